"""``check_recipe``: everything about a recipe that can be checked without loading weights.

Beyond the typed loading of :func:`embedtune.training.config.load_train_config` (keys, types, values),
this checks that the files exist, that the model's architecture can be read (its ``config.json`` only)
and that ``peft.target_modules`` name layers the model has (on the ``meta`` device: no memory used).
"""

from __future__ import annotations

from pathlib import Path

from embedtune.errors import ConfigError
from embedtune.training.config import TrainConfig

__all__ = ["check_recipe"]


def _model_config(name: str) -> tuple[object | None, str]:
    """The model's transformers config if it can be read cheaply, and a note on where it came from."""
    from transformers import AutoConfig

    from embedtune.models import zoo

    if name in zoo.ZOO:
        # Already built (or a plain package folder)? Building may mean dequantising a GGUF: not here.
        candidates = [zoo.cache_dir() / name, zoo.cache_dir() / "models" / name]
        if name == "minilm":
            candidates.append(zoo.minilm_path())
        folder = next((c for c in candidates if (c / "config.json").is_file()), candidates[0])
        if not (folder / "config.json").is_file():
            return None, f"model: {name} is a bundled short name ({zoo.ZOO[name].description})"
        path = str(folder)
    else:
        path = name
        local = Path(name).expanduser()
        if (
            local.exists()
            and not (local / "config.json").is_file()
            and not (local / "adapter_config.json").is_file()
        ):
            raise ConfigError(f"model.name_or_path: {name} is not a model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(path), f"model: {name} ({path})"
    except (OSError, ValueError) as exc:
        if Path(name).expanduser().exists():
            raise ConfigError(f"model.name_or_path: cannot read {name}/config.json: {exc}") from None
        return None, f"model: {name} is a hub id not in the local cache; it will be downloaded if online"


def _check_lora_targets(cfg: TrainConfig, hf_config: object) -> str:
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(hf_config)
    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    assert cfg.peft is not None
    if cfg.peft.match_all_linear:
        return f"peft: LoRA on all linear layers ({', '.join(linear)})"
    missing = [t for t in cfg.peft.target_modules or [] if t not in linear]
    if missing:
        raise ConfigError(
            f"peft.target_modules: {missing} match no linear layer of {cfg.model.name_or_path}; "
            f"its linear layers are: {', '.join(linear)}"
        )
    return f"peft: LoRA r={cfg.peft.r} on {', '.join(cfg.peft.target_modules or [])}"


def check_recipe(cfg: TrainConfig, *, check_files: bool = True) -> list[str]:
    """Check what typed loading cannot: files, model architecture, LoRA targets, batch arithmetic.

    Args:
        cfg: a loaded recipe.
        check_files: also check that data files and model folders exist.

    Returns:
        Human-readable notes (one line each) on what was checked.

    Raises:
        ConfigError: a problem, naming the key path and the fix.
    """
    notes: list[str] = []
    sched = cfg.step_scheduler
    n_pass = cfg.data.n_passages
    notes.append(
        f"batch: {sched.global_batch_size} queries x {n_pass} passages per step"
        + (
            f", GradCache chunks of {cfg.gradcache.chunk_size}"
            if cfg.gradcache.enabled
            else f", {sched.global_batch_size // sched.micro_batch_size} micro-batch(es) of {sched.micro_batch_size}"
        )
    )
    if cfg.loss.matryoshka_dims and cfg.model.pooling is None:
        notes.append("loss: Matryoshka dimensions are checked against the embedding size at load")
    if check_files:
        for i, ds in enumerate(cfg.data.datasets):
            if not ds.path.startswith("hf://") and not Path(ds.path).exists():
                raise ConfigError(
                    f"data.datasets[{i}].path: {ds.path} does not exist (relative to {Path.cwd()})"
                )
            if ds.negatives and not Path(ds.negatives).is_file():
                raise ConfigError(f"data.datasets[{i}].negatives: {ds.negatives} does not exist")
        notes.append(f"data: {len(cfg.data.datasets)} data set(s) found")
        if cfg.validation is not None and not Path(cfg.validation.data).exists():
            raise ConfigError(
                f"validation.data: {cfg.validation.data} does not exist (relative to {Path.cwd()})"
            )
        resume = cfg.checkpoint.resume
        if (
            resume
            and resume not in ("latest", "best", "auto")
            and not (Path(resume) / "checkpoint.json").is_file()
        ):
            raise ConfigError(
                f"checkpoint.resume: {resume} is not a checkpoint folder (no checkpoint.json); "
                "use latest, best or a step_* folder"
            )
        hf_config, note = _model_config(cfg.model.name_or_path)
        notes.append(note)
        if hf_config is not None:
            dim = getattr(hf_config, "hidden_size", None)
            if cfg.loss.matryoshka_dims and dim and max(cfg.loss.matryoshka_dims) > dim:
                raise ConfigError(
                    f"loss.matryoshka_dims: {max(cfg.loss.matryoshka_dims)} exceeds the embedding size {dim}"
                )
            if cfg.peft is not None:
                notes.append(_check_lora_targets(cfg, hf_config))
    return notes
