"""``embedtune mine``: hard negatives for query–positive data, with a positive-aware margin filter."""

from __future__ import annotations

import argparse
import json

HELP = "mine hard negatives (positive-aware margin filter) into corpus-ID JSON or inline JSONL"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``embedtune mine``."""
    parser.add_argument(
        "--model", required=True, help="bi-encoder that scores candidates (folder or short name)"
    )
    parser.add_argument(
        "--data", required=True, help="training data: corpus-ID .json, inline .jsonl or a BEIR folder"
    )
    parser.add_argument("--output", required=True, help="output: .json (corpus-ID) or .jsonl (inline)")
    parser.add_argument("--split", default="train", help="qrels split of a BEIR folder (default: train)")
    parser.add_argument("--num-negatives", type=int, default=4, help="negatives kept per query (default 4)")
    parser.add_argument(
        "--range",
        default="0:100",
        help="rank window START:END over the candidates without positives, 0-based, END exclusive "
        "(default 0:100; 10:100 skips the 10 best)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.95,
        help="drop candidates scoring above the positive-aware threshold (default 0.95); see --margin-type",
    )
    parser.add_argument(
        "--margin-type",
        choices=("perc", "abs"),
        default="perc",
        help="perc: keep score <= margin * positive score; abs: keep score <= positive score - margin",
    )
    parser.add_argument("--no-margin", action="store_true", help="disable the margin filter")
    parser.add_argument(
        "--sampling", choices=("top", "random"), default="top", help="hardest survivors or a seeded sample"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --sampling random")
    parser.add_argument(
        "--output-format",
        choices=("corpus_id", "inline"),
        default=None,
        help="default from the suffix: .jsonl is inline, else corpus-ID",
    )
    parser.add_argument("--backend", choices=("exact", "faiss"), default="exact", help="search back-end")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per document (default: model's)")
    parser.add_argument("--query-max-length", type=int, default=None, help="tokens per query")
    parser.add_argument("--bf16", action="store_true", help="encode under bfloat16 autocast")
    parser.add_argument(
        "--cache-dir", default=None, help="corpus-embedding cache (default: embedtune's cache)"
    )
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    parser.add_argument(
        "--query-block", type=int, default=256, help="queries per search block (memory bound)"
    )
    parser.add_argument("--corpus-block", type=int, default=32768, help="documents per search block")
    parser.add_argument(
        "--reranker", default=None, help="cross-encoder folder: rescore candidates and positives"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def check(args: argparse.Namespace) -> None:
    """Data, output, range and models, before anything heavy is imported."""
    from embedtune.commands import _checks

    _checks.existing_path(args.data, "--data")
    _checks.check_output_file(args.output, "--output", suffixes=(".json", ".jsonl"))
    start, _, end = str(args.range).partition(":")
    if not (end.strip().isdigit() and (not start.strip() or start.strip().isdigit())) or int(
        start or 0
    ) >= int(end):
        raise _checks.UsageError(
            f"--range: expected START:END with 0 <= START < END such as 10:100, got {args.range!r}"
        )
    for value, flag in (
        (args.num_negatives, "--num-negatives"),
        (args.batch_size, "--batch-size"),
        (args.max_length, "--max-length"),
        (args.query_max_length, "--query-max-length"),
        (args.query_block, "--query-block"),
        (args.corpus_block, "--corpus-block"),
    ):
        _checks.check_positive(value, flag)
    if args.cache_dir and not args.no_cache:
        _checks.check_output_dir(args.cache_dir, "--cache-dir")
    if args.backend == "faiss":
        _checks.require_package("faiss")
    _checks.check_model(args.model)
    if args.reranker:
        _checks.check_model(args.reranker, "--reranker")


def run(args: argparse.Namespace) -> int:
    """Mine, write, and print a one-screen summary."""
    import torch

    from embedtune.data.formats import read_training_file
    from embedtune.eval.cache import default_cache_dir
    from embedtune.mining import MiningSettings, mine_hard_negatives, parse_range, write_mined
    from embedtune.models import AutoBiEncoder

    start, end = parse_range(args.range)
    settings = MiningSettings(
        num_negatives=args.num_negatives,
        range_start=start,
        range_end=end,
        margin=None if args.no_margin else args.margin,
        margin_type=args.margin_type,
        sampling=args.sampling,
        seed=args.seed,
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = read_training_file(args.data, split=args.split)
    encoder = AutoBiEncoder.from_pretrained(args.model, device=device)
    reranker = None
    if args.reranker:
        from embedtune.reranker import CrossEncoderReranker

        reranker = CrossEncoderReranker.from_pretrained(args.reranker, device=device)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    result = mine_hard_negatives(
        encoder,
        data,
        settings,
        batch_size=args.batch_size,
        bf16=args.bf16,
        max_length=args.max_length,
        query_max_length=args.query_max_length,
        cache_dir=cache_dir,
        backend=args.backend,
        query_block=args.query_block,
        corpus_block=args.corpus_block,
        reranker=reranker,
    )
    paths = write_mined(data, result, args.output, input_path=args.data, output_format=args.output_format)
    print(
        json.dumps(
            {"written": [str(p) for p in paths], "fingerprint": result.info["fingerprint"], **result.stats},
            indent=2,
        )
    )
    return 0
