"""Distributed scaling: training examples/s on 1 vs N processes (gloo on CPU), and on 1 GPU.

Weak scaling, the way data parallelism is used: every rank keeps the same local batch, so N ranks
train on an N times larger global batch per step. Each step is the real one: forward of queries and
passages, InfoNCE with cross-rank negatives (passages gathered from all ranks with gradients), backward
with DDP (or FSDP2) gradient reduction, clipping, AdamW. Every rank runs with ``--threads`` CPU threads,
so a 1-process run and an N-process run use 1× and N× the cores.

    examples/s = ranks × local_batch × steps / time        efficiency = (examples/s at N) / (N × at 1)

Usage::

    python benchmarks/distributed_scaling.py                       # 1 and 2 CPU processes, tiny-llama
    python benchmarks/distributed_scaling.py --ranks 1,2,4 --strategies ddp,fsdp2
    python benchmarks/distributed_scaling.py --gpu                 # adds a 1-GPU row when CUDA is present

On a 2-core laptop or a shared CI box, expect poor CPU efficiency: two ranks compete for two cores with
everything else, and gloo's all-reduce over loopback is slow next to a tiny model's compute.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tokens(g: torch.Generator, rows: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, vocab, (rows, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=g)
    attn = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * attn, "attention_mask": attn, "pooling_mask": attn.clone()}


def worker(rank: int, world: int, port: int, opts: dict[str, Any], result_file: str) -> None:
    """One rank: build, warm up, time ``steps`` training steps; rank 0 writes the timing."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(opts["threads"])
    from embedtune.models import AutoBiEncoder
    from embedtune.training import distributed as D
    from embedtune.training.gradcache import GradCache
    from embedtune.training.loss import InfoNCELoss, LossConfig

    device = opts["device"]
    ctx = D.init_distributed(D.DistributedConfig(timeout_minutes=5), device=device)
    try:
        torch.manual_seed(0)
        enc = AutoBiEncoder.from_pretrained(opts["model"], verify=False, device=ctx.device)
        enc.train()
        model = D.wrap_model(enc, opts["strategy"], ctx)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        loss_fn = InfoNCELoss(LossConfig(temperature=0.02))
        b, n = opts["local_batch"], opts["n_passages"]
        vocab = min(enc.config.vocab_size, 30_000)
        g = torch.Generator().manual_seed(1000 + rank)
        batches = [
            (
                _tokens(g, b, opts["seq"] // 2, vocab),
                _tokens(g, b * n, opts["seq"], vocab),
                torch.randint(0, 10**9, (b * n,), generator=g),
            )
            for _ in range(4)
        ]
        autocast = (
            torch.autocast(ctx.device.type, dtype=torch.bfloat16)
            if opts["bf16"]
            else torch.autocast("cpu", enabled=False)
        )

        chunk = opts["gradcache"]

        def encode(x: dict[str, torch.Tensor]) -> torch.Tensor:
            with autocast:
                return model(**x)

        def step(i: int) -> float:
            q_in, p_in, ids = batches[i % len(batches)]
            q_in = {k: v.to(ctx.device) for k, v in q_in.items()}
            p_in = {k: v.to(ctx.device) for k, v in p_in.items()}
            ids = ids.to(ctx.device)
            opt.zero_grad(set_to_none=True)

            def loss_of(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
                return D.cross_rank_loss(loss_fn, q, p, n_passages=n, doc_keys=[ids])

            if chunk:
                if opts["sync_once"] and isinstance(model, D.ForwardingDDP):
                    model.sync_on_last_of(-(-b // chunk) - (-(b * n) // chunk))
                loss = GradCache(encode, chunk)(q_in, p_in, loss_of)
            else:
                loss = loss_of(encode(q_in), encode(p_in))
                loss.backward()
            D.clip_grad_norm(list(model.parameters()), 1.0)
            opt.step()
            return loss.item()

        for i in range(opts["warmup"]):
            step(i)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        D.barrier()
        t0 = time.perf_counter()
        for i in range(opts["steps"]):
            step(i)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        D.barrier()
        elapsed = time.perf_counter() - t0
        if rank == 0:
            Path(result_file).write_text(json.dumps({"elapsed": elapsed}))
    finally:
        D.destroy_distributed()


def run_config(world: int, opts: dict[str, Any], timeout: float) -> float:
    """Run one configuration on ``world`` spawned processes; returns examples/s."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        ctx = mp.start_processes(
            worker, args=(world, _free_port(), opts, result), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        elapsed = json.loads(Path(result).read_text())["elapsed"]
    return world * opts["local_batch"] * opts["steps"] / elapsed


def main(argv: list[str] | None = None) -> int:
    from _machine import header  # every table says which machine (CPU model, AMX / avx512_bf16) it came from

    print(header(measure=False)[1], flush=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-llama", help="model name or folder (default: tiny-llama)")
    ap.add_argument("--ranks", default="1,2", help="comma-separated process counts on CPU (default 1,2)")
    ap.add_argument("--strategies", default="ddp", help="comma-separated: ddp, fsdp2")
    ap.add_argument("--local-batch", type=int, default=8, help="queries per rank per step")
    ap.add_argument(
        "--n-passages", type=int, default=2, help="passages per query (positive + hard negatives)"
    )
    ap.add_argument("--seq", type=int, default=64, help="passage tokens (queries: half)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument(
        "--gradcache",
        type=int,
        default=0,
        metavar="CHUNK",
        help="use GradCache with this chunk size; DDP rows then compare one gradient all-reduce per chunk "
        "with one per step",
    )
    ap.add_argument("--gpu", action="store_true", help="also time 1 GPU (NCCL-free, one rank)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    base = {
        "model": args.model,
        "local_batch": args.local_batch,
        "n_passages": args.n_passages,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "bf16": False,
        "device": "cpu",
        "gradcache": args.gradcache,
        "sync_once": True,
    }
    ranks = [int(r) for r in args.ranks.split(",")]
    rows: list[tuple[str, int, float]] = []
    print(
        f"model={args.model} local_batch={args.local_batch} n_passages={args.n_passages} seq={args.seq} "
        f"steps={args.steps} threads/rank={args.threads} cpus={os.cpu_count()} torch={torch.__version__}",
        flush=True,
    )
    print(f"| {'setup':<32} | ranks | global batch | examples/s | speed-up vs 1 | efficiency |")
    print(f"|{'-' * 34}|-------|--------------|------------|---------------|------------|")
    variants = [(s, True) for s in args.strategies.split(",")]
    if args.gradcache and "ddp" in args.strategies.split(","):
        variants.append(("ddp", False))  # the same, reducing after every chunk's backward
    for strategy, sync_once in variants:
        single = None
        label = "CPU gloo " + strategy + (f" gc{args.gradcache}" if args.gradcache else "")
        if args.gradcache and strategy == "ddp":
            label += " 1 reduce/step" if sync_once else " reduce/chunk"
        for w in ranks:
            eps = run_config(w, {**base, "strategy": strategy, "sync_once": sync_once}, args.timeout)
            single = single or (eps if w == 1 else None)
            speedup = f"{eps / single:.2f}x" if single else "-"
            eff = f"{eps / (w * single):.2f}" if single else "-"
            print(
                f"| {label:<32} | {w:>5} | {w * args.local_batch:>12} | {eps:>10.1f} | {speedup:>13} | {eff:>10} |",
                flush=True,
            )
            rows.append((strategy, w, eps))
    if args.gpu and torch.cuda.is_available():
        for bf16 in (False, True):
            eps = run_config(1, {**base, "strategy": "ddp", "device": "cuda", "bf16": bf16}, args.timeout)
            cpu1 = next((e for s, w, e in rows if w == 1), None)
            ratio = f"{eps / cpu1:.1f}x" if cpu1 else "-"
            name = f"1 GPU {torch.cuda.get_device_name(0)[:12]}{' bf16' if bf16 else ''}"
            print(
                f"| {name:<24} | {1:>5} | {args.local_batch:>12} | {eps:>10.1f} | {ratio:>13} | {'-':>10} |",
                flush=True,
            )
    elif args.gpu:
        print("(no CUDA device: GPU row skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
