"""Ministral 3 as a bidirectional encoder (model_type ``ministral3_bidirec``).

Ministral-3 instruct checkpoints are ``mistral3`` vision-language models; their language tower is a
``ministral3`` decoder. :func:`embedtune.models.auto` extracts that tower; this module makes it
bidirectional the same way as Llama: ``config.is_causal = False`` on the instance, no patched forward.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, Ministral3Config, Ministral3Model

from embedtune.models.bidirectional import make_bidirectional


@strict
class Ministral3BidirectionalConfig(Ministral3Config):
    """``Ministral3Config`` with bidirectional attention and no sliding window."""

    model_type = "ministral3_bidirec"
    pooling: str = "avg"
    """Pooling used for this checkpoint (informational)."""
    temperature: float = 1.0
    """Contrastive temperature used in training (informational)."""

    def __post_init__(self, **kwargs):
        kwargs.pop("is_causal", None)
        super().__post_init__(**kwargs)
        self.is_causal = False
        self.sliding_window = None


class Ministral3BidirectionalModel(Ministral3Model):
    """``Ministral3Model`` whose every layer attends to the whole (unpadded) input."""

    config_class = Ministral3BidirectionalConfig

    def __init__(self, config: Ministral3Config):
        super().__init__(config)
        make_bidirectional(self)


AutoConfig.register(Ministral3BidirectionalConfig.model_type, Ministral3BidirectionalConfig, exist_ok=True)
AutoModel.register(Ministral3BidirectionalConfig, Ministral3BidirectionalModel, exist_ok=True)
