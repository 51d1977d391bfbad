"""Checking a recipe and listing the short model names must not import torch or transformers.

These run in a fresh interpreter (this test process has long imported torch) and read ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "transformers", "pyarrow", "numpy", "sentence_transformers", "onnxruntime")


def heavy_modules_after(code: str) -> list[str]:
    """The heavy modules that ``code`` imports in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_every_shipped_recipe_imports_nothing_heavy() -> None:
    code = (
        "from embedtune.recipes import list_recipes\n"
        "from embedtune.training.config import load_train_config\n"
        "for name in list_recipes():\n"
        "    load_train_config(name)\n"
    )
    assert heavy_modules_after(code) == []


def test_model_short_names_and_data_config_import_nothing_heavy() -> None:
    code = "from embedtune.models import zoo\nassert 'minilm' in zoo.ZOO\nimport embedtune.data.config\n"
    assert heavy_modules_after(code) == []


def test_every_declared_training_name_has_an_implementation() -> None:
    # Recipes are checked against names declared in embedtune.config (no torch); the implementations
    # register themselves when embedtune.training.loss/optim are imported. The two lists must agree.
    from embedtune.config import LOSSES, OPTIMIZERS, SCHEDULERS

    for registry in (LOSSES, OPTIMIZERS, SCHEDULERS):
        for name in registry.names():
            assert registry.get(name) is not None, f"{registry.kind} {name!r} is declared but not implemented"


def test_moved_config_blocks_are_still_importable_from_their_old_modules() -> None:
    from embedtune.training import config, distributed, loss, optim

    assert loss.LossConfig is config.LossConfig
    assert optim.OptimizerConfig is config.OptimizerConfig
    assert optim.LRSchedulerConfig is config.LRSchedulerConfig
    assert distributed.DistributedConfig is config.DistributedConfig
