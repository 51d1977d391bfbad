"""The GPU check: what no CPU test can show, in one command, in ≤ 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py              # on a CUDA machine; no downloads
    python benchmarks/gpu_check.py --dry-run    # the same stages on a tiny model on the CPU (tests run this)

Stages (each PASS / FAIL / SKIP with its numbers; a failing stage does not stop the others):

1. ``environment``  GPU, CUDA, torch, transformers, flash-attn, CPU model and flags, the GPU's bf16 peak.
2. ``cuda-tests``   ``pytest -m cuda``: GradCache dropout replay on the GPU and every other CUDA-marked test
                    (``--dry-run``: only checks that the marker selects tests).
3. ``bidirectional`` tiny random Llama / Qwen2 / Mistral / Gemma 3 with a sliding window of 2 in the
                    config, converted by ``make_bidirectional`` and run under the fastest attention
                    installed (``flash_attention_2`` when ``flash_attn`` imports, else ``sdpa``) in bf16:
                    no attention module keeps a window, a far token reaches the first one, and
                    ``verify_bidirectional`` (padded batches too) passes.
4. ``train-1b``     a random model of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads,
                    vocab 128,256), bidirectional, trained a few steps by ``embedtune train llama3_2_1b``
                    (the shipped recipe and its precision: fp32 weights, bf16 autocast, gradient
                    checkpointing) on full-length synthetic text: tokens/s, MFU against the GPU's bf16
                    dense peak, peak memory.
5. ``nccl-ws1``     ``torchrun --nproc-per-node 1`` through the real rank entry point (``embedtune.train``)
                    with in-batch + cross-device negatives and false-negative masking on NCCL: which
                    process group was created and the device of every tensor handed to a collective.

Stages share a time budget (``--budget-minutes``, default 8): subprocess timeouts and the recipe's own
``max_time_minutes`` are taken from what is left. The report is printed and written to ``benchmarks/results/gpu_check_<date>.txt`` as it goes (a stage
that runs out of time still leaves the earlier ones). Without CUDA (and without ``--dry-run``) the
script stops at once with a clear message. Model FLOPs count ``6·N`` per token for the non-embedding
parameters plus ``12·L·d·s`` for full (bidirectional) attention, and no recomputation (MFU, not HFU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) by device-name substring; first match wins.
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
]

# The shape of meta-llama/Llama-3.2-1B (config.json), built randomly: no download.
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=2048,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
WORDS = 1000  # synthetic vocabulary: w0 .. w999, one token each


# ============================================================================================ report
@dataclass
class Stage:
    """One stage's outcome."""

    name: str
    status: str = "PASS"  # PASS | FAIL | SKIP
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.status = "FAIL"
        self.lines.append(f"FAIL: {why}")

    def note(self, line: str) -> None:
        self.lines.append(line)


