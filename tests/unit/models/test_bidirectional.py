"""Bidirectionality matrix: {llama, ministral3, mistral, qwen3} x {sdpa, eager} x {no, left, right padding}.

For each cell: changing a late token changes the first real token's output; changing a padding
token changes no real token's output. The same probe on the unconverted causal model shows no change,
so the test can fail.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from embedtune.errors import BidirectionalityError
from embedtune.models.bidirectional import attends_to_future, make_bidirectional, verify_bidirectional
from embedtune.models.llama import LlamaBidirectionalConfig, LlamaBidirectionalModel
from embedtune.models.ministral3 import Ministral3BidirectionalConfig, Ministral3BidirectionalModel

VOCAB = 128
DIMS = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
FAMILIES = ["llama", "ministral3", "mistral", "qwen3"]


def build(family: str, attn: str, *, convert: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if convert and family == "llama":
        cfg = LlamaBidirectionalConfig(**DIMS)
        cfg._attn_implementation = attn
        return LlamaBidirectionalModel(cfg).eval()
    if convert and family == "ministral3":
        cfg = Ministral3BidirectionalConfig(**DIMS)
        cfg._attn_implementation = attn
        return Ministral3BidirectionalModel(cfg).eval()
    cfg = AutoConfig.for_model(family, **DIMS)
    if family == "mistral":
        cfg.sliding_window = 4096  # the Mistral default the conversion must switch off
    cfg._attn_implementation = attn
    model = AutoModel.from_config(cfg).eval()
    return make_bidirectional(model) if convert else model


def batch(padding: str, seq: int = 7, pad: int = 2) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Two rows; row 0 carries ``pad`` padding positions on the given side. Returns ids, mask, real positions."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    real = list(range(seq))
    if padding == "right":
        mask[0, seq - pad :] = 0
        real = list(range(seq - pad))
    elif padding == "left":
        mask[0, :pad] = 0
        real = list(range(pad, seq))
    return ids, mask, real


@torch.no_grad()
def first_token_moves(model: torch.nn.Module, padding: str) -> bool:
    ids, mask, real = batch(padding)
    bumped = ids.clone()
    bumped[0, real[-1]] = (bumped[0, real[-1]] + 1) % VOCAB  # the last real token of row 0
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state[0, real[0]]
    b = model(input_ids=bumped, attention_mask=mask).last_hidden_state[0, real[0]]
    return not torch.allclose(a, b, atol=1e-6)


@torch.no_grad()
def padding_leaks(model: torch.nn.Module, padding: str) -> bool:
    ids, mask, real = batch(padding)
    repadded = ids.clone()
    padded = [i for i in range(ids.shape[1]) if i not in real]
    repadded[0, padded] = (repadded[0, padded] + 3) % VOCAB
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state[0, real]
    b = model(input_ids=repadded, attention_mask=mask).last_hidden_state[0, real]
    return not torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_is_bidirectional(family: str, attn: str, padding: str) -> None:
    model = build(family, attn, convert=True)
    assert model.config.is_causal is False
    assert first_token_moves(model, padding), "a late token must influence the first token"
    if padding != "none":
        assert not padding_leaks(model, padding), "padding must not influence real tokens"


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unconverted_model_is_causal(family: str, attn: str, padding: str) -> None:
    model = build(family, attn, convert=False)
    assert not first_token_moves(model, padding)


def test_setting_only_the_attention_flag_is_not_enough() -> None:
    """The known trap: ``self_attn.is_causal = False`` alone keeps the causal mask once a batch is padded."""
    model = build("llama", "eager", convert=False)
    for layer in model.layers:
        layer.self_attn.is_causal = False
    assert not first_token_moves(model, "right")
    with pytest.raises(BidirectionalityError):
        verify_bidirectional(model)


def test_mistral_sliding_window_is_switched_off() -> None:
    model = build("mistral", "sdpa", convert=True)
    assert model.config.sliding_window is None


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_accepts_converted_and_rejects_causal(family: str) -> None:
    verify_bidirectional(build(family, "sdpa", convert=True))
    causal = build(family, "sdpa", convert=False)
    assert not attends_to_future(causal)
    with pytest.raises(BidirectionalityError, match="attends causally"):
        verify_bidirectional(causal)
