"""Hard-negative mining with a positive-aware margin (NV-Retriever's TopK-PercPos / TopK-MarginPos).

Most users hold query–positive pairs and nothing else. Mining turns them into training data with hard
negatives:

1. encode the corpus (through the evaluation's cached encoder, ``embedtune.eval.retrieval.encode_corpus``)
   and the queries with the model being fine-tuned (or a stronger teacher);
2. retrieve each query's top candidates with the evaluation's blocked exact search (or FAISS), whose
   extra memory is ``query_block x (corpus_block + k)`` scores whatever the corpus size;
3. drop the query's positives, then every candidate scoring above a threshold derived from the
   query's *positive* score — candidates nearly as similar as the positive are likely unlabelled
   positives (false negatives), and training against them hurts;
4. keep ``num_negatives`` from a rank window of what is left (the hardest ones, or a seeded sample);
5. optionally rescore positives and candidates with a cross-encoder, apply the margin to its scores,
   and store them as teacher scores for distillation.

Ranks and the window
    Ranks count the retrieved candidates best first, **with the positives removed**, 0-based; the
    window ``start:end`` is a Python slice of that list (``0:100`` = the 100 best non-positive
    candidates, ``10:100`` skips the 10 best). The margin filter runs inside the window, so a
    window always means the same documents whatever the margin.

The threshold (per query; ``s+`` = the *lowest* score among the query's positives, the conservative
choice when there are several)
    * ``perc``: keep a candidate only if ``score <= s+ - (1 - margin) * |s+|``; for the usual positive
      ``s+`` this is ``score <= margin * s+`` (NV-Retriever's 95%).
    * ``abs``: keep a candidate only if ``score <= s+ - margin``.
    Everything above the threshold is dropped, whatever its rank.

Use :func:`mine_hard_negatives` on a model and a data set, :func:`mine_from_embeddings` on
precomputed embeddings (what the 1M-document benchmark does), :func:`select_negatives` for one query
(what the tests check), and :func:`write_mined` to save the result as corpus-ID JSON or inline JSONL
with a ``mining`` block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedtune._atomic import atomic_file
from embedtune.errors import ConfigError, DataError

logger = logging.getLogger("embedtune.mining")

__all__ = [
    "MARGIN_TYPES",
    "MinedExample",
    "MiningResult",
    "MiningSettings",
    "margin_threshold",
    "mine_from_embeddings",
    "mine_hard_negatives",
    "parse_range",
    "select_negatives",
    "write_mined",
]

#: ``--margin-type`` values.
MARGIN_TYPES: tuple[str, ...] = ("perc", "abs")
#: ``--sampling`` values: the hardest negatives of the window, or a seeded random sample of it.
SAMPLING: tuple[str, ...] = ("top", "random")
#: Version of the ``mining`` block written into output files.
MINING_FORMAT_VERSION = 1


@dataclass
class MiningSettings:
    """How negatives are chosen (the ``mining.settings`` block of the output records these).

    Attributes:
        num_negatives: negatives kept per query.
        range_start: first rank of the window (0-based, positives removed).
        range_end: rank after the last one of the window (exclusive).
        margin: the threshold parameter (``perc``: a fraction such as 0.95; ``abs``: a score gap);
            None disables the filter.
        margin_type: ``perc`` or ``abs`` (see the module docstring).
        sampling: ``top`` keeps the best-scoring survivors; ``random`` samples them (seeded).
        seed: seed of ``random`` sampling (per query: ``seed`` and the query index).
    """

    num_negatives: int = 4
    range_start: int = 0
    range_end: int = 100
    margin: float | None = 0.95
    margin_type: str = "perc"
    sampling: str = "top"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_negatives, bool) or int(self.num_negatives) < 1:
            raise ConfigError(f"num_negatives: must be an integer >= 1, got {self.num_negatives!r}")
        if not 0 <= self.range_start < self.range_end:
            raise ConfigError(
                f"range: need 0 <= start < end, got {self.range_start}:{self.range_end} — e.g. --range 10:100"
            )
        if self.range_end - self.range_start < self.num_negatives:
            raise ConfigError(
                f"range {self.range_start}:{self.range_end} holds fewer than num_negatives="
                f"{self.num_negatives} candidates — widen the range or ask for fewer negatives"
            )
        if self.margin_type not in MARGIN_TYPES:
            raise ConfigError(f"margin_type: {self.margin_type!r} is not one of {', '.join(MARGIN_TYPES)}")
        if self.margin is not None:
            if not np.isfinite(self.margin):
                raise ConfigError(f"margin: must be a finite number, got {self.margin}")
            if self.margin_type == "perc" and not 0 < self.margin <= 1:
                raise ConfigError(
                    f"margin: with margin_type perc it is a fraction in (0, 1] (e.g. 0.95), got {self.margin}"
                )
            if self.margin_type == "abs" and self.margin < 0:
                raise ConfigError(f"margin: with margin_type abs it must be >= 0, got {self.margin}")
        if self.sampling not in SAMPLING:
            raise ConfigError(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLING)}")


def parse_range(text: str) -> tuple[int, int]:
    """Parse ``"10:100"`` into ``(10, 100)``.

    Raises:
        ConfigError: not two non-negative integers separated by a colon.
    """
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = int(parts[0] or 0), int(parts[1])
    except ValueError:
        raise ConfigError(f"--range: expected START:END such as 10:100, got {text!r}") from None
    if start < 0 or end <= start:
        raise ConfigError(f"--range: need 0 <= START < END, got {text!r}")
    return start, end


def margin_threshold(
    positive_scores: Sequence[float] | np.ndarray, margin: float | None, margin_type: str
) -> float:
    """The highest score a negative may have, from the query's positive scores.

    Args:
        positive_scores: the scores of the query's positives (at least one).
        margin: the margin (None: no limit).
        margin_type: ``perc`` or ``abs``.

    Returns:
        The threshold; candidates scoring strictly above it are dropped (``inf`` when ``margin`` is None).
    """
    if margin is None:
        return float("inf")
    pos = float(np.min(np.asarray(positive_scores, dtype=np.float64)))
    if margin_type == "perc":
        # margin * pos for positive scores; for a negative pos this stays *below* pos (a plain
        # product would put the threshold above the positive).
        return pos - (1.0 - margin) * abs(pos)
    if margin_type == "abs":
        return pos - margin
    raise ConfigError(f"margin_type: {margin_type!r} is not one of {', '.join(MARGIN_TYPES)}")


@dataclass
class MinedExample:
    """What mining chose for one query.

    Attributes:
        negatives: corpus rows of the kept negatives, best-scoring first.
        negative_scores: their scores (the scores the margin was applied to).
        positive_scores: scores of the query's positives, in the order of the data.
        threshold: the margin threshold used for this query.
        dropped_positives: positives found among the retrieved candidates (never kept).
        dropped_margin: window candidates dropped because they scored above the threshold.
        teacher_negative_scores: cross-encoder scores of the negatives (rescoring only).
        teacher_positive_scores: cross-encoder scores of the positives (rescoring only).
        retriever_negative_scores: bi-encoder scores of the negatives when a cross-encoder rescored.
    """

    negatives: list[int]
    negative_scores: list[float]
    positive_scores: list[float]
    threshold: float
    dropped_positives: int = 0
    dropped_margin: int = 0
    teacher_negative_scores: list[float] | None = None
    teacher_positive_scores: list[float] | None = None
    retriever_negative_scores: list[float] | None = None


def select_negatives(
    candidate_rows: Sequence[int] | np.ndarray,
    candidate_scores: Sequence[float] | np.ndarray,
    positive_rows: Sequence[int] | np.ndarray,
    positive_scores: Sequence[float] | np.ndarray,
    settings: MiningSettings,
    *,
    query_index: int = 0,
    allowed_rows: tuple[int, int] | None = None,
) -> MinedExample:
    """Choose one query's negatives from its retrieved candidates.

    Args:
        candidate_rows: corpus rows of the retrieved candidates, best first (-1 = empty slot).
        candidate_scores: their scores, same order.
        positive_rows: corpus rows of the query's positives.
        positive_scores: their scores (same scorer as the candidates).
        settings: window, margin and count.
        query_index: the query's index (mixes into the seed of ``random`` sampling).
        allowed_rows: ``(lo, hi)``: only rows in ``[lo, hi)`` may be negatives (the query's own corpus
            when a file names several corpora); None allows every row.

    Returns:
        The chosen negatives (at most ``settings.num_negatives``; fewer when the filter leaves fewer).
    """
    rows = np.asarray(candidate_rows, dtype=np.int64)
    scores = np.asarray(candidate_scores, dtype=np.float64)
    pos = np.asarray(positive_rows, dtype=np.int64)
    valid = rows >= 0
    if allowed_rows is not None:
        valid &= (rows >= allowed_rows[0]) & (rows < allowed_rows[1])
    is_pos = np.isin(rows, pos) & valid
    # Positives are removed before ranking, so the window does not move with the number of positives.
    keep = valid & ~is_pos
    rows, scores = rows[keep], scores[keep]
    # A document retrieved twice (duplicate rows cannot happen in one search, but callers may merge
    # lists) is one candidate.
    _, first = np.unique(rows, return_index=True)
    if len(first) != len(rows):
        order = np.sort(first)
        rows, scores = rows[order], scores[order]
    window = slice(settings.range_start, settings.range_end)
    rows, scores = rows[window], scores[window]
    threshold = margin_threshold(positive_scores, settings.margin, settings.margin_type)
    below = scores <= threshold
    dropped_margin = int((~below).sum())
    rows, scores = rows[below], scores[below]
    n = settings.num_negatives
    if settings.sampling == "random" and len(rows) > n:
        rng = np.random.default_rng([settings.seed, query_index])
        pick = np.sort(rng.choice(len(rows), size=n, replace=False))
        rows, scores = rows[pick], scores[pick]
    return MinedExample(
        negatives=[int(r) for r in rows[:n]],
        negative_scores=[float(s) for s in scores[:n]],
        positive_scores=[float(s) for s in np.asarray(positive_scores, dtype=np.float64)],
        threshold=float(threshold),
        dropped_positives=int(is_pos.sum()),
        dropped_margin=dropped_margin,
    )


@dataclass
class MiningResult:
    """The mined negatives of a whole data set, and how they were obtained.

    Attributes:
        examples: one :class:`MinedExample` per query, in the data's order.
        settings: the settings used.
        stats: counts and timings (queries, short queries, dropped candidates, seconds per phase).
        info: what the ``mining`` block records beyond the settings (model, data, fingerprint).
    """

    examples: list[MinedExample]
    settings: MiningSettings
    stats: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _positive_scores(
    q_emb: np.ndarray, doc_emb: np.ndarray | torch.Tensor, positives: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Dot products of every query with each of its positives (reads only the positives' rows)."""
    flat = (
        np.concatenate([np.asarray(p, dtype=np.int64) for p in positives])
        if positives
        else np.zeros(0, np.int64)
    )
    uniq, inverse = np.unique(flat, return_inverse=True)
    # Fancy indexing a memmap with sorted unique rows reads just those rows.
    pos_emb = np.asarray(
        doc_emb[uniq] if not isinstance(doc_emb, torch.Tensor) else doc_emb[uniq].numpy(), dtype=np.float32
    )
    out: list[np.ndarray] = []
    start = 0
    for i, p in enumerate(positives):
        idx = inverse[start : start + len(p)]
        start += len(p)
        out.append(pos_emb[idx] @ q_emb[i])
    return out


