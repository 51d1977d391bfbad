"""Llama as a bidirectional encoder (model_type ``llama_bidirec``).

The same weights and modules as ``transformers.LlamaModel``; the only change is that the config says
``is_causal = False`` and the attention modules are switched to match, so transformers' own mask
builders produce a bidirectional padding mask. The config accepts NeMo AutoModel's extra keys
(``pooling``, ``temperature``) so a NeMo ``llama_bidirec`` checkpoint loads with no remote code.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaModel

from embedtune.models.bidirectional import make_bidirectional


@strict
class LlamaBidirectionalConfig(LlamaConfig):
    """``LlamaConfig`` with bidirectional attention and NeMo's embedding keys."""

    model_type = "llama_bidirec"
    pooling: str = "avg"
    """Pooling NeMo used for this checkpoint (informational; embedtune reads its own settings first)."""
    temperature: float = 1.0
    """Contrastive temperature NeMo trained with (informational)."""

    def __post_init__(self, **kwargs):
        kwargs.pop("is_causal", None)
        super().__post_init__(**kwargs)
        self.is_causal = False


class LlamaBidirectionalModel(LlamaModel):
    """``LlamaModel`` whose every layer attends to the whole (unpadded) input."""

    config_class = LlamaBidirectionalConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        make_bidirectional(self)


AutoConfig.register(LlamaBidirectionalConfig.model_type, LlamaBidirectionalConfig, exist_ok=True)
AutoModel.register(LlamaBidirectionalConfig, LlamaBidirectionalModel, exist_ok=True)
