"""``embedtune.models.attention``: blockwise attention with dropout on CPUs.

Relational: without dropout it computes what ``scaled_dot_product_attention`` computes (output and
gradients, any block size, bool / additive / no mask); with dropout it computes softmax · its own mask
· V, and the mask drops at the rate asked. In a model it is used only where it applies, gets the
padding mask transformers builds for sdpa, and leaves the saved config alone.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

import embedtune.models.attention as attention
from embedtune.models.attention import (
    IMPLEMENTATION,
    draw_keep_mask,
    dropout_attention,
    use_blockwise_dropout_attention,
)

B, H, S, D = 3, 4, 9, 8


def _qkv(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, S, D, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def _padding_mask(kind: str) -> torch.Tensor | None:
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, 6:] = False
    keep[2, 3:] = False
    if kind == "none":
        return None
    mask = keep[:, None, None, :].expand(B, 1, S, S)
    if kind == "bool":
        return mask
    return torch.zeros(B, 1, S, S).masked_fill(~mask, torch.finfo(torch.float32).min)  # additive


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # a loss whose gradient is not uniform
    return torch.autograd.grad((out.float() * weights).sum(), inputs)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
@pytest.mark.parametrize("block", [1 << 20, 150, 40])  # whole batch, rows of heads, single heads
def test_without_dropout_it_computes_what_sdpa_computes(mask_kind, block, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_ENTRIES", block)
    q, k, v = _qkv()
    mask = _padding_mask(mask_kind)

    ours = dropout_attention(q, k, v, mask, 0.0, D**-0.5)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    for got, want in zip(_grads(ours, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [1 << 20, 40])
def test_with_dropout_it_is_the_softmax_times_its_mask_times_v(block, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_ENTRIES", block)
    q, k, v = _qkv()
    mask, p = _padding_mask("bool"), 0.3
    torch.manual_seed(5)
    ours = dropout_attention(q, k, v, mask, p, D**-0.5)
    torch.manual_seed(5)  # the same draw from the default generator
    keep = draw_keep_mask((B, H, S, S), p)
    _, dropped = attention._drop_threshold(p)
    scores = (q @ k.transpose(-1, -2) * D**-0.5).masked_fill(~mask, float("-inf"))
    ref = scores.softmax(-1) * keep / (1 - dropped) @ v

    assert (~keep).any() and keep.any()
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    for got, want in zip(_grads(ours, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    without = dropout_attention(q, k, v, mask, 0.0, D**-0.5)
    assert not torch.allclose(ours, without, atol=1e-3)  # the dropout is live


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_mask_drops_at_the_rate_asked(p):
    n = 1 << 20
    first, second = draw_keep_mask((n,), p), draw_keep_mask((n,), p)
    _, realised = attention._drop_threshold(p)
    sd = math.sqrt(p * (1 - p) / n)

    assert abs(realised - p) < 1e-5
    for mask in (first, second):
        assert abs((~mask).float().mean().item() - p) < 5 * sd
    assert (first != second).any()  # two draws, two masks
    # every 16-bit lane decides independently: neighbours agree as often as independent draws would
    agree = (first[:-1] == first[1:]).float().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 5 * sd
    assert draw_keep_mask((1000,), 0.0).all()


def test_the_mask_drawn_in_pieces_is_the_mask_drawn_at_once(monkeypatch):
    torch.manual_seed(9)
    whole = draw_keep_mask((7, 13, 11), 0.3)
    monkeypatch.setattr(attention, "DRAW_ENTRIES", 8)
    torch.manual_seed(9)
    torch.testing.assert_close(draw_keep_mask((7, 13, 11), 0.3), whole, rtol=0, atol=0)


def test_bfloat16_inputs_give_bfloat16_results_close_to_float32():
    q, k, v = _qkv(torch.bfloat16)
    mask = _padding_mask("bool")
    ours = dropout_attention(q, k, v, mask, 0.0, D**-0.5)
    grads = _grads(ours, [q, k, v])
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask)

    assert ours.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(ours.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, _grads(ref, [q32, k32, v32])):
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)


def _bert(attn: str = "sdpa", attention_dropout: float = 0.5):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "bert", **SMALL, attention_probs_dropout_prob=attention_dropout, hidden_dropout_prob=0.0
    )
    return AutoModel.from_config(config, attn_implementation=attn)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    mask[2, 5:] = 0
    return ids, mask


def test_a_bert_model_uses_it_in_training_with_the_padding_mask_of_sdpa(monkeypatch, tmp_path):
    model = _bert()
    ids, mask = _batch()
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]

    assert use_blockwise_dropout_attention(model)
    assert model.config._attn_implementation == IMPLEMENTATION
    calls = []
    original = attention.dropout_attention
    monkeypatch.setattr(attention, "dropout_attention", lambda *a: calls.append(a[3]) or original(*a))

    # A dropout that rounds to none (p · 65536 < 0.5) runs the blockwise path and must equal eval.
    for layer in model.encoder.layer:
        layer.attention.self.dropout.p = 1e-9
    model.train()
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    assert len(calls) == 2  # both layers
    assert calls[0] is not None and calls[0].dtype == torch.bool  # sdpa's padding mask reached it
    torch.testing.assert_close(hidden, reference, atol=2e-5, rtol=1e-5)

    # With its real dropout it differs from eval, and is reproducible under a seed.
    for layer in model.encoder.layer:
        layer.attention.self.dropout.p = 0.5
    torch.manual_seed(3)
    first = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(3)
    again = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first * mask[..., None], reference, atol=1e-3)

    # Evaluation and no-grad fall back to sdpa; the saved config names neither implementation.
    calls.clear()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None], reference
        )
    assert not calls
    model.save_pretrained(tmp_path)
    assert IMPLEMENTATION not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_it_is_not_switched_on_where_it_changes_nothing():
    assert not use_blockwise_dropout_attention(_bert(attention_dropout=0.0))  # no dropout
    assert not use_blockwise_dropout_attention(_bert(attn="eager"))  # another implementation asked for
    llama = AutoModel.from_config(
        AutoConfig.for_model("llama", **SMALL, num_key_value_heads=2), attn_implementation="sdpa"
    )
    assert not use_blockwise_dropout_attention(llama)  # attention_dropout 0


def test_training_switches_it_on_unless_the_recipe_names_sdpa(capsys):
    from embedtune.training.parallel import Parallel
    from embedtune.training.tasks import apply_attention_dropout

    cpu = Parallel.from_env(device="cpu")
    kept = _bert()
    apply_attention_dropout(kept, None, cpu, attn_implementation="sdpa")
    assert kept.config._attn_implementation == "sdpa"
    assert "blockwise" not in capsys.readouterr().out

    switched = _bert()
    apply_attention_dropout(switched, None, cpu)
    assert switched.config._attn_implementation == IMPLEMENTATION
    assert "attention: blockwise dropout attention on the CPU" in capsys.readouterr().out

    no_dropout = _bert()
    apply_attention_dropout(no_dropout, 0.0, cpu)  # model.attention_dropout: 0 → PyTorch's fused kernel
    assert no_dropout.config._attn_implementation == "sdpa"
