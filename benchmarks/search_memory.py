"""Peak memory and time of top-k search: full score matrix (baseline) vs blocked exact search vs FAISS.

Each variant runs in its own child process on the same synthetic embeddings (seeded, L2-normalised).
The child resets its peak-RSS counter after building the data (``/proc/self/clear_refs``; on a GPU,
torch's peak-allocation counter), so the "extra MiB" column is the memory the search itself needed on
top of the embeddings. The blocked search's
result is checked against the full product's (same top-k indices).

    .venv/bin/python benchmarks/search_memory.py --docs 200000 --queries 2000 --dim 384 --k 100

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) // 1024  # MiB
    return out


def child(variant: str, docs: int, queries: int, dim: int, k: int, seed: int, device: str) -> None:
    import numpy as np
    import torch

    from embedtune.eval.search import exact_search, faiss_search

    cuda = device == "cuda"
    g = torch.Generator(device=device).manual_seed(seed)
    corpus = torch.nn.functional.normalize(torch.randn(docs, dim, generator=g, device=device), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=g, device=device), dim=-1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() // 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        base = _status()["VmRSS"]
    t0 = time.perf_counter()
    if variant == "full matmul + topk":
        _scores, idx = torch.topk(q @ corpus.T, k, dim=1)
    elif variant == "blocked exact":
        _scores, idx = exact_search(q, corpus, k)
    elif variant == "faiss Flat":
        _scores, idx = faiss_search(q, corpus.numpy(), k)
    else:
        raise SystemExit(f"unknown variant {variant}")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() // 2**20 if cuda else _status()["VmHWM"]
    np.save("/dev/null", idx.numpy())  # keep the result alive until here
    print(json.dumps({"seconds": seconds, "extra_mib": peak - base, "idx": idx[:50].tolist()}))


def main() -> int:
    from _machine import header  # every table says which machine (CPU model, AMX / avx512_bf16) it came from

    print(header(measure=False)[1], flush=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: GPU memory, no FAISS")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.docs, args.queries, args.dim, args.k, args.seed, args.device)
        return 0

    variants = ["full matmul + topk", "blocked exact"]
    try:
        import faiss  # noqa: F401

        if args.device == "cpu":
            variants.append("faiss Flat")
    except ImportError:
        pass
    results = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--child", v]
        cmd += [
            "--docs",
            str(args.docs),
            "--queries",
            str(args.queries),
            "--dim",
            str(args.dim),
            "--k",
            str(args.k),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[v] = json.loads(out.strip().splitlines()[-1])

    full = results["full matmul + topk"]
    score_mib = args.queries * args.docs * 4 / 2**20
    print(
        f"{args.queries} queries x {args.docs} documents, dim {args.dim}, k {args.k} "
        f"on {args.device} (full score matrix = {score_mib:.0f} MiB)"
    )
    print(
        f"{'variant':<22}{'extra MiB':>10}{'x full':>8}{'seconds':>9}{'x full':>8}  same top-k (first 50 queries)"
    )
    for v, r in results.items():
        pairs = [(a, b) for ra, rb in zip(r["idx"], full["idx"]) for a, b in zip(ra, rb)]
        same = f"{100 * sum(a == b for a, b in pairs) / len(pairs):.1f}%"
        mem_ratio = r["extra_mib"] / max(full["extra_mib"], 1)
        print(
            f"{v:<22}{r['extra_mib']:>10}{mem_ratio:>8.2f}{r['seconds']:>9.2f}{r['seconds'] / full['seconds']:>8.2f}  {same}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
