"""NeMo AutoModel's cross-encoder, ``LlamaBidirectionalForSequenceClassification``, without remote code.

NeMo saves a reranker as a ``llama_bidirec`` config (``pooling``, ``temperature``, ``num_labels``) with
weights ``model.*`` (a bidirectional Llama) and ``score.weight`` (a bias-free linear head). Its score
is, for hidden states ``h`` (batch, seq, hidden) and the attention mask ``m``::

    pooled = pool(h * m, m, config.pooling)       # avg: sum / count; cls: position 0; last: last real token
    logits = score(pooled) / config.temperature

Unknown pooling names fall back to position 0, as NeMo's own ``_pool`` does. This is *not* HF's
``LlamaForSequenceClassification`` (which scores the last non-pad token and has no temperature), so
loading NeMo weights there would silently score differently; this class reproduces NeMo's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, LlamaPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from embedtune.models.llama import LlamaBidirectionalConfig, LlamaBidirectionalModel

__all__ = ["LlamaBidirectionalForSequenceClassification", "is_nemo_cross_encoder", "nemo_pool"]

ARCHITECTURE = "LlamaBidirectionalForSequenceClassification"


def nemo_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """NeMo's pooling of the cross-encoder: hidden (b, s, h), mask (b, s) -> (b, h).

    ``avg`` averages the real tokens; ``last`` takes position -1 when every row ends with a real token
    (left padding) and the last real token otherwise; anything else (``cls``, unknown) takes position 0.
    """
    masked = hidden.masked_fill(~attention_mask[..., None].bool(), 0.0)  # (b, s, h)
    if method == "avg":
        return masked.sum(dim=1) / attention_mask.sum(dim=1)[..., None].to(hidden.dtype)
    if method == "last":
        if bool(attention_mask[:, -1].sum() == attention_mask.shape[0]):
            return masked[:, -1]
        lengths = attention_mask.sum(dim=1) - 1  # (b,)
        return masked[torch.arange(masked.shape[0], device=masked.device), lengths]
    return masked[:, 0]


class LlamaBidirectionalForSequenceClassification(LlamaPreTrainedModel):
    """A bidirectional Llama, NeMo's pooling and a bias-free ``score`` head (NeMo's checkpoint layout)."""

    config_class = LlamaBidirectionalConfig
    base_model_prefix = "model"

    def __init__(self, config: LlamaBidirectionalConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaBidirectionalModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """Scores (batch, num_labels): ``score(pool(h, mask)) / temperature``."""
        if attention_mask is None:
            raise ValueError("attention_mask is required: NeMo's cross-encoder pools by the mask")
        kwargs.pop("token_type_ids", None)
        kwargs.pop("labels", None)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        pooled = nemo_pool(hidden, attention_mask, str(getattr(self.config, "pooling", "avg")))
        logits = self.score(pooled) / float(getattr(self.config, "temperature", 1.0) or 1.0)
        return SequenceClassifierOutput(logits=logits)


def is_nemo_cross_encoder(config: Any) -> bool:
    """True for a config NeMo wrote for its cross-encoder (``llama_bidirec`` + the classification class)."""
    return getattr(config, "model_type", None) == "llama_bidirec" and ARCHITECTURE in (
        getattr(config, "architectures", None) or []
    )


AutoModelForSequenceClassification.register(
    LlamaBidirectionalConfig, LlamaBidirectionalForSequenceClassification, exist_ok=True
)
