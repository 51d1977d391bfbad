"""The final trained model as one plain folder, from one process or from every rank of a sharded run.

The checkpoints under ``checkpoint_dir`` are for resuming; this is what a user loads afterwards
(transformers + sentence-transformers layout, ``model.safetensors``), the same whether the run was one
process, DDP or FSDP2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["save_consolidated"]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _merge_lora(inner: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add each LoRA delta (``scaling · B @ A``) to its base weight in a *full* state dict; drop adapters."""
    merged = {k: v for k, v in full.items() if ".lora_" not in k}
    for name, module in inner.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
            continue
        key = f"{name}.base_layer.weight"
        weight = merged[key].float()
        for adapter in module.active_adapters:
            a_key, b_key = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
            if a_key not in full:
                continue
            delta = full[b_key].float() @ full[a_key].float() * module.scaling[adapter]
            weight = weight + (delta.T if getattr(module, "fan_in_fan_out", False) else delta)
        merged[key] = weight.to(merged[key].dtype)
    out = {}
    for k, v in merged.items():
        out[k.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = v
    return out


def save_consolidated(model: nn.Module, path: str | Path, ctx: Any = None) -> Path | None:
    """Write the trained model as one plain folder (a collective: all ranks must call it).

    DDP and single process: rank 0 calls ``BiEncoder.save_pretrained`` (weights are replicated). FSDP2:
    the full state dict is gathered to rank 0's CPU (one block at a time, never the whole model on one
    GPU), LoRA deltas merged, and written as ``model.safetensors`` with the same config, tokenizer,
    sentence-transformers and ``embedtune.json`` files as ``save_pretrained`` writes, in float32, into a
    staged folder swapped in when complete (the previous model survives a crash).

    Args:
        model: the wrapped or plain :class:`~embedtune.models.biencoder.BiEncoder`.
        path: output folder.
        ctx: the distributed context (default: the current one).

    Returns:
        The folder on rank 0, None on the other ranks.
    """
    from embedtune.training import distributed as D

    ctx = ctx or D.get_context()
    out = Path(path)
    inner = D.unwrap(model)
    if not _is_fsdp(inner):
        if ctx.is_main:
            inner.save_pretrained(out)  # type: ignore[operator]
        _barrier()
        return out if ctx.is_main else None

    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict + cpu_offload: gathered shard by shard, materialised only on rank 0's CPU.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        from embedtune._atomic import staged_folder
        from embedtune.models.saving import _check_target

        target = out.expanduser().absolute()
        _check_target(target)
        # Written beside the target and swapped in when complete, as save_pretrained does: a crash
        # or a full disk keeps the previous model.
        with staged_folder(target) as staged:
            _write_plain_folder(inner, full, staged, save_file)
    _barrier()
    return out if ctx.is_main else None


def _write_plain_folder(inner: nn.Module, full: dict[str, Tensor], out: Path, save_file: Any) -> None:
    from embedtune.models import saving
    from embedtune.models.settings import EncoderSettings

    backbone = inner.backbone  # type: ignore[attr-defined]
    is_peft = hasattr(backbone, "peft_config")
    prefix = "backbone.base_model.model." if is_peft else "backbone."
    if is_peft:
        full = _merge_lora(inner, full)
    # float32, as save_pretrained saves by default: every reader then computes the same embeddings.
    weights = {
        k[len(prefix) :]: (v.float() if v.is_floating_point() else v).contiguous().clone()
        for k, v in full.items()
        if k.startswith(prefix)
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    base = inner.base_model  # type: ignore[attr-defined]
    settings = inner.settings  # type: ignore[attr-defined]
    config = {**saving.stock_config_dict(base.config), "dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    inner.tokenizer.save_pretrained(str(out))  # type: ignore[attr-defined]
    for rel, content in saving.sentence_transformers_files(settings, inner.dim).items():  # type: ignore[attr-defined]
        f = out / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if is_peft:
        settings = EncoderSettings(
            **{**settings.__dict__, "source": {**settings.source, "lora_merged": True}}
        )
    settings.save(out)
    saving.write_model_card(out, inner, adapter=False)  # type: ignore[arg-type]
