"""benchmarks/gpu_check.py: its arithmetic, its collective recorder, its no-CUDA exit and a CPU dry run.

The check itself needs a GPU; what can be verified here is that every stage's logic runs end to end on
a tiny model (``--dry-run``), that the numbers it reports are computed right, and that the recorder
that looks for CPU tensors handed to NCCL does flag them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


gc = _module()


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_bf16_peak_from_the_device_name(name, peak):
    assert gc.bf16_peak_tflops(name) == peak


def test_model_flops_and_mfu_by_hand():
    # Llama-3.2-1B: 1,235,814,400 parameters, 262,668,288 of them the embedding table.
    n = 1_235_814_400 - 128_256 * 2048
    fpt = gc.train_flops_per_token(n, 16, 32 * 64, 512)
    assert fpt == 6 * 973_146_112 + 12 * 16 * 2048 * 512
    # 100k tokens/s on a 989 TFLOP/s GPU:
    assert gc.mfu(100_000, fpt, 989.0) == pytest.approx(100_000 * fpt / 989e12)
    assert gc.mfu(100_000, fpt, None) is None


def test_llama_1b_shape_matches_the_published_parameter_count():
    from transformers import LlamaConfig, LlamaModel

    with torch.device("meta"):
        model = LlamaModel(LlamaConfig(**gc.LLAMA_1B))
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400


def test_the_recorder_flags_cpu_tensors_handed_to_a_cuda_backend():
    import torch.distributed as dist

    # Pretend gloo wants CUDA tensors, as NCCL does: a CPU tensor must then be flagged.
    rec = gc.CollectiveRecorder(expected={"gloo": "cuda"}).install()
    try:
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            dist.all_reduce(torch.ones(3))
            out = [torch.zeros(2, dtype=torch.long)]
            dist.all_gather(out, torch.arange(2))
        finally:
            dist.destroy_process_group()
    finally:
        rec.uninstall()
    s = rec.summary()
    assert s["backend"] == "gloo"
    assert s["collectives"]["all_reduce"] == {"cpu": 1} and s["collectives"]["all_gather"] == {"cpu": 2}
    assert len(s["wrong_device"]) == 3 and "all_reduce: (3,)" in s["wrong_device"][0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only exit")
def test_without_cuda_it_stops_at_once_with_a_clear_message(tmp_path):
    out = tmp_path / "report.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=env, check=False
    )
    assert res.returncode == 2
    assert "no CUDA device" in res.stderr and "--dry-run" in res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "report.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    text = out.read_text()
    for stage in ("environment", "cuda-tests", "bidirectional", "train-1b"):
        assert f"== {stage}: PASS" in text, res.stdout[-3000:]
    assert "tokens/step" in text and "losses:" in text
    assert text.count("-> ok") == 4  # llama, qwen2, mistral, gemma3 all bidirectional without a window
    # World size 1 through torchrun: either the recipe created the gloo group and every collective
    # took CPU tensors, or the report says plainly that the single-process path ran instead.
    assert "== nccl-ws1: PASS" in text or "no gloo process group at world size 1" in text
    assert res.returncode == (0 if "== nccl-ws1: PASS" in text else 1)
