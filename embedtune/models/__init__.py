"""Backbones, pooling and the bi-encoder model.

The names below are imported on first use: ``embedtune.models.zoo`` (the short model names, read by
the CLI's argument checks) must not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedtune.models.auto import AutoBiEncoder
    from embedtune.models.bidirectional import make_bidirectional, verify_bidirectional
    from embedtune.models.biencoder import BiEncoder
    from embedtune.models.llama import LlamaBidirectionalConfig, LlamaBidirectionalModel
    from embedtune.models.ministral3 import Ministral3BidirectionalConfig, Ministral3BidirectionalModel
    from embedtune.models.settings import EncoderSettings

# name -> the submodule that defines it (importing llama/ministral3 registers their model types with
# transformers' Auto classes; embedtune.models.auto imports both)
_LAZY = {
    "AutoBiEncoder": "auto",
    "BiEncoder": "biencoder",
    "EncoderSettings": "settings",
    "LlamaBidirectionalConfig": "llama",
    "LlamaBidirectionalModel": "llama",
    "Ministral3BidirectionalConfig": "ministral3",
    "Ministral3BidirectionalModel": "ministral3",
    "make_bidirectional": "bidirectional",
    "verify_bidirectional": "bidirectional",
}

__all__ = [
    "AutoBiEncoder",
    "BiEncoder",
    "EncoderSettings",
    "LlamaBidirectionalConfig",
    "LlamaBidirectionalModel",
    "Ministral3BidirectionalConfig",
    "Ministral3BidirectionalModel",
    "make_bidirectional",
    "verify_bidirectional",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
