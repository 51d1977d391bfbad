"""Errors raised by the ONNX export and runtime (all are ``EmbedtuneError``: the CLI prints one line)."""

from __future__ import annotations

import importlib.util

from embedtune.errors import EmbedtuneError

ONNX_EXTRA_HINT = "pip install 'embedtune[onnx]'"
# `--quantize int8` writes 8-bit MatMulNBits; onnxruntime's quantizer takes ``bits=8`` from 1.24 on.
INT8_MIN_ONNXRUNTIME = (1, 24)


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


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def int8_unsupported_reason() -> str | None:
    """Why ``--quantize int8`` cannot run here (onnxruntime missing or older than 1.24), or None.

    Reads the installed version's metadata only: cheap enough for the torch-free argument checks.
    """
    from importlib import metadata

    try:
        version = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return f"--quantize int8 needs onnxruntime (the 'onnx' extra) — install it: {ONNX_EXTRA_HINT}"
    if _version_tuple(version) < INT8_MIN_ONNXRUNTIME:
        need = ".".join(map(str, INT8_MIN_ONNXRUNTIME))
        return (
            f"--quantize int8 needs onnxruntime >= {need} (8-bit MatMulNBits); this one is {version} — "
            f"upgrade it: pip install -U 'onnxruntime>={need}'"
        )
    return None


def require_int8() -> None:
    """Fail before any work when onnxruntime cannot write int8 (see :func:`int8_unsupported_reason`).

    Raises:
        MissingExtraError: onnxruntime is missing or too old.
    """
    reason = int8_unsupported_reason()
    if reason is not None:
        raise MissingExtraError(reason)
