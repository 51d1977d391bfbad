"""``embedtune search``: what does the model retrieve for a query? A quick look at a corpus."""

from __future__ import annotations

import argparse

from embedtune.commands._options import add_encoding_arguments

HELP = "search a corpus with a model and print the top documents for one or more queries"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``embedtune search``."""
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="query text(s)")
    parser.add_argument(
        "--model", required=True, help="model folder, hub id or short name (minilm, smollm2-135m)"
    )
    parser.add_argument(
        "--corpus",
        required=True,
        help="corpus .jsonl ({_id,title,text} or {id,text}), BEIR folder, NeMo corpus folder or training file",
    )
    parser.add_argument("-k", "--top-k", type=int, default=10, help="results per query (default 10)")
    add_encoding_arguments(parser)
    parser.add_argument(
        "--width", type=int, default=100, help="characters of each document to show (default 100)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def _snippet(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def check(args: argparse.Namespace) -> None:
    """Queries, corpus and model, before anything heavy is imported."""
    from embedtune.commands import _checks

    if not any(q.strip() for q in args.queries):
        raise _checks.UsageError("QUERY: give a non-empty query text")
    _checks.check_positive(args.top_k, "--top-k")
    _checks.check_positive(args.batch_size, "--batch-size")
    _checks.check_positive(args.max_length, "--max-length")
    _checks.existing_path(args.corpus, "--corpus")
    if args.backend == "faiss":
        _checks.require_package("faiss")
    _checks.check_model(args.model)


def run(args: argparse.Namespace) -> int:
    """Encode the corpus (or reuse the cache), search, print."""
    import json

    import numpy as np
    import torch

    from embedtune.errors import ConfigError, DataError
    from embedtune.eval.cache import default_cache_dir
    from embedtune.eval.datasets import load_corpus
    from embedtune.eval.retrieval import encode_corpus
    from embedtune.eval.search import search
    from embedtune.export.runtime import load_encoder

    if args.top_k < 1:
        raise ConfigError(f"--top-k: must be >= 1, got {args.top_k}")
    queries = [q for q in args.queries if q.strip()]
    if not queries:
        raise ConfigError("QUERY: give a non-empty query text")
    corpus = load_corpus(args.corpus)
    if len(corpus) == 0:
        raise DataError(f"{args.corpus}: the corpus is empty — nothing to search")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_encoder(args.model, args.runtime or "auto", device=device)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    doc_emb, _ = encode_corpus(
        encoder,
        corpus,
        batch_size=args.batch_size,
        bf16=args.bf16,
        max_length=args.max_length,
        cache_dir=cache_dir,
    )
    kw = {"batch_size": args.batch_size, "bf16": args.bf16, "show_progress": False}
    if args.max_length is not None:
        kw["max_length"] = args.max_length
    q_emb = np.asarray(encoder.encode_queries(queries, **kw), dtype=np.float32)
    scores, idx = search(torch.from_numpy(q_emb), doc_emb, args.top_k, backend=args.backend)
    ids = corpus.ids
    for qi, query in enumerate(queries):
        hits = [(int(i), float(s)) for s, i in zip(scores[qi].tolist(), idx[qi].tolist()) if i >= 0]
        texts = corpus.texts([i for i, _ in hits])
        if args.json:
            for rank, ((i, s), text) in enumerate(zip(hits, texts), start=1):
                print(json.dumps({"query": query, "rank": rank, "score": s, "id": ids[i], "text": text}))
            continue
        print(f"query: {query}")
        id_w = max([2, *(len(str(ids[i])) for i, _ in hits)])
        for rank, ((i, s), text) in enumerate(zip(hits, texts), start=1):
            print(f"{rank:>4}  {s:7.4f}  {str(ids[i]).ljust(id_w)}  {_snippet(text, args.width)}")
        if qi < len(queries) - 1:
            print()
    return 0
