"""Export a bi-encoder to ONNX, prove the export computes the same embeddings, and run it.

* :func:`embedtune.export.onnx.export_onnx` writes ``model.onnx`` (pooling and normalisation inside
  the graph), the tokenizer and ``embedtune.json``, then verifies it against PyTorch;
* :class:`embedtune.export.runtime.OnnxBiEncoder` encodes texts with ONNX Runtime through the same
  ``encode_queries`` / ``encode_documents`` / ``encode`` API as :class:`~embedtune.BiEncoder`;
* :func:`embedtune.export.runtime.load_encoder` loads either backend from a path.

Nothing here imports torch, onnx or onnxruntime at package import time.
"""

from __future__ import annotations

from embedtune.export.errors import MissingExtraError, OnnxExportError, VerificationError

__all__ = ["MissingExtraError", "OnnxExportError", "VerificationError"]
