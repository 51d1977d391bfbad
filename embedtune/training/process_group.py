"""The process group: who this process is in a ``torchrun`` job, on which device, and joining/leaving it.

* :class:`DistributedConfig`: the recipe's ``distributed:`` block.
* :func:`resolve_device`: the recipe's ``device`` (``auto|cpu|cuda``) → this rank's ``torch.device``.
* :func:`init_distributed` / :func:`destroy_distributed`: one process group per job (NCCL on GPUs, gloo on
  CPUs) with a timeout, so a rank that dies or hangs makes the others fail instead of waiting forever.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

from embedtune.errors import EmbedtuneError

# The distributed: block lives with the other recipe blocks (torch-free, so recipes validate fast).
from embedtune.training.config import DistributedConfig, Strategy

__all__ = [
    "DistContext",
    "DistributedConfig",
    "DistributedError",
    "Strategy",
    "barrier",
    "destroy_distributed",
    "get_context",
    "init_distributed",
    "negatives_group",
    "resolve_device",
]


class DistributedError(EmbedtuneError):
    """A distributed run is set up inconsistently (batch sizes, rank counts, backends)."""


# ==================================================================================================
# Process group
# ==================================================================================================
@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job."""

    rank: int = 0
    """Global rank, 0..world_size-1."""
    world_size: int = 1
    """Number of processes in the job."""
    local_rank: int = 0
    """Rank on this machine (selects the GPU)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The device this rank trains on."""
    backend: str | None = None
    """``nccl``/``gloo``, or None when not distributed."""

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes the shared files (logs, final model, pointers)."""
        return self.rank == 0


_CONTEXT = DistContext()
# A second group for the negatives gather: its backward runs inside autograd next to DDP/FSDP's own
# gradient collectives, and a separate communicator keeps the two streams from ever interleaving.
_NEGATIVES_GROUP: Any = None


def get_context() -> DistContext:
    """The context set by the last :func:`init_distributed` (single process before that)."""
    return _CONTEXT


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The device this process trains on: the recipe's ``device`` plus, on GPUs, the local rank's GPU.

    Raises:
        DistributedError: ``cuda`` asked for without a GPU, or fewer GPUs than local ranks.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedError("device: cuda was asked for but no GPU is visible; use device: cpu")
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(
            f"local rank {local_rank} needs GPU {local_rank} but only {torch.cuda.device_count()} are "
            "visible; lower --nproc-per-node to the number of GPUs on this machine"
        )
    return torch.device("cuda", local_rank)


def negatives_group() -> Any:
    """The process group of the cross-rank negatives gather (None before :func:`init_distributed`)."""
    return _NEGATIVES_GROUP


def init_distributed(
    config: DistributedConfig | None = None,
    *,
    device: Literal["auto", "cpu", "cuda"] | str = "auto",
) -> DistContext:
    """Join the job described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Without those variables nothing is initialised and a single-process context is returned, so the
    same recipe runs with and without torchrun; ``torchrun --nproc-per-node 1`` does create a group.

    Args:
        config: the ``distributed:`` block (backend, timeout); defaults when None.
        device: the recipe's ``device``; ``auto`` trains on CUDA when available.

    Returns:
        The context (also available later through :func:`get_context`).

    Raises:
        DistributedError: NCCL requested without CUDA, or fewer GPUs than local ranks.
    """
    global _CONTEXT, _NEGATIVES_GROUP
    cfg = config or DistributedConfig()
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    # torchrun (MASTER_ADDR + RANK) with one rank still gets a process group: world size 1 runs the
    # collectives of N ranks (benchmarks/gpu_check.py checks NCCL that way on one GPU).
    launched = world > 1 or ("MASTER_ADDR" in os.environ and "RANK" in os.environ)
    if not launched and not dist.is_initialized():
        _CONTEXT = DistContext(device=dev)
        return _CONTEXT

    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise DistributedError("distributed.backend: nccl needs GPUs; use gloo (or auto) to train on CPUs")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = dev  # eager NCCL init: a bad GPU fails here, not at the first step
            # NCCL aborts a stuck collective (instead of hanging) only with async error handling on.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=cfg.timeout_minutes),
            **kwargs,
        )
    _NEGATIVES_GROUP = dist.new_group(backend=backend, timeout=timedelta(minutes=cfg.timeout_minutes))
    _CONTEXT = DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=backend,
    )
    return _CONTEXT


def destroy_distributed() -> None:
    """Leave the process group (safe to call when none exists).

    Drop the wrapped model (and what holds it) first: DDP's reducer keeps the group alive past
    ``destroy_process_group``, and a gloo group still alive at interpreter shutdown is joined there,
    where a thread that needs the GIL can keep the process from ever exiting. (FSDP2's device mesh is
    also kept by DTensor's internal caches, out of reach: its group lives until shutdown.)
    """
    global _CONTEXT, _NEGATIVES_GROUP
    _NEGATIVES_GROUP = None
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _CONTEXT = DistContext(device=_CONTEXT.device)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()
