"""Memory of hard-negative mining on a large synthetic corpus: blocked search over a memory-mapped
embedding file (what ``embedtune mine`` does with the evaluation's embedding cache) vs the naive way
(the whole embedding matrix in RAM and a full queries x documents score matrix).

The *search and selection* part of mining is measured; document **embeddings are random** (seeded,
L2-normalised, written once to a ``.npy`` file like the cache's), because encoding 1M texts with a real
model takes hours on 2 CPU cores. Each query's positives are 1-3 random documents and the query is a
noisy mix of them, so positives really are retrieved and must be dropped.

Each variant runs in a child process. Reported per variant:

* ``anon peak MiB`` — the peak of the process's anonymous memory (heap, tensors) above what it held
  before mining started (sampled every 5 ms from ``/proc/self/status`` ``RssAnon``): the memory
  mining *needs*;
* ``rss peak MiB`` — the peak resident set above the start, file pages of the memory map included:
  those are page cache the kernel can drop at any time, not memory that mining holds;
* time, and whether the mined negatives equal the naive variant's (same seed, same settings).

    .venv/bin/python benchmarks/mining_memory.py --docs 1000000 --queries 1000 --dim 384

Linux only (reads /proc). Needs ``docs * dim * 4`` bytes of free disk for the embedding file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024  # MiB
    return 0


class _PeakSampler:
    """Samples RssAnon and VmRSS in a thread; ``peaks`` are maxima above the values at start."""

    def __init__(self) -> None:
        self.base_anon, self.base_rss = _status("RssAnon"), _status("VmRSS")
        self.peak_anon, self.peak_rss = self.base_anon, self.base_rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, _status("RssAnon"))
            self.peak_rss = max(self.peak_rss, _status("VmRSS"))
            time.sleep(0.005)

    def __enter__(self) -> _PeakSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak_anon = max(self.peak_anon, _status("RssAnon"))
        self.peak_rss = max(self.peak_rss, _status("VmRSS"))


def make_data(folder: Path, docs: int, queries: int, dim: int, seed: int) -> None:
    """Write docs.npy (memory-map friendly), queries.npy and positives.json."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mm = np.lib.format.open_memmap(folder / "docs.npy", mode="w+", dtype=np.float32, shape=(docs, dim))
    for s in range(0, docs, 100_000):  # chunked, so making the data does not need the RAM either
        x = rng.standard_normal((min(100_000, docs - s), dim), dtype=np.float32)
        mm[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    mm.flush()
    positives = [
        rng.choice(docs, size=int(rng.integers(1, 4)), replace=False).tolist() for _ in range(queries)
    ]
    q = np.stack([np.asarray(mm[sorted(p)]).mean(0) for p in positives]) + 0.02 * rng.standard_normal(
        (queries, dim)
    )
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    np.save(folder / "queries.npy", q)
    (folder / "positives.json").write_text(json.dumps(positives))
    del mm


def child(variant: str, folder: Path, num_neg: int, start: int, end: int, margin: float) -> None:
    import numpy as np
    import torch

    from embedtune.mining import MiningSettings, mine_from_embeddings, select_negatives

    torch.set_num_threads(2)
    q = np.load(folder / "queries.npy")
    positives = [np.asarray(p) for p in json.loads((folder / "positives.json").read_text())]
    settings = MiningSettings(num_negatives=num_neg, range_start=start, range_end=end, margin=margin)
    t0 = time.perf_counter()
    with _PeakSampler() as peak:
        if variant == "blocked-mmap":
            docs = np.load(folder / "docs.npy", mmap_mode="r")  # what the embedding cache returns
            res = mine_from_embeddings(q, docs, positives, settings)
            negatives = [e.negatives for e in res.examples]
        else:  # naive: everything in RAM, one full score matrix
            docs = torch.from_numpy(np.load(folder / "docs.npy"))
            scores = torch.from_numpy(q) @ docs.T  # (queries, docs)
            k = end + max(len(p) for p in positives)
            top_s, top_i = torch.topk(scores, k, dim=1)
            negatives = []
            for i, p in enumerate(positives):
                pos_scores = scores[i, torch.as_tensor(p)].numpy()
                negatives.append(
                    select_negatives(top_i[i].numpy(), top_s[i].numpy(), p, pos_scores, settings).negatives
                )
    elapsed = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "variant": variant,
                "anon_peak_mib": peak.peak_anon - peak.base_anon,
                "rss_peak_mib": peak.peak_rss - peak.base_rss,
                "seconds": elapsed,
                "negatives": negatives,
            }
        )
    )


def main() -> int:
    from _machine import header  # every table says which machine (CPU model, AMX / avx512_bf16) it came from

    print(header(measure=False)[1], flush=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--num-negatives", type=int, default=4)
    ap.add_argument("--range", default="0:100")
    ap.add_argument("--margin", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-naive", action="store_true", help="when the naive variant would not fit in RAM")
    ap.add_argument("--workdir", default=None, help="where the embedding file goes (default: a temp dir)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    start, end = (int(x) for x in args.range.split(":"))
    if args.child:
        child(args.child, Path(args.workdir), args.num_negatives, start, end, args.margin)
        return 0

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        make_data(folder, args.docs, args.queries, args.dim, args.seed)
        print(
            f"synthetic data: {args.docs:,} docs x {args.dim} dims ({args.docs * args.dim * 4 / 2**20:,.0f} MiB "
            f"file), {args.queries:,} queries, made in {time.perf_counter() - t:.0f}s",
            flush=True,
        )
        rows = []
        variants = ["blocked-mmap"] if args.skip_naive else ["naive-in-ram", "blocked-mmap"]
        for v in variants:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                v,
                "--workdir",
                str(folder),
                "--num-negatives",
                str(args.num_negatives),
                "--range",
                args.range,
                "--margin",
                str(args.margin),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    same = {r["variant"]: r["negatives"] == base["negatives"] for r in rows}
    n_neg = sum(len(x) for x in rows[-1]["negatives"])
    print(
        f"\n## Mining {args.docs:,} documents x {args.dim} dims, {args.queries:,} queries "
        f"(range {args.range}, margin {args.margin} perc, {args.num_negatives} negatives; {n_neg:,} mined)\n"
    )
    print(
        f"| variant | anon peak MiB | ratio vs {base['variant']} | rss peak MiB (incl. page cache) | seconds | same negatives |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["anon_peak_mib"] / base["anon_peak_mib"] if base["anon_peak_mib"] else float("nan")
        print(
            f"| {r['variant']} | {r['anon_peak_mib']:,} | {ratio:.3f}x | {r['rss_peak_mib']:,} | {r['seconds']:.1f} | "
            f"{same[r['variant']]} |"
        )
    matrix = args.docs * args.dim * 4 / 2**20
    print(
        f"\nembedding matrix: {matrix:,.0f} MiB; full score matrix: {args.docs * args.queries * 4 / 2**20:,.0f} MiB. "
        "Bound of the blocked search (defaults query_block=256, corpus_block=32768): one corpus block copy "
        f"({32768 * args.dim * 4 / 2**20:.0f} MiB) + 256 x (32768 + k) scores (~{256 * (32768 + 200) * 4 / 2**20:.0f} MiB, "
        "a few temporaries of that size) + the query embeddings and results — independent of the corpus size."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
