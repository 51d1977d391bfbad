"""Read any supported training-data layout, with validation that names file, line and field.

* **Inline JSONL** (``*.jsonl``): :mod:`embedtune.data.inline`.
* **Corpus-ID JSON** (``*.json``, NeMo AutoModel's layout): :mod:`embedtune.data.corpus_id`.
* **BEIR** (a folder): :mod:`embedtune.data.beir`.
* **Hugging Face retrieval layout** (``hf://org/repo/subset`` or a local folder with
  ``<subset>/dataset_metadata.json``, NeMo's ``embed-nemotron`` schema): :mod:`embedtune.data.hf_layout`.

Whatever the layout, :func:`read_training_file` returns :class:`~embedtune.data.model.RetrievalData`:
queries plus positive and negative *corpus rows* (never copies of the texts), over a memory-mapped
:class:`~embedtune.data.corpus.Corpus`. Every problem in a file is collected before anything is raised
(see :mod:`embedtune.data.problems`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from embedtune.data.beir import BeirSplit, load_beir, read_beir_training
from embedtune.data.corpus import Corpus
from embedtune.data.corpus_id import read_corpus_id
from embedtune.data.hf_layout import HF_PREFIX, is_hf_layout, read_hf_layout
from embedtune.data.inline import read_inline
from embedtune.data.model import ConcatCorpus, Example, Instructions, RetrievalData
from embedtune.data.problems import DataValidationError, Problem

__all__ = [
    "FORMATS",
    "BeirSplit",
    "ConcatCorpus",
    "Corpus",
    "Example",
    "Instructions",
    "RetrievalData",
    "detect_format",
    "load_beir",
    "read_training_file",
]

#: The layouts ``format:`` accepts.
FORMATS = ("inline", "corpus_id", "beir", "hf")


def detect_format(path: str | os.PathLike[str]) -> str:
    """Choose the layout from the path: ``hf://...`` or a folder with ``dataset_metadata.json`` subsets is
    the Hugging Face layout, a folder with ``corpus.jsonl`` is BEIR, ``.jsonl`` is inline, ``.json`` is
    corpus-ID (unless its first line is a complete inline example).

    Raises:
        DataValidationError: when the path does not exist or no layout fits.
    """
    p = Path(path)
    name = str(path)
    if name.startswith(HF_PREFIX):
        return "hf"
    if not p.exists():
        raise DataValidationError(
            [
                Problem(
                    name,
                    None,
                    "path",
                    "does not exist",
                    "check the path (relative paths start at the current directory)",
                )
            ]
        )
    if p.is_dir():
        if (p / "corpus.jsonl").is_file() and (p / "qrels").is_dir():
            return "beir"
        if is_hf_layout(p):
            return "hf"
        if (p / "merlin_metadata.json").is_file():
            raise DataValidationError(
                [
                    Problem(
                        name,
                        None,
                        "path",
                        "is a corpus folder (it holds merlin_metadata.json), not a training file",
                        "point at the corpus-ID JSON file whose 'corpus' list names this folder",
                    )
                ]
            )
        raise DataValidationError(
            [
                Problem(
                    name,
                    None,
                    "path",
                    "is a folder without corpus.jsonl and qrels/ (BEIR layout)",
                    "point at an inline .jsonl file, a corpus-ID .json file, or a BEIR folder",
                )
            ]
        )
    if p.suffix == ".jsonl":
        return "inline"
    if p.suffix == ".json":
        with open(p, "rb") as f:
            first = f.readline().strip().lstrip(b"\xef\xbb\xbf")
        try:
            obj = json.loads(first)
        except ValueError:
            return "corpus_id"
        if isinstance(obj, dict) and ("query" in obj or "question" in obj) and "data" not in obj:
            return "inline"  # JSONL saved under a .json name, as some tools do
        return "corpus_id"
    raise DataValidationError(
        [
            Problem(
                name,
                None,
                "format",
                f"cannot tell the layout from the suffix {p.suffix!r}",
                "name the file .jsonl (inline) or .json (corpus-ID), or set format: inline|corpus_id|beir",
            )
        ]
    )


def read_training_file(
    path: str | os.PathLike[str],
    format: str | None = None,
    on_bad_row: str = "error",
    *,
    split: str = "train",
    negatives: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> RetrievalData:
    """Read and validate a training file (or BEIR folder) in any supported layout.

    Args:
        path: An inline ``.jsonl`` file, a corpus-ID ``.json`` file, a BEIR folder, an
            ``hf://org/repo[/subset]`` URI or a local folder in that layout.
        format: ``"inline"``, ``"corpus_id"``, ``"beir"`` or ``"hf"``; None chooses from the path.
        on_bad_row: ``"error"`` (default) raises listing every problem; ``"skip"`` drops bad examples
            and documents and warns once with the count.
        split: The BEIR qrels split to train on.
        negatives: BEIR only: a JSONL file of mined negatives, ``{"query_id": ..., "neg_doc": [ids]}``.
        cache_dir: Where memory-mapped corpora are cached (default ``~/.cache/embedtune``).

    Returns:
        The examples and their corpus.

    Raises:
        DataValidationError: (a :class:`~embedtune.errors.DataError`) listing every problem found.
    """
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        from embedtune.errors import ConfigError

        raise ConfigError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "inline":
        return read_inline(Path(path), str(path), on_bad_row, cache_dir)
    if fmt == "corpus_id":
        return read_corpus_id(Path(path), str(path), on_bad_row, cache_dir)
    if fmt == "hf":
        return read_hf_layout(path, on_bad_row, cache_dir)
    return read_beir_training(Path(path), split, negatives, on_bad_row, cache_dir)