def mine_from_embeddings(
    query_emb: np.ndarray | torch.Tensor,
    doc_emb: np.ndarray | torch.Tensor,
    positives: Sequence[Sequence[int] | np.ndarray],
    settings: MiningSettings,
    *,
    backend: str = "exact",
    query_block: int = 256,
    corpus_block: int = 32768,
    device: str | torch.device | None = None,
    rescore: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    allowed_rows: Sequence[tuple[int, int] | None] | None = None,
) -> MiningResult:
    """Mine negatives from precomputed embeddings.

    Args:
        query_emb: (num_queries, dim) query embeddings.
        doc_emb: (num_docs, dim) document embeddings; a ``numpy.memmap`` is read block by block.
        positives: per query, the corpus rows of its positives (at least one each).
        settings: window, margin, count.
        backend: ``exact`` (blocked, memory-bounded) or ``faiss``.
        query_block: queries per search block (peak extra memory ~ query_block x corpus_block scores).
        corpus_block: corpus rows per search block.
        device: where the search runs.
        rescore: optional ``f(query_index, candidate_rows) -> (candidate_scores, positive_scores)``
            replacing the retriever's scores (a cross-encoder); the margin then applies to these.
        allowed_rows: per query, the ``(lo, hi)`` corpus rows its negatives may come from (None: all).

    Returns:
        The :class:`MiningResult` (``info`` is empty; :func:`mine_hard_negatives` fills it).

    Raises:
        DataError: a query has no positive, or the counts of queries and positive lists differ.
    """
    from embedtune.eval.search import search

    q = query_emb.numpy() if isinstance(query_emb, torch.Tensor) else np.asarray(query_emb, dtype=np.float32)
    if len(positives) != q.shape[0]:
        raise DataError(
            f"{q.shape[0]} query embeddings but {len(positives)} positive lists — give one per query"
        )
    pos_lists = [np.asarray(p, dtype=np.int64) for p in positives]
    for i, p in enumerate(pos_lists):
        if p.size == 0:
            raise DataError(f"query {i} has no positive — mining needs at least one positive per query")
    # Enough candidates that removing every positive still fills the window.
    max_pos = max((len(p) for p in pos_lists), default=0)
    k = settings.range_end + max_pos
    t0 = time.perf_counter()
    scores, idx = search(
        torch.from_numpy(q),
        doc_emb,
        k,
        backend=backend,
        query_block=query_block,
        corpus_block=corpus_block,
        device=device,
    )
    t1 = time.perf_counter()
    pos_scores = _positive_scores(q, doc_emb, pos_lists)
    scores_np, idx_np = scores.numpy(), idx.numpy()
    examples: list[MinedExample] = []
    for i in range(q.shape[0]):
        allowed = allowed_rows[i] if allowed_rows is not None else None
        if rescore is None:
            ex = select_negatives(
                idx_np[i],
                scores_np[i],
                pos_lists[i],
                pos_scores[i],
                settings,
                query_index=i,
                allowed_rows=allowed,
            )
        else:
            # The cross-encoder rescored the non-positive window candidates: re-rank by its scores, then
            # apply the same window-free selection (the window was already applied on retriever ranks).
            rows = idx_np[i]
            keep = (rows >= 0) & ~np.isin(rows, pos_lists[i])
            if allowed is not None:
                keep &= (rows >= allowed[0]) & (rows < allowed[1])
            window_rows = rows[keep][settings.range_start : settings.range_end]
            retr = dict(zip(rows.tolist(), scores_np[i].tolist()))
            ce_cand, ce_pos = rescore(i, window_rows)
            order = np.argsort(-np.asarray(ce_cand), kind="stable")
            window_rows, ce_cand = window_rows[order], np.asarray(ce_cand)[order]
            ex = select_negatives(
                window_rows,
                ce_cand,
                pos_lists[i],
                ce_pos,
                MiningSettings(
                    **{
                        **asdict(settings),
                        "range_start": 0,
                        "range_end": max(len(window_rows), settings.num_negatives),
                    }
                ),
                query_index=i,
            )
            ex.dropped_positives = int(np.isin(rows, pos_lists[i]).sum())
            ex.teacher_negative_scores = list(ex.negative_scores)
            ex.teacher_positive_scores = list(ex.positive_scores)
            ex.retriever_negative_scores = [float(retr[r]) for r in ex.negatives]
            ex.positive_scores = [float(s) for s in pos_scores[i]]
        examples.append(ex)
    t2 = time.perf_counter()
    short = sum(1 for e in examples if len(e.negatives) < settings.num_negatives)
    stats = {
        "queries": len(examples),
        "negatives": sum(len(e.negatives) for e in examples),
        "queries_with_fewer_negatives": short,
        "positives_retrieved_and_dropped": sum(e.dropped_positives for e in examples),
        "candidates_dropped_by_margin": sum(e.dropped_margin for e in examples),
        "search_s": round(t1 - t0, 3),
        "select_s": round(t2 - t1, 3),
    }
    if short:
        logger.warning(
            "%d of %d queries got fewer than %d negatives (the margin or the window left too few); "
            "widen --range or relax --margin",
            short,
            len(examples),
            settings.num_negatives,
        )
    return MiningResult(examples=examples, settings=settings, stats=stats)


