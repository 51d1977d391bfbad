"""Distributed training building blocks, one module per concept (this module re-exports them).

=========================================  =====================================================
:mod:`embedtune.training.process_group`    ``DistributedConfig``, device resolution, joining the job
:mod:`embedtune.training.batching`         ``BatchPlan``: which global-batch rows each rank takes
:mod:`embedtune.training.collectives`      gather with gradient, gather, agreement on stop signals
:mod:`embedtune.training.wrapping`         DDP / FSDP2 wrapping, global gradient norm and clipping
:mod:`embedtune.training.parallel`         ``Parallel``: the one interface the recipe uses
:mod:`embedtune.training.checkpoint`       checkpoints (one process and N ranks), final model
=========================================  =====================================================
"""

from __future__ import annotations

from embedtune.training.batching import BatchPlan, plan_batches, slice_batch
from embedtune.training.checkpoint import save_consolidated
from embedtune.training.collectives import (
    agree_on_signal,
    all_gather_sizes,
    cross_rank_loss,
    gather_tensor,
    gather_with_grad,
    group_device,
)
from embedtune.training.process_group import (
    DistContext,
    DistributedConfig,
    DistributedError,
    Strategy,
    barrier,
    destroy_distributed,
    get_context,
    init_distributed,
    resolve_device,
)
from embedtune.training.wrapping import (
    ForwardingDDP,
    allocate_fsdp_buffers,
    clip_grad_norm,
    total_grad_norm,
    unwrap,
    wrap_model,
)

__all__ = [
    "BatchPlan",
    "DistContext",
    "DistributedConfig",
    "DistributedError",
    "ForwardingDDP",
    "Strategy",
    "agree_on_signal",
    "all_gather_sizes",
    "allocate_fsdp_buffers",
    "barrier",
    "clip_grad_norm",
    "cross_rank_loss",
    "destroy_distributed",
    "gather_tensor",
    "gather_with_grad",
    "get_context",
    "group_device",
    "init_distributed",
    "plan_batches",
    "resolve_device",
    "save_consolidated",
    "slice_batch",
    "total_grad_norm",
    "unwrap",
    "wrap_model",
]
