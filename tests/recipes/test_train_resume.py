"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM) and resumed equals an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from _train_helpers import cli_env, final_weights, losses, task_sections, tiny_recipe, train_cmd, write_recipe

# 40 examples / global batch 8 = 5 steps per epoch: max_steps 8 crosses the epoch boundary after step 5,
# and the resumed part (from the checkpoint at step 4) runs across it.
CASES = {
    # tiny BERT has hidden/attention dropout 0.1: full fine-tuning with dropout on.
    "bert-full": {"model": {"name_or_path": "tiny-bert"}},
    # tiny Llama with LoRA dropout 0.1: adapter-only checkpoints.
    "llama-lora": {"peft": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}},
    # The other tasks of the one loop: distillation from a cross-encoder, and the cross-encoder itself.
    "distill": "distill",
    "rerank": "rerank",
}


def _sections(case: str, tmp) -> dict:
    spec = CASES[case]
    return task_sections(spec, tmp, backbone="tiny-bert") if isinstance(spec, str) else spec


def _wait_for_step(run_dir, proc, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.stderr.read()}")
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for training progress")


def _uninterrupted(tmp_path, case):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    recipe = tiny_recipe(ref_dir, **_sections(case, tmp_path))
    subprocess.run(
        train_cmd(write_recipe(ref_dir / "r.yaml", recipe)),
        check=True,
        env=cli_env(),
        capture_output=True,
        timeout=300,
    )
    return ref_dir / "run"


def _assert_same_run(run_dir, ref_dir):
    got, want = losses(run_dir), losses(ref_dir)
    assert sorted(got) == list(range(1, 9))
    assert got == want  # bitwise: floats compared exactly
    a, b = final_weights(run_dir / "model"), final_weights(ref_dir / "model")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "case",
    [c if isinstance(CASES[c], dict) else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)],
)
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, case):
    ref = _uninterrupted(tmp_path, case)

    work = tmp_path / "killed"
    work.mkdir()
    recipe_path = write_recipe(work / "r.yaml", tiny_recipe(work, **_sections(case, tmp_path)))
    run_dir = work / "run"
    # ckpt_every_steps=1 for this run would change nothing but checkpoint timing; keep 2 like the reference.
    proc = subprocess.Popen(
        train_cmd(recipe_path), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(run_dir, proc, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done_before = max(losses(run_dir))
    assert done_before < 8, "the run finished before it could be killed"
    assert (run_dir / "checkpoints" / "latest").read_text().startswith("step_")

    resumed = subprocess.run(
        train_cmd(recipe_path, "checkpoint.resume=latest"),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    _assert_same_run(run_dir, ref)


def test_sigterm_saves_exits_143_and_resumes_identically(tmp_path):
    case = "llama-lora"
    ref = _uninterrupted(tmp_path, case)
    work = tmp_path / "term"
    work.mkdir()
    recipe = tiny_recipe(work, **_sections(case, tmp_path))
    recipe["step_scheduler"]["ckpt_every_steps"] = 100  # only the signal makes a mid-run checkpoint
    recipe_path = write_recipe(work / "r.yaml", recipe)
    run_dir = work / "run"
    proc = subprocess.Popen(
        train_cmd(recipe_path), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(run_dir, proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    stopped_at = max(losses(run_dir))
    assert stopped_at < 8
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest == f"step_{stopped_at:08d}"  # the step in flight was finished and saved
    assert "resume=latest" in err

    resumed = subprocess.run(
        train_cmd(recipe_path, "checkpoint.resume=latest"),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(run_dir, ref)
