"""``embedtune validate-data PATH...``: check training data completely and print what it holds.

``PATH`` is a data file, a BEIR folder, or a training recipe (``.yaml``), whose ``data.datasets`` are
checked with the recipe's own settings (format, split, mined negatives, ``n_passages``).

Reads every file the way training would (inline JSONL, corpus-ID JSON with its corpus folders, BEIR),
reports every problem as ``file:line: field: what — fix`` and prints counts: queries, documents,
positives and negatives per query (histogram), and token-length percentiles of a sample. Exits 1 when
any problem is found, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "check training data (inline JSONL, corpus-ID JSON, BEIR) and print statistics and every problem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``embedtune validate-data``."""
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="data file(s), BEIR folder(s), or a training recipe (.yaml: checks its data.datasets)",
    )
    parser.add_argument(
        "--format",
        choices=("inline", "corpus_id", "beir"),
        default=None,
        help="layout (default: from the path)",
    )
    parser.add_argument("--split", default="train", help="BEIR qrels split (default: train)")
    parser.add_argument("--negatives", default=None, help="BEIR: mined negatives JSONL to check as well")
    parser.add_argument(
        "--tokenizer",
        default="minilm",
        help="model (short name, folder or hub id) whose tokenizer measures lengths; 'none' skips token "
        "lengths (default: minilm)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=2000,
        help="queries and passages sampled for token lengths (default: 2000)",
    )
    parser.add_argument(
        "--n-passages",
        type=int,
        default=None,
        help="also report examples with fewer than N-1 negatives (what n_passages: N would need)",
    )
    parser.add_argument("--cache-dir", default=None, help="corpus cache folder (default: ~/.cache/embedtune)")


def check(args: argparse.Namespace) -> None:
    """Recipes, the negatives file and the tokenizer's model, before anything heavy is imported.

    A missing data path is not an argument error here: it is reported as a problem of that path (with
    the others), as this command reports every problem it finds.
    """
    from embedtune.commands import _checks

    for path in args.paths:
        if path.endswith((".yaml", ".yml")):
            _checks.existing_path(path, "PATH", kind="file")
    if args.negatives:
        _checks.existing_path(args.negatives, "--negatives", kind="file")
    _checks.check_positive(args.sample, "--sample", minimum=0)
    _checks.check_positive(args.n_passages, "--n-passages")
    if args.tokenizer.lower() != "none":
        _checks.check_model(args.tokenizer, "--tokenizer")


def run(args: argparse.Namespace) -> int:
    """Validate each path; print a report; 1 if any problem was found."""
    import warnings

    from embedtune.data.formats import read_training_file
    from embedtune.data.problems import DataValidationError

    # Loaded when the first data set is read without a fatal problem: a missing file is reported at
    # once, without importing transformers.
    tokenizer: Any = _LazyTokenizer(args.tokenizer)
    any_problem = False
    for path, fmt, split, negatives, n_passages in _targets(args):
        print(f"{path}")
        try:
            with warnings.catch_warnings():
                # Problems are printed below, each on its own line; the summary warning would repeat them.
                warnings.simplefilter("ignore")
                data = read_training_file(
                    path,
                    fmt,
                    "skip",
                    split=split,
                    negatives=negatives,
                    cache_dir=args.cache_dir,
                )
        except DataValidationError as exc:
            # A problem that stops reading (bad JSON document, missing corpus folder, ...).
            _print_problems(exc.problems, exc.total)
            any_problem = True
            continue
        _print_stats(data, tokenizer.get(), args.sample, n_passages)
        problems = list(data.problems)
        total = data.problem_count
        corpus_problems = _corpus_problems(data)
        problems += corpus_problems
        total += len(corpus_problems)
        _print_problems(problems, total)
        any_problem = any_problem or total > 0
    return 1 if any_problem else 0


def _targets(args: argparse.Namespace) -> list[tuple[str, str | None, str, str | None, int | None]]:
    """(path, format, split, negatives, n_passages) to check: the paths given, or a recipe's data sets."""
    out: list[tuple[str, str | None, str, str | None, int | None]] = []
    for path in args.paths:
        if path.endswith((".yaml", ".yml")):
            # A training recipe: check exactly the data sets (and settings) training would read.
            from embedtune.config import load_config, read_yaml
            from embedtune.data.config import DataConfig
            from embedtune.errors import ConfigError

            recipe = read_yaml(path)
            if not isinstance(recipe.get("data"), dict):
                raise ConfigError(f"{path}: data: missing — a recipe needs a data: block with datasets")
            try:
                cfg = load_config(DataConfig, recipe["data"])
            except ConfigError as exc:
                raise ConfigError(f"{path}: data.{exc}") from None
            n = args.n_passages if args.n_passages is not None else cfg.n_passages
            out += [(d.path, d.format, d.split, d.negatives, n) for d in cfg.datasets]
        else:
            out.append((path, args.format, args.split, args.negatives, args.n_passages))
    return out


