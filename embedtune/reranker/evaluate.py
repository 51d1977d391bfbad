"""Rerank a bi-encoder's top-k with a cross-encoder and report the gain, on the same queries and qrels.

The retriever's run comes from the evaluation's full-corpus search (``embedtune.eval.retrieval``,
cached corpus embeddings, exact blocked search); the reranker rescores each query's top ``top_k``
documents; both runs are scored by the same trec_eval-exact metrics, so the difference is the gain of
reranking alone. Documents below the top-k keep no score (the reranked run has ``top_k`` entries),
so recall@k for k > top_k cannot change.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedtune.eval.metrics import trec_order

__all__ = ["RerankEvaluation", "evaluate_reranking", "fuse_runs", "rerank_run"]


def fuse_runs(
    retriever_run: Mapping[str, Mapping[str, float]],
    reranker_run: Mapping[str, Mapping[str, float]],
    weight: float = 0.5,
) -> dict[str, dict[str, float]]:
    """Interpolate per-query min-max-normalised scores: ``weight * reranker + (1 - weight) * retriever``.

    Only documents the reranker scored are kept. ``weight=1`` is the reranker alone (same order).

    Args:
        retriever_run: query ID -> {document ID -> retriever score}.
        reranker_run: query ID -> {document ID -> reranker score}.
        weight: the reranker's share, in [0, 1]; choose it before looking at test results.

    Returns:
        query ID -> {document ID -> fused score}.
    """

    def norm(d: Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
        vals = [d[k] for k in keys]
        lo, hi = min(vals), max(vals)
        span = hi - lo or 1.0
        return {k: (d[k] - lo) / span for k in keys}

    out: dict[str, dict[str, float]] = {}
    for qid, rr in reranker_run.items():
        keys = list(rr)
        if not keys:
            out[qid] = {}
            continue
        a, b = norm(rr, keys), norm(retriever_run[qid], keys)
        out[qid] = {k: weight * a[k] + (1 - weight) * b[k] for k in keys}
    return out


def rerank_run(
    reranker: Any,
    queries: Mapping[str, str],
    run: Mapping[str, Mapping[str, float]],
    corpus: Any,
    *,
    top_k: int = 100,
    batch_size: int = 32,
    bf16: bool = False,
    show_progress: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Rescore every query's top ``top_k`` documents of ``run`` with ``reranker``.

    Args:
        reranker: a ``CrossEncoderReranker`` (``predict(queries, passages, ...)``).
        queries: query ID -> text.
        run: query ID -> {document ID -> retriever score}.
        corpus: the documents (``index_of``/``indices_of`` and ``texts``).
        top_k: documents per query to rescore (by the retriever's ranking).
        batch_size: pairs per forward pass.
        bf16: bfloat16 autocast.
        show_progress: progress bar.

    Returns:
        query ID -> {document ID -> reranker score} for the top ``top_k`` documents of each query.
    """
    from embedtune.eval.datasets import indices_of

    pairs_q: list[str] = []
    pairs_d: list[str] = []
    owners: list[tuple[str, str]] = []
    for qid, docs in run.items():
        top = trec_order(docs)[:top_k]
        rows = indices_of(corpus, top)
        texts = corpus.texts([int(r) for r in rows if r >= 0])
        kept = [d for d, r in zip(top, rows) if r >= 0]
        pairs_q.extend([queries[qid]] * len(kept))
        pairs_d.extend(texts)
        owners.extend((qid, d) for d in kept)
    scores = reranker.predict(pairs_q, pairs_d, batch_size=batch_size, bf16=bf16, show_progress=show_progress)
    out: dict[str, dict[str, float]] = {qid: {} for qid in run}
    for (qid, d), s in zip(owners, np.asarray(scores, dtype=np.float64).tolist()):
        out[qid][d] = s
    return out


