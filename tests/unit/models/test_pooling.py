"""Pooling: equal to sentence-transformers' Pooling module, and independent of the padding side."""

from __future__ import annotations

import pytest
import torch

try:  # sentence-transformers >= 6
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    ST_CLS_SKIPS_PROMPT = True
except ImportError:  # sentence-transformers 5.x (the lowest version pyproject.toml allows)
    from sentence_transformers.models import Pooling as STPooling

    # 5.x applies include_prompt=False to mean pooling only; its CLS is always token 0 (checked).
    ST_CLS_SKIPS_PROMPT = False

from embedtune.errors import ConfigError
from embedtune.models.pooling import POOLING_METHODS, TO_SENTENCE_TRANSFORMERS, canonical_pooling, pool


def _right_padded(lengths: list[int], hidden: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    h = torch.randn(len(lengths), seq, hidden, generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return h, mask


def _to_left(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end (left padding), padding vectors set to noise."""
    h2 = torch.randn_like(h) * 100  # padding vectors must not matter
    m2 = torch.zeros_like(mask)
    for i in range(h.shape[0]):
        n = int(mask[i].sum())
        h2[i, h.shape[1] - n :] = h[i, :n]
        m2[i, h.shape[1] - n :] = 1
    return h2, m2


@pytest.mark.parametrize("method", POOLING_METHODS)
def test_same_vector_for_left_and_right_padding(method: str) -> None:
    h, mask = _right_padded([5, 2, 7, 1])
    h_left, mask_left = _to_left(h, mask)
    torch.testing.assert_close(pool(h, mask, method), pool(h_left, mask_left, method), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", POOLING_METHODS)
@pytest.mark.parametrize("prompt_length", [0, 2])
def test_equals_sentence_transformers_pooling(method: str, prompt_length: int) -> None:
    if method == "cls" and prompt_length and not ST_CLS_SKIPS_PROMPT:
        pytest.skip("sentence-transformers < 6 ignores include_prompt=False for CLS pooling")
    lengths = [6, 4, 7]
    h, mask = _right_padded(lengths, hidden=8)
    pooling_mask = mask.clone()
    pooling_mask[:, :prompt_length] = 0
    ours = pool(h, mask, method, pooling_mask)
    st = STPooling(8, pooling_mode=TO_SENTENCE_TRANSFORMERS[method], include_prompt=prompt_length == 0)
    features = {"token_embeddings": h, "attention_mask": mask}
    if prompt_length:
        features["prompt_length"] = torch.tensor([prompt_length])
    theirs = st(features)["sentence_embedding"]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_weighted_mean_is_really_weighted() -> None:
    h, mask = _right_padded([4])
    expected = (h[0, :4] * torch.arange(1, 5).unsqueeze(1)).sum(0) / 10  # weights 1,2,3,4
    torch.testing.assert_close(pool(h, mask, "weighted_mean")[0], expected)
    assert not torch.allclose(pool(h, mask, "weighted_mean"), pool(h, mask, "mean"))


def test_last_is_the_last_real_token_not_position_minus_one() -> None:
    h, mask = _right_padded([3, 5])
    torch.testing.assert_close(pool(h, mask, "last")[0], h[0, 2])
    torch.testing.assert_close(pool(h, mask, "last")[1], h[1, 4])


def test_aliases_and_unknown_name() -> None:
    assert canonical_pooling("avg") == "mean"
    assert canonical_pooling("weighted_avg") == "mean"  # NeMo's name for an unweighted sum
    with pytest.raises(ConfigError, match=r"unknown method 'maxx'.*mean, cls, last, weighted_mean"):
        canonical_pooling("maxx")


def test_nemos_weighted_avg_is_mean_after_normalisation() -> None:
    """NeMo's ``weighted_avg`` is ``last_hidden.masked_fill(~mask, 0).sum(1)``: after L2 it equals mean."""
    torch.manual_seed(0)
    h = torch.randn(3, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    nemo_sum = h.masked_fill(~mask[..., None].bool(), 0.0).sum(dim=1)
    ours = pool(h, mask, "weighted_avg")
    torch.testing.assert_close(
        torch.nn.functional.normalize(ours, dim=-1), torch.nn.functional.normalize(nemo_sum, dim=-1)
    )
    # ...and not the position-weighted mean, which points elsewhere.
    weighted = torch.nn.functional.normalize(pool(h, mask, "weighted_mean"), dim=-1)
    assert not torch.allclose(weighted, torch.nn.functional.normalize(nemo_sum, dim=-1), atol=1e-3)


def test_bert_pooler_head_is_frozen_with_and_without_lora_and_gets_no_gradient():
    """A bi-encoder never uses BERT's own pooler: left trainable, DDP fails at its second step."""
    from embedtune.models import AutoBiEncoder
    from embedtune.models.biencoder import freeze_unused_pooler
    from embedtune.training.config import PeftConfig
    from embedtune.training.tasks import apply_lora

    enc = AutoBiEncoder.from_pretrained("tiny-bert")
    names = [n for n, _ in enc.named_parameters() if "pooler" in n.split(".")]
    assert names, "tiny-bert has a pooler: the test needs one"
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert not trainable & set(names) and len(trainable) == len(list(enc.parameters())) - len(names)
    batch = enc.tokenizer(["a text", "another text here"], return_tensors="pt", padding=True)
    enc(batch["input_ids"], batch["attention_mask"]).sum().backward()
    grads = {n for n, p in enc.named_parameters() if p.grad is not None}
    assert grads == trainable  # every trainable parameter is used; the frozen ones would not be
    lora = apply_lora(enc.backbone, PeftConfig(match_all_linear=True))
    adapters = [n for n, p in lora.named_parameters() if "pooler" in n.split(".") and p.requires_grad]
    assert adapters, "PEFT all-linear adapts the pooler's dense layer"
    assert freeze_unused_pooler(lora) == adapters
    assert not any(p.requires_grad for n, p in lora.named_parameters() if "pooler" in n.split("."))
