"""Does attention dropout 0 cost quality? `embedtune train` of MiniLM on SciFact at equal steps, 0.1 vs 0.

The question behind making ``model.attention_dropout: 0`` a default for BERT-family encoders (it lets
PyTorch's fused CPU attention run: ~1.5x the examples/s in ``train_throughput.py``). Each seed trains
twice with identical settings except the attention dropout, for the same number of epochs (no time
budget): the time_to_quality.py arm (919 SciFact train pairs, in-batch negatives, batch 32, 256 tokens,
lr 2e-5, scale 20, fp32), then scores both on the full SciFact test split (NDCG@10, embedtune's
evaluator). SciFact train and test share one corpus (see time_to_quality.py).

    .venv/bin/python benchmarks/attention_dropout_quality.py --seeds 12 13 14   # ~25 min per seed on the 2-core avx512_bf16 EPYC
    .venv/bin/python benchmarks/attention_dropout_quality.py --quick            # smoke: 64 pairs, 1 epoch

Needs SciFact in ../shared/data (or ``--data``); skips cleanly without.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import recorded
from time_to_quality import add_training_args, ndcg, parse_training_args, run_embedtune, train_pairs

ARMS = {"model's own (0.1)": None, "attention dropout 0": 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=[12])
    args = parse_training_args(ap)
    if args is None:
        return 0

    import torch

    torch.set_num_threads(args.threads)
    rows: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
    with recorded(
        "attention_dropout_quality",
        argv=sys.argv[1:],
        threads=args.threads,
        suffix="_quick" if args.quick else "",
    ):
        pairs = train_pairs(args.data, args.max_pairs)
        print(f"{len(pairs)} SciFact train pairs, {args.epochs} epochs, batch {args.batch}, lr {args.lr}")
        for seed in args.seeds:
            for arm, p in ARMS.items():
                run_args = argparse.Namespace(**{**vars(args), "seed": seed, "attention_dropout": p})
                with tempfile.TemporaryDirectory() as tmp:
                    wall = run_embedtune(pairs, Path(tmp), run_args, budget_s=1e9)  # equal epochs, no budget
                    score = ndcg(Path(tmp) / "embedtune_run" / "model", args.data, args)
                rows[arm].append((wall, score))
                print(f"seed {seed}, {arm}: trained in {wall:.0f} s, NDCG@10 {score:.5f}", flush=True)
        corpus = f"{args.max_corpus} documents" if args.max_corpus else "the full corpus"
        print(
            f"\nNDCG@10 on SciFact test ({corpus}), {len(args.seeds)} seed(s) {args.seeds}, {args.epochs} epochs"
        )
        print(f"{'arm':<22}{'train wall s':>13}{'vs 0.1':>8}{'NDCG@10 mean':>14}{'spread':>8}")
        base_wall = statistics.mean(w for w, _ in rows["model's own (0.1)"])
        for arm, got in rows.items():
            walls, scores = [w for w, _ in got], [s for _, s in got]
            spread = max(scores) - min(scores)
            print(
                f"{arm:<22}{statistics.mean(walls):13.0f}{statistics.mean(walls) / base_wall:7.2f}x"
                f"{statistics.mean(scores):14.5f}{spread:8.5f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
