"""``embedtune train`` over damaged checkpoints and a changed recipe, end to end (one process)."""

from __future__ import annotations

import subprocess

import pytest
from _train_helpers import cli_env, losses, tiny_recipe, train_cmd, write_recipe


def _train(recipe_path, *overrides):
    return subprocess.run(
        train_cmd(recipe_path, *overrides), env=cli_env(), capture_output=True, text=True, timeout=400
    )


@pytest.mark.slow  # four short training runs
def test_resume_skips_a_truncated_newest_checkpoint_and_refuses_a_changed_recipe_by_name(tmp_path):
    recipe = tiny_recipe(tmp_path, step_scheduler={"max_steps": 4, "ckpt_every_steps": 2})
    recipe["checkpoint"] = {"keep_last": 3}
    recipe_path = write_recipe(tmp_path / "r.yaml", recipe)
    first = _train(recipe_path)
    assert first.returncode == 0, first.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    damaged = ckpts / "step_00000004" / "state" / "__0_0.distcp"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated, as by a crash of the storage

    # resume=latest: a warning naming the file, then training continues from step 2 (and re-saves 4).
    resumed = _train(recipe_path, "checkpoint.resume=latest", "step_scheduler.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{damaged}: truncated" in resumed.stderr and "resuming from step_00000002" in resumed.stderr
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    assert max(losses(tmp_path / "run")) == 6

    # A changed learning rate: refused, naming the key, with the override to use.
    changed = _train(
        recipe_path, "checkpoint.resume=latest", "step_scheduler.max_steps=8", "optimizer.lr=0.0005"
    )
    assert changed.returncode != 0
    assert "optimizer.lr: 0.001 -> 0.0005" in changed.stderr and "allow_config_change" in changed.stderr
    assert "Traceback" not in changed.stderr
    allowed = _train(
        recipe_path,
        "checkpoint.resume=latest",
        "step_scheduler.max_steps=8",
        "optimizer.lr=0.0005",
        "checkpoint.allow_config_change=true",
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "optimizer.lr: 0.001 -> 0.0005" in allowed.stderr  # said, not silent
    assert max(losses(tmp_path / "run")) == 8
