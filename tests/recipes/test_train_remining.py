"""Re-mining during training and the per-step diagnostics, through ``embedtune train``."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from _train_helpers import cli_env, final_weights, losses, tiny_recipe, train_cmd, write_recipe

from embedtune.data.formats import read_training_file

# 40 examples / batch 8 = 5 steps an epoch; refreshes after steps 3 and 6; checkpoints every 2 steps.
MINING = {"refresh_every_steps": 3, "num_negatives": 3, "range_start": 0, "range_end": 20, "margin": 0.95}
SECTIONS = {"model": {"name_or_path": "tiny-bert"}, "mining": MINING}


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for_step(run_dir, proc, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.stderr.read()}")
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for training progress")


@pytest.mark.slow
def test_sigkill_and_resume_across_a_refresh_equals_the_uninterrupted_run(tmp_path):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    recipe = tiny_recipe(ref_dir, **SECTIONS)
    subprocess.run(
        train_cmd(write_recipe(ref_dir / "r.yaml", recipe)),
        check=True,
        env=cli_env(),
        capture_output=True,
        timeout=600,
    )
    ref = ref_dir / "run"
    mined = sorted(p.name for p in (ref / "mined").glob("*.npz"))
    assert mined == ["step_00000003.npz", "step_00000006.npz"]
    recs = _records(ref)
    changed = [r["mining/examples_changed"] for r in recs if "mining/examples_changed" in r]
    assert len(changed) == 2 and changed[0] > 0, "re-mining with the model changed no negatives"
    # The re-mined sets are the data's examples with other negatives, never a positive.
    data = read_training_file(ref_dir / "train.jsonl")
    with np.load(ref / "mined" / mined[0]) as z:
        offsets, rows = z["offsets_0"], z["rows_0"]
    assert len(offsets) == len(data) + 1
    for i in range(len(data)):
        negs = rows[offsets[i] : offsets[i + 1]]
        assert len(negs) >= 2 and not set(negs.tolist()) & set(data.positives(i).tolist())
    # Diagnostics at step 0 and on logged steps.
    assert any(r["step"] == 0 and "diag/positive_score" in r for r in recs)
    assert all("diag/zero_loss_share" in r for r in recs if "loss" in r)

    work = tmp_path / "killed"
    work.mkdir()
    recipe_path = write_recipe(work / "r.yaml", tiny_recipe(work, **SECTIONS))
    run_dir = work / "run"
    proc = subprocess.Popen(
        train_cmd(recipe_path), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(run_dir, proc, 5)  # past the refresh at 3; the latest checkpoint is step 4
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert max(losses(run_dir)) < 8, "the run finished before it could be killed"
    resumed = subprocess.run(
        train_cmd(recipe_path, "checkpoint.resume=latest"),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    got, want = losses(run_dir), losses(ref)
    assert sorted(got) == list(range(1, 9)) and got == want  # bitwise
    a, b = final_weights(run_dir / "model"), final_weights(ref / "model")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in mined:
        with np.load(ref / "mined" / name) as x, np.load(run_dir / "mined" / name) as y:
            assert np.array_equal(x["rows_0"], y["rows_0"])


def test_mining_block_is_validated_and_needs_hard_negatives(tmp_path):
    from embedtune.errors import ConfigError
    from embedtune.training.config import MiningConfig

    with pytest.raises(ConfigError, match="refresh_every_steps"):
        MiningConfig(refresh_every_steps=0)
    recipe = tiny_recipe(tmp_path, model={"name_or_path": "tiny-bert"}, mining=MINING, data={"n_passages": 1})
    proc = subprocess.run(
        train_cmd(write_recipe(tmp_path / "r.yaml", recipe)),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "n_passages is 1" in proc.stderr and "Traceback" not in proc.stderr
