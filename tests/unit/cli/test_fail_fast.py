"""Every argument error of every command answers at once: before torch, transformers or a model load.

Each case runs ``embedtune ...`` in a fresh interpreter that reports, after ``main`` returns, how long
``main`` took and which heavy modules it imported (``sys.modules``). Issue #14: an argument error
must come back within 2 s, with one clear line naming the option and the fix, and without torch.
The 2 s are CPU seconds of the process (imports included): wall time on a shared 2-core machine can
triple under load, so it is only bounded loosely (10 s); the ``sys.modules`` check is the strict part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "transformers", "sentence_transformers", "onnxruntime", "onnx", "peft")
LIMIT_S = 2.0  # CPU seconds in main (imports included)
WALL_LIMIT_S = 10.0

PROBE = """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from embedtune.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:  # --help and argparse's own errors
    rc = exc.code
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
heavy = [m for m in HEAVY if m in sys.modules]
print("@@" + json.dumps({"rc": rc, "s": cpu, "wall": wall, "heavy": heavy}), file=sys.stderr)
"""


def run_cli(args: list[str], cwd: Path) -> tuple[int, float, list[str], str]:
    """(exit code, seconds in main, heavy modules imported, stderr without the probe's line)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "EMBEDTUNE_DEBUG": ""}
    env["EMBEDTUNE_MODEL_CACHE"] = str(cwd / "model-cache")  # nothing pre-built: the checks must not care
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    lines = out.stderr.splitlines()
    probe = [json.loads(line[2:]) for line in lines if line.startswith("@@")]
    assert probe, f"main did not return: {out.stderr[-2000:]}"
    rest = "\n".join(line for line in lines if not line.startswith("@@"))
    assert probe[0]["wall"] < WALL_LIMIT_S, f"{args}: {probe[0]['wall']:.1f}s of wall time"
    return probe[0]["rc"], probe[0]["s"], probe[0]["heavy"], rest + out.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a small valid recipe, a data file, a corpus and a run that holds checkpoints."""
    d = tmp_path_factory.mktemp("failfast")
    (d / "train.jsonl").write_text(json.dumps({"query": "q", "pos_doc": "p", "neg_doc": ["n"]}) + "\n")
    (d / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "text": "a document"}) + "\n")
    (d / "texts.txt").write_text("hello\n")
    recipe = {
        "model": {"name_or_path": "tiny-bert"},
        "data": {"datasets": [{"path": "train.jsonl"}]},
        "output_dir": "runs/fresh",
    }
    (d / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    # The other tasks share the one schema, so their recipe errors are found as early.
    (d / "rerank.yaml").write_text(json.dumps({**recipe, "recipe": "rerank", "cross_encodr": {}}))
    (d / "distill.yaml").write_text(json.dumps({**recipe, "distill": {"weigth": 1.0}}))
    ckpt = d / "runs" / "old" / "checkpoints" / "step_4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (d / "a_file").write_text("not a folder")
    return d


# (command line, exit code, text the error must contain)
CASES: list[tuple[list[str], int, str]] = [
    # train / validate: recipe names, config keys, overrides, model names, data paths, output folder
    (["train", "nope_recipe"], 2, "no such recipe file, nor a shipped recipe"),
    (["train", "rerank.yaml"], 2, "cross_encodr"),
    (["train", "distill.yaml"], 2, "weigth"),
    (["validate", "distill.yaml"], 2, "weigth"),
    (["demo", "--recipe", "minilm_dem"], 2, "did you mean 'minilm_demo'?"),
    (["demo", "--budget-minutes", "0"], 2, "--budget-minutes 0: must be > 0"),
    (["demo", "optimizer.lrr=1"], 2, "override 'optimizer.lrr=1' (command line)"),
    (["train", "minilm_dem"], 2, "did you mean 'minilm_demo'?"),
    (["train", "recipe.yaml", "optimizer.lrr=1"], 2, "override 'optimizer.lrr=1' (command line)"),
    (["train", "recipe.yaml", "optimizer.lrr=1"], 2, "did you mean 'lr'?"),
    (["train", "recipe.yaml", "model.name_or_path=minlm"], 2, "did you mean 'minilm'?"),
    (["train", "recipe.yaml", "data.datasets[0].path=nope.jsonl"], 2, "nope.jsonl: no such file"),
    (["train", "recipe.yaml", "output_dir=runs/old"], 2, "already holds checkpoints"),
    (["train", "recipe.yaml", "output_dir=a_file/run"], 2, "a_file is a file"),
    (["train", "recipe.yaml", "--nproc-per-node", "0"], 2, "--nproc-per-node 0: must be >= 1"),
    (["train", "recipe.yaml", "--nnodes", "2"], 2, "--rdzv-endpoint"),
    (["validate", "minilm_dem"], 2, "did you mean 'minilm_demo'?"),
    (["validate", "recipe.yaml", "loss.temprature=0.1"], 2, "did you mean 'temperature'?"),
    # data validation: a missing file is reported as that path's problem (exit 1), at once
    (["validate-data", "nope.jsonl"], 1, "nope.jsonl: path: does not exist"),
    (["validate-data", "train.jsonl", "--tokenizer", "minlm"], 2, "did you mean 'minilm'?"),
    (["validate-data", "nope.yaml"], 2, "nope.yaml: no such file"),
    # eval / search / encode / mine / export / info / rerank / cp
    (["eval", "--model", "minilm", "--data", "nope"], 2, "--data nope: no such file or folder"),
    (["eval", "--model", "minlm", "--data", "corpus.jsonl"], 2, "did you mean 'minilm'?"),
    (
        ["eval", "--model", "runs/old/model", "--data", "corpus.jsonl"],
        2,
        "--model runs/old/model: no such folder",
    ),
    (["eval", "--model", "gpt-nope", "--data", "corpus.jsonl"], 2, "HF_HUB_OFFLINE=1"),
    (["eval", "--model", "minilm", "--data", "corpus.jsonl", "--k", "0"], 2, "--k: cut-offs must be >= 1"),
    (
        ["eval", "--model", "minilm", "--data", "corpus.jsonl", "--output", "a_file/m.json"],
        2,
        "a_file is a file",
    ),
    (["search", "  ", "--model", "minilm", "--corpus", "corpus.jsonl"], 2, "QUERY: give a non-empty query"),
    (["search", "q", "--model", "minilm", "--corpus", "nope.jsonl"], 2, "--corpus nope.jsonl: no such"),
    (["search", "q", "--model", "minlm", "--corpus", "corpus.jsonl"], 2, "did you mean 'minilm'?"),
    (
        ["encode", "--model", "minilm", "--input", "nope.txt", "--output", "o.npy"],
        2,
        "--input nope.txt: no such file",
    ),
    (["encode", "--model", "minilm", "--input", "texts.txt", "--output", "o.csv"], 2, "must end in .npy"),
    (
        ["encode", "--model", "minlm", "--input", "texts.txt", "--output", "o.npy"],
        2,
        "did you mean 'minilm'?",
    ),
    (
        ["mine", "--model", "minilm", "--data", "nope.jsonl", "--output", "o.json"],
        2,
        "--data nope.jsonl: no such",
    ),
    (
        ["mine", "--model", "minilm", "--data", "train.jsonl", "--output", "o.txt"],
        2,
        "must end in .json or .jsonl",
    ),
    (
        ["mine", "--model", "minilm", "--data", "train.jsonl", "--output", "o.json", "--range", "9:3"],
        2,
        "--range",
    ),
    (["export", "onnx", "--model", "minlm", "--output", "out"], 2, "did you mean 'minilm'?"),
    (["export", "onnx", "--model", "minilm", "--output", "a_file"], 2, "--output a_file: is a file"),
    (["info", "minlm"], 2, "did you mean 'minilm'?"),
    (["rerank", "eval", "--reranker", "minilm", "--retriever", "minilm", "--data", "nope"], 2, "--data nope"),
    (
        ["rerank", "score", "--reranker", "minilm", "--query", " ", "--passage", "p"],
        2,
        "--query: give a non-empty",
    ),
    (["cp", "minilm_dem", "x.yaml"], 2, "did you mean 'minilm_demo'?"),
]


@pytest.mark.parametrize(("argv", "code", "text"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_argument_errors_answer_at_once_without_torch(
    workdir: Path, argv: list[str], code: int, text: str
) -> None:
    rc, seconds, heavy, out = run_cli(argv, workdir)
    assert rc == code, out
    assert text in out
    assert "Traceback" not in out
    assert heavy == [], f"{argv} imported {heavy} before failing"
    assert seconds < LIMIT_S, f"{argv} took {seconds:.2f}s"
    error_lines = [line for line in out.splitlines() if "error:" in line]
    assert len(error_lines) <= 1, out  # one clear line, not a cascade


def test_help_of_every_command_answers_at_once_without_torch(workdir: Path) -> None:
    # Includes commands added later by other modules: they are discovered, so they are checked too.
    from embedtune.cli import discover_commands

    for name in ["", *discover_commands()]:
        rc, seconds, heavy, out = run_cli([name, "--help"] if name else ["--help"], workdir)
        assert rc == 0, out
        assert heavy == [], f"`embedtune {name} --help` imported {heavy}"
        assert seconds < LIMIT_S, f"`embedtune {name} --help` took {seconds:.2f}s"


def test_a_valid_recipe_passes_the_checks(workdir: Path) -> None:
    # The checks must not reject what training accepts: `train`'s check on the fixture's recipe passes.
    import argparse

    from embedtune.commands import train

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        args = argparse.Namespace(
            recipe="recipe.yaml",
            overrides=[],
            nproc_per_node=None,
            nnodes="1",
            rdzv_endpoint=None,
            max_restarts=0,
            shutdown_timeout=600,
        )
        train.check(args)
        args.overrides = ["output_dir=runs/old", "checkpoint.resume=latest"]  # resuming is allowed
        train.check(args)
    finally:
        os.chdir(cwd)
