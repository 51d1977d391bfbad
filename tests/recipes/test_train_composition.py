"""Tasks × parallelism compose, through the shipped recipe path (``python -m embedtune.train``).

* 2 gloo ranks == 1 process for distillation and for the reranker (the bi-encoder's own cases, with
  GradCache and with accumulation, are in ``tests/unit/distributed/test_recipe_distributed.py``): same
  per-step losses and final weights up to float32 reduction order.
* FSDP2 == DDP with gradient clipping *active*: the threshold is far below the actual gradient norm
  (asserted from the logged pre-clip norms), so every step is clipped, by the global norm over shards.

Slow: every run starts torch + transformers in 1-3 processes on shared CPUs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import cli_env, final_weights, losses, task_sections, tiny_recipe, write_recipe

from embedtune.training.monitor import read_metrics

pytestmark = pytest.mark.slow

STEPS = {"max_steps": 3, "ckpt_every_steps": None}


def _recipe(tmp: Path, name: str, **sections) -> Path:
    r = tiny_recipe(tmp / name, **sections)
    r["step_scheduler"] = {**r["step_scheduler"], **STEPS, **sections.get("step_scheduler", {})}
    r["logging"] = {"progress_bar": False, "plot": False, "tensorboard": False}
    return write_recipe(tmp / name / "recipe.yaml", r)


def _train(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "embedtune.train", str(recipe), *extra],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def _assert_close_runs(a_dir: Path, b_dir: Path, tol: float = 1e-4) -> None:
    a, b = losses(a_dir), losses(b_dir)
    assert list(a) == list(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) <= tol for s in a), (a, b)
    wa, wb = final_weights(a_dir / "model"), final_weights(b_dir / "model")
    assert wa.keys() == wb.keys() and wa
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < tol, worst


@pytest.mark.parametrize("task", ["distill", "rerank"])
def test_two_ranks_train_like_one_process(tmp_path, task):
    """One process with micro-batches of 4 == 2 ranks × 2 queries (cross-rank negatives for the bi-encoder)."""
    sections = task_sections(task, tmp_path)
    one = _recipe(tmp_path, "one", **sections, step_scheduler={"local_batch_size": 4})
    two = _recipe(tmp_path, "two", **sections, step_scheduler={"local_batch_size": 2})
    _train(one)
    r2 = _train(two, "--nproc-per-node", "2")
    assert "2 ranks (gloo, ddp)" in r2.stdout
    _assert_close_runs(tmp_path / "one" / "run", tmp_path / "two" / "run")


def test_fsdp2_equals_ddp_with_clipping_active(tmp_path):
    clip = 1e-3
    sections = {"max_grad_norm": clip, "optimizer": {"lr": 1e-2}}
    ddp = _recipe(tmp_path, "ddp", **sections, distributed={"strategy": "ddp"})
    fsdp = _recipe(tmp_path, "fsdp", **sections, distributed={"strategy": "fsdp2"})
    _train(ddp, "--nproc-per-node", "2")
    r = _train(fsdp, "--nproc-per-node", "2")
    assert "2 ranks (gloo, fsdp2)" in r.stdout
    for name in ("ddp", "fsdp"):
        norms = [
            m["grad_norm"]
            for m in read_metrics(tmp_path / name / "run" / "metrics.jsonl")
            if "grad_norm" in m
        ]
        assert len(norms) == 3 and min(norms) > 10 * clip, norms  # every step was clipped
    _assert_close_runs(tmp_path / "ddp" / "run", tmp_path / "fsdp" / "run", tol=1e-5)


def _two_ranks(recipe: Path, log_dir: Path, *extra: str) -> list[subprocess.Popen]:
    """The two ranks as plain processes (torchrun's environment), so that the test can SIGKILL them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(2):
        env = {**cli_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        log = open(log_dir / f"rank{rank}.log", "ab")  # noqa: SIM115
        cmd = [sys.executable, "-m", "embedtune.train", str(recipe), *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("task", ["biencoder", "distill", "rerank"])
def test_two_ranks_sigkill_then_resume_is_bitwise_identical(tmp_path, task):
    import signal
    import time

    import torch

    steps = {"local_batch_size": 2, "max_steps": 6, "ckpt_every_steps": 2}
    sections = task_sections(task, tmp_path)
    ref = _recipe(tmp_path, "ref", **sections, step_scheduler=steps)
    run = _recipe(tmp_path, "run", **sections, step_scheduler=steps)
    assert _wait(_two_ranks(ref, tmp_path / "ref")) == [0, 0]

    procs = _two_ranks(run, tmp_path / "run")
    run_dir = tmp_path / "run" / "run"
    deadline = time.monotonic() + 600
    while not (run_dir / "metrics.jsonl").is_file() or max(losses(run_dir), default=0) < 3:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    assert _wait(procs) == [-signal.SIGKILL] * 2
    assert max(losses(run_dir)) < 6, "the run finished before it could be killed"

    assert _wait(_two_ranks(run, tmp_path / "run", "checkpoint.resume=latest")) == [0, 0]
    assert losses(run_dir) == losses(tmp_path / "ref" / "run")  # floats compared exactly
    want, got = final_weights(tmp_path / "ref" / "run" / "model"), final_weights(run_dir / "model")
    assert want.keys() == got.keys() and want
    assert all(torch.equal(want[k], got[k]) for k in want)
