"""Retrieval metrics with trec_eval semantics.

Every number here equals what ``trec_eval`` (through ``pytrec_eval``) reports for the same qrels and
run, so results can be compared with BEIR, MTEB and published tables:

* **Ranking.** A query's results are ordered by score, highest first; equal scores are ordered by
  document ID, *descending* (byte-wise string comparison), as trec_eval does. The order of the run's
  dictionary does not matter.
* **Relevance.** A judged document with relevance ``>= 1`` is relevant; ``0`` (or negative) is judged
  non-relevant; unjudged documents are non-relevant. NDCG uses the relevance value itself as the gain
  (linear gain, negative values count as 0), the discount ``1 / log2(rank + 1)``, and the ideal ranking
  of all judged documents.
* **Which queries count.** A query is evaluated when it is in both the qrels and the run (an empty
  result list counts, and scores 0). Queries without any relevant document score 0 on every metric.
  Aggregates are the mean over the evaluated queries. ``evaluate_retrieval`` puts every judged query in
  the run, so no judged query is silently dropped.

Metric names (``k`` from ``k_values``) and their trec_eval equivalents:

==================  ==========================================================================
``ndcg@k``          ``ndcg_cut_k``
``recall@k``        ``recall_k`` (relevant retrieved in the top k / all relevant)
``precision@k``     ``P_k`` (always divided by k, even when fewer than k results exist)
``map@k``           ``map_cut_k`` (divided by all relevant, not by min(k, relevant))
``mrr@k``           ``recip_rank`` on the run cut to its top k: the MRR@k of BEIR and MS MARCO
==================  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from embedtune.errors import ConfigError

#: Metric families understood by ``compute_metrics``.
METRIC_NAMES: tuple[str, ...] = ("ndcg", "recall", "mrr", "map", "precision")

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def trec_order(doc_scores: Mapping[str, float]) -> list[str]:
    """Return the document IDs of one query's results in trec_eval's ranking order.

    Args:
        doc_scores: document ID -> score for one query.

    Returns:
        The IDs sorted by score descending, ties by document ID descending.
    """
    # Python compares str by code point, which is the byte order of their UTF-8 encoding: the same
    # order as trec_eval's strcmp on the UTF-8 bytes.
    return sorted(doc_scores, key=lambda d: (doc_scores[d], d), reverse=True)


def _check_k_values(k_values: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(sorted(set(k_values)))
    if not ks or any((not isinstance(k, int)) or isinstance(k, bool) or k < 1 for k in ks):
        raise ConfigError(f"k_values must be positive integers, got {list(k_values)!r}")
    return ks


def _check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    names = tuple(metrics)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    return names


def query_metrics(
    judgements: Mapping[str, int],
    doc_scores: Mapping[str, float],
    k_values: Sequence[int] = (1, 10, 100),
    metrics: Sequence[str] = METRIC_NAMES,
) -> dict[str, float]:
    """Compute the metrics of one query.

    Args:
        judgements: document ID -> relevance (the query's qrels line).
        doc_scores: document ID -> score (the query's results; may be empty).
        k_values: cut-offs.
        metrics: metric families from ``METRIC_NAMES``.

    Returns:
        ``{"ndcg@10": ..., "recall@10": ..., ...}``.

    Raises:
        ConfigError: an unknown metric name or a cut-off that is not a positive integer.
    """
    ks = _check_k_values(k_values)
    names = _check_metrics(metrics)
    max_k = ks[-1]
    ranked = trec_order(doc_scores)[:max_k]
    # (rank,) relevance of each retrieved document; unjudged documents are 0.
    rels = [judgements.get(d, 0) for d in ranked]
    num_rel = sum(1 for r in judgements.values() if r >= 1)
    ideal = sorted((r for r in judgements.values() if r > 0), reverse=True)

    # Prefix sums so every cut-off is O(1) after one pass.
    dcg = [0.0]
    idcg = [0.0]
    hits = [0]
    ap = [0.0]
    first_hit = 0  # 1-based rank of the first relevant result; 0 = none in the top max_k
    for i in range(max_k):
        discount = math.log2(i + 2)
        rel = rels[i] if i < len(rels) else 0
        is_rel = rel >= 1
        dcg.append(dcg[-1] + (rel / discount if rel > 0 else 0.0))
        idcg.append(idcg[-1] + (ideal[i] / discount if i < len(ideal) else 0.0))
        hits.append(hits[-1] + int(is_rel))
        ap.append(ap[-1] + (hits[-1] / (i + 1) if is_rel else 0.0))
        if is_rel and not first_hit:
            first_hit = i + 1

    out: dict[str, float] = {}
    for k in ks:
        if "ndcg" in names:
            out[f"ndcg@{k}"] = dcg[k] / idcg[k] if idcg[k] > 0 else 0.0
        if "recall" in names:
            out[f"recall@{k}"] = hits[k] / num_rel if num_rel else 0.0
        if "mrr" in names:
            out[f"mrr@{k}"] = 1.0 / first_hit if 0 < first_hit <= k else 0.0
        if "map" in names:
            out[f"map@{k}"] = ap[k] / num_rel if num_rel else 0.0
        if "precision" in names:
            out[f"precision@{k}"] = hits[k] / k
    return out


def per_query_metrics(
    qrels: Qrels,
    run: Run,
    k_values: Sequence[int] = (1, 10, 100),
    metrics: Sequence[str] = METRIC_NAMES,
) -> dict[str, dict[str, float]]:
    """Compute metrics for every query that is in both ``qrels`` and ``run`` (trec_eval's rule).

    Args:
        qrels: query ID -> {document ID -> relevance}.
        run: query ID -> {document ID -> score}.
        k_values: cut-offs.
        metrics: metric families from ``METRIC_NAMES``.

    Returns:
        query ID -> metric name -> value.
    """
    return {qid: query_metrics(qrels[qid], run[qid], k_values, metrics) for qid in qrels if qid in run}


def compute_metrics(
    qrels: Qrels,
    run: Run,
    k_values: Sequence[int] = (1, 10, 100),
    metrics: Sequence[str] = METRIC_NAMES,
) -> dict[str, float]:
    """Mean retrieval metrics over the evaluated queries, with trec_eval semantics.

    Args:
        qrels: query ID -> {document ID -> relevance}.
        run: query ID -> {document ID -> score}. Queries missing here are not evaluated (as in
            trec_eval without ``-c``); give them an empty dict to have them count as 0.
        k_values: cut-offs.
        metrics: metric families from ``METRIC_NAMES``.

    Returns:
        metric name (``"ndcg@10"``, ``"recall@100"``, ``"mrr@10"``, ``"map@100"``, ``"precision@1"``)
        -> mean value; every value is 0.0 when no query is evaluated.
    """
    per_query = per_query_metrics(qrels, run, k_values, metrics)
    return mean_metrics(per_query.values(), k_values, metrics)


def mean_metrics(
    per_query: Iterable[Mapping[str, float]],
    k_values: Sequence[int] = (1, 10, 100),
    metrics: Sequence[str] = METRIC_NAMES,
) -> dict[str, float]:
    """Average per-query metric dictionaries (0.0 for each metric when there are none)."""
    keys = [f"{m}@{k}" for k in _check_k_values(k_values) for m in _check_metrics(metrics)]
    rows = list(per_query)
    if not rows:
        return dict.fromkeys(keys, 0.0)
    return {key: math.fsum(r[key] for r in rows) / len(rows) for key in keys}