def _data_fingerprint(data: Any) -> str:
    """Hash of the corpus content, the queries and their positives (what mining read)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(getattr(data.corpus, "fingerprint", "")).encode())
    for qid, query in zip(data.query_ids, data.queries):
        h.update(f"{qid}\x00{query}\x00".encode("utf-8", "surrogatepass"))
    h.update(np.ascontiguousarray(data.pos_offsets, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(data.pos_rows, dtype=np.int64).tobytes())
    return h.hexdigest()


def mine_hard_negatives(
    encoder: Any,
    data: Any,
    settings: MiningSettings,
    *,
    batch_size: int = 64,
    bf16: bool = False,
    max_length: int | None = None,
    query_max_length: int | None = None,
    cache_dir: str | Path | None = None,
    backend: str = "exact",
    query_block: int = 256,
    corpus_block: int = 32768,
    reranker: Any = None,
    reranker_batch_size: int = 32,
    show_progress: bool | None = None,
) -> MiningResult:
    """Mine hard negatives for every query of a training data set.

    Args:
        encoder: a ``BiEncoder`` (``encode_queries`` / ``encode_documents``).
        data: ``embedtune.data.formats.RetrievalData`` (``read_training_file``), whose negatives are ignored.
        settings: window, margin, count.
        batch_size: texts per forward pass.
        bf16: encode under bfloat16 autocast.
        max_length: tokens per document (default: the encoder's setting).
        query_max_length: tokens per query (default: ``max_length``).
        cache_dir: corpus-embedding cache (shared with ``embedtune eval``); None disables it.
        backend: ``exact`` or ``faiss``.
        query_block: queries per search block.
        corpus_block: corpus rows per search block.
        reranker: optional cross-encoder (``embedtune.reranker.CrossEncoderReranker``) that rescores the
            window candidates and positives; its scores decide the margin and become teacher scores.
        reranker_batch_size: pairs per cross-encoder forward pass.
        show_progress: progress bars.

    Returns:
        A :class:`MiningResult` whose ``info`` names the model, the data and a fingerprint.

    Raises:
        DataError: the data set has no examples or a query without positives.
    """
    from embedtune.eval.cache import encoder_fingerprint
    from embedtune.eval.retrieval import encode_corpus

    if len(data) == 0:
        raise DataError(f"{data.source}: no examples to mine negatives for")
    t0 = time.perf_counter()
    doc_emb, from_cache = encode_corpus(
        encoder,
        data.corpus,
        batch_size=batch_size,
        bf16=bf16,
        max_length=max_length,
        cache_dir=cache_dir,
        show_progress=show_progress,
    )
    t1 = time.perf_counter()
    q_kw: dict[str, Any] = {"batch_size": batch_size, "bf16": bf16, "show_progress": show_progress}
    if query_max_length or max_length:
        q_kw["max_length"] = query_max_length or max_length
    q_emb = np.asarray(encoder.encode_queries(list(data.queries), **q_kw), dtype=np.float32)
    t2 = time.perf_counter()
    positives = [data.positives(i) for i in range(len(data))]

    rescore = None
    if reranker is not None:

        def rescore(i: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            docs = data.corpus.texts(np.concatenate([rows, positives[i]]))
            s = np.asarray(
                reranker.predict(
                    [data.queries[i]] * len(docs),
                    docs,
                    batch_size=reranker_batch_size,
                    bf16=bf16,
                    show_progress=False,
                ),
                dtype=np.float64,
            )
            return s[: len(rows)], s[len(rows) :]

    # A file naming several corpora: each query's negatives come from its own corpus only.
    allowed_rows = None
    starts = getattr(data.corpus, "_starts", None)
    if starts is not None and len(starts) > 2:
        allowed_rows = [(int(starts[g]), int(starts[g + 1])) for g in np.asarray(data.groups).tolist()]
    result = mine_from_embeddings(
        q_emb,
        doc_emb,
        positives,
        settings,
        backend=backend,
        query_block=query_block,
        corpus_block=corpus_block,
        rescore=rescore,
        allowed_rows=allowed_rows,
    )
    result.stats.update(
        encode_corpus_s=round(t1 - t0, 3),
        encode_queries_s=round(t2 - t1, 3),
        corpus_from_cache=from_cache,
        corpus_documents=len(data.corpus),
    )
    model_fp = encoder_fingerprint(encoder)
    settings_src = getattr(getattr(encoder, "settings", None), "source", {}) or {}
    model_info: dict[str, Any] = {
        "name_or_path": settings_src.get("name_or_path"),
        "weights_fingerprint": model_fp.get("weights") or model_fp.get("custom"),
        "max_length": max_length or getattr(getattr(encoder, "settings", None), "max_length", None),
        "bf16": bool(bf16),
    }
    reranker_info = None
    if reranker is not None:
        reranker_info = {
            "name_or_path": getattr(reranker, "name_or_path", None),
            "weights_fingerprint": reranker.fingerprint() if hasattr(reranker, "fingerprint") else None,
        }
    data_fp = _data_fingerprint(data)
    fp_blob = json.dumps(
        {
            "model": model_fp,
            "reranker": reranker_info,
            "data": data_fp,
            "settings": asdict(settings),
            "backend": backend,
            "max_length": max_length,
            "query_max_length": query_max_length,
            "bf16": bf16,
        },
        sort_keys=True,
        default=str,
    )
    result.info = {
        "model": model_info,
        "reranker": reranker_info,
        "data": {
            "source": str(data.source),
            "format": data.format,
            "fingerprint": data_fp,
            "queries": len(data),
            "documents": len(data.corpus),
        },
        "backend": backend,
        "fingerprint": hashlib.blake2b(fp_blob.encode(), digest_size=16).hexdigest(),
    }
    return result


# ------------------------------------------------------------------------------------------ output


def mining_block(result: MiningResult) -> dict[str, Any]:
    """The ``mining`` block written beside the examples: settings, model, data, fingerprint, stats."""
    from embedtune import __version__

    return {
        "format_version": MINING_FORMAT_VERSION,
        "embedtune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(result.settings),
        **result.info,
        "stats": result.stats,
    }


def _doc_entry(key: str, value: str, score: float | None, teacher: float | None) -> dict[str, Any]:
    # Rounded: 6 decimals keep every ranking and threshold decision, and halve the file size.
    entry: dict[str, Any] = {key: value}
    if score is not None:  # None: written without mining (``unmined``)
        entry["score"] = round(float(score), 6)
    if teacher is not None:
        entry["ce_score"] = round(float(teacher), 6)
    return entry


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write a text file through ``write(f)``; the previous file stays until the new one is complete."""
    with atomic_file(path) as f:
        write(f)


def _corpus_list(input_path: Path) -> list[Any]:
    """The ``corpus`` entries of a corpus-ID file (NeMo writes a single corpus as one object)."""
    corpus = json.loads(input_path.read_text(encoding="utf-8"))["corpus"]
    return [corpus] if isinstance(corpus, dict) else list(corpus)


def _record_corpus_ids(data: Any, input_path: Path) -> list[str] | None:
    """Each example's ``corpus_id`` when the corpus-ID input names several corpora, else None.

    Taken from the example's corpus (``data.groups`` indexes the input's corpora in order) and that
    corpus's ``merlin_metadata.json``, so it holds for any subset of the input's examples.
    """
    entries = _corpus_list(input_path)
    if len(entries) < 2:
        return None
    names = []
    for entry in entries:
        rel = entry.get("path") if isinstance(entry, dict) else entry
        folder = Path(rel) if os.path.isabs(rel) else (input_path.parent / rel)
        meta = json.loads((folder / "merlin_metadata.json").read_text(encoding="utf-8"))
        names.append(str(meta["corpus_id"]))
    return [names[int(g)] for g in data.groups]


def _corpus_entries_for(data: Any, input_path: Path, output: Path) -> list[dict[str, Any]] | None:
    """The input's ``corpus`` list with paths re-based on the output file (corpus-ID input only)."""
    if data.format != "corpus_id":
        return None
    entries = []
    for entry in _corpus_list(input_path):
        rel = entry.get("path") if isinstance(entry, dict) else entry
        folder = Path(rel) if os.path.isabs(rel) else (input_path.parent / rel)
        new = dict(entry) if isinstance(entry, dict) else {}
        new["path"] = os.path.relpath(folder.resolve(), output.parent.resolve())
        entries.append(new)
    return entries


def unmined(data: Any, settings: MiningSettings, reason: str) -> MiningResult:
    """A :class:`MiningResult` with no negatives and no scores: ``write_mined`` then writes ``data`` as it is
    (corpus-ID or inline, the same corpus handling), with ``reason`` in its ``mining`` block."""
    examples = [
        MinedExample([], [], [None] * len(data.positives(i)), float("inf"))  # type: ignore[list-item]
        for i in range(len(data))
    ]
    return MiningResult(
        examples, settings, stats={"queries": len(data), "negatives": 0}, info={"not_mined": reason}
    )


def write_mined(
    data: Any,
    result: MiningResult,
    output: str | os.PathLike[str],
    *,
    input_path: str | os.PathLike[str] | None = None,
    output_format: str | None = None,
) -> list[Path]:
    """Save mined negatives with their scores and a ``mining`` block.

    * ``corpus_id`` (``.json``): ``{"corpus": [...], "mining": {...}, "data": [{question_id, question,
      corpus_id?, pos_doc: [{id, score}], neg_doc: [{id, score, ce_score?}]}]}``. A corpus-ID input keeps
      its corpus folders (paths re-based); any other input gets a corpus folder written beside the output
      (``<stem>_corpus/``, with ``merlin_metadata.json``), so the file is self-contained.
    * ``inline`` (``.jsonl``): one ``{"question_id", "query", "pos_doc": [{text, score}], "neg_doc":
      [{text, score}]}`` a line, and the ``mining`` block in ``<output>.mining.json`` (a JSONL line
      without a query would be a bad example).

    Both read back with ``embedtune.data.formats.read_training_file``.

    Args:
        data: the ``RetrievalData`` that was mined.
        result: :func:`mine_hard_negatives`'s result.
        output: the output path.
        input_path: the file the data came from (needed to re-base corpus-ID corpus paths).
        output_format: ``corpus_id`` or ``inline``; default from the suffix (``.jsonl`` is inline).

    Returns:
        The paths written.

    Raises:
        ConfigError: unknown output format.
    """
    out = Path(output)
    fmt = output_format or ("inline" if out.suffix == ".jsonl" else "corpus_id")
    if fmt not in ("corpus_id", "inline"):
        raise ConfigError(f"--output-format: {fmt!r} is not corpus_id or inline")
    corpus = data.corpus
    block = mining_block(result)
    ids = corpus.ids
    written: list[Path] = []

    def entries(i: int, key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        ex = result.examples[i]
        value = (lambda r: ids[int(r)]) if key == "id" else (lambda r: corpus.text(int(r)))
        pos_rows = data.positives(i)
        tpos = ex.teacher_positive_scores or [None] * len(pos_rows)
        pos = [_doc_entry(key, value(r), s, t) for r, s, t in zip(pos_rows, ex.positive_scores, tpos)]
        tneg = ex.teacher_negative_scores or [None] * len(ex.negatives)
        # With a cross-encoder, ``score`` stays the retriever's and the teacher's goes to ``ce_score``.
        neg_scores = ex.retriever_negative_scores or ex.negative_scores
        neg = [_doc_entry(key, value(r), s, t) for r, s, t in zip(ex.negatives, neg_scores, tneg)]
        return pos, neg

    if fmt == "inline":

        def write_lines(f: Any) -> None:
            for i in range(len(data)):
                pos, neg = entries(i, "text")
                rec = {
                    "question_id": data.query_ids[i],
                    "query": data.queries[i],
                    "pos_doc": pos,
                    "neg_doc": neg,
                }
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

        _atomic_write(out, write_lines)
        side = out.with_name(out.name + ".mining.json")
        _atomic_write(side, lambda f: f.write(json.dumps(block, indent=2, default=str) + "\n"))
        return [out, side]

    corpus_entries = _corpus_entries_for(data, Path(input_path), out) if input_path is not None else None
    corpus_ids: list[str] | None = None
    if corpus_entries is None:
        folder = out.with_name(f"{out.stem}_corpus")
        folder.mkdir(parents=True, exist_ok=True)
        corpus_name = folder.name
        _atomic_write(
            folder / "merlin_metadata.json",
            lambda f: f.write(
                json.dumps(
                    {
                        "class": "TextQADataset",
                        "corpus_id": corpus_name,
                        "query_instruction": "",
                        "passage_instruction": "",
                    }
                )
                + "\n"
            ),
        )

        def write_docs(f: Any) -> None:
            for start in range(0, len(corpus), 10_000):
                rows = range(start, min(len(corpus), start + 10_000))
                for r, text in zip(rows, corpus.texts(list(rows))):
                    f.write(json.dumps({"id": ids[r], "text": text}, ensure_ascii=False) + "\n")

        _atomic_write(folder / "corpus.jsonl", write_docs)
        written.append(folder)
        corpus_entries = [{"path": folder.name}]
    else:
        # Also right for a subset of the input's examples (a held-out split, skipped bad rows).
        corpus_ids = _record_corpus_ids(data, Path(input_path))  # type: ignore[arg-type]

    def write_json(f: Any) -> None:
        # Streamed record by record so that a million examples never sit in memory as one JSON tree.
        f.write('{\n"corpus": ' + json.dumps(corpus_entries) + ",\n")
        f.write('"mining": ' + json.dumps(block, default=str) + ',\n"data": [\n')
        for i in range(len(data)):
            pos, neg = entries(i, "id")
            rec: dict[str, Any] = {"question_id": data.query_ids[i], "question": data.queries[i]}
            if corpus_ids is not None and corpus_ids[i] is not None:
                rec["corpus_id"] = corpus_ids[i]
            rec["pos_doc"], rec["neg_doc"] = pos, neg
            f.write(json.dumps(rec, ensure_ascii=False) + (",\n" if i + 1 < len(data) else "\n"))
        f.write("]\n}\n")

    _atomic_write(out, write_json)
    written.insert(0, out)
    return written


# ------------------------------------------------------------------------------ re-mining in training


def _rng_states() -> tuple[Any, Any, Any]:
    import random

    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_states(states: tuple[Any, Any, Any]) -> None:
    import random

    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def merge_negatives(
    mined: Sequence[int], previous: Sequence[int], positives: Sequence[int], needed: int
) -> list[int]:
    """The re-mined negatives, topped up from the previous ones when the margin left fewer than ``needed``.

    Order: the mined ones (best-scoring first), then previous ones in their order, skipping positives
    and repeats. Deterministic, so re-deriving it gives the same list.
    """
    out = [int(r) for r in mined]
    if len(out) >= needed:
        return out
    seen = set(out) | {int(p) for p in positives}
    for r in previous:
        if len(out) >= needed:
            break
        if int(r) not in seen:
            out.append(int(r))
            seen.add(int(r))
    return out


class ShardedEncoder:
    """An encoder whose ``encode_documents`` / ``encode_queries`` split the work over the ranks of a job.

    Each rank embeds an equal, contiguous share of the texts (the last share padded with repeats of the
    first text, so that every rank runs the same number of forward passes: FSDP2 gathers parameters in
    every forward, and a rank with fewer batches would leave the others waiting), then the shares are
    gathered in rank order and every rank returns the embeddings of all texts. Every other attribute
    (``settings``, ``tokenizer``, ``backbone``, ...) is the wrapped encoder's, and :meth:`fingerprint` is
    its fingerprint, so caches and mined-file provenance do not depend on the number of ranks.

    Args:
        encoder: the model being trained, unwrapped (a ``BiEncoder``).
        rank: this process's rank.
        world_size: number of ranks (every rank must call the same methods with the same texts).
        group: the process group (None: the default one).
    """

    def __init__(self, encoder: Any, rank: int, world_size: int, group: Any = None) -> None:
        self._encoder = encoder
        self._rank = int(rank)
        self._world = int(world_size)
        self._group = group

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def fingerprint(self) -> dict[str, Any]:
        """The wrapped encoder's fingerprint (see ``embedtune.eval.cache.encoder_fingerprint``)."""
        from embedtune.eval.cache import encoder_fingerprint

        return encoder_fingerprint(self._encoder)

    def _sharded(self, encode: Callable[..., Any], texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        from embedtune.training.collectives import gather_tensor

        texts = list(texts)
        n = len(texts)
        if n == 0:
            return np.asarray(encode(texts, **kwargs), dtype=np.float32)
        per = -(-n // self._world)
        share = texts[self._rank * per : (self._rank + 1) * per]
        share += [texts[0]] * (per - len(share))
        local = torch.from_numpy(np.ascontiguousarray(np.asarray(encode(share, **kwargs), dtype=np.float32)))
        gathered = gather_tensor(local, sizes=[per] * self._world, group=self._group)
        return gathered.cpu().numpy()[:n]

    def encode_documents(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        """Embed documents, each rank a share; every rank gets all rows (float32, in input order)."""
        return self._sharded(self._encoder.encode_documents, texts, **kwargs)

    def encode_queries(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        """Embed queries, each rank a share; every rank gets all rows (float32, in input order)."""
        return self._sharded(self._encoder.encode_queries, texts, **kwargs)


class NegativeRefresher:
    """Re-mines the hard negatives of the training data with the model being trained (ANCE-style).

    Every ``refresh_every_steps`` optimizer steps, :meth:`refresh` encodes each training corpus with the
    current model (``mine_hard_negatives``: the evaluation's corpus encoder and blocked exact search),
    picks negatives with the positive-aware margin, and returns the data sets with their negatives
    replaced; the epochs that follow sample from them. Examples the margin leaves short are topped up
    from their previous negatives (:func:`merge_negatives`).

    Determinism under resume: each refresh writes its negatives to ``<output_dir>/mined/step_<N>.npz``
    (atomically, before training continues) and :meth:`state_dict` names that file; a resumed run loads
    it (:meth:`load_state_dict`) and so trains on exactly the negatives the interrupted run had. The RNG
    streams are saved and restored around a refresh, so encoding never shifts the training randomness.

    Args:
        settings: window, margin and count of the mined negatives.
        every: refresh period in optimizer steps.
        output_dir: the run's output folder.
        needed: negatives each example needs (``n_passages - 1``).
        batch_size: texts per encoding forward pass.
        bf16: encode under bf16 autocast.
        max_length: tokens per text while encoding (None: the model's).
        cache_dir: corpus-embedding cache (None: no cache; the weights change every refresh anyway).
    """

    def __init__(
        self,
        settings: MiningSettings,
        every: int,
        output_dir: str | os.PathLike[str],
        *,
        needed: int,
        batch_size: int = 64,
        bf16: bool = False,
        max_length: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        backend: str = "exact",
    ) -> None:
        if every < 1:
            raise ConfigError(f"mining.refresh_every_steps: must be >= 1, got {every}")
        self.settings = settings
        self.every = int(every)
        self.folder = Path(output_dir) / "mined"
        self.needed = int(needed)
        self.batch_size = batch_size
        self.bf16 = bf16
        self.max_length = max_length
        self.cache_dir = cache_dir
        self.backend = backend
        self.mined_step: int | None = None
        self.history: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        """Whether the negatives are re-mined before optimizer step ``step + 1`` (i.e. after ``step`` steps)."""
        return step > 0 and step % self.every == 0 and self.mined_step != step

    def _path(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.npz"

    def refresh(self, encoder: Any, datasets: Sequence[Any], step: int) -> list[Any]:
        """Re-mine every data set with ``encoder``; returns the data sets with the new negatives.

        Raises:
            DataError: a data set has an example without positives.
        """
        import dataclasses

        states = _rng_states()
        t0 = time.perf_counter()
        out, arrays, stats = [], {}, []
        try:
            for d, data in enumerate(datasets):
                result = mine_hard_negatives(
                    encoder,
                    data,
                    self.settings,
                    batch_size=self.batch_size,
                    bf16=self.bf16,
                    max_length=self.max_length,
                    cache_dir=self.cache_dir,
                    backend=self.backend,
                    show_progress=False,
                )
                lists = [
                    merge_negatives(
                        ex.negatives, data.negatives(i).tolist(), data.positives(i).tolist(), self.needed
                    )
                    for i, ex in enumerate(result.examples)
                ]
                offsets = np.zeros(len(lists) + 1, dtype=np.int64)
                offsets[1:] = np.cumsum([len(x) for x in lists])
                rows = np.fromiter((r for x in lists for r in x), dtype=np.int64, count=int(offsets[-1]))
                arrays[f"offsets_{d}"], arrays[f"rows_{d}"] = offsets, rows
                out.append(dataclasses.replace(data, neg_offsets=offsets, neg_rows=rows))
                changed = sum(1 for i, x in enumerate(lists) if set(x) != set(data.negatives(i).tolist()))
                stats.append({"dataset": d, "examples_changed": changed, **result.stats})
        finally:
            _set_rng_states(states)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(step)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        self.mined_step = step
        self.history.append({"step": step, "seconds": round(time.perf_counter() - t0, 2), "datasets": stats})
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state: the step whose negatives are in use and their file (relative to output_dir)."""
        if self.mined_step is None:
            return {"mined_step": None}
        return {
            "mined_step": self.mined_step,
            "file": str(self._path(self.mined_step).relative_to(self.folder.parent)),
        }

    def load_state_dict(self, state: dict[str, Any], datasets: Sequence[Any]) -> list[Any] | None:
        """Restore the negatives in use at the checkpoint; None when none had been mined yet.

        Raises:
            DataError: the file named by the checkpoint is missing or does not fit the data.
        """
        import dataclasses

        step = state.get("mined_step")
        if step is None:
            return None
        path = self.folder.parent / state["file"]
        if not path.is_file():
            raise DataError(
                f"{path}: the negatives mined at step {step} are missing — the checkpoint needs them to resume "
                "exactly; restore the run's mined/ folder or start from an earlier checkpoint"
            )
        with np.load(path) as z:
            out = []
            for d, data in enumerate(datasets):
                offsets, rows = z[f"offsets_{d}"], z[f"rows_{d}"]
                if len(offsets) != len(data) + 1:
                    raise DataError(
                        f"{path}: mined for {len(offsets) - 1} examples, the data set has {len(data)} — "
                        "resume with the same data"
                    )
                out.append(dataclasses.replace(data, neg_offsets=offsets.copy(), neg_rows=rows.copy()))
        self.mined_step = int(step)
        return out


def build_refresher(cfg: Any, output_dir: str | os.PathLike[str]) -> NegativeRefresher:
    """The :class:`NegativeRefresher` of a recipe's ``mining:`` block.

    Raises:
        ConfigError: ``data.n_passages`` is 1 (no hard negatives to re-mine).
    """
    m = cfg.mining
    needed = int(cfg.data.n_passages) - 1
    if needed < 1:
        raise ConfigError(
            "mining: re-mining needs hard negatives, but data.n_passages is 1 (in-batch negatives only) — "
            "set data.n_passages >= 2 or remove the mining block"
        )
    settings = MiningSettings(
        num_negatives=m.num_negatives or needed,
        range_start=m.range_start,
        range_end=m.range_end,
        margin=m.margin,
        margin_type=m.margin_type,
        sampling=m.sampling,
        seed=int(cfg.seed),
    )
    return NegativeRefresher(
        settings,
        m.refresh_every_steps,
        output_dir,
        needed=needed,
        batch_size=m.batch_size,
        bf16=bool(cfg.bf16),
        max_length=m.max_length,
    )
