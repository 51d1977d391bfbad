"""FP8 checkpoints (``quantization_config.quant_method: fp8``) dequantised on load, as NeMo AutoModel does.

``mistralai/Ministral-3-3B-Instruct-2512`` ships FP8 weights (``float8_e4m3fn`` tensors with scales);
NeMo's recipes moved to the ``-BF16`` checkpoint, and NeMo dequantises FP8 when it extracts the
language tower. An encoder is fine-tuned in bf16/fp32, so we do the same: every FP8 weight ``w`` with
its scale ``s`` becomes ``w.float() * s`` in the requested dtype, where ``s`` is

* ``<name>.weight_scale_inv`` (transformers' fine-grained FP8, DeepSeek style): a scalar, or one value
  per ``weight_block_size`` block, broadcast over its block;
* ``<name>.weight_scale`` (AutoFP8 / compressed-tensors style): a scalar or one value per row.

Activation scales (``input_scale``, ``activation_scale``, ``k_scale``, ``v_scale``) only matter for
FP8 *inference* kernels and are dropped. Anything else about the checkpoint is read as usual.

The key names and the direction of the scale are those of Mistral's Hugging Face-format FP8 releases:
``weight_scale_inv`` multiplies (its values equal the native format's ``qscale_weight``, as vLLM's fix for
Devstral Small 2's HF-format weights checked), and ``activation_scale`` is unused for weights;
llama.cpp's HF converter dequantises these checkpoints the same way (``w.float() * s``, the block scale
repeated and trimmed). That is a check against other loaders, not against the real checkpoint: none can
be downloaded here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from embedtune.errors import ModelLoadError

__all__ = ["dequantize_fp8", "fp8_quantization", "load_dequantized"]

_FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
_DROPPED_SUFFIXES = ("input_scale", "activation_scale", "k_scale", "v_scale")
BF16_HINT = (
    "or load the BF16 checkpoint instead (for Ministral 3: mistralai/Ministral-3-3B-Instruct-2512-BF16, "
    "the one NeMo AutoModel's recipe uses)"
)


def fp8_quantization(config: Any) -> dict[str, Any] | None:
    """The FP8 ``quantization_config`` of ``config`` (or of its ``text_config``) as a dict; None otherwise."""
    for cfg in (config, getattr(config, "text_config", None)):
        qc = getattr(cfg, "quantization_config", None)
        if qc is None:
            continue
        data = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else vars(qc))
        if "fp8" in str(data.get("quant_method", "")).lower():
            return data
    return None


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight * scale`` in float32, with a per-block or per-row ``scale`` broadcast over the weight.

    Args:
        weight: The FP8 tensor, e.g. (out, in).
        scale: A scalar, (out, 1)/(out,) per row, or (ceil(out/bo), ceil(in/bi)) per block. Both file
            conventions (``weight_scale_inv`` and ``weight_scale``) store the factor that multiplies.

    Raises:
        ModelLoadError: when the scale's shape fits no known layout.
    """
    w = weight.to(torch.float32)
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return w * s.reshape(())
    if s.dim() == 1 and s.shape[0] == w.shape[0]:
        s = s[:, None]
    if s.dim() != w.dim():
        raise ModelLoadError(
            f"FP8 scale of shape {tuple(s.shape)} does not fit a weight of shape {tuple(w.shape)}"
        )
    for dim in range(w.dim()):
        if s.shape[dim] != w.shape[dim]:
            block = math.ceil(w.shape[dim] / s.shape[dim])
            s = s.repeat_interleave(block, dim=dim).narrow(dim, 0, w.shape[dim])
    return w * s


def _safetensors_files(path: str) -> list[Path]:
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{path}: an FP8 checkpoint without .safetensors files — cannot dequantise it, {BF16_HINT}"
        )
    return files


def load_dequantized(
    model: torch.nn.Module, path: str, key_mapping: dict[str, str] | None, dtype: torch.dtype
) -> torch.nn.Module:
    """Fill ``model`` (built from the config, no quantisation) with the dequantised FP8 weights of ``path``.

    Args:
        model: The plain model, e.g. a ``Ministral3BidirectionalModel`` built from the config.
        path: The checkpoint folder or hub id.
        key_mapping: Regex -> replacement applied to checkpoint keys (e.g. a mistral3 language tower).
        dtype: The dtype of the loaded weights.

    Raises:
        ModelLoadError: a weight of the model is absent from the checkpoint, or a scale is missing.
    """
    from safetensors import safe_open

    raw: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                raw[key] = f.get_tensor(key)
    wanted = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key.endswith(("weight_scale_inv", "weight_scale")) or key.endswith(_DROPPED_SUFFIXES):
            continue
        if tensor.dtype in _FP8_DTYPES:
            base = key[: -len("weight")] if key.endswith("weight") else key + "."
            scale = raw.get(base + "weight_scale_inv")
            if scale is None:
                scale = raw.get(base + "weight_scale")
            if scale is None:
                raise ModelLoadError(
                    f"{path}: FP8 tensor {key} has no weight_scale_inv/weight_scale — {BF16_HINT}"
                )
            tensor = dequantize_fp8(tensor, scale)
        name = key
        for pattern, repl in (key_mapping or {}).items():
            name, n = re.subn(pattern, repl, name)
            if n:
                break
        if name not in wanted and prefix and name.startswith(prefix + "."):
            name = name[len(prefix) + 1 :]
        if name in wanted:
            out[name] = tensor.to(dtype)
    missing = sorted(set(wanted) - set(out))
    # Rotary buffers are computed, not stored.
    missing = [k for k in missing if not k.endswith(("inv_freq", "original_inv_freq"))]
    if missing:
        raise ModelLoadError(
            f"{path}: the FP8 checkpoint lacks {len(missing)} weight(s) of the model (first: {missing[0]}) — {BF16_HINT}"
        )
    model.load_state_dict(out, strict=False)
    return model.to(dtype)
