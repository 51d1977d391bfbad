"""``embedtune eval``: full-corpus retrieval metrics of a model on a BEIR folder, corpus-ID JSON or JSONL."""

from __future__ import annotations

import argparse

from embedtune.commands._options import add_encoding_arguments

HELP = "full-corpus retrieval evaluation (NDCG@10, Recall@k, MRR@10, MAP@100) with a TREC run file"

# The summary table: (column title, metric key); columns whose k is not evaluated are left out.
TABLE = [
    ("NDCG@10", "ndcg@10"),
    ("Recall@1", "recall@1"),
    ("Recall@10", "recall@10"),
    ("Recall@100", "recall@100"),
    ("MRR@10", "mrr@10"),
    ("MAP@100", "map@100"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``embedtune eval``."""
    parser.add_argument(
        "--model", required=True, help="model folder, hub id or short name (minilm, smollm2-135m)"
    )
    parser.add_argument(
        "--data",
        required=True,
        help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), corpus-ID .json or inline .jsonl "
        "(its queries' positives against all documents of the file)",
    )
    parser.add_argument("--split", default="test", help="qrels split of a BEIR folder (default: test)")
    parser.add_argument(
        "--output", default=None, help="write metrics (and per-query values) to this JSON file"
    )
    parser.add_argument("--run", default=None, help="write the retrieved top-k as a TREC run file")
    parser.add_argument(
        "--k", type=int, nargs="+", default=[1, 10, 100], metavar="K", help="cut-offs (default: 1 10 100)"
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help="results per query in the run file (default: max k)"
    )
    add_encoding_arguments(parser)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail when qrels name unknown queries or documents (default: warn)",
    )
    parser.add_argument(
        "--skip-unknown-docs",
        action="store_true",
        help="drop judgements naming documents missing from the corpus (default: they count as relevant "
        "and never retrieved, as in trec_eval; skipping scores higher than trec_eval)",
    )
    ident = parser.add_mutually_exclusive_group()
    ident.add_argument(
        "--ignore-identical-ids",
        dest="ignore_identical_ids",
        action="store_const",
        const=True,
        default=None,
        help="never retrieve a document whose ID equals the query's (BEIR; default: on for ArguAna/Quora)",
    )
    ident.add_argument(
        "--keep-identical-ids",
        dest="ignore_identical_ids",
        action="store_const",
        const=False,
        help="the opposite",
    )
    parser.add_argument("--max-queries", type=int, default=None, help="evaluate a seeded sample of queries")
    parser.add_argument(
        "--max-corpus", type=int, default=None, help="search relevant docs + a seeded sample (not comparable)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-queries/--max-corpus samples")
    parser.add_argument(
        "--per-query",
        action="store_true",
        help="(kept for old scripts: --output always has per-query metrics)",
    )
    parser.add_argument(
        "--ci-resamples",
        type=int,
        default=10_000,
        help="bootstrap resamples of the queries for the 95%% confidence intervals (0: none; default 10000)",
    )
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per (name, metrics); the columns of ``TABLE`` that are present."""
    present = [(t, k) for t, k in TABLE if all(k in m for _, m in rows)]
    if not present:  # custom cut-offs: show every metric
        present = [(k, k) for k in rows[0][1]]
    name_w = max(len("model"), *(len(n) for n, _ in rows))
    widths = [max(len(t), 6) for t, _ in present]
    lines = ["  ".join(["model".ljust(name_w), *(t.rjust(w) for (t, _), w in zip(present, widths))])]
    for name, m in rows:
        lines.append(
            "  ".join([name.ljust(name_w), *(f"{m[k]:.4f}".rjust(w) for (_, k), w in zip(present, widths))])
        )
    return "\n".join(lines)


def check(args: argparse.Namespace) -> None:
    """Data, outputs, cut-offs and model, before anything heavy is imported."""
    from embedtune.commands import _checks

    if any(k < 1 for k in args.k):
        raise _checks.UsageError(f"--k: cut-offs must be >= 1, got {args.k}")
    for value, flag in (
        (args.batch_size, "--batch-size"),
        (args.max_length, "--max-length"),
        (args.top_k, "--top-k"),
        (args.max_queries, "--max-queries"),
        (args.max_corpus, "--max-corpus"),
    ):
        _checks.check_positive(value, flag)
    _checks.existing_path(args.data, "--data")
    if args.output:
        _checks.check_output_file(args.output, "--output")
    if args.run:
        _checks.check_output_file(args.run, "--run")
    if args.cache_dir and not args.no_cache:
        _checks.check_output_dir(args.cache_dir, "--cache-dir")
    if args.backend == "faiss":
        _checks.require_package("faiss")
    _checks.check_model(args.model)


def run(args: argparse.Namespace) -> int:
    """Load, evaluate, print the table, write the JSON and run files."""
    import sys
    import warnings
    from pathlib import Path

    import torch

    from embedtune._atomic import write_json
    from embedtune.errors import ConfigError
    from embedtune.eval.cache import default_cache_dir
    from embedtune.eval.datasets import EvalDataWarning, load_eval_set
    from embedtune.eval.retrieval import run_evaluation, write_trec_run
    from embedtune.export.runtime import load_encoder

    if any(k < 1 for k in args.k):
        raise ConfigError(f"--k: cut-offs must be >= 1, got {args.k}")
    if args.ci_resamples < 0 or not 0 < args.confidence < 1:
        raise ConfigError(
            f"--ci-resamples must be >= 0 and --confidence in (0, 1); got {args.ci_resamples}, {args.confidence}"
        )
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    # Read the data before loading the model: a bad file should fail in a second, not after the load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvalDataWarning)  # printed below, once, as one line each
        eval_set = load_eval_set(
            args.data,
            args.split,
            strict=args.strict,
            ignore_identical_ids=args.ignore_identical_ids,
            skip_unknown_documents=args.skip_unknown_docs,
        )
    for line in eval_set.warnings:
        print(f"embedtune eval: warning: {line}", file=sys.stderr)
    eval_set = eval_set.subset(args.max_queries, args.max_corpus, args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_encoder(args.model, args.runtime or "auto", device=device)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    result = run_evaluation(
        encoder,
        eval_set,
        tuple(args.k),
        batch_size=args.batch_size,
        bf16=args.bf16,
        max_length=args.max_length,
        cache_dir=cache_dir,
        backend=args.backend,
        top_k=args.top_k,
    )
    name = f"{Path(str(args.model)).name or args.model} on {eval_set.name}"
    print(
        f"{result.num_queries} queries, {result.num_docs} documents"
        + (" (corpus embeddings from cache)" if result.corpus_from_cache else "")
        + f"; encode {result.timings['encode_corpus']:.1f}s + {result.timings['encode_queries']:.1f}s, "
        f"search {result.timings['search']:.2f}s"
    )
    print(format_table([(name, result.metrics)]))
    ci = None
    if args.ci_resamples > 0:
        from embedtune.eval.stats import metric_intervals

        # Seeded: the same evaluation prints the same interval. See embedtune.eval.stats.
        ci = metric_intervals(
            result.per_query, confidence=args.confidence, n_resamples=args.ci_resamples, seed=args.seed
        )
        shown = [(t, k) for t, k in TABLE if k in ci] or [(k, k) for k in ci]
        print(
            f"{args.confidence:.0%} CI (bootstrap over {result.num_queries} queries, {args.ci_resamples} resamples, "
            f"seed {args.seed}): " + ", ".join(f"{t} [{ci[k][0]:.4f}, {ci[k][1]:.4f}]" for t, k in shown)
        )
    if args.max_corpus is not None:
        print(
            f"note: searched a sample of {result.num_docs} documents (--max-corpus); scores are higher than on the "
            "full corpus and comparable only with the same --max-corpus/--seed"
        )
    if args.output:
        out = {
            "model": str(args.model),
            "data": str(args.data),
            "split": eval_set.split,
            "num_queries": result.num_queries,
            "num_docs": result.num_docs,
            "limits": {"max_queries": args.max_queries, "max_corpus": args.max_corpus, "seed": args.seed},
            "ignore_identical_ids": eval_set.ignore_identical_ids,
            "bf16": args.bf16,
            "encoder_settings": encoder.settings.to_dict() if hasattr(encoder.settings, "to_dict") else None,
            "metrics": result.metrics,
            "ci": ci,
            "ci_settings": {
                "method": "percentile bootstrap over queries",
                "confidence": args.confidence,
                "resamples": args.ci_resamples,
                "seed": args.seed,
            },
            "timings": result.timings,
            "corpus_from_cache": result.corpus_from_cache,
            "warnings": eval_set.warnings,
        }
        out["per_query"] = result.per_query  # what `embedtune compare` tests on
        p = write_json(args.output, out)  # atomic: an earlier results file survives a failed write
        print(f"metrics: {p}")
    if args.run:
        print(f"run: {write_trec_run(result.run, args.run)}")
    return 0
