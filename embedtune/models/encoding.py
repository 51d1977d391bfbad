"""The inference loop shared by every encoder backend (PyTorch ``BiEncoder``, ONNX ``OnnxBiEncoder``).

Texts are checked, sorted longest first (similar lengths share a batch, so little compute goes to
padding, and an out-of-memory error shows on the first batch), embedded batch by batch by a
backend-specific function, and returned in the caller's order. A backend that can count tokens passes
``lengths`` (tokens per text, after truncation): sorting by tokens groups texts more tightly than
sorting by characters, so batches carry less padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from embedtune.errors import EmbedtuneError
from embedtune.progress import progress

# Show a progress bar by default when encoding more texts than this.
PROGRESS_THRESHOLD = 512

# embed_batch(texts, prefix) -> (len(texts), dim) float32 array; prefix is None, one str, or one per text.
EmbedBatch = Callable[[list[str], "str | list[str] | None"], np.ndarray]


def check_texts(
    texts: Sequence[str], prefix: str | Sequence[str] | None
) -> tuple[list[str], list[str] | None]:
    """Validate ``encode`` input; returns the texts as a list and the per-text prefixes (or None).

    Raises:
        EmbedtuneError: a single string, an empty list, a non-string, or a prefix list of the wrong length.
    """
    if isinstance(texts, str):
        raise EmbedtuneError("encode: pass a list of texts, not a single string — wrap it: [text]")
    texts = list(texts)
    if not texts:
        raise EmbedtuneError("encode: got an empty list of texts — pass at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise EmbedtuneError(f"encode: texts[{i}] is {type(text).__name__}, not str — pass strings only")
    prefixes: list[str] | None = None
    if prefix is not None and not isinstance(prefix, str):
        prefixes = list(prefix)
        if len(prefixes) != len(texts):
            raise EmbedtuneError(
                f"encode: {len(prefixes)} prefixes for {len(texts)} texts — give one per text"
            )
    return texts, prefixes


def encode_in_batches(
    texts: Sequence[str],
    embed_batch: EmbedBatch,
    *,
    batch_size: int,
    prefix: str | Sequence[str] | None = None,
    show_progress: bool | None = None,
    desc: str = "encode",
    lengths: Sequence[int] | None = None,
) -> np.ndarray:
    """Embed ``texts`` in length-sorted batches with ``embed_batch``; rows follow the input order.

    Args:
        texts: the texts.
        embed_batch: embeds one batch: ``(texts, prefix) -> (n, dim)`` float32 array.
        batch_size: texts per call of ``embed_batch``.
        prefix: None (the backend's default for the kind), one prefix, or one per text.
        show_progress: progress bar; default on for more than ``PROGRESS_THRESHOLD`` texts.
        desc: the progress bar's label.
        lengths: the sort key, one per text (e.g. tokens after truncation); default: characters.

    Returns:
        (len(texts), dim) float32 embeddings.
    """
    texts, prefixes = check_texts(texts, prefix)
    if batch_size < 1:
        raise EmbedtuneError(f"encode: batch_size must be >= 1, got {batch_size}")
    if lengths is not None and len(lengths) != len(texts):
        raise EmbedtuneError(f"encode: {len(lengths)} lengths for {len(texts)} texts — give one per text")
    key = [len(t) for t in texts] if lengths is None else list(lengths)
    order = np.argsort([-n for n in key], kind="stable")
    if show_progress is None:
        show_progress = len(texts) > PROGRESS_THRESHOLD
    out: np.ndarray | None = None
    starts = range(0, len(texts), batch_size)
    for start in progress(starts, total=math.ceil(len(texts) / batch_size), desc=desc, enabled=show_progress):
        idx = order[start : start + batch_size]
        batch_prefix = prefix if prefixes is None else [prefixes[i] for i in idx]
        emb = np.asarray(embed_batch([texts[i] for i in idx], batch_prefix), dtype=np.float32)
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
    assert out is not None  # texts is not empty
    return out


def token_lengths(
    tokenizer: Callable[..., Any],
    texts: Sequence[str],
    prefix: str | Sequence[str] | None,
    *,
    max_length: int,
    block: int = 4096,
) -> list[int]:
    """Tokens of each ``prefix + text`` after truncation to ``max_length``, counted in blocks (little memory).

    Args:
        tokenizer: a transformers tokenizer (called on lists of strings).
        texts: the texts.
        prefix: one prefix for all, one per text, or None (no prefix).
        max_length: the truncation length the encoder will use.
        block: texts tokenised per call; only the counts are kept.
    """
    out: list[int] = []
    for start in range(0, len(texts), block):
        chunk = list(texts[start : start + block])
        if isinstance(prefix, str):
            chunk = [prefix + t for t in chunk]
        elif prefix is not None:
            chunk = [p + t for p, t in zip(prefix[start : start + block], chunk)]
        ids = tokenizer(chunk, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        out.extend(len(row) for row in ids)
    return out


def encode_label(kind: str) -> str:
    """The progress-bar label for encoding texts of ``kind``: ``encode queries`` / ``encode documents``."""
    return "encode queries" if kind == "query" else f"encode {kind}s"
