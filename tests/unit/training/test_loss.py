"""InfoNCE against a naive per-query Python loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from embedtune.training.loss import InfoNCELoss, LossConfig, info_nce, sequence_fingerprints


def naive_info_nce(q, p, n_passages, temperature, in_batch, doc_ids, offset):
    """One query at a time, candidates listed explicitly."""
    losses = []
    for i in range(q.shape[0]):
        g = offset + i
        pos = g * n_passages
        rows = range(p.shape[0]) if in_batch else range(pos, pos + n_passages)
        logits = []
        for j in rows:
            if doc_ids is not None and j != pos and int(doc_ids[j]) == int(doc_ids[pos]):
                continue  # a false negative: the same document as the positive
            logits.append(float(q[i].double() @ p[j].double()) / temperature)
        pos_logit = float(q[i].double() @ p[pos].double()) / temperature
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        losses.append(lse - pos_logit)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("offset", [0, 2])
def test_info_nce_matches_naive_loop(in_batch, masked, offset):
    g = torch.Generator().manual_seed(0)
    b_total, n_passages, d, b_local = 5, 3, 8, 3
    q = F.normalize(torch.randn(b_local, d, generator=g), dim=-1)
    p = F.normalize(torch.randn(b_total * n_passages, d, generator=g), dim=-1)
    ids = torch.randint(0, 6, (b_total * n_passages,), generator=g)  # many collisions on purpose
    doc_ids = ids if masked else None
    got = info_nce(
        q,
        p,
        n_passages=n_passages,
        temperature=0.05,
        in_batch_negatives=in_batch,
        doc_ids=doc_ids,
        offset=offset,
    )
    want = naive_info_nce(q, p, n_passages, 0.05, in_batch, doc_ids, offset)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_masking_changes_the_loss_only_when_ids_collide():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    p = F.normalize(torch.randn(8, 8, generator=g), dim=-1)
    unique = torch.arange(8)
    plain = info_nce(q, p, n_passages=2, temperature=1.0, doc_ids=None)
    assert info_nce(q, p, n_passages=2, temperature=1.0, doc_ids=unique).item() == pytest.approx(plain.item())
    shared = unique.clone()
    shared[2] = shared[0]  # query 1's positive is the same document as query 0's positive
    masked = info_nce(q, p, n_passages=2, temperature=1.0, doc_ids=shared)
    # Removing a candidate from a log-sum-exp can only lower the loss.
    assert masked.item() < plain.item()


def test_doc_ids_accept_group_shape():
    g = torch.Generator().manual_seed(2)
    q, p = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g)
    ids = torch.tensor([[1, 2], [1, 3], [4, 5]])
    a = info_nce(q, p, n_passages=2, doc_ids=ids)
    b = info_nce(q, p, n_passages=2, doc_ids=ids.reshape(-1))
    assert torch.equal(a, b)


def test_matryoshka_is_mean_of_truncated_renormalised_losses():
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    p = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    cfg = LossConfig(temperature=0.1, matryoshka_dims=[16, 4], matryoshka_weights=[1.0, 3.0])
    got = InfoNCELoss(cfg)(q, p, n_passages=2)
    full = naive_info_nce(q, p, 2, 0.1, True, None, 0)
    small = naive_info_nce(
        F.normalize(q[:, :4], dim=-1), F.normalize(p[:, :4], dim=-1), 2, 0.1, True, None, 0
    )
    assert got.item() == pytest.approx((full + 3 * small) / 4, rel=1e-5)


def test_fingerprints_equal_iff_same_real_tokens():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 9], [5, 6, 7, 0], [6, 5, 7, 0], [5, 6, 7, 3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    fp = sequence_fingerprints(ids, mask)
    assert fp[0] == fp[1] == fp[2]  # padding content does not matter
    assert fp[0] != fp[3]  # order matters
    assert fp[0] != fp[4]  # length matters
