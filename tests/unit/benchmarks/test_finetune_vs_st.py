"""benchmarks/finetune_vs_st.py: the reduced SciFact folder it builds, and its clean skip without SciFact."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "benchmarks" / "finetune_vs_st.py"


def _module():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("finetune_vs_st", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": f"doc {i}"} for i in range(50)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(20)]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    train = "".join(f"q{i}\td{i}\t1\n" for i in range(10))
    test = "".join(f"q{i}\td{i}\t1\nq{i}\td{i + 20}\t1\n" for i in range(10, 20))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + train)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + test)
    return folder


def test_subset_keeps_every_judged_document(tmp_path: Path) -> None:
    mod = _module()
    out = mod.write_subset(_beir(tmp_path / "full"), tmp_path / "sub", 4, 20, max_test_queries=3)
    docs = {json.loads(line)["_id"] for line in (out / "corpus.jsonl").open()}
    train = [line.split("\t") for line in (out / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    test = [line.split("\t") for line in (out / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    assert len(train) == 4 and len({r[0] for r in test}) == 3 and len(test) == 6
    assert {r[1] for r in train + test} <= docs and len(docs) == 20
    queries = {json.loads(line)["_id"] for line in (out / "queries.jsonl").open()}
    assert queries == {r[0] for r in train + test}


def test_skips_cleanly_without_scifact(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "skipped: no SciFact" in proc.stdout


def test_mini_pairs_are_one_per_positive_of_the_bundled_train_split() -> None:
    mod = _module()
    train = REPO / "data" / "scifact-mini" / "train.json"
    raw = json.loads(train.read_text())
    docs = {
        json.loads(line)["id"]: json.loads(line)["text"]
        for line in (train.parent / "train_corpus" / "docs.jsonl").open()
    }
    expected = [(row["question"], docs[p["id"]]) for row in raw["data"] for p in row["pos_doc"]]
    pairs = mod.mini_pairs(train)
    assert len({q for q, _ in pairs}) == 537 and sorted(pairs) == sorted(expected)
