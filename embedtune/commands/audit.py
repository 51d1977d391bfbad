"""``embedtune audit``: leakage into an evaluation set and false-negative risk in training data.

See ``embedtune.audit.core`` for what each check means.
"""

from __future__ import annotations

import argparse

HELP = "audit training data: train/eval overlap, false negatives among the negatives, --fix a cleaned copy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``embedtune audit``."""
    parser.add_argument(
        "data", metavar="TRAIN", help="training data: inline .jsonl, corpus-ID .json or BEIR folder"
    )
    parser.add_argument(
        "--format", default=None, choices=("inline", "corpus_id", "beir"), help="layout of TRAIN"
    )
    parser.add_argument("--train-split", default="train", help="qrels split when TRAIN is a BEIR folder")
    parser.add_argument("--eval", dest="eval_data", default=None, help="evaluation set to check for overlap")
    parser.add_argument(
        "--eval-split", default="test", help="qrels split of a BEIR --eval folder (default test)"
    )
    parser.add_argument("--model", default=None, help="score negatives with this model (or short name)")
    parser.add_argument(
        "--reranker",
        default=None,
        help="score (query, document) pairs with this cross-encoder instead of --model (raw logits, as "
        "embedtune mine --reranker uses them)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.95,
        help="with --model: flag negatives scoring above this share of the positive's score (default 0.95)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.05, help="training temperature (too-easy rule)"
    )
    parser.add_argument(
        "--near-threshold",
        type=float,
        default=0.7,
        help="Jaccard similarity of near-duplicates (default 0.7)",
    )
    parser.add_argument(
        "--no-near-duplicates", action="store_true", help="exact duplicates only (no datasketch needed)"
    )
    parser.add_argument("--output", default=None, help="write the JSON report here")
    parser.add_argument("--per-query", default=None, help="write one JSON line per training example here")
    parser.add_argument(
        "--fix", default=None, metavar="OUT", help="write a cleaned copy (.jsonl, or .json for corpus-ID)"
    )
    parser.add_argument(
        "--fix-reasons",
        nargs="+",
        default=None,
        metavar="REASON",
        help="flag reasons whose negatives --fix removes (default: all)",
    )
    parser.add_argument(
        "--keep-leaking", action="store_true", help="--fix keeps examples that overlap --eval"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass with --model")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text with --model")
    parser.add_argument("--bf16", action="store_true", help="encode under bfloat16 autocast")
    parser.add_argument("--device", default=None, help="cpu or cuda")


def check(args: argparse.Namespace) -> None:
    """Paths, thresholds and outputs, before anything heavy is imported."""
    from pathlib import Path

    from embedtune.commands import _checks

    _checks.existing_path(args.data, "TRAIN")
    if args.eval_data:
        _checks.existing_path(args.eval_data, "--eval")
    if not 0 < args.near_threshold <= 1:
        raise _checks.UsageError(
            f"--near-threshold: a Jaccard similarity in (0, 1], got {args.near_threshold}"
        )
    if args.margin is not None and not 0 < args.margin <= 1:
        raise _checks.UsageError(f"--margin: a share in (0, 1] such as 0.95, got {args.margin}")
    _checks.check_positive(args.batch_size, "--batch-size")
    _checks.check_positive(args.max_length, "--max-length")
    for value, flag in ((args.output, "--output"), (args.per_query, "--per-query"), (args.fix, "--fix")):
        if value:
            _checks.check_output_file(value, flag)
    if args.fix and Path(args.fix).resolve() == Path(args.data).resolve():
        raise _checks.UsageError(
            f"--fix {args.fix}: must not be the input TRAIN (the audit never edits its input)"
        )
    if args.model and args.reranker:
        raise _checks.UsageError("--model and --reranker: give one (a bi-encoder or a cross-encoder)")
    if args.model:
        _checks.check_model(args.model)
    if args.reranker:
        _checks.check_model(args.reranker, "--reranker")


def run(args: argparse.Namespace) -> int:
    """Read, audit, print, write."""
    import sys
    import warnings

    from embedtune.audit import AuditSettings, audit_training_data, format_summary, write_fixed, write_report
    from embedtune.audit import write_per_query as write_pq
    from embedtune.audit.text import datasketch_available
    from embedtune.data.formats import read_training_file
    from embedtune.errors import ConfigError

    near = not args.no_near_duplicates
    if near and not datasketch_available():
        raise ConfigError(
            "near-duplicate checks need datasketch (pip install 'embedtune[audit]'); "
            "or pass --no-near-duplicates for exact duplicates only"
        )
    settings = AuditSettings(
        near_duplicates=near,
        near_threshold=args.near_threshold,
        margin=args.margin,
        temperature=args.temperature,
    )
    data = read_training_file(args.data, args.format, split=args.train_split)
    eval_set = None
    if args.eval_data:
        from embedtune.eval.datasets import EvalDataWarning, load_eval_set

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EvalDataWarning)
            eval_set = load_eval_set(args.eval_data, args.eval_split)
        for line in eval_set.warnings:
            print(f"embedtune audit: warning: {line}", file=sys.stderr)
    score = None
    if args.model:
        import numpy as np
        import torch

        from embedtune.export.runtime import load_encoder

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        encoder = load_encoder(args.model, "auto", device=device)
        kw = {"batch_size": args.batch_size, "bf16": args.bf16}
        if args.max_length:
            kw["max_length"] = args.max_length

        def score(queries: list[str], docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
            return (
                np.asarray(encoder.encode_queries(queries, **kw), dtype=np.float32),
                np.asarray(encoder.encode_documents(docs, **kw), dtype=np.float32),
            )

    pair_score = None
    if args.reranker:
        import numpy as np
        import torch

        from embedtune.reranker import CrossEncoderReranker

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        reranker = CrossEncoderReranker.from_pretrained(args.reranker, device=device)

        def pair_score(queries: list[str], docs: list[str]) -> np.ndarray:
            return reranker.predict(
                queries, docs, batch_size=args.batch_size, bf16=args.bf16, max_length=args.max_length
            )

    report = audit_training_data(
        data,
        eval_set,
        settings=settings,
        score=score,
        pair_score=pair_score,
        progress=lambda m: print(f"audit: {m}", file=sys.stderr),
    )
    print(format_summary(report))
    if args.output:
        print(f"report: {write_report(report, args.output)}")
    if args.per_query:
        print(f"per-query: {write_pq(report, args.per_query)}")
    if args.fix:
        from embedtune.audit import REASONS

        path, counts = write_fixed(
            data,
            report,
            args.fix,
            input_path=args.data,
            reasons=tuple(args.fix_reasons or REASONS),
            drop_leaking=not args.keep_leaking,
        )
        print(
            f"fixed copy: {path} ({counts['examples_kept']} examples kept, {counts['examples_dropped_leaking']} "
            f"leaking dropped, {counts['negatives_removed']} negatives removed)"
        )
    return 0
