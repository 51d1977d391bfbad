"""Cross-encoder rerankers: model, training loop, rerank evaluation, ONNX export."""

from __future__ import annotations

from embedtune.reranker.model import NEMO_TEMPLATE, CrossEncoderReranker, RerankerSettings

__all__ = ["NEMO_TEMPLATE", "CrossEncoderReranker", "RerankerSettings"]
