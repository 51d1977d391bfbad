"""Time and extra peak memory of ``same_document_ids``: sort/unique (now) vs the (N, N) version (before).

The loss groups the passages of a step into documents ("same hashed ID *or* same text fingerprint",
transitively) once per loss call. At a GradCache batch of 4,096 queries × 8 passages that is N = 32,768
passages — or the same N gathered from 8 ranks × 512 queries under cross-rank negatives, where the
grouping runs on the gathered keys. The previous code built (N, N) bool and int64 temporaries
(about 17 bytes × N², 18 GiB at N = 32,768); the new one sorts each key once (``torch.unique``) and
propagates per-group minima in O(N) memory.

The machine header (CPU model, AMX / avx512_bf16 flags, measured matmul peaks) comes from
``benchmarks/_machine.py``; the table is stored under ``benchmarks/results/``. Each (variant, N) runs in
a fresh child process, one torch thread; ``extra peak MiB`` is the peak resident set during the call
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before it) minus the resident set at its start,
with glibc told to give every allocation of 64 KiB or more fresh pages (``MALLOC_MMAP_THRESHOLD_``), after
the inputs exist and a warm-up on a tiny batch. Linux only. Keys are realistic: 63-bit document-ID
hashes with ~10 % repeated documents and text fingerprints that join a few more pairs. The (N, N) version is measured up to ``--old-max-n`` (default
8,192: about 1.1 GiB on a shared machine); above that its row is *projected* from the largest measured
size as ∝ N² (memory) and ∝ N² (time), and marked so. Both variants' labels are compared for equality
wherever both ran.

    .venv/bin/python benchmarks/same_document_ids.py              # N = 1,024 ... 32,768
    .venv/bin/python benchmarks/same_document_ids.py --old-max-n 32768   # measure the old one too (18 GiB)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's embedtune
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _machine

BUDGET_S, BUDGET_MIB = 1.0, 100.0  # the bar for N = 4,096 × 8


def quadratic_same_document_ids(*keys: torch.Tensor) -> torch.Tensor:
    """The implementation before the rewrite (recipe.py at ff63dba), verbatim but for names."""
    n = keys[0].shape[0]
    same = torch.zeros(n, n, dtype=torch.bool, device=keys[0].device)
    for k in keys:
        same |= k[:, None] == k[None, :]  # (N, N)
    labels = torch.arange(n, device=same.device)
    big = torch.full((n, n), n, dtype=torch.long, device=same.device)
    while True:
        new = torch.where(same, labels[None, :], big).min(dim=1).values
        if torch.equal(new, labels):
            return labels
        labels = new


def make_keys(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) hashed document IDs with ~10 % repeats and (N,) fingerprints joining ~1 % more pairs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2**62, (n,), generator=g)
    dup = torch.randperm(n, generator=g)[: n // 10]
    ids[dup] = ids[torch.randint(0, n, (dup.numel(),), generator=g)]
    fps = torch.randint(-(2**62), 2**62, (n,), generator=g)
    join = torch.randperm(n, generator=g)[: n // 100]
    fps[join] = fps[torch.randint(0, n, (join.numel(),), generator=g)]
    return ids, fps


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> None:
    """Reset VmHWM (the peak resident set) to the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(variant: str, n: int, repeats: int) -> dict:
    """Run one variant at one size in this (fresh) process; print a JSON line."""
    from embedtune.training.loss import same_document_ids

    fn = same_document_ids if variant == "new" else quadratic_same_document_ids
    torch.set_num_threads(1)
    fn(*make_keys(64, seed=1))  # warm-up (kernels, allocator) on a tiny batch
    keys = make_keys(n)
    best, extra = float("inf"), 0.0
    for _ in range(repeats):
        _reset_peak_rss()
        base = _status_mib("VmRSS")
        t0 = time.perf_counter()
        labels = fn(*keys)
        best = min(best, time.perf_counter() - t0)
        extra = max(extra, _status_mib("VmHWM") - base)
        del labels
    labels = fn(*keys)
    out = {"variant": variant, "n": n, "s": best, "extra_mib": extra}
    out["labels_sha1"] = hashlib.sha1(labels.numpy().tobytes()).hexdigest()  # exact equality check
    out["components"] = int(labels.unique().numel())
    return out


def run_child(variant: str, n: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, str(n), "--repeats", str(repeats)]
    # Allocations of 64 KiB and more get fresh pages (mmap), so the peak resident set sees each one
    # instead of memory that an earlier, freed allocation left in the heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise SystemExit(f"child {variant} N={n} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 32768], help="passage counts N"
    )
    ap.add_argument("--old-max-n", type=int, default=8192, help="largest N to run the (N, N) version at")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per run (best is reported)")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats)))
        return 0

    from _machine import recorded

    with recorded("same_document_ids", argv=sys.argv[1:], threads=1):
        return table(args)


def table(args: argparse.Namespace) -> int:
    """Run every (variant, N) in a child process and print the side-by-side table."""
    print("same_document_ids over [hashed ID, text fingerprint] keys; N = 4,096 × 8 = 32,768 is the target\n")
    head = f"{'N passages':>10} | {'old s':>9} | {'old extra MiB':>13} | {'new s':>8} | {'new extra MiB':>13} | {'time ×':>7} | {'mem ×':>7} | same labels"
    print(head)
    print("-" * len(head))
    measured_old: dict | None = None
    ok = True
    for n in args.sizes:
        new = run_child("new", n, args.repeats)
        if n <= args.old_max_n:
            old = run_child("old", n, args.repeats)
            measured_old, tag = old, ""
            same = "yes" if old["labels_sha1"] == new["labels_sha1"] else "NO"
        elif measured_old is not None:
            f = (n / measured_old["n"]) ** 2
            old = {"s": measured_old["s"] * f, "extra_mib": measured_old["extra_mib"] * f}
            tag, same = "*", "(not run)"
        else:
            old, tag, same = {"s": float("nan"), "extra_mib": float("nan")}, "", "(not run)"
        ok &= same != "NO"
        ratio_t = old["s"] / max(new["s"], 1e-9)
        ratio_m = old["extra_mib"] / max(new["extra_mib"], 1.0)  # new rounds to < 1 MiB often
        print(
            f"{n:>10,} | {old['s']:>8.3f}{tag or ' '} | {old['extra_mib']:>12.0f}{tag or ' '} | {new['s']:>8.4f} | "
            f"{new['extra_mib']:>13.1f} | {ratio_t:>7.0f} | {ratio_m:>7.0f} | {same}"
        )
        if n == 32768:
            passed = new["s"] < BUDGET_S and new["extra_mib"] < BUDGET_MIB
            ok &= passed
            print(
                f"{'':>10}   new at 4,096 × 8: {new['s']:.4f} s (< {BUDGET_S:.0f} s) and {new['extra_mib']:.1f} MiB "
                f"extra (< {BUDGET_MIB:.0f} MiB): {'PASS' if passed else 'FAIL'}"
            )
    print("\n* projected from the largest measured old size as ∝ N² (run with --old-max-n to measure)")
    print("mem × uses max(new, 1 MiB) as the divisor (the new peak can round to nothing)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
