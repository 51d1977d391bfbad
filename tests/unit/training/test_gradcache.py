"""GradCache gradients equal the plain loss's gradients."""

from __future__ import annotations

import pytest
import torch
from _training_tiny import TinyEncoder, random_inputs

from embedtune.training.gradcache import GradCache, RandContext
from embedtune.training.loss import InfoNCELoss, LossConfig

N_PASSAGES = 3


def _batch(seed: int, b: int = 6):
    g = torch.Generator().manual_seed(seed)
    queries = random_inputs(g, b, 9, instruction=3)  # instruction tokens excluded from pooling
    passages = random_inputs(g, b * N_PASSAGES, 12)
    doc_ids = torch.randint(0, 8, (b * N_PASSAGES,), generator=g)  # collisions -> masking is active
    return queries, passages, doc_ids


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _encode(model):
    return lambda x: model(x["input_ids"], x["attention_mask"], x["pooling_mask"])


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_gradcache_equals_plain_loss_without_dropout(chunk_size):
    torch.manual_seed(0)
    # float64 so that the comparison measures the method, not float32 summation order.
    model = TinyEncoder(dropout=0.0).double()
    loss_fn = InfoNCELoss(LossConfig(temperature=0.05, in_batch_negatives=True, mask_false_negatives=True))
    q, p, ids = _batch(1)

    plain = loss_fn(_encode(model)(q), _encode(model)(p), n_passages=N_PASSAGES, doc_ids=ids)
    plain.backward()
    want = _grads(model)
    model.zero_grad()

    cached = GradCache(_encode(model), chunk_size)(
        q, p, lambda a, b: loss_fn(a, b, n_passages=N_PASSAGES, doc_ids=ids)
    )
    got = _grads(model)
    assert cached.item() == pytest.approx(plain.item(), rel=1e-6)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_gradcache_with_dropout_replays_each_chunk():
    """With dropout on, GradCache equals a plain forward that draws the same dropout masks."""
    model = TinyEncoder(dropout=0.3).double()
    model.train()
    loss_fn = InfoNCELoss(LossConfig(temperature=0.05))
    q, p, ids = _batch(2)
    chunk = 4

    torch.manual_seed(123)
    enc = _encode(model)
    # The reference: same chunking, autograd kept, so the RNG draws are the ones GradCache replays.
    q_emb = torch.cat([enc({k: v[i : i + chunk] for k, v in q.items()}) for i in range(0, 6, chunk)])
    p_emb = torch.cat([enc({k: v[i : i + chunk] for k, v in p.items()}) for i in range(0, 18, chunk)])
    plain = loss_fn(q_emb, p_emb, n_passages=N_PASSAGES, doc_ids=ids)
    plain.backward()
    want = _grads(model)
    after_plain = torch.rand(1)
    model.zero_grad()

    torch.manual_seed(123)
    cached = GradCache(enc, chunk)(q, p, lambda a, b: loss_fn(a, b, n_passages=N_PASSAGES, doc_ids=ids))
    got = _grads(model)
    # The global RNG stream after GradCache continues exactly as after the plain step (exact resume).
    assert torch.equal(torch.rand(1), after_plain)
    assert cached.item() == pytest.approx(plain.item(), rel=1e-6)
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_without_rng_replay_dropout_gradients_would_differ():
    """Guards the test above: if replay did nothing, the gradients would not match."""
    model = TinyEncoder(dropout=0.3)
    q, _, _ = _batch(3)
    enc = _encode(model)
    ctx = RandContext()
    a = enc(q)
    b = enc(q)
    with ctx:
        c = enc(q)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def test_scale_multiplies_gradients():
    torch.manual_seed(0)
    model = TinyEncoder(dropout=0.0)
    loss_fn = InfoNCELoss(LossConfig())
    q, p, ids = _batch(4)
    fn = lambda a, b: loss_fn(a, b, n_passages=N_PASSAGES, doc_ids=ids)  # noqa: E731
    GradCache(_encode(model), 5)(q, p, fn, scale=1.0)
    one = _grads(model)
    model.zero_grad()
    GradCache(_encode(model), 5)(q, p, fn, scale=0.25)
    quarter = _grads(model)
    for name in one:
        torch.testing.assert_close(quarter[name], one[name] * 0.25, rtol=1e-5, atol=1e-8)