@dataclass
class RerankEvaluation:
    """Metrics of the retriever alone and after reranking its top-k.

    Attributes:
        retriever: metric -> value for the bi-encoder's run.
        reranked: metric -> value after reranking.
        gain: metric -> reranked - retriever.
        top_k: documents reranked per query.
        num_queries: queries evaluated.
        timings: seconds for ``retrieve`` and ``rerank``.
        run: the reranked run (query ID -> {document ID -> score}).
        fused: metric -> value of the interpolated run (``fusion_weight`` given), else empty.
    """

    retriever: dict[str, float]
    reranked: dict[str, float]
    gain: dict[str, float]
    top_k: int
    num_queries: int
    timings: dict[str, float] = field(default_factory=dict)
    run: dict[str, dict[str, float]] = field(default_factory=dict)
    fused: dict[str, float] = field(default_factory=dict)

    def table(self, metrics: Sequence[str] = ("ndcg@10", "mrr@10", "recall@10", "recall@100")) -> str:
        """A Markdown table: retriever, reranked, gain and ratio for each metric."""
        lines = ["| metric | retriever | reranked | gain | ratio |", "|---|---|---|---|---|"]
        for m in metrics:
            if m not in self.retriever:
                continue
            a, b = self.retriever[m], self.reranked[m]
            ratio = f"{b / a:.3f}x" if a else "-"
            lines.append(f"| {m} | {a:.4f} | {b:.4f} | {b - a:+.4f} | {ratio} |")
        return "\n".join(lines)


def evaluate_reranking(
    retriever: Any,
    reranker: Any,
    eval_set: Any,
    *,
    top_k: int = 100,
    k_values: Sequence[int] = (1, 10, 100),
    batch_size: int = 32,
    rerank_batch_size: int = 32,
    bf16: bool = False,
    cache_dir: str | Path | None = None,
    max_length: int | None = None,
    run: Mapping[str, Mapping[str, float]] | None = None,
    fusion_weight: float | None = None,
    show_progress: bool | None = None,
) -> RerankEvaluation:
    """Evaluate a bi-encoder, rerank its top-k, evaluate again.

    Args:
        retriever: the ``BiEncoder`` whose top-k is reranked (unused when ``run`` is given).
        reranker: the ``CrossEncoderReranker``.
        eval_set: queries, corpus and qrels (``embedtune.eval.datasets.load_eval_set``).
        top_k: documents reranked per query.
        k_values: metric cut-offs.
        batch_size: texts per bi-encoder forward pass.
        rerank_batch_size: pairs per cross-encoder forward pass.
        bf16: bfloat16 autocast for both models.
        cache_dir: corpus-embedding cache of the evaluation.
        max_length: bi-encoder tokens per text.
        run: a precomputed retriever run to rerank instead of searching.
        fusion_weight: also report the interpolation of reranker and retriever scores (``fuse_runs``).
        show_progress: progress bars.

    Returns:
        A :class:`RerankEvaluation`.
    """
    from embedtune.eval.metrics import compute_metrics
    from embedtune.eval.retrieval import run_evaluation

    t0 = time.perf_counter()
    depth = max(max(k_values), top_k)
    if run is None:
        base = run_evaluation(
            retriever,
            eval_set,
            k_values,
            batch_size=batch_size,
            bf16=bf16,
            max_length=max_length,
            cache_dir=cache_dir,
            top_k=depth,
            show_progress=show_progress,
        )
        run = base.run
        retriever_metrics = base.metrics
    else:
        retriever_metrics = compute_metrics(eval_set.qrels, dict(run), k_values)
    t1 = time.perf_counter()
    reranked = rerank_run(
        reranker,
        eval_set.queries,
        run,
        eval_set.corpus,
        top_k=top_k,
        batch_size=rerank_batch_size,
        bf16=bf16,
        show_progress=show_progress,
    )
    t2 = time.perf_counter()
    reranked_metrics = compute_metrics(eval_set.qrels, reranked, k_values)
    gain = {m: reranked_metrics[m] - retriever_metrics[m] for m in reranked_metrics if m in retriever_metrics}
    fused = {}
    if fusion_weight is not None:
        fused = compute_metrics(eval_set.qrels, fuse_runs(run, reranked, fusion_weight), k_values)
    return RerankEvaluation(
        retriever=retriever_metrics,
        reranked=reranked_metrics,
        gain=gain,
        top_k=top_k,
        num_queries=len([q for q in eval_set.qrels if q in reranked]),
        timings={"retrieve": t1 - t0, "rerank": t2 - t1},
        run=reranked,
        fused=fused,
    )
