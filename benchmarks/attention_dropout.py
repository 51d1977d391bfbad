"""One attention layer's forward + backward with dropout on the probabilities, at MiniLM's shapes.

Three ways, in one process, alternating rounds (A B C A B C ...; the median is kept):

* ``torch dropout``: ``scaled_dot_product_attention(dropout_p=p)`` — on a CPU its unfused path, which
  is what sentence-transformers (and embedtune with ``model.attn_implementation: sdpa``) train on;
* ``embedtune dropout``: :func:`embedtune.models.attention.dropout_attention` (blockwise, same p);
* ``torch no dropout``: ``scaled_dot_product_attention`` without dropout — PyTorch's fused kernel, the
  floor that no dropout implementation can beat (not the same computation).

    .venv/bin/python benchmarks/attention_dropout.py                    # fp32 and bf16, 128/256 tokens

Ratios are against ``torch dropout`` measured in the same run. ``--keep-freed-memory`` first applies the
glibc allocator setting embedtune's CPU training makes (``embedtune._malloc``) — to all three ways alike:
without it, every large tensor of the unfused path is a fresh ``mmap`` that page-faults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import recorded


def _time_ways(q, k, v, mask, grad, p: float, scale: float, rounds: int) -> dict[str, list[float]]:
    """Seconds per forward + backward of each way, alternating, after one warm-up round."""
    import torch.nn.functional as F

    from embedtune.models.attention import dropout_attention

    ways = {
        "torch dropout": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p),
        "embedtune dropout": lambda: dropout_attention(q, k, v, mask, p, scale),
        "torch no dropout": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds + 1):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn().backward(grad)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
            q.grad = k.grad = v.grad = None
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=96, help="sequences (32 queries + 64 passages in a step)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--p", type=float, default=0.1, help="dropout on the attention probabilities")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument(
        "--keep-freed-memory", action="store_true", help="embedtune's glibc allocator setting, for all ways"
    )
    args = ap.parse_args()

    import torch

    if args.keep_freed_memory:
        from embedtune._malloc import keep_freed_memory

        assert keep_freed_memory(), "the allocator setting is glibc's only"

    torch.set_num_threads(args.threads)
    suffix = "_kept_memory" if args.keep_freed_memory else ""
    with recorded("attention_dropout", argv=sys.argv[1:], threads=args.threads, suffix=suffix):
        allocator = "freed memory kept (embedtune._malloc)" if args.keep_freed_memory else "glibc's default"
        print(
            f"\none attention layer, forward + backward: {args.rows} sequences x {args.heads} heads x "
            f"{args.head_dim} dims, 1/4 of the rows padded to half length, dropout {args.p}, "
            f"{args.threads} threads, median of {args.rounds} rounds, allocator: {allocator}"
        )
        print(f"{'dtype':9} {'tokens':>6} {'way':18} {'ms':>8} {'vs torch dropout':>17}")
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for length in args.lengths:
                g = torch.Generator().manual_seed(0)
                shape = (args.rows, args.heads, length, args.head_dim)
                q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
                keep = torch.ones(args.rows, length, dtype=torch.bool)
                keep[: args.rows // 4, length // 2 :] = False
                mask = keep[:, None, None, :].expand(args.rows, 1, length, length)
                grad = torch.randn(shape, generator=g).to(dtype)
                times = _time_ways(q, k, v, mask, grad, args.p, args.head_dim**-0.5, args.rounds)
                base = statistics.median(times["torch dropout"])
                for name, ts in times.items():
                    t = statistics.median(ts)
                    print(f"{dtype_name:9} {length:6} {name:18} {t * 1e3:8.1f} {base / t:16.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
