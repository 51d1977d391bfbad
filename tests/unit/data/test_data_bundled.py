"""The bundled scifact-mini data set: loads cleanly, no test leakage, rebuilds byte for byte."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

from embedtune.data.formats import load_beir, read_training_file

ROOT = Path(__file__).resolve().parents[3]
MINI = ROOT / "data" / "scifact-mini"


@pytest.fixture(scope="module")
def mini() -> Path:
    if not (MINI / "train.json").is_file():
        pytest.skip("data/scifact-mini is not in this checkout")
    return MINI


def test_small_enough_to_ship(mini: Path) -> None:
    size = sum(p.stat().st_size for p in mini.rglob("*") if p.is_file())
    assert size <= 15 * 2**20
    assert "CC BY-NC 2.0" in (ROOT / "data" / "README.md").read_text()


def test_loads_and_has_no_test_leakage(mini: Path) -> None:
    train = read_training_file(mini / "train.json")
    test = load_beir(mini / "test", "test")
    assert len(train) > 400 and len(test.queries) >= 200 and len(test.corpus) <= 1500
    assert (train.negative_counts() >= 1).all()
    test_docs = set(test.corpus.ids)
    assert not test_docs & set(train.corpus.ids)  # no test-corpus document is trained on
    assert not {q.strip().lower() for q in test.queries.values()} & {q.strip().lower() for q in train.queries}
    relevant = {d for judged in test.qrels.values() for d, s in judged.items() if s > 0}
    assert relevant <= test_docs  # every test answer is in the test corpus


def test_checksums_match(mini: Path) -> None:
    for line in (mini / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((mini / name).read_bytes()).hexdigest() == digest, name


def test_rebuild_from_beir_is_identical(mini: Path, shared_scifact: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "build_scifact_mini", ROOT / "data" / "build_scifact_mini.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(shared_scifact, tmp_path / "out")
    assert (tmp_path / "out" / "SHA256SUMS").read_text() == (mini / "SHA256SUMS").read_text()
