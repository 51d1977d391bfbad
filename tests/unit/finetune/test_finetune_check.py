"""`embedtune finetune` argument errors answer before torch is imported, naming the option."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# The fail-fast probe of the CLI tests: a fresh interpreter reports the exit code and heavy imports.
_spec = importlib.util.spec_from_file_location(
    "_fail_fast", Path(__file__).resolve().parents[1] / "cli" / "test_fail_fast.py"
)
_fail_fast = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fail_fast)
run_cli = _fail_fast.run_cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("finetune_check")
    (d / "train.jsonl").write_text(json.dumps({"query": "q", "pos_doc": "p"}) + "\n")
    (d / "afile").write_text("x")
    return d


@pytest.mark.parametrize(
    "argv,text",
    [
        (["--model", "tiny-bert", "--data", "nope.jsonl", "--output", "o"], "--data nope.jsonl: no such"),
        (["--model", "tiny-bert", "--data", "train.jsonl", "--eval", "nope", "--output", "o"], "--eval nope"),
        (["--model", "tiny-bert", "--data", "train.jsonl", "--output", "afile"], "--output afile: is a file"),
        (["--model", "minlm", "--data", "train.jsonl", "--output", "o"], "did you mean 'minilm'"),
        (
            ["--model", "tiny-bert", "--data", "train.jsonl", "--output", "o", "--heldout-fraction", "1.5"],
            "--heldout-fraction",
        ),
        (["--model", "tiny-bert", "--data", "train.jsonl", "--output", "o", "--set", "lr"], "KEY.PATH=VALUE"),
    ],
)
def test_argument_errors_fail_fast(workdir: Path, argv: list[str], text: str) -> None:
    rc, _, heavy, out = run_cli(["finetune", *argv], workdir)
    assert rc != 0 and text in out, out
    assert "Traceback" not in out
    assert heavy == [], f"imported {heavy} before failing"
