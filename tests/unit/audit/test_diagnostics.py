"""Training diagnostics: rebuilt from the loss's inputs, they agree with the loss itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedtune.audit.diagnostics import (
    DiagnosticsAccumulator,
    candidate_scores,
    contrastive_diagnostics,
    warnings_for,
)
from embedtune.training.loss import info_nce


def _batch(b=6, n=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    p = F.normalize(torch.randn(b * n, d, generator=g), dim=-1)
    return q, p


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_mean_per_query_loss_equals_info_nce(in_batch, masked):
    q, p = _batch()
    ids = pos_ids = None
    if masked:
        ids = torch.arange(18)
        ids[4] = ids[0]  # query 1's first negative is query 0's positive document
        ids[7] = ids[6]  # a duplicate inside query 2's own group
        ids[10] = 99  # query 3 has a second positive (99) that shows up as its own negative
        pos_ids = torch.tensor([[6, -1], [9, 99], [12, -1], [15, -1]])  # the local queries 2..5
    # The local queries are rows 2..5 of the global batch (as on rank 1 of 2 with cross-rank negatives).
    kw = dict(n_passages=3, in_batch_negatives=in_batch, doc_ids=ids, positive_ids=pos_ids, offset=2)
    loss = info_nce(q[2:], p, temperature=0.05, **kw)
    d = contrastive_diagnostics(q[2:], p, temperature=0.05, **kw)
    assert d["queries"] == 4
    assert d["loss"] / d["queries"] == pytest.approx(float(loss), rel=1e-5)


def test_counts_against_a_hand_made_batch():
    # 2 queries, 2 passages each (positive first), no in-batch negatives.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    # Query 0: positive 1.0, negative 0.0 -> at temperature 0.01 the loss is ~0.
    # Query 1: positive 1.0, negative 1.0 (a tie) -> the positive is not ranked first; loss log 2.
    d = contrastive_diagnostics(q, p, n_passages=2, temperature=0.01, in_batch_negatives=False)
    assert d["zero_loss"] == 1 and d["positive_not_first"] == 1
    assert d["positive_score"] == 2.0 and d["hardest_negative_score"] == 1.0
    scores, labels = candidate_scores(q, p, n_passages=2, in_batch_negatives=False)
    assert scores.tolist() == [[1.0, 0.0], [1.0, 1.0]] and labels.tolist() == [0, 0]


def test_accumulated_means_and_warnings():
    acc = DiagnosticsAccumulator()
    assert not acc and acc.means() == {}
    q, p = _batch()
    acc.add(contrastive_diagnostics(q, p, n_passages=3, temperature=0.05))
    acc.add(contrastive_diagnostics(q, p, n_passages=3, temperature=0.05))
    one = contrastive_diagnostics(q, p, n_passages=3, temperature=0.05)
    assert acc.means()["diag/positive_score"] == pytest.approx(one["positive_score"] / 6)
    # Easy: each positive is its query, negatives orthogonal -> loss ~0 everywhere.
    eye = torch.eye(4)
    easy = DiagnosticsAccumulator()
    easy.add(
        contrastive_diagnostics(
            eye[:2], torch.stack([eye[0], eye[2], eye[1], eye[3]]), n_passages=2, temperature=0.05
        )
    )
    assert easy.means()["diag/zero_loss_share"] == 1.0
    assert any("too easy" in w for w in warnings_for(easy.means(), 0))
    # Collapsed: every embedding the same.
    same = torch.ones(6, 4) / 2
    col = DiagnosticsAccumulator()
    col.add(contrastive_diagnostics(same[:2], same, n_passages=3, temperature=0.05))
    w = warnings_for(col.means(), 10)
    assert any("collapsed" in x for x in w) and not any("too easy" in x for x in w)
    # A healthy random batch warns about nothing.
    assert warnings_for(acc.means(), 0) == []