def _corpus_problems(data: Any) -> list[Any]:
    """Problems found while building the corpus (skipped documents), not already in the data's list."""
    parts = getattr(data.corpus, "parts", [data.corpus])
    seen = {str(p) for p in data.problems}
    return [p for c in parts for p in getattr(c, "problems", []) if str(p) not in seen]


def _print_problems(problems: list[Any], total: int) -> None:
    if not total:
        print("  problems           none")
        return
    print(f"  problems           {total}")
    for p in problems:
        print(f"    {p}")
    if total > len(problems):
        print(f"    ... and {total - len(problems)} more (not kept in memory)")


def _histogram(counts: Any) -> str:
    """'0: 3 | 1: 10 | 7: 4' for few distinct counts, else power-of-two buckets '2-3: 4 | 4-7: 9 ...'."""
    import numpy as np

    if not len(counts):
        return "-"
    values, freq = np.unique(counts, return_counts=True)
    if len(values) <= 12:  # few distinct counts: show each exactly
        return " | ".join(f"{v}: {n:,}" for v, n in zip(values.tolist(), freq.tolist()))
    edges = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    parts = []
    for lo, hi in zip(edges, [*edges[1:], None]):
        n = int(np.sum((counts >= lo) & (counts < hi))) if hi is not None else int(np.sum(counts >= lo))
        if n:
            label = str(lo) if hi == lo + 1 else (f"{lo}+" if hi is None else f"{lo}-{hi - 1}")
            parts.append(f"{label}: {n:,}")
    return " | ".join(parts)


def _print_stats(data: Any, tokenizer: Any, sample: int, n_passages: int | None) -> None:
    import numpy as np

    negs = data.negative_counts()
    pos = np.diff(data.pos_offsets)
    n_corpora = len(getattr(data.corpus, "parts", [data.corpus]))
    print(f"  format             {data.format}")
    print(f"  queries            {len(data):,}")
    print(f"  documents          {len(data.corpus):,} ({n_corpora} corpus{'es' if n_corpora > 1 else ''})")
    if len(data):
        print(f"  positives/query    min {pos.min()}, mean {pos.mean():.2f}, max {pos.max()}")
        print(f"  negatives/query    min {negs.min()}, mean {negs.mean():.2f}, max {negs.max()}")
        print(f"  negatives histo    {_histogram(negs)}")
    if n_passages is not None and n_passages > 1 and len(data):
        short = int(np.sum(negs < n_passages - 1))
        print(
            f"  short of n_passages={n_passages}: {short:,} examples have fewer than {n_passages - 1} negatives"
        )
    if tokenizer is not None and len(data):
        rng = np.random.default_rng(0)
        q_idx = rng.choice(len(data), size=min(sample, len(data)), replace=False)
        d_idx = rng.choice(len(data.corpus), size=min(sample, len(data.corpus)), replace=False)
        q_len = _token_lengths(tokenizer, [data.queries[i] for i in q_idx])
        d_len = _token_lengths(tokenizer, data.corpus.texts(np.sort(d_idx)))
        name = getattr(tokenizer, "name_or_path", "tokenizer").rsplit("/", 2)[-2:]
        print(f"  query tokens       {_percentiles(q_len)}  (sample of {len(q_len):,})")
        print(
            f"  document tokens    {_percentiles(d_len)}  (sample of {len(d_len):,}; tokenizer {'/'.join(name)})"
        )


def _token_lengths(tokenizer: Any, texts: list[str]) -> Any:
    import numpy as np

    out = []
    for i in range(0, len(texts), 256):
        enc = tokenizer(texts[i : i + 256], add_special_tokens=True, truncation=False)["input_ids"]
        out += [len(x) for x in enc]
    return np.asarray(out)


def _percentiles(lengths: Any) -> str:
    import numpy as np

    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return f"p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {lengths.max()}"


class _LazyTokenizer:
    """Loads the tokenizer once, on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loaded = False
        self._tokenizer: Any = None

    def get(self) -> Any:
        if not self._loaded:
            self._tokenizer, self._loaded = _load_tokenizer(self.name), True
        return self._tokenizer


def _load_tokenizer(name: str) -> Any:
    if name.lower() == "none":
        return None
    try:
        import logging

        from transformers import AutoTokenizer

        from embedtune.models.zoo import resolve

        logging.getLogger("transformers").setLevel(logging.ERROR)
        tok = AutoTokenizer.from_pretrained(resolve(name))
        tok.model_max_length = 10**9  # measuring, not truncating: no "sequence too long" warnings
        return tok
    except Exception as exc:  # lengths are a convenience: validation must still run
        print(f"note: no token lengths (cannot load tokenizer {name!r}: {exc})", file=sys.stderr)
        return None
