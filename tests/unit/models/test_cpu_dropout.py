"""``embedtune.models.dropout``: nn.Dropout with the CPU mask drawn 16 bits per entry.

Relational: in training it is the input times its own mask times 1 / (1 - the realised rate), with the
gradient through the same mask; it drops at the rate asked, entries independently, and repeats under
the same seed; outside training, at rate 0 and off the CPU it is ``nn.Dropout``. Swapped into a model
it leaves the weights, the evaluation output and the saved files as they were.
"""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_bert import dropout_bert
from torch import nn
from transformers import BertModel

from embedtune.models.attention import realised_drop
from embedtune.models.dropout import CpuDropout, use_cpu_dropout


def _x(shape: tuple[int, ...] = (4, 50, 64), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x[x == 0] = 1.0  # no exact zeros: an output zero then means a dropped entry
    return x.to(dtype).requires_grad_()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_in_training_it_is_the_input_times_its_mask_with_the_gradient_through_it(p):
    x = _x()
    drop = CpuDropout(p).train()
    out = drop(x)
    keep = out != 0
    scale = 1 / (1 - realised_drop(p))
    torch.testing.assert_close(out, torch.where(keep, x * scale, 0), rtol=1e-6, atol=0)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(keep, weights * scale, 0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_it_drops_at_the_rate_asked_independently(p):
    torch.manual_seed(1)
    with torch.no_grad():
        dropped = CpuDropout(p).train()(torch.ones(1 << 20)) == 0
    n = dropped.numel()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 5 * sd
    # neighbours (which share a 64-bit draw) are independent: P(both dropped) = p^2
    both = (dropped[:-1] & dropped[1:]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)


def test_the_same_seed_draws_the_same_mask_and_another_seed_another():
    x = _x()
    drop = CpuDropout(0.1).train()
    torch.manual_seed(7)
    a = drop(x)
    torch.manual_seed(7)
    b = drop(x)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bfloat16_stays_bfloat16():
    x = _x(dtype=torch.bfloat16)
    out = CpuDropout(0.1).train()(x)
    assert out.dtype == torch.bfloat16
    keep = out != 0
    torch.testing.assert_close(out, torch.where(keep, x / (1 - realised_drop(0.1)), 0))


@pytest.mark.parametrize("case", ["eval", "rate 0", "rate 1"])
def test_where_it_does_not_apply_it_is_nn_dropout(case):
    p = {"eval": 0.1, "rate 0": 0.0, "rate 1": 1.0}[case]
    x = _x()
    ours, ref = CpuDropout(p), nn.Dropout(p)
    for m in (ours, ref):
        m.train(case != "eval")
    torch.manual_seed(3)
    expected = ref(x)
    torch.manual_seed(3)
    assert torch.equal(ours(x), expected)


def _bert() -> BertModel:
    return dropout_bert()


def test_swapped_into_a_model_it_replaces_every_dropout_and_keeps_the_weights_and_eval_output(tmp_path):
    model = _bert().train()
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    before = model(input_ids=ids).last_hidden_state
    model.train()

    # embeddings + per layer: attention probabilities, attention output, FFN output
    assert use_cpu_dropout(model) == 1 + 2 * 3
    assert not [m for m in model.modules() if type(m) is nn.Dropout]
    assert all(m.training for m in model.modules() if isinstance(m, CpuDropout))
    assert model.state_dict().keys() == before_state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_state.items())

    torch.manual_seed(5)
    train_a = model(input_ids=ids).last_hidden_state
    torch.manual_seed(5)
    train_b = model(input_ids=ids).last_hidden_state
    assert torch.equal(train_a, train_b) and not torch.allclose(train_a, before)

    model.eval()
    assert torch.equal(model(input_ids=ids).last_hidden_state, before)
    model.save_pretrained(tmp_path)
    reloaded = BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(reloaded(input_ids=ids).last_hidden_state, before)