class Report:
    """Prints every line and appends it to the results file at once (partial runs keep what they did)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def stage(self, st: Stage) -> None:
        self.line(f"\n== {st.name}: {st.status} ({st.seconds:.1f} s)")
        for ln in st.lines:
            self.line(f"   {ln}")


def run_stage(name: str, fn: Callable[[Stage], None], report: Report) -> Stage:
    st = Stage(name)
    t0 = time.perf_counter()
    try:
        fn(st)
    except Exception as exc:  # a stage's crash is its result; the next stages still run
        st.fail(f"{type(exc).__name__}: {exc}")
        st.lines.extend("  " + ln for ln in traceback.format_exc().splitlines()[-12:])
    st.seconds = time.perf_counter() - t0
    report.stage(st)
    return st


# ====================================================================================== pure helpers
def bf16_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU from its name (``torch.cuda.get_device_name``), or None if unknown."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def train_flops_per_token(non_embedding_params: int, n_layers: int, attn_dim: int, seq_len: int) -> float:
    """Model FLOPs of one trained token: 6·N (matmuls, fwd + bwd) + 12·L·d·s (full attention scores).

    Args:
        non_embedding_params: parameters outside the embedding table (a lookup is no matmul).
        n_layers: transformer layers.
        attn_dim: heads × head_dim of the queries.
        seq_len: tokens per sequence (every query attends to all of them: bidirectional).
    """
    return 6.0 * non_embedding_params + 12.0 * n_layers * attn_dim * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a known peak."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def cpu_header() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    marks = [f for f in ("amx_tile", "amx_bf16", "avx512f", "avx512_bf16", "avx2") if f in flags]
    return f"{model}; {os.cpu_count()} cores; flags: {', '.join(marks) or 'none of amx/avx512/avx2'}"


def no_cuda_message() -> str:
    import torch

    return (
        "gpu_check: no CUDA device — torch.cuda.is_available() is False "
        f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}). Run it on a machine "
        "with an NVIDIA GPU, or pass --dry-run for the CPU smoke run of the same stages on a tiny model."
    )


def fastest_attention(cuda: bool) -> str:
    """``flash_attention_2`` when flash-attn is importable on a CUDA machine, else ``sdpa``."""
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except Exception:  # installed but broken (ABI mismatch): say so via the fallback
            return "sdpa"
    return "sdpa"


# ===================================================================================== model & data
def write_word_tokenizer(folder: Path) -> Any:
    """A word-level tokenizer over ``w0 .. w{WORDS-1}`` (no download, no package beyond tokenizers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3}
    vocab.update({f"w{i}": i + 4 for i in range(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    fast.save_pretrained(str(folder))
    return fast


def write_random_llama(folder: Path, dims: dict[str, Any], dtype: str = "bfloat16") -> dict[str, int]:
    """Save a randomly initialised Llama of shape ``dims`` (plus the word tokenizer); returns its sizes."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    folder.mkdir(parents=True, exist_ok=True)
    write_word_tokenizer(folder)
    cfg = LlamaConfig(**dims, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialise fast where possible
        model = LlamaModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    model.to(getattr(torch, dtype)).save_pretrained(str(folder))  # the recipe loads it as float32
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"params": total, "non_embedding_params": total - embedding}


def write_long_pairs(path: Path, rows: int, words: int, negatives: int, seed: int = 0) -> Path:
    """JSONL training rows whose every text is ``words`` long (so every sequence is truncated to full)."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(words))

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            row = {"query": text(), "pos_doc": text(), "neg_doc": [text() for _ in range(negatives)]}
            f.write(json.dumps(row) + "\n")
    return path


def recipe_overrides(
    *,
    output_dir: Path,
    model_dir: Path,
    data: Path,
    steps: int,
    global_batch: int,
    local_batch: int,
    max_len: int,
    dry_run: bool,
    minutes: float = 5.0,
    extra: Sequence[str] = (),
) -> list[str]:
    """Overrides of the shipped ``llama3_2_1b`` recipe for a short run on synthetic data (precision kept)."""
    out = [
        f"output_dir={output_dir}",
        f"model.name_or_path={model_dir}",
        f"data.datasets=[{{path: {data}}}]",
        f"data.q_max_len={max_len}",
        f"data.p_max_len={max_len}",
        f"model.max_length={max_len}",
        "validation=null",
        f"step_scheduler.max_steps={steps}",
        f"step_scheduler.global_batch_size={global_batch}",
        f"step_scheduler.local_batch_size={local_batch}",
        "step_scheduler.ckpt_every_steps=1000000",
        f"step_scheduler.max_time_minutes={minutes:.2f}",  # the recipe stops itself within the budget
        "step_scheduler.log_every_steps=1",
        "lr_scheduler.warmup_steps=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
    ]
    if dry_run:
        out += ["device=cpu", "num_threads=2"]
    return out + list(extra)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


# ============================================================================================ stages
@dataclass
class Ctx:
    dry_run: bool
    work: Path
    steps: int
    global_batch: int
    peak_tflops: float | None
    cuda: bool
    deadline: float = float("inf")
    """``time.monotonic()`` by which the whole check must be done (``--budget-minutes``)."""

    def seconds_left(self, reserve: float = 0.0) -> float:
        """Time a stage may take, keeping ``reserve`` seconds for the stages after it (at least 30 s)."""
        return max(30.0, self.deadline - time.monotonic() - reserve)


def stage_environment(ctx: Ctx, st: Stage) -> None:
    import torch
    import transformers

    st.note(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
    st.note(f"CPU: {cpu_header()}")
    fa = importlib.util.find_spec("flash_attn")
    st.note(
        f"flash_attn: {'installed' if fa else 'not installed'}; fastest attention: {fastest_attention(ctx.cuda)}"
    )
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        st.note(
            f"GPU: {name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
            f"{torch.cuda.device_count()} visible"
        )
        st.note(f"bf16 dense peak: {ctx.peak_tflops or 'unknown (pass --peak-tflops)'} TFLOP/s")
        st.metrics.update(gpu=name, peak_tflops=ctx.peak_tflops)
    else:
        st.note("GPU: none (--dry-run on the CPU: numbers below are not GPU numbers)")


def stage_cuda_tests(ctx: Ctx, st: Stage) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/"]
    if ctx.dry_run:
        cmd.append("--collect-only")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    limit = min(240.0, ctx.seconds_left(reserve=240.0))  # the training and NCCL stages come after
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit, check=False)
    tail = (res.stdout + res.stderr).strip().splitlines()
    st.note(" ".join(cmd[2:]))
    st.lines.extend(ln for ln in tail[-8:] if ln.strip())
    if ctx.dry_run:
        n = sum(1 for ln in res.stdout.splitlines() if "::" in ln)
        st.metrics["collected"] = n
        if res.returncode != 0 or n == 0:
            st.fail(f"`pytest -m cuda --collect-only` selected {n} tests (rc {res.returncode})")
        return
    passed = re.search(r"(\d+) passed", res.stdout)
    skipped = re.search(r"(\d+) skipped", res.stdout)
    st.metrics.update(
        passed=int(passed.group(1)) if passed else 0, skipped=int(skipped.group(1)) if skipped else 0
    )
    if res.returncode != 0:
        st.fail(f"pytest -m cuda exited {res.returncode}")
    elif st.metrics["skipped"]:
        st.fail(f"{st.metrics['skipped']} CUDA tests skipped on a CUDA machine")


def far_token_reaches_first(model: Any, device: str, seq: int = 16) -> bool:
    import torch

    vocab = int(model.config.vocab_size)
    ids = torch.randint(10, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    bumped = ids.clone()
    bumped[0, -1] = (bumped[0, -1] + 1 - 10) % (vocab - 10) + 10
    with torch.no_grad():
        a = model(input_ids=ids.to(device), use_cache=False).last_hidden_state[0, 0].float()
        b = model(input_ids=bumped.to(device), use_cache=False).last_hidden_state[0, 0].float()
    # Out of reach, token 0's output is computed from the same values in the same order: bit-identical.
    return not torch.equal(a, b)


def stage_bidirectional(ctx: Ctx, st: Stage) -> None:
    import torch
    from transformers import AutoConfig, AutoModel

    from embedtune.models.bidirectional import attention_windows, make_bidirectional, verify_bidirectional

    attn = fastest_attention(ctx.cuda)
    device = "cuda" if ctx.cuda else "cpu"
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    st.note(f"attention: {attn}, {dtype}, {device}; config sliding window 2, probe of 16 tokens, 2 layers")
    dims = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    families = {
        "llama": {},
        "qwen2": dict(use_sliding_window=True, sliding_window=2, max_window_layers=0),
        "mistral": dict(sliding_window=2),
        # Both layers sliding: a full layer would let the far token through whatever the window.
        "gemma3_text": dict(sliding_window=2, layer_types=["sliding_attention", "sliding_attention"]),
    }
    for family, extra in families.items():
        try:
            cfg = AutoConfig.for_model(family, **dims, **extra)
            torch.manual_seed(0)
            model = AutoModel.from_config(cfg, attn_implementation=attn, dtype=dtype).to(device).eval()
            make_bidirectional(model)
            windows = attention_windows(model)
            left = {k: v for k, v in windows.items() if v is not None}
            reaches = far_token_reaches_first(model, device)
            try:
                verify_bidirectional(model, seq_len=8)
                verified = "verified"
            except Exception as exc:
                verified = f"verify_bidirectional: {exc}"
            ok = not left and reaches and verified == "verified"
            line = f"windows left: {left or 'none'}; far token reaches token 0: {reaches}; {verified}"
        except Exception as exc:  # one family's failure must not hide the others'
            ok, line = False, f"{type(exc).__name__}: {exc}"
        st.note(f"{family:12s} {line} -> {'ok' if ok else 'FAIL'}")
        if not ok:
            st.status = "FAIL"
    st.metrics["attention"] = attn


def stage_train(ctx: Ctx, st: Stage) -> None:
    import torch

    from embedtune.cli import main as embedtune_main

    dims = TINY_LLAMA if ctx.dry_run else LLAMA_1B
    max_len = 32 if ctx.dry_run else 512
    local = 2 if ctx.dry_run else 8
    n_passages = 5  # the recipe's 1 positive + 4 hard negatives
    model_dir, run = ctx.work / "llama-1b-random", ctx.work / "train-1b"
    t0 = time.perf_counter()
    sizes = write_random_llama(model_dir, dims)
    data = write_long_pairs(
        ctx.work / "long.jsonl", ctx.global_batch * ctx.steps, max_len + 64, n_passages - 1
    )
    st.note(
        f"model: Llama-3.2-1B shape {'(tiny in --dry-run) ' if ctx.dry_run else ''}"
        f"{sizes['params'] / 1e6:.2f}M params ({sizes['non_embedding_params'] / 1e6:.2f}M outside the "
        f"embedding), built in {time.perf_counter() - t0:.0f} s"
    )
    args = [
        "train",
        "llama3_2_1b",
        *recipe_overrides(
            output_dir=run,
            model_dir=model_dir,
            data=data,
            steps=ctx.steps,
            global_batch=ctx.global_batch,
            local_batch=local,
            max_len=max_len,
            dry_run=ctx.dry_run,
            # The loop stops itself in time; the checkpoint, final save and NCCL stage come after it.
            minutes=min(5.0, ctx.seconds_left(reserve=240.0) / 60),
        ),
    ]
    st.note("embedtune " + " ".join(args))
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    rc = embedtune_main(args)
    wall = time.perf_counter() - t1
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    st.note(
        f"exit {rc}; {len(records)} steps logged; whole command {wall:.0f} s (load, steps, checkpoint, save)"
    )
    if rc != 0 or not records:
        st.fail(f"embedtune train exited {rc} with {len(records)} logged steps")
        return
    losses = [float(r["loss"]) for r in records]
    times = [float(r["step_s"]) for r in records if "step_s" in r]
    timed = times[1:] if len(times) > 1 else times  # the first step compiles kernels and warms caches
    step_s = median(timed) if timed else wall / len(records)
    tokens = ctx.global_batch * (1 + n_passages) * max_len  # every text is truncated to max_len
    tps = tokens / step_s
    fpt = train_flops_per_token(
        sizes["non_embedding_params"],
        dims["num_hidden_layers"],
        dims["num_attention_heads"] * dims["head_dim"],
        max_len,
    )
    util = mfu(tps, fpt, ctx.peak_tflops)
    st.metrics.update(tokens_per_s=tps, step_s=step_s, mfu=util, losses=losses)
    st.note(
        f"batch {ctx.global_batch} queries × (1 + {n_passages}) texts × {max_len} tokens = {tokens:,} "
        f"tokens/step; micro-batch {local}; bf16 autocast over fp32 weights; gradient checkpointing"
    )
    st.note(
        f"step time (median of steps 2..{len(times)}): {step_s:.3f} s; {tps:,.0f} tokens/s; "
        f"{tps * fpt / 1e12:.1f} model TFLOP/s"
    )
    st.note(
        f"MFU: {util:.1%} of {ctx.peak_tflops:.0f} TFLOP/s bf16 dense"
        if util is not None
        else "MFU: n/a (no known bf16 peak for this device; pass --peak-tflops)"
    )
    if ctx.cuda:
        st.note(
            f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved"
        )
        st.metrics["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    st.note("losses: " + ", ".join(f"{x:.4f}" for x in losses))
    if not all(x == x and abs(x) != float("inf") for x in losses):
        st.fail("non-finite loss")


def stage_nccl(ctx: Ctx, st: Stage) -> None:
    backend = "gloo" if ctx.dry_run else "nccl"
    model_dir = ctx.work / "tiny-llama"
    write_random_llama(model_dir, TINY_LLAMA, dtype="float32")
    data = write_long_pairs(ctx.work / "tiny.jsonl", 16, 40, 4, seed=1)
    overrides = recipe_overrides(
        output_dir=ctx.work / "nccl-ws1",
        model_dir=model_dir,
        data=data,
        steps=2,
        global_batch=4,
        local_batch=2,
        max_len=32,
        dry_run=ctx.dry_run,
        extra=[
            "loss.in_batch_negatives=true",
            "loss.mask_false_negatives=true",
            "distributed.cross_device_negatives=true",
            f"distributed.backend={backend}",
        ],
    )
    from embedtune.recipes import recipe_path

    recipe = str(recipe_path("llama3_2_1b"))  # a path: every rank entry point reads files
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        str(Path(__file__).resolve()),
        "--rank-entry",
        recipe,
        *overrides,
    ]
    st.note(
        "torchrun --standalone --nproc-per-node 1 -m embedtune.train llama3_2_1b (tiny Llama, "
        f"in-batch + cross-device negatives, masking, backend {backend}); collectives recorded"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    limit = min(240.0, ctx.seconds_left())
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit, check=False)
    found = [ln for ln in res.stdout.splitlines() if ln.startswith("GPU_CHECK_PG ")]
    info = json.loads(found[-1][len("GPU_CHECK_PG ") :]) if found else {}
    st.metrics.update(rc=res.returncode, **info)
    st.note(
        f"exit {res.returncode}; process group: {info.get('backend') or 'none created'}; "
        f"collectives: {info.get('collectives', {})}"
    )
    if res.returncode != 0 or not found:
        st.fail(f"the run exited {res.returncode}")
        st.lines.extend("  " + ln for ln in (res.stdout + res.stderr).strip().splitlines()[-15:])
        return
    if info.get("backend") != backend:
        st.fail(
            f"no {backend} process group at world size 1: the recipe took the single-process path, so "
            f"{backend.upper()} was not exercised (world size 1 should be the same code as N ranks)"
        )
    bad = info.get("wrong_device", [])
    if bad:
        st.fail(f"tensors on the wrong device handed to collectives: {bad[:5]}")
    if info.get("backend") == backend and not info.get("collectives"):
        st.fail("a process group was created but no collective ran")


# ======================================================================= the torchrun rank entry
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "gather",
    "scatter",
    "reduce",
    "barrier",
)


class CollectiveRecorder:
    """Wraps ``torch.distributed``'s collectives to record the process group and every input's device.

    Instrumentation of this benchmark's own rank process, installed before embedtune is imported so the
    recipe runs unchanged. A tensor is on the wrong device when it is not on the group's: CUDA for
    NCCL, CPU for gloo (NCCL rejects CPU tensors at the first collective: the bug this looks for).

    Args:
        expected: maps a backend name to the device type its collectives take.
    """

    def __init__(self, expected: dict[str, str] | None = None) -> None:
        self.expected = expected or {"nccl": "cuda", "gloo": "cpu"}
        self.backend: str | None = None
        self.collectives: dict[str, dict[str, int]] = {}
        self.wrong_device: list[str] = []
        self._saved: dict[str, Any] = {}

    def _tensors(self, x: Any) -> Iterator[Any]:
        import torch

        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, list | tuple):
            for y in x:
                yield from self._tensors(y)

    def record(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count one call of collective ``name`` and check its tensors' devices."""
        want = self.expected.get(self.backend or "", None)
        counts = self.collectives.setdefault(name, {})
        for t in self._tensors([*args, *kwargs.values()]):
            counts[t.device.type] = counts.get(t.device.type, 0) + 1
            if want is not None and t.device.type != want:
                self.wrong_device.append(
                    f"{name}: {tuple(t.shape)} {t.dtype} on {t.device} ({self.backend} wants {want})"
                )

    def install(self) -> CollectiveRecorder:
        import torch.distributed as dist

        real_init = dist.init_process_group

        def init(*args: Any, **kwargs: Any) -> Any:
            out = real_init(*args, **kwargs)
            self.backend = str(dist.get_backend())
            return out

        self._saved["init_process_group"] = real_init
        dist.init_process_group = init  # type: ignore[assignment]
        for name in COLLECTIVES:
            if not hasattr(dist, name):
                continue
            real = getattr(dist, name)
            self._saved[name] = real

            def call(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
                self.record(_name, args, kwargs)
                return _real(*args, **kwargs)

            setattr(dist, name, call)
        return self

    def uninstall(self) -> None:
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    def summary(self) -> dict[str, Any]:
        return {"backend": self.backend, "collectives": self.collectives, "wrong_device": self.wrong_device}


def rank_entry(argv: list[str]) -> int:
    """One torchrun rank: record the process group and collectives, then train via ``embedtune.train``."""
    recorder = CollectiveRecorder().install()
    from embedtune.train import main as train_main

    rc = train_main(argv)
    print("GPU_CHECK_PG " + json.dumps(recorder.summary()), flush=True)
    return rc


# ============================================================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke run of every stage on a tiny model")
    ap.add_argument(
        "--out", type=Path, default=None, help="report file (default benchmarks/results/gpu_check_<date>.txt)"
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="training steps of the 1B stage (default 6; dry run 3)"
    )
    ap.add_argument("--global-batch", type=int, default=None, help="queries per step (default 32; dry run 4)")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 dense peak, if the GPU is not known"
    )
    ap.add_argument("--stages", nargs="+", default=None, help="run only these stages (names as printed)")
    ap.add_argument(
        "--budget-minutes", type=float, default=8.0, help="the whole check's time budget (stages share it)"
    )
    ap.add_argument("--rank-entry", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.rank_entry:
        return rank_entry(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(no_cuda_message(), file=sys.stderr)
        return 2
    date = dt.datetime.now(dt.timezone.utc)
    out = args.out or REPO / "benchmarks" / "results" / (
        f"gpu_check_{'dryrun_' if args.dry_run else ''}{date:%Y-%m-%d}.txt"
    )
    report = Report(out)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # shard-writing bars would interleave with the report
    name = torch.cuda.get_device_name(0) if cuda else "none"
    peak = args.peak_tflops or (bf16_peak_tflops(name) if cuda else None)
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
        or "unknown"
    )
    report.line(
        f"embedtune GPU check — {date:%Y-%m-%d %H:%M} UTC — commit {commit} — "
        f"{'DRY RUN on the CPU (tiny model)' if args.dry_run else name}"
    )
    report.line(
        "command: python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Ctx(
            dry_run=args.dry_run,
            work=Path(tmp),
            cuda=cuda and not args.dry_run,
            steps=args.steps or (3 if args.dry_run else 6),
            global_batch=args.global_batch or (4 if args.dry_run else 32),
            peak_tflops=peak,
            deadline=time.monotonic() + 60 * args.budget_minutes,
        )
        stages: list[tuple[str, Callable[[Ctx, Stage], None]]] = [
            ("environment", stage_environment),
            ("cuda-tests", stage_cuda_tests),
            ("bidirectional", stage_bidirectional),
            ("train-1b", stage_train),
            ("nccl-ws1", stage_nccl),
        ]
        t0 = time.perf_counter()
        results = [
            run_stage(n, lambda st, f=f: f(ctx, st), report)
            for n, f in stages
            if args.stages is None or n in args.stages
        ]
    report.line(
        f"\nsummary ({time.perf_counter() - t0:.0f} s): " + ", ".join(f"{r.name} {r.status}" for r in results)
    )
    report.line(f"written to {out}")
    return 0 if all(r.status != "FAIL" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
