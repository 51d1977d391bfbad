"""Errors raised by the ONNX export and runtime (all are ``EmbedtuneError``: the CLI prints one line)."""

from __future__ import annotations

import importlib.util

from embedtune.errors import EmbedtuneError

ONNX_EXTRA_HINT = "pip install 'embedtune[onnx]'"


class OnnxExportError(EmbedtuneError):
    """The model cannot be exported with the options given (opset, dtype, output folder, ...)."""


class VerificationError(OnnxExportError):
    """The exported graph does not compute the same embeddings as the PyTorch model."""


class MissingExtraError(EmbedtuneError):
    """An optional dependency (the ``onnx`` extra) is not installed."""


def require_onnx(*, runtime_only: bool = False) -> None:
    """Fail with the ``pip install`` to run when the ``onnx`` extra is missing.

    Args:
        runtime_only: only ONNX Runtime is needed (inference); exporting also needs ``onnx``.

    Raises:
        MissingExtraError: naming the missing packages and ``pip install 'embedtune[onnx]'``.
    """
    packages = ("onnxruntime",) if runtime_only else ("onnx", "onnxruntime")
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        what = "running an ONNX model" if runtime_only else "ONNX export"
        raise MissingExtraError(
            f"{what} needs the package(s) {', '.join(missing)} (the 'onnx' extra) — install it: "
            f"{ONNX_EXTRA_HINT}"
        )
