"""A clean ``embedtune train`` (short recipe), ``eval``, ``export`` and ``demo`` print no library warnings.

The four commands run in a fresh interpreter with every Python warning turned on (``always``) and a
handler on the ``transformers``/``torch``/``peft`` loggers, so a warning that this process already
showed once, or that pytest's filters would hide, still counts. Any warning that is not on
``ALLOWED`` below fails the test with where it came from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# (category, text in the message, why it is allowed). Keep this list short and say why for each entry.
ALLOWED: list[tuple[str, str, str]] = []

SCRIPT = r"""
import json, logging, sys, warnings
from pathlib import Path

warnings.simplefilter("always")
seen = []
warnings.showwarning = lambda m, c, f, l, file=None, line=None: seen.append(
    {"kind": c.__name__, "message": str(m)[:300], "where": f"{f}:{l}", "command": current[0]}
)


class Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            seen.append({"kind": "log:" + record.name, "message": record.getMessage()[:300],
                         "where": f"{record.pathname}:{record.lineno}", "command": current[0]})


for name in ("", "transformers", "torch", "peft", "sentence_transformers", "onnxruntime"):
    logging.getLogger(name).addHandler(Collect())

current = ["setup"]
from embedtune.cli import main
from embedtune.models import AutoBiEncoder

AutoBiEncoder.from_pretrained("tiny-llama").save_pretrained("base")
rows = [{"query": f"question {i} alpha", "pos_doc": f"answer {i} alpha words", "neg_doc": [f"other {i}"]}
        for i in range(16)]
Path("pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
recipe = {
    "model": {"name_or_path": "base", "gradient_checkpointing": True},
    "data": {"datasets": [{"path": "pairs.jsonl"}], "n_passages": 2},
    "peft": {"r": 4, "match_all_linear": True},
    "bf16": True,
    "step_scheduler": {"global_batch_size": 8, "max_steps": 3},
    "lr_scheduler": {"warmup_steps": 1},
    "validation": {"data": "pairs.jsonl", "every_n_steps": 2},
    "logging": {"progress_bar": True, "tensorboard": False, "plot": True},
    "output_dir": "run",
    "num_threads": 1,
}
Path("recipe.yaml").write_text(json.dumps(recipe))
codes = {}
for argv in (
    ["train", "recipe.yaml"],
    ["eval", "--model", "run/model", "--data", "pairs.jsonl", "--no-cache"],
    ["export", "onnx", "--model", "run/model", "--output", "onnx", "--no-eval"],
    # `make demo`'s command on a tiny model: measuring, planning, before/after evaluation, LoRA merge.
    ["demo", "model.name_or_path=tiny-llama", "output_dir=demo", "step_scheduler.max_steps=2",
     "step_scheduler.global_batch_size=4", "data.p_max_len=32", "validation.max_queries=6",
     "validation.max_corpus=30", "num_threads=1"],
):
    current[0] = argv[0]
    codes[argv[0]] = main(argv)
print("@@" + json.dumps({"codes": codes, "warnings": seen}))
"""


@pytest.mark.slow  # ~90 s: four commands on a tiny model in a fresh interpreter
def test_train_eval_export_demo_print_no_library_warnings(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": ""}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("@@")]
    assert lines, out.stderr[-3000:]
    result = json.loads(lines[-1][2:])
    assert result["codes"] == {"train": 0, "eval": 0, "export": 0, "demo": 0}, out.stderr[-3000:]
    unexpected = [
        w
        for w in result["warnings"]
        if not any(w["kind"] == kind and text in w["message"] for kind, text, _ in ALLOWED)
    ]
    assert unexpected == [], "\n".join(
        f"{w['command']}: {w['kind']}: {w['message']} ({w['where']})" for w in unexpected
    )
