"""``embedtune compare RUN_A RUN_B``: is the difference between two evaluations real?

Both runs must have been evaluated on the same queries (the same qrels and split). For every metric it
prints A, B, the difference ``A - B``, its paired bootstrap confidence interval, and the two-sided
p-values of a paired randomisation test and a paired bootstrap test (``embedtune.eval.stats``), then
says in words whether the difference is significant at ``--alpha``.
"""

from __future__ import annotations

import argparse

HELP = "paired significance test of two evaluations (eval JSON or TREC runs on the same qrels)"

#: Metrics shown by default (those present in both runs), in this order.
DEFAULT_METRICS = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "map@100")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``embedtune compare``."""
    parser.add_argument("run_a", metavar="RUN_A", help="`embedtune eval --output` JSON, or a TREC run file")
    parser.add_argument("run_b", metavar="RUN_B", help="the other system, evaluated on the same queries")
    parser.add_argument(
        "--qrels",
        default=None,
        help="BEIR folder or qrels .tsv that TREC runs are judged on (not needed for JSON)",
    )
    parser.add_argument(
        "--split", default="test", help="qrels split of a BEIR --qrels folder (default: test)"
    )
    parser.add_argument(
        "--k", type=int, nargs="+", default=[1, 10, 100], metavar="K", help="cut-offs for TREC runs"
    )
    parser.add_argument(
        "--metrics", nargs="+", default=None, metavar="M", help="metrics to compare (default: the main six)"
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument(
        "--resamples", type=int, default=10_000, help="resamples of each test (default 10000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="resampling seed (default 0)")
    parser.add_argument(
        "--ci-method", choices=("percentile", "bca"), default="percentile", help="bootstrap interval method"
    )
    parser.add_argument("--output", default=None, help="write the comparison to this JSON file")


def format_rows(rows: list, alpha: float) -> str:
    """The comparison table."""
    conf = round(100 * (1 - alpha))
    head = [
        "metric",
        "A",
        "B",
        "delta",
        f"{conf}% CI of delta",
        "p(rand)",
        "p(boot)",
        "A>B/A<B/=",
        "significant",
    ]
    body = []
    for r in rows:
        verdict = "no"
        if r.significant:
            verdict = "yes, A better" if r.delta > 0 else "yes, B better"
        body.append(
            [
                r.metric,
                f"{r.a:.4f}",
                f"{r.b:.4f}",
                f"{r.delta:+.4f}",
                f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]",
                f"{r.p_randomization:.4f}",
                f"{r.p_bootstrap:.4f}",
                f"{r.wins}/{r.losses}/{r.ties}",
                verdict,
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for b in body:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths)))
        )
    return "\n".join(lines)


def verdict_line(row, alpha: float) -> str:
    """One plain sentence about one metric."""
    p = max(row.p_randomization, row.p_bootstrap)
    if row.significant:
        better = "A" if row.delta > 0 else "B"
        return (
            f"{row.metric}: {better} is better by {abs(row.delta):.4f}; significant at {alpha} "
            f"(p = {row.p_randomization:.4f} randomisation, {row.p_bootstrap:.4f} bootstrap)."
        )
    return (
        f"{row.metric}: the difference {row.delta:+.4f} is NOT significant at {alpha} (p up to {p:.4f}); "
        "the runs cannot be told apart on these queries."
    )


def check(args: argparse.Namespace) -> None:
    """Paths and values, before anything heavy is imported."""
    from embedtune.commands import _checks

    _checks.existing_path(args.run_a, "RUN_A", kind="file")
    _checks.existing_path(args.run_b, "RUN_B", kind="file")
    if args.qrels:
        _checks.existing_path(args.qrels, "--qrels")
    if not 0 < args.alpha < 1:
        raise _checks.UsageError(f"--alpha: must be in (0, 1) such as 0.05, got {args.alpha}")
    _checks.check_positive(args.resamples, "--resamples")
    if args.output:
        _checks.check_output_file(args.output, "--output")


def run(args: argparse.Namespace) -> int:
    """Load both runs, test every metric, print and optionally save the result."""
    import sys
    from pathlib import Path

    from embedtune.errors import ConfigError, DataError
    from embedtune.eval.stats import compare_per_query, load_run, read_qrels

    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha: must be in (0, 1) such as 0.05, got {args.alpha}")
    if args.resamples < 1:
        raise ConfigError(f"--resamples: must be >= 1, got {args.resamples}")
    qrels = read_qrels(args.qrels, args.split) if args.qrels else None
    a = load_run(args.run_a, qrels, tuple(args.k))
    b = load_run(args.run_b, qrels, tuple(args.k))
    for key in ("data", "split", "limits"):
        if key in a.info and key in b.info and a.info[key] != b.info[key]:
            print(
                f"embedtune compare: warning: the runs differ in {key}: A {a.info[key]!r}, B {b.info[key]!r} — "
                "a paired test needs the same queries and corpus",
                file=sys.stderr,
            )
    first_a = next(iter(a.per_query.values()))
    first_b = next(iter(b.per_query.values()))
    if args.metrics:
        metrics = list(args.metrics)
        for m in metrics:
            if m not in first_a or m not in first_b:
                have = sorted(set(first_a) & set(first_b))
                raise DataError(f"--metrics: {m!r} is not in both runs; available: {', '.join(have)}")
    else:
        metrics = [m for m in DEFAULT_METRICS if m in first_a and m in first_b] or [
            m for m in first_a if m in first_b
        ]
    rows = compare_per_query(
        a.per_query,
        b.per_query,
        metrics,
        alpha=args.alpha,
        n_resamples=args.resamples,
        seed=args.seed,
        method=args.ci_method,
    )
    n = len(a.per_query)
    print(f"A: {a.path}" + (f" ({a.info['model']})" if a.info.get("model") else ""))
    print(f"B: {b.path}" + (f" ({b.info['model']})" if b.info.get("model") else ""))
    exact = n < 63 and 2**n <= args.resamples
    print(
        f"{n} queries; paired randomisation test ({'exact, ' + str(2**n) + ' sign patterns' if exact else f'{args.resamples} resamples'}) "
        f"and paired bootstrap ({args.resamples} resamples, {args.ci_method} interval), seed {args.seed}, two-sided"
    )
    print(format_rows(rows, args.alpha))
    for r in rows:
        print(verdict_line(r, args.alpha))
    if len(rows) > 1:
        print(
            f"note: {len(rows)} metrics tested without a multiple-testing correction; decide on one in advance."
        )
    if args.output:
        from embedtune.eval.stats import write_json_atomic

        out = {
            "run_a": a.path,
            "run_b": b.path,
            "info_a": a.info,
            "info_b": b.info,
            "num_queries": n,
            "alpha": args.alpha,
            "resamples": args.resamples,
            "seed": args.seed,
            "ci_method": args.ci_method,
            "metrics": [r.to_dict() for r in rows],
        }
        print(f"comparison: {write_json_atomic(Path(args.output), out)}")
    return 0
