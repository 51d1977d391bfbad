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
