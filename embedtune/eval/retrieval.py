"""Full-corpus retrieval evaluation: encode the corpus once, search it exactly, score with trec_eval rules.

```python
from embedtune import AutoBiEncoder
from embedtune.eval.datasets import load_eval_set
from embedtune.eval.retrieval import evaluate_retrieval

enc = AutoBiEncoder.from_pretrained("minilm")
metrics = evaluate_retrieval(enc, load_eval_set("../shared/data/scifact", "test"), cache_dir="~/.cache/et")
metrics["ndcg@10"]
```

The corpus is encoded in chunks (length-sorted batches inside each, by the encoder), optionally under
bf16 autocast, and cached on disk when ``cache_dir`` is given (see ``embedtune.eval.cache``). The search
is exact: blocked matrix products with ties broken as trec_eval orders them, so the retrieved top-k is
exactly the top-k of the full score list (see ``embedtune.eval.search``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedtune.errors import DataError
from embedtune.eval.cache import EmbeddingCache, cache_key, corpus_fingerprint, encoder_fingerprint
from embedtune.eval.datasets import EvalSet, indices_of
from embedtune.eval.metrics import mean_metrics, per_query_metrics
from embedtune.eval.search import search

logger = logging.getLogger("embedtune.eval")

#: Documents handed to the encoder at once: bounds the memory for texts; big enough for length sorting.
ENCODE_CHUNK = 32768


@dataclass
class RetrievalResult:
    """Everything one evaluation produced.

    Attributes:
        metrics: metric name -> mean over the evaluated queries.
        per_query: query ID -> metric name -> value.
        run: query ID -> {document ID -> score}, the top ``top_k`` results.
        num_queries: queries evaluated.
        num_docs: documents searched.
        corpus_from_cache: whether the corpus embeddings came from the cache.
        timings: seconds spent in ``encode_corpus``, ``encode_queries``, ``search``, ``metrics``.
    """

    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    run: dict[str, dict[str, float]]
    num_queries: int
    num_docs: int
    corpus_from_cache: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def _encode_kwargs(batch_size: int, bf16: bool, show_progress: bool | None, max_length: int | None) -> dict:
    kw: dict[str, Any] = {"batch_size": batch_size, "bf16": bf16, "show_progress": show_progress}
    if max_length is not None:
        kw["max_length"] = max_length
    return kw


def encode_corpus(
    encoder: Any,
    corpus: Any,
    *,
    batch_size: int = 32,
    bf16: bool = False,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    show_progress: bool | None = None,
    prefix: str | None = None,
) -> tuple[np.ndarray, bool]:
    """Embed every document of ``corpus`` (``encoder.encode_documents``), reusing the disk cache.

    Args:
        encoder: a ``BiEncoder`` (anything with ``encode_documents(texts, batch_size=, bf16=, ...)``).
        corpus: a corpus (``len``, ``ids``, ``texts(indices)``, ``fingerprint``).
        batch_size: texts per forward pass.
        bf16: bfloat16 autocast.
        max_length: tokens per document (default: the encoder's setting).
        cache_dir: cache folder; None disables the cache.
        show_progress: progress bar (default: the encoder's choice).
        prefix: passage prefix for every document (a data set's instruction); None: the model's.

    Returns:
        ``(embeddings (num_docs, dim) float32, from_cache)``; cached embeddings are memory-mapped.

    Raises:
        DataError: the corpus is empty.
    """
    n = len(corpus)
    if n == 0:
        raise DataError(f"{corpus!r}: the corpus is empty — there are no documents to encode")
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    key = description = None
    if cache is not None:
        description = {
            "kind": "document",
            "model": encoder_fingerprint(encoder),
            "corpus": corpus_fingerprint(corpus),
            "num_docs": n,
            "max_length": max_length,
            "bf16": bool(bf16),
            "prefix": prefix,
        }
        key = cache_key(description)
        hit = cache.load(key, n)
        if hit is not None:
            logger.info("corpus embeddings from cache %s", cache.paths(key)[0])
            return hit, True
    kw = _encode_kwargs(batch_size, bf16, show_progress, max_length)
    if prefix is not None:
        kw["prefix"] = prefix
    # With a cache, the vectors are written straight into the (memory-mapped) cache file, so a corpus
    # larger than RAM can be encoded; without one they are kept in memory.
    out: np.ndarray | None = None
    pending = None
    try:
        for start in range(0, n, ENCODE_CHUNK):
            rows = np.arange(start, min(n, start + ENCODE_CHUNK))
            emb = np.asarray(encoder.encode_documents(corpus.texts(rows), **kw), dtype=np.float32)
            if out is None:
                if cache is not None and key is not None:
                    pending = cache.begin(key, (n, emb.shape[1]))
                    out = pending.array
                else:
                    out = np.empty((n, emb.shape[1]), dtype=np.float32)
            out[start : start + len(rows)] = emb
    except BaseException:
        if pending is not None:
            pending.abort()
        raise
    assert out is not None  # n > 0 was checked above
    if pending is not None and description is not None:
        out = pending.commit(description)
    return out, False


def _doc_id_priority(ids: Sequence[str]) -> torch.Tensor:
    """Rank of each row's ID in ascending string order: trec_eval ranks the larger ID first on a tie."""
    order = sorted(range(len(ids)), key=lambda i: (ids[i], -i))
    priority = torch.empty(len(ids), dtype=torch.long)
    priority[torch.as_tensor(order, dtype=torch.long)] = torch.arange(len(ids))
    return priority


def retrieve(
    encoder: Any,
    eval_set: EvalSet,
    top_k: int = 100,
    *,
    batch_size: int = 32,
    bf16: bool = False,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    backend: str = "exact",
    show_progress: bool | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, dict[str, float]], bool]:
    """Search the corpus for every query of ``eval_set``.

    Returns:
        ``(run, corpus_from_cache)``; ``run`` maps every query ID (each one, even with no result) to
        its top ``top_k`` {document ID -> score}.

    Raises:
        DataError: the corpus or the query set is empty.
    """
    timings = timings if timings is not None else {}
    corpus = eval_set.corpus
    if len(corpus) == 0:
        raise DataError(f"{eval_set.source or eval_set.name}: the corpus is empty — nothing to search")
    qids = list(eval_set.queries)
    if not qids:
        raise DataError(f"{eval_set.source or eval_set.name}: no queries to evaluate")

    t0 = time.perf_counter()
    doc_emb, from_cache = encode_corpus(
        encoder,
        corpus,
        batch_size=batch_size,
        bf16=bf16,
        max_length=max_length,
        cache_dir=cache_dir,
        show_progress=show_progress,
        prefix=eval_set.passage_prefix,
    )
    t1 = time.perf_counter()
    kw = _encode_kwargs(batch_size, bf16, show_progress, max_length)
    if eval_set.query_prefixes is not None:
        # The data set's instructions, as in training (the model's own query prefix where a query has none).
        default = encoder.settings.query_prefix if hasattr(encoder, "settings") else ""
        kw["prefix"] = [eval_set.query_prefixes.get(q, default) for q in qids]
    q_emb = np.asarray(encoder.encode_queries([eval_set.queries[q] for q in qids], **kw), dtype=np.float32)
    t2 = time.perf_counter()

    ids = list(corpus.ids)
    exclude = None
    if eval_set.ignore_identical_ids:
        exclude = torch.from_numpy(indices_of(corpus, qids))
    device = getattr(encoder, "device", None)
    device = device if isinstance(device, torch.device) and device.type == "cuda" else None
    scores, idx = search(
        torch.from_numpy(q_emb),
        doc_emb,
        top_k,
        backend=backend,
        exclude=exclude,
        tie_priority=_doc_id_priority(ids),
        device=device,
    )
    run: dict[str, dict[str, float]] = {}
    for qid, s_row, i_row in zip(qids, scores.tolist(), idx.tolist()):
        results: dict[str, float] = {}
        for s, i in zip(s_row, i_row):
            if i >= 0:
                results.setdefault(ids[i], s)  # duplicate IDs: keep the better-ranked copy
        run[qid] = results
    t3 = time.perf_counter()
    timings.update(encode_corpus=t1 - t0, encode_queries=t2 - t1, search=t3 - t2)
    return run, from_cache


def run_evaluation(
    encoder: Any,
    eval_set: EvalSet,
    k_values: Sequence[int] = (1, 10, 100),
    *,
    batch_size: int = 32,
    bf16: bool = False,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    backend: str = "exact",
    top_k: int | None = None,
    show_progress: bool | None = None,
) -> RetrievalResult:
    """Encode, search and score; see ``evaluate_retrieval``. Returns the run and per-query values too."""
    timings: dict[str, float] = {}
    depth = max(max(k_values), top_k or 0)
    run, from_cache = retrieve(
        encoder,
        eval_set,
        depth,
        batch_size=batch_size,
        bf16=bf16,
        max_length=max_length,
        cache_dir=cache_dir,
        backend=backend,
        show_progress=show_progress,
        timings=timings,
    )
    t0 = time.perf_counter()
    per_query = per_query_metrics(eval_set.qrels, run, k_values)
    metrics = mean_metrics(per_query.values(), k_values)
    timings["metrics"] = time.perf_counter() - t0
    return RetrievalResult(
        metrics=metrics,
        per_query=per_query,
        run=run,
        num_queries=len(per_query),
        num_docs=len(eval_set.corpus),
        corpus_from_cache=from_cache,
        timings=timings,
    )


def evaluate_retrieval(
    encoder: Any,
    eval_set: EvalSet,
    k_values: Sequence[int] = (1, 10, 100),
    batch_size: int = 32,
    bf16: bool = False,
    cache_dir: str | Path | None = None,
    *,
    max_length: int | None = None,
    backend: str = "exact",
    show_progress: bool | None = None,
) -> dict[str, float]:
    """Full-corpus retrieval metrics of ``encoder`` on ``eval_set``.

    Args:
        encoder: a ``BiEncoder`` (``encode_queries`` / ``encode_documents``).
        eval_set: queries, corpus and qrels (``embedtune.eval.datasets.load_eval_set``).
        k_values: cut-offs; every metric family is reported at each.
        batch_size: texts per forward pass.
        bf16: encode under bfloat16 autocast.
        cache_dir: reuse corpus embeddings from this folder when model and corpus are unchanged.
        max_length: tokens per text (default: the encoder's setting).
        backend: ``"exact"`` (blocked matrix products) or ``"faiss"``.
        show_progress: progress bars while encoding.

    Returns:
        ``{"ndcg@10": ..., "recall@100": ..., "mrr@10": ..., "map@100": ..., "precision@1": ..., ...}``.

    Raises:
        DataError: the corpus or the query set is empty.
    """
    return run_evaluation(
        encoder,
        eval_set,
        k_values,
        batch_size=batch_size,
        bf16=bf16,
        max_length=max_length,
        cache_dir=cache_dir,
        backend=backend,
        show_progress=show_progress,
    ).metrics


def write_trec_run(run: Mapping[str, Mapping[str, float]], path: str | Path, tag: str = "embedtune") -> Path:
    """Write a run in TREC format (``qid Q0 docid rank score tag``), ranked as trec_eval ranks it.

    Returns:
        The path.
    """
    from embedtune._atomic import atomic_file
    from embedtune.eval.metrics import trec_order

    p = Path(path)
    with atomic_file(p) as f:  # an earlier run file survives a failed write
        for qid in run:
            docs = run[qid]
            for rank, doc_id in enumerate(trec_order(docs), start=1):
                # repr keeps every bit of the float, so reading the file back gives the same ranking.
                f.write(f"{qid} Q0 {doc_id} {rank} {docs[doc_id]!r} {tag}\n")
    return p
