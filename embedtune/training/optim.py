"""Optimizers and learning-rate schedules, chosen by name from registries.

``optimizer.name`` picks from :data:`embedtune.config.OPTIMIZERS` (``adamw``, ``sgd``) and
``lr_scheduler.name`` from :data:`embedtune.config.SCHEDULERS` (``constant``, ``linear``, ``cosine``).
Every schedule warms up linearly from ``warmup_start_ratio * lr`` (default 0) over ``warmup_steps``
and then decays towards ``min_lr_ratio * lr`` at ``total_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from embedtune.config import OPTIMIZERS, SCHEDULERS
from embedtune.errors import ConfigError

# The optimizer:/lr_scheduler: blocks live with the other recipe blocks (torch-free).
from embedtune.training.config import LRSchedulerConfig, OptimizerConfig

__all__ = [
    "LRSchedulerConfig",
    "OptimizerConfig",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "warmup_steps",
]


def _param_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    # No decay on biases and 1-D weights (norms): decaying them towards 0 only hurts.
    decay, no_decay = [], []
    for name, p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@OPTIMIZERS.register("adamw")
def _adamw(params: Iterable[tuple[str, nn.Parameter]], cfg: OptimizerConfig) -> Optimizer:
    # foreach=True: one fused kernel per group instead of a Python loop over parameters.
    return torch.optim.AdamW(
        _param_groups(params, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True
    )


@OPTIMIZERS.register("sgd")
def _sgd(params: Iterable[tuple[str, nn.Parameter]], cfg: OptimizerConfig) -> Optimizer:
    return torch.optim.SGD(_param_groups(params, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> Optimizer:
    """Build the optimizer over ``model``'s trainable parameters.

    Raises:
        ConfigError: the model has no trainable parameters.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameters (check peft.target_modules)")
    return OPTIMIZERS.get(cfg.name, "optimizer.name")(named, cfg)


def _constant(progress: float) -> float:
    return 1.0


def _linear(progress: float) -> float:
    return 1.0 - progress


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULERS.register("constant")(_constant)
SCHEDULERS.register("linear")(_linear)
SCHEDULERS.register("cosine")(_cosine)


def warmup_steps(cfg: LRSchedulerConfig, total_steps: int) -> tuple[int, int]:
    """``(used, asked)``: the warmup steps the schedule uses and the ones the recipe asked for.

    A warmup as long as the run would never reach the peak LR, so it is cut to ``total_steps - 1``;
    the recipe reports the cut (``used < asked``) instead of training the whole run below the peak.
    """
    asked = int(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio is not None else cfg.warmup_steps
    return min(asked, max(total_steps - 1, 0)), asked


def lr_factor(step: int, total_steps: int, cfg: LRSchedulerConfig) -> float:
    """Multiplier of the peak LR for the optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup, _ = warmup_steps(cfg, total_steps)
    if step < warmup:
        start = cfg.warmup_start_ratio
        return start + (1.0 - start) * (step + 1) / (warmup + 1)
    decay_steps = max(total_steps - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    shape: Callable[[float], float] = SCHEDULERS.get(cfg.name, "lr_scheduler.name")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape(progress)


def build_scheduler(optimizer: Optimizer, cfg: LRSchedulerConfig, total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`; its ``state_dict`` is JSON-serialisable."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
