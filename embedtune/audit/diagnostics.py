"""Training diagnostics from the embeddings the contrastive loss already has (no extra forward pass).

At step 0 and every log step the training loop reports, over the queries of the step:

* ``diag/positive_score`` -- mean score of each query's positive;
* ``diag/hardest_negative_score`` -- mean of each query's highest-scoring *candidate negative* (the
  loss's own candidates: its hard negatives, plus in-batch and cross-rank ones when they are on, minus
  the passages masked as the same document);
* ``diag/zero_loss_share`` -- share of queries whose InfoNCE term is below ``ZERO_LOSS`` (the positive
  already takes > 99 % of the softmax: the query teaches nothing);
* ``diag/positive_not_first_share`` -- share of queries where some candidate scores at least as high as
  the positive;
* ``diag/score_spread`` -- mean over queries of the range (highest - lowest) of the candidates' scores.

:func:`warnings_for` turns them into warnings: *negatives too easy* (most queries at loss ~0), and
*collapsed* (every candidate of a query scores the same: the embeddings stopped discriminating).

The scores are rebuilt from the loss's inputs with the same candidate set and masking as
``embedtune.training.loss.info_nce``; ``tests/unit/audit/test_diagnostics.py`` checks that the mean of
the per-query losses computed here equals the loss itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

#: A query whose loss is below this counts as "loss ~0" (positive's softmax probability > 0.99).
ZERO_LOSS = 0.01
#: Warn "too easy" when at least this share of queries is at loss ~0.
TOO_EASY_SHARE = 0.8
#: Warn "collapsed" when a query's candidates span less than this score range on average.
COLLAPSE_SPREAD = 1e-3

KEYS: tuple[str, ...] = (
    "diag/positive_score",
    "diag/hardest_negative_score",
    "diag/zero_loss_share",
    "diag/positive_not_first_share",
    "diag/score_spread",
)


@torch.no_grad()
def candidate_scores(
    queries: Tensor,
    passages: Tensor,
    *,
    n_passages: int,
    in_batch_negatives: bool = True,
    doc_ids: Tensor | None = None,
    positive_ids: Tensor | None = None,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """The loss's score matrix and label of each query (masked candidates at ``-inf``).

    Same layout and masking as ``info_nce`` (it uses the loss's own ``false_negative_mask``): with
    in-batch negatives every passage is a candidate and the label is the query's positive row;
    otherwise only the query's own group, positive at 0.

    Returns:
        ``(scores (B, C) float32, labels (B,) int64)``.
    """
    from embedtune.training.loss import _passage_keys, false_negative_mask

    q, p = queries.detach().float(), passages.detach().float()
    b, n_total = q.shape[0], p.shape[0]
    global_q = torch.arange(offset, offset + b, device=q.device)
    pos_rows = global_q * n_passages
    mask = None
    if doc_ids is not None:
        mask = false_negative_mask(_passage_keys(doc_ids.to(q.device), n_total), pos_rows, positive_ids)
    if in_batch_negatives:
        scores = q @ p.T  # (B, N)
        labels = pos_rows
    else:
        groups = p.view(-1, n_passages, p.shape[-1])[global_q]  # (B, n, d)
        scores = torch.einsum("bd,bkd->bk", q, groups)
        labels = torch.zeros(b, dtype=torch.long, device=q.device)
        if mask is not None:
            mask = mask.gather(1, pos_rows[:, None] + torch.arange(n_passages, device=q.device))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return scores, labels


@torch.no_grad()
def contrastive_diagnostics(
    queries: Tensor,
    passages: Tensor,
    *,
    n_passages: int,
    temperature: float,
    in_batch_negatives: bool = True,
    doc_ids: Tensor | None = None,
    positive_ids: Tensor | None = None,
    offset: int = 0,
) -> dict[str, float]:
    """Sums over the local queries (see :class:`DiagnosticsAccumulator`) of the four diagnostics.

    Returns:
        ``{"queries": B, "positive_score": sum, "hardest_negative_score": sum (over queries that have a
        negative), "with_negative": count, "zero_loss": count, "positive_not_first": count,
        "loss": sum of per-query losses}``.
    """
    scores, labels = candidate_scores(
        queries,
        passages,
        n_passages=n_passages,
        in_batch_negatives=in_batch_negatives,
        doc_ids=doc_ids,
        positive_ids=positive_ids,
        offset=offset,
    )
    b = scores.shape[0]
    rows = torch.arange(b, device=scores.device)
    pos = scores[rows, labels]  # (B,)
    others = scores.clone()
    others[rows, labels] = float("-inf")
    hardest = others.max(dim=1).values  # (B,), -inf when a query has no candidate negative
    has_neg = torch.isfinite(hardest)
    per_query_loss = torch.logsumexp(scores / temperature, dim=1) - pos / temperature
    finite = torch.isfinite(scores)
    spread = (
        scores.masked_fill(~finite, float("-inf")).max(dim=1).values
        - scores.masked_fill(~finite, float("inf")).min(dim=1).values
    )
    return {
        "queries": float(b),
        "positive_score": float(pos.sum()),
        "hardest_negative_score": float(hardest[has_neg].sum()),
        "with_negative": float(has_neg.sum()),
        "zero_loss": float((per_query_loss < ZERO_LOSS).sum()),
        "positive_not_first": float((hardest >= pos).sum()),
        "loss": float(per_query_loss.sum()),
        "spread": float(spread.sum()),
    }


#: The sums :func:`contrastive_diagnostics` returns, in a fixed order (added over ranks as one vector).
SUM_KEYS = (
    "queries",
    "positive_score",
    "hardest_negative_score",
    "with_negative",
    "zero_loss",
    "positive_not_first",
    "loss",
    "spread",
)


class DiagnosticsAccumulator:
    """Adds the sums of several micro-batches (and ranks) and turns them into the logged means."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, sums: Mapping[str, float]) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def __bool__(self) -> bool:
        return bool(self.sums.get("queries"))

    def means(self) -> dict[str, float]:
        """``diag/*`` means over the queries added so far (empty when none)."""
        s = self.sums
        n = s.get("queries", 0.0)
        if not n:
            return {}
        with_neg = s.get("with_negative", 0.0)
        out = {
            "diag/positive_score": s["positive_score"] / n,
            "diag/zero_loss_share": s["zero_loss"] / n,
            "diag/positive_not_first_share": s["positive_not_first"] / n,
            "diag/score_spread": s.get("spread", 0.0) / n,
        }
        if with_neg:
            out["diag/hardest_negative_score"] = s["hardest_negative_score"] / with_neg
        return out

    def reset(self) -> None:
        self.sums = {}


def warnings_for(means: Mapping[str, Any], step: int) -> list[str]:
    """Plain-language warnings for one set of logged diagnostics."""
    out = []
    zero = means.get("diag/zero_loss_share")
    if zero is not None and zero >= TOO_EASY_SHARE:
        out.append(
            f"step {step}: {zero:.0%} of the queries have loss ~0 (positive takes > 99% of the softmax): the "
            "negatives are too easy — mine hard negatives (embedtune mine), raise loss.temperature's sharpness "
            "(lower it) or use more negatives"
        )
    spread = means.get("diag/score_spread")
    if spread is not None and spread < COLLAPSE_SPREAD:
        pos, neg = means.get("diag/positive_score"), means.get("diag/hardest_negative_score")
        out.append(
            f"step {step}: every candidate of a query scores the same (mean score range {spread:.2e}; positive "
            f"{pos:.4f}, hardest negative {neg if neg is None else round(neg, 4)}): the embeddings have collapsed — "
            "lower optimizer.lr, check pooling/normalisation and the data (run embedtune audit)"
        )
    return out
