"""Backbones, pooling and the bi-encoder model."""

from embedtune.models.auto import AutoBiEncoder
from embedtune.models.bidirectional import make_bidirectional, verify_bidirectional
from embedtune.models.biencoder import BiEncoder
from embedtune.models.llama import LlamaBidirectionalConfig, LlamaBidirectionalModel
from embedtune.models.ministral3 import Ministral3BidirectionalConfig, Ministral3BidirectionalModel
from embedtune.models.settings import EncoderSettings

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
