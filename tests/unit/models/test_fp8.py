"""FP8 checkpoints (the original Ministral-3-3B-Instruct-2512 is one) are dequantised on load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from embedtune.models import zoo
from embedtune.models.auto import AutoBiEncoder

FP8 = torch.float8_e4m3fn
BLOCK = 16
TEXTS = ["a short text", "a somewhat longer text about nothing in particular"]


def _quantise(w: torch.Tensor, style: str) -> dict[str, torch.Tensor]:
    """One weight as an FP8 checkpoint stores it: fp8 values and the factor that multiplies them back."""
    if style == "block":  # weight_scale_inv: one scale per BLOCK x BLOCK tile
        rows, cols = -(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)
        scale = torch.empty(rows, cols)
        q = torch.empty_like(w)
        for i in range(rows):
            for j in range(cols):
                tile = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
                scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
                q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = tile / scale[i, j]
        return {"weight": q.to(FP8), "weight_scale_inv": scale}
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0  # weight_scale: one per row
    return {"weight": (w / scale).to(FP8), "weight_scale": scale, "input_scale": torch.tensor(1.0)}


def _reference(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dequantise written out element by element (independent of embedtune's broadcasting)."""
    q = parts["weight"].to(torch.float32)
    if "weight_scale_inv" in parts:
        s = parts["weight_scale_inv"]
        out = torch.empty_like(q)
        for r in range(q.shape[0]):
            for c in range(0, q.shape[1], BLOCK):
                out[r, c : c + BLOCK] = q[r, c : c + BLOCK] * s[r // BLOCK, c // BLOCK]
        return out
    return q * parts["weight_scale"]


def _fp8_checkpoint(folder: Path, style: str) -> dict[str, torch.Tensor]:
    src = Path(zoo.resolve("tiny-ministral3"))
    shutil.copytree(src, folder)
    weights = load_file(str(folder / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for key, w in weights.items():
        if key.endswith("proj.weight"):  # every linear layer of the decoder
            parts = _quantise(w, style)
            base = key[: -len("weight")]
            out.update({base + k: v for k, v in parts.items()})
            expected[key] = _reference(parts)
        else:
            out[key] = w
            expected[key] = w
    (folder / "model.safetensors").unlink()
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic" if style == "block" else "static",
        "weight_block_size": [BLOCK, BLOCK] if style == "block" else None,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("style", ["block", "row"])
def test_fp8_checkpoint_is_dequantised_exactly(tmp_path: Path, style: str, caplog) -> None:
    expected = _fp8_checkpoint(tmp_path / "fp8", style)
    with caplog.at_level("WARNING"):
        model = AutoBiEncoder.from_pretrained(tmp_path / "fp8")
    assert "Ministral-3-3B-Instruct-2512-BF16" in caplog.text
    state = model.backbone.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    # FP8 is lossy, but the dequantised model still embeds like the original.
    original = AutoBiEncoder.from_pretrained("tiny-ministral3")
    cos = (model.encode_documents(TEXTS) * original.encode_documents(TEXTS)).sum(-1)
    assert bool((torch.as_tensor(cos) > 0.99).all()), cos


def test_fp8_tensor_without_a_scale_names_the_bf16_checkpoint(tmp_path: Path) -> None:
    _fp8_checkpoint(tmp_path / "fp8", "row")
    weights = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    weights = {k: v for k, v in weights.items() if not k.endswith("weight_scale")}
    save_file(weights, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    from embedtune.errors import ModelLoadError

    with pytest.raises(
        ModelLoadError, match=r"has no weight_scale_inv/weight_scale .*Ministral-3-3B-Instruct-2512-BF16"
    ):
        AutoBiEncoder.from_pretrained(tmp_path / "fp8")
