"""A checkpoint saved in NeMo AutoModel's cross-encoder layout scores as NeMo's forward does.

NeMo's ``LlamaBidirectionalForSequenceClassification``: a Llama with a padding-only (bidirectional)
attention mask, ``pool`` over the mask (``avg`` here, NeMo's recipe default), a bias-free ``score``
linear head, and the logits divided by ``config.temperature``. The reference below is written from
those formulas with a stock, causal ``LlamaModel`` fed an explicit 4-D padding mask — it shares no code
with embedtune's loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

QUERIES = ["what is a cell", "why do stars shine", "q"]
PASSAGES = [
    "cells are the units of life",
    "stars fuse hydrogen into helium and the energy leaves as light for a very long time",
    "x",
]
TEMPERATURE = 0.5


def _nemo_checkpoint(folder: Path, pooling: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """Write a tiny random checkpoint exactly as NeMo lays it out; return its backbone and head."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from embedtune.models import zoo

    tiny = Path(zoo.resolve("tiny-llama"))
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = json.loads((tiny / "config.json").read_text())
    torch.manual_seed(1)
    backbone = LlamaModel(LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures",)}))
    score = torch.randn(1, backbone.config.hidden_size) * 0.2
    tensors = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    tensors["score.weight"] = score
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.update(
        model_type="llama_bidirec",
        architectures=["LlamaBidirectionalForSequenceClassification"],
        auto_map={
            "AutoModel": "model.LlamaBidirectionalForSequenceClassification",
            "AutoConfig": "model.LlamaBidirectionalForSequenceClassificationConfig",
        },
        pooling=pooling,
        temperature=TEMPERATURE,
        num_labels=1,
    )
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(folder))
    return backbone.eval(), score


def _nemo_forward(backbone: torch.nn.Module, score: torch.Tensor, ids, mask, pooling: str) -> torch.Tensor:
    """NeMo's forward, written out: bidirectional padding mask -> pool -> score -> / temperature."""
    b, s = mask.shape
    allowed = mask[:, None, None, :].bool().expand(b, 1, s, s)  # every query position sees every real key
    additive = torch.zeros(b, 1, s, s).masked_fill(~allowed, torch.finfo(torch.float32).min)
    hidden = backbone(input_ids=ids, attention_mask=additive).last_hidden_state  # (b, s, h)
    h = hidden.masked_fill(~mask[..., None].bool(), 0.0)
    if pooling == "avg":
        pooled = h.sum(dim=1) / mask.sum(dim=1)[..., None]
    else:  # "cls" and anything NeMo does not know: position 0
        pooled = h[:, 0]
    return (pooled @ score.T).squeeze(-1) / TEMPERATURE


@pytest.mark.parametrize("pooling", ["avg", "cls"])
def test_nemo_cross_encoder_checkpoint_scores_like_nemos_forward(tmp_path: Path, pooling: str) -> None:
    from embedtune.nemo.cross_encoder import LlamaBidirectionalForSequenceClassification
    from embedtune.reranker import NEMO_TEMPLATE, CrossEncoderReranker

    backbone, score = _nemo_checkpoint(tmp_path / "nemo_ce", pooling)
    ce = CrossEncoderReranker.from_pretrained(tmp_path / "nemo_ce")
    assert isinstance(ce.backbone, LlamaBidirectionalForSequenceClassification)
    assert ce.settings.template == NEMO_TEMPLATE and ce.settings.bidirectional
    ours = torch.from_numpy(ce.predict(QUERIES, PASSAGES, batch_size=2))

    # What NeMo's CrossEncoderCollator feeds the model: the template, tokenised and right-padded.
    texts = [NEMO_TEMPLATE.format(query=q, passage=p) for q, p in zip(QUERIES, PASSAGES)]
    enc = ce.tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    assert int(enc["attention_mask"].sum(1).min()) < enc["attention_mask"].shape[1]  # padding is exercised
    with torch.no_grad():
        reference = _nemo_forward(backbone, score, enc["input_ids"], enc["attention_mask"], pooling)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_a_different_head_would_be_caught(tmp_path: Path) -> None:
    """The control: HF's stock head (last token, no temperature) on the same weights scores differently."""
    from transformers import LlamaForSequenceClassification

    from embedtune.reranker import NEMO_TEMPLATE, CrossEncoderReranker

    _nemo_checkpoint(tmp_path / "nemo_ce", "avg")
    ce = CrossEncoderReranker.from_pretrained(tmp_path / "nemo_ce")
    stock = LlamaForSequenceClassification.from_pretrained(tmp_path / "nemo_ce", num_labels=1).eval()
    texts = [NEMO_TEMPLATE.format(query=q, passage=p) for q, p in zip(QUERIES, PASSAGES)]
    enc = ce.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = stock(**enc).logits.squeeze(-1)
    ours = torch.from_numpy(ce.predict(QUERIES, PASSAGES))
    assert not torch.allclose(ours, theirs, atol=1e-3)


def test_saved_nemo_reranker_round_trips(tmp_path: Path) -> None:
    from embedtune.reranker import CrossEncoderReranker

    _nemo_checkpoint(tmp_path / "nemo_ce", "avg")
    ce = CrossEncoderReranker.from_pretrained(tmp_path / "nemo_ce")
    again = CrossEncoderReranker.from_pretrained(ce.save_pretrained(tmp_path / "saved"))
    torch.testing.assert_close(
        torch.from_numpy(again.predict(QUERIES, PASSAGES)), torch.from_numpy(ce.predict(QUERIES, PASSAGES))
    )
