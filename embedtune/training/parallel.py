"""What differs between one process, ``torchrun`` DDP and FSDP2, behind one small interface.

The recipe and the tasks see parallelism only through :class:`Parallel`:

=================  ===================================================================================
``device``         this rank's device (``cuda:<local rank>`` or ``cpu``)
``rank``           this process's rank, ``world_size`` the number of ranks (1 in a single process)
``wrap(model)``    DDP, FSDP2 (fp32 shards + bf16 ``MixedPrecisionPolicy`` when ``bf16``), or as is
``plan(...)``      which rows of each global batch this rank processes, per accumulation step
``gather(x)``      rows of every rank (with gradient for embeddings), for cross-rank negatives
``no_sync(model)`` accumulate gradients locally (no all-reduce) for all passes but the last
``mean(v)``        the mean of a logged scalar over ranks; ``agree(flag)``: any rank's stop decision
``clip(...)``      the global gradient norm (also over FSDP2 shards) and clipping
=================  ===================================================================================

A single process is the ``world_size == 1`` case of the same object: without a process group every
collective becomes the identity, so single-process tests run the code path that runs on 8 GPUs (and
``torchrun --nproc-per-node 1`` runs the real collectives on one rank).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from embedtune.training import collectives as C
from embedtune.training.batching import BatchPlan, plan_batches
from embedtune.training.process_group import (
    DistContext,
    DistributedConfig,
    barrier,
    destroy_distributed,
    init_distributed,
)
from embedtune.training.wrapping import (
    ForwardingDDP,
    allocate_fsdp_buffers,
    clip_grad_norm,
    is_sharded,
    unwrap,
    wrap_model,
)

__all__ = ["Parallel"]


class Parallel:
    """One rank of a data-parallel job (or the only process).

    Args:
        ctx: who this process is (see :func:`~embedtune.training.process_group.init_distributed`).
        config: the recipe's ``distributed:`` block.
        bf16: bfloat16 compute (FSDP2 then gathers parameters in bfloat16 over float32 shards).
    """

    def __init__(
        self, ctx: DistContext, config: DistributedConfig | None = None, *, bf16: bool = False
    ) -> None:
        self.ctx = ctx
        self.config = config or DistributedConfig()
        self.bf16 = bf16

    @classmethod
    def from_env(
        cls, config: DistributedConfig | None = None, *, device: str = "auto", bf16: bool = False
    ) -> Parallel:
        """Join the ``torchrun`` job described by the environment, or be the only process."""
        return cls(init_distributed(config, device=device), config, bf16=bf16)

    # ---------------------------------------------------------------------------------- identity
    @property
    def device(self) -> torch.device:
        """This rank's device; every collective input is moved here first."""
        return self.ctx.device

    @property
    def rank(self) -> int:
        """This process's rank (0 in a single process)."""
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        """Number of ranks (1 in a single process)."""
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0: writes logs, pointers and the final model."""
        return self.ctx.is_main

    @property
    def strategy(self) -> str:
        """``single`` (one process), ``ddp`` or ``fsdp2``."""
        return self.config.strategy if self.world_size > 1 else "single"

    @property
    def grouped(self) -> bool:
        """True when a process group exists (under torchrun, also with one rank): collectives run."""
        return self.ctx.backend is not None and dist.is_initialized()

    @property
    def gathers_negatives(self) -> bool:
        """True when the loss scores local queries against the passages of every rank."""
        return self.grouped and self.config.cross_device_negatives

    def cpu_threads(self) -> int | None:
        """Threads per rank when several ranks share one CPU machine (None: torch's default)."""
        if self.world_size == 1 or self.device.type != "cpu":
            return None
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        return max(1, (os.cpu_count() or 1) // max(1, local))

    def describe(self) -> str:
        """One line for the log: ranks, backend, strategy."""
        if self.world_size == 1:
            return f"one process on {self.device}"
        return f"{self.world_size} ranks ({self.ctx.backend}, {self.config.strategy}) on {self.device.type}"

    # ---------------------------------------------------------------------------------- the model
    def wrap(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` for data-parallel training (before the optimizer is built)."""
        wrapped = wrap_model(
            model,
            self.config.strategy,
            self.ctx,
            reshard_after_forward=self.config.reshard_after_forward,
            # fp32 shards (the master weights the optimizer steps), gathered and computed in bf16.
            param_dtype=torch.bfloat16 if self.bf16 else None,
        )
        if is_sharded(wrapped):
            allocate_fsdp_buffers(wrapped)
        return wrapped

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The user's module under a DDP wrapper (FSDP2 shards in place)."""
        return unwrap(model)

    @staticmethod
    def is_sharded(model: nn.Module) -> bool:
        """True when the parameters are FSDP2 shards (no rank holds the whole model)."""
        return is_sharded(unwrap(model))

    @contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Accumulate gradients locally: no gradient reduction in the backward passes inside.

        DDP decides at forward time (``no_sync``); FSDP2 at backward time
        (``set_requires_gradient_sync``). Use it around every forward+backward of a step but the last;
        the last one reduces the sum, so the result equals reducing each one.
        """
        if self.world_size == 1:
            yield
        elif isinstance(model, ForwardingDDP):
            with model.no_sync():
                yield
        elif is_sharded(model):
            model.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)  # type: ignore[operator]
        else:
            yield

    # ---------------------------------------------------------------------------------- the batch
    def plan(self, global_batch_size: int, local_batch_size: int | None, *, gradcache: bool) -> BatchPlan:
        """Which rows of every global batch this rank processes, per accumulation step.

        Raises:
            DistributedError: the batch cannot be split over the ranks (the message suggests sizes).
        """
        return plan_batches(
            global_batch_size, local_batch_size, self.world_size, self.rank, gradcache=gradcache
        )

    def gather(self, x: Tensor, *, grad: bool = False) -> Tensor:
        """Every rank's rows of ``x`` in rank order (``x`` itself, on :attr:`device`, in one process).

        Args:
            x: (n, ...) local rows; moved to the group's device first (the collator builds on the CPU).
            grad: differentiable gather (embeddings): the backward returns to each rank the sum over
                ranks of the gradients of its own rows.
        """
        if not self.grouped:
            return x.to(self.device)
        # Every rank holds the same number of rows (the BatchPlan's equal shares): no sizes collective.
        sizes = [x.shape[0]] * self.world_size
        return C.gather_with_grad(x, sizes=sizes) if grad else C.gather_tensor(x, sizes=sizes)

    # ---------------------------------------------------------------------------------- reductions
    def mean(self, value: float) -> float:
        """The mean of a per-rank scalar over all ranks (e.g. the logged loss of the global batch)."""
        if not self.grouped:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is True on any (stop decisions from rank-local clocks)."""
        if not self.grouped:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum_over_ranks(self, values: Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
        """``values[k]`` summed over every rank for each of ``keys`` (a missing key counts 0).

        Every rank must call it with the same ``keys`` on the same steps; one all-reduce in float64.
        """
        if not self.grouped:
            return {k: float(values.get(k, 0.0)) for k in keys}
        t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, t.tolist()))

    def agree_signal(self, received: int | None) -> int | None:
        """The stop signal any rank received (the highest number), or None; call once per step."""
        if not self.grouped:
            return received
        t = torch.tensor([int(received or 0)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) or None

    def clip(self, parameters: Sequence[nn.Parameter], max_norm: float | None) -> Tensor:
        """The global gradient norm (also over FSDP2 shards); clipped to ``max_norm`` when set."""
        return clip_grad_norm(parameters, max_norm)

    def barrier(self) -> None:
        """Wait for every rank."""
        barrier()

    def close(self) -> None:
        """Leave the process group (nothing to do in a single process)."""
        destroy_distributed()

    def __repr__(self) -> str:
        return f"Parallel({self.describe()})"


def local_copy(t: Any) -> Tensor:
    """The local shard of a DTensor (FSDP2 gradient), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
