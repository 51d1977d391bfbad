"""Distributed training on PyTorch's own engine: process groups, DDP, FSDP2, cross-rank negatives, DCP.

Everything a recipe needs to run the same training step on N processes (``torchrun``) and get the
result one process would get on the whole global batch:

* :func:`init_distributed` / :func:`destroy_distributed`: one process group per job (NCCL on GPUs, gloo
  on CPUs) with a timeout, so a rank that dies or hangs makes the others fail instead of waiting forever.
* :func:`plan_batches` and :func:`slice_batch`: how a global batch is cut into per-rank micro-batches
  (contiguous, so rank ``r``'s queries are the rows a single process would see at that position).
* :func:`gather_with_grad` and :func:`cross_rank_loss`: passage embeddings of every rank become negatives
  for every query, and gradients flow back to the rank that produced each passage.
* :func:`wrap_model`: ``DistributedDataParallel`` or FSDP2 (``torch.distributed.fsdp.fully_shard``).
* :class:`DistributedCheckpointer`: model and optimizer through ``torch.distributed.checkpoint`` (DCP),
  each rank's RNG and data position in its own file, DCP's ``.metadata`` file as the commit marker.
* :func:`save_consolidated`: the final model as plain safetensors (transformers + sentence-transformers).
* :func:`agree_on_signal`: a SIGTERM seen by any one rank stops every rank after the same step.

Why the loss needs no rescaling: each rank's loss is the mean over its own B queries, and DDP/FSDP2
*average* gradients over the W ranks. The backward of the gather sums, into each rank's own passages,
the gradients from the losses of all ranks. The averaged gradient is therefore
``(1/W) Σ_r ∂L_r/∂θ = ∂/∂θ [mean over all W·B queries]`` — the single-process gradient on the whole batch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from embedtune.errors import ConfigError, EmbedtuneError

__all__ = [
    "BatchPlan",
    "DistContext",
    "DistributedCheckpointer",
    "DistributedConfig",
    "DistributedError",
    "ForwardingDDP",
    "agree_on_signal",
    "all_gather_sizes",
    "barrier",
    "clip_grad_norm",
    "cross_rank_loss",
    "destroy_distributed",
    "gather_tensor",
    "gather_with_grad",
    "get_context",
    "init_distributed",
    "plan_batches",
    "slice_batch",
    "total_grad_norm",
    "unwrap",
    "wrap_model",
]

Strategy = Literal["ddp", "fsdp2"]


class DistributedError(EmbedtuneError):
    """A distributed run is set up inconsistently (batch sizes, rank counts, backends)."""


# ==================================================================================================
# Configuration
# ==================================================================================================
@dataclass
class DistributedConfig:
    """The recipe's ``distributed:`` block (used only when the job runs on more than one process)."""

    strategy: Strategy = "ddp"
    """``ddp``: every rank holds the whole model and optimizer state, gradients are all-reduced; the
    fastest choice whenever the model, its gradients and the optimizer state fit one device (always the
    case with LoRA). ``fsdp2``: parameters, gradients and optimizer state are sharded across ranks
    (``torch.distributed.fsdp.fully_shard``), each block gathered just in time; use it for full
    fine-tuning of large decoders that do not fit one device."""

    cross_device_negatives: bool = True
    """Score every query against the passages of *all* ranks (gathered with gradients), so the
    in-batch negatives are those of the global (micro-)batch, as in a single process. Off: each rank
    uses only its own passages (less communication, fewer negatives)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; ``auto`` is NCCL when training on CUDA, gloo otherwise."""

    timeout_minutes: float = 10.0
    """How long a collective may wait for the other ranks before the job fails. Bounds the hang when
    one rank dies; raise it if checkpoints or validation on rank 0 take longer."""

    reshard_after_forward: bool = True
    """FSDP2 only: free each block's gathered parameters after its forward and re-gather them for the
    backward (least memory). False keeps them until the backward (more memory, one all-gather less)."""

    resume_on_other_world_size: bool = False
    """Allow ``checkpoint.resume`` from a checkpoint written by a different number of ranks (e.g. after
    losing a node). Weights, optimizer state (resharded by DCP), schedule and data position carry over;
    per-rank random streams cannot, so the run continues but is not bitwise identical. Off: refused."""

    def __post_init__(self) -> None:
        if not self.timeout_minutes > 0:
            raise ConfigError(f"timeout_minutes: must be > 0, got {self.timeout_minutes}")


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


def init_distributed(
    config: DistributedConfig | None = None,
    *,
    device: Literal["auto", "cpu", "cuda"] | str = "auto",
) -> DistContext:
    """Join the job described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Without those variables (or with ``WORLD_SIZE=1``) nothing is initialised and a single-process
    context is returned, so the same recipe runs with and without torchrun.

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
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError("device: cuda was asked for but no GPU is visible; use device: cpu")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local_rank} needs GPU {local_rank} but only {torch.cuda.device_count()} are "
                "visible; lower --nproc-per-node to the number of GPUs on this machine"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world <= 1 and not dist.is_initialized():
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
    """Leave the process group (safe to call when none exists)."""
    global _CONTEXT, _NEGATIVES_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _NEGATIVES_GROUP = None
    _CONTEXT = DistContext(device=_CONTEXT.device)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


# ==================================================================================================
# Batch sizes and sharding
# ==================================================================================================
@dataclass(frozen=True)
class BatchPlan:
    """How one global batch is split across ranks and accumulation steps.

    ``global_batch_size = micro_batch_size × world_size × accumulation_steps``. At accumulation step
    ``a``, rank ``r`` processes the global-batch positions
    ``[a·W·m + r·m, a·W·m + (r+1)·m)``: the W ranks together cover one contiguous block of ``W·m``
    examples, in rank order. With cross-rank negatives that block is exactly the micro-batch a single
    process with ``local_batch_size = W·m`` would see, so both runs compute the same loss.
    """

    global_batch_size: int
    micro_batch_size: int
    """Queries per rank per forward/backward pass."""
    world_size: int
    rank: int

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def positions(self, step: int) -> range:
        """Positions (within the global batch) of this rank's queries at accumulation step ``step``."""
        start = step * self.world_size * self.micro_batch_size + self.rank * self.micro_batch_size
        return range(start, start + self.micro_batch_size)

    def all_positions(self) -> list[range]:
        """This rank's positions for every accumulation step, in order."""
        return [self.positions(a) for a in range(self.accumulation_steps)]


def plan_batches(
    global_batch_size: int,
    local_batch_size: int | None,
    world_size: int,
    rank: int,
    *,
    gradcache: bool = False,
) -> BatchPlan:
    """Check ``global = local × ranks × accumulation`` and return the split for this rank.

    Args:
        global_batch_size: queries per optimizer step over all ranks (``step_scheduler.global_batch_size``).
        local_batch_size: queries per rank per forward/backward (``step_scheduler.local_batch_size``);
            None means one micro-batch per rank (``global / ranks``). With GradCache the whole rank share
            is one micro-batch, encoded in chunks, so this is ignored.
        world_size: number of ranks.
        rank: this rank.
        gradcache: GradCache on (each rank processes its whole share at once).

    Raises:
        DistributedError: the sizes are inconsistent; the message explains the rule and suggests values.
    """
    if global_batch_size % world_size:
        lo = global_batch_size - global_batch_size % world_size
        raise DistributedError(
            f"step_scheduler.global_batch_size={global_batch_size} cannot be split over {world_size} ranks: "
            f"the global batch is local_batch_size × ranks × accumulation steps, so it must be a multiple "
            f"of {world_size}; use {lo or world_size} or {lo + world_size}"
        )
    share = global_batch_size // world_size
    if gradcache or local_batch_size is None:
        micro = share
    else:
        micro = local_batch_size
        if micro > share or share % micro:
            divisors = [d for d in range(1, share + 1) if share % d == 0]
            raise DistributedError(
                f"step_scheduler.local_batch_size={micro} does not divide the per-rank share of the global "
                f"batch: global_batch_size={global_batch_size} over {world_size} ranks is {share} queries "
                f"per rank, and global = local × ranks × accumulation steps. Use a local_batch_size in "
                f"{divisors}, or set global_batch_size to {micro * world_size} × the accumulation steps "
                f"you want (e.g. {micro * world_size * max(1, share // micro)})"
            )
    return BatchPlan(global_batch_size, micro, world_size, rank)


def slice_batch(batch: dict[str, Any], rows: range) -> dict[str, Any]:
    """The queries ``rows`` of a collated batch, with their passages and document IDs.

    Args:
        batch: ``{"query": {...}: (B, Sq), "passages": {...}: (B·n, Sp), "doc_ids": (B, n)}``, passages
            grouped per query (the collator's layout); extra keys are left out.
        rows: contiguous query rows to keep.

    Returns:
        The same layout with ``len(rows)`` queries.
    """
    assert rows.step == 1, "slice_batch takes contiguous rows"
    b = batch["query"]["input_ids"].shape[0]
    n = batch["passages"]["input_ids"].shape[0] // b
    out: dict[str, Any] = {
        "query": {k: v[rows.start : rows.stop] for k, v in batch["query"].items()},
        "passages": {k: v[rows.start * n : rows.stop * n] for k, v in batch["passages"].items()},
    }
    if "doc_ids" in batch and batch["doc_ids"] is not None:
        out["doc_ids"] = batch["doc_ids"][rows.start : rows.stop]
    return out


# ==================================================================================================
# Cross-rank negatives
# ==================================================================================================
def _group(group: Any) -> Any:
    return group if group is not None else _NEGATIVES_GROUP


def all_gather_sizes(n: int, *, group: Any = None, device: torch.device | None = None) -> list[int]:
    """The first-dimension size of a tensor on every rank (``[n]`` in a single process)."""
    if not dist.is_initialized():
        return [n]
    g = _group(group)
    dev = device or _CONTEXT.device
    t = torch.tensor([n], dtype=torch.int64, device=dev)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size(g))]
    dist.all_gather(out, t, group=g)
    return [int(x.item()) for x in out]


def _all_gather_padded(x: Tensor, sizes: Sequence[int], group: Any) -> Tensor:
    # all_gather needs equal shapes: pad every rank's rows to the largest count, then cut back.
    m = max(sizes)
    padded = x if x.shape[0] == m else torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient for our rows and keeps them."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], rank: int, group: Any) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_padded(x.detach(), sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        # Every rank used our rows in its own loss: the gradient of the sum of all ranks' losses w.r.t.
        # our rows is the sum of the ranks' gradients. (gloo has no reduce_scatter: all_reduce + slice.)
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_with_grad(x: Tensor, *, sizes: Sequence[int] | None = None, group: Any = None) -> Tensor:
    """Concatenate ``x`` from every rank in rank order, differentiably.

    The result is ``(Σ_r n_r, ...)``; its backward returns to each rank the *sum over ranks* of the
    gradients for that rank's rows, which is what the gradient of the summed per-rank losses needs (see
    the module docstring for why DDP's averaging then gives the single-process gradient).

    Args:
        x: (n, ...) local rows; ``n`` may differ between ranks.
        sizes: every rank's ``n`` if already known (saves one collective); see :func:`all_gather_sizes`.
        group: process group (default: the one :func:`init_distributed` made for negatives).

    Returns:
        ``x`` itself in a single process, else the gathered tensor.
    """
    if not dist.is_initialized():
        return x
    g = _group(group)
    sizes = list(sizes) if sizes is not None else all_gather_sizes(x.shape[0], group=g, device=x.device)
    return _GatherWithGrad.apply(x, sizes, dist.get_rank(g), g)


def gather_tensor(x: Tensor, *, sizes: Sequence[int] | None = None, group: Any = None) -> Tensor:
    """Concatenate ``x`` from every rank without autograd (IDs, fingerprints, metrics)."""
    if not dist.is_initialized():
        return x
    g = _group(group)
    sizes = list(sizes) if sizes is not None else all_gather_sizes(x.shape[0], group=g, device=x.device)
    with torch.no_grad():
        return _all_gather_padded(x, sizes, g)


def cross_rank_loss(
    loss_fn: Callable[..., Tensor],
    queries: Tensor,
    passages: Tensor,
    *,
    n_passages: int,
    doc_keys: Sequence[Tensor] | None = None,
    make_ids: Callable[..., Tensor] | None = None,
) -> Tensor:
    """The contrastive loss of the local queries against the passages of *every* rank.

    Gathers the passage embeddings (with gradients) and the passages' document keys from all ranks,
    computes the document IDs for false-negative masking over the *gathered* keys (so two ranks holding
    the same document mask it for each other), and calls ``loss_fn`` with the global offset of the
    local queries. Works unchanged inside GradCache's ``loss_fn`` (its backward goes through the gather).

    Args:
        loss_fn: ``loss_fn(queries, passages, *, n_passages, doc_ids, offset) -> scalar`` (e.g.
            :class:`embedtune.training.loss.InfoNCELoss`), the mean over the local queries.
        queries: (B, d) local query embeddings.
        passages: (B·n_passages, d) local passage embeddings, grouped per query, positive first.
        n_passages: passages per query.
        doc_keys: one or more (B·n_passages,) or (B, n_passages) int64 keys per passage (hashed IDs,
            text fingerprints); None disables masking.
        make_ids: turns the gathered keys into one ID per passage (e.g. the recipe's
            ``same_document_ids`` for "same ID *or* same text"); default: the single key as is.

    Returns:
        The scalar loss (mean over local queries).

    Raises:
        DistributedError: ranks hold different numbers of queries (the mean over ranks would weight
            their queries unequally, so the gradient would not be the single-process one).
    """
    keys = [k.reshape(-1) for k in doc_keys] if doc_keys is not None else []
    if len(keys) > 1 and make_ids is None:
        raise ValueError("cross_rank_loss: several doc_keys need make_ids to combine them")
    combine = make_ids or (lambda k: k)
    if not dist.is_initialized():
        ids = combine(*keys) if keys else None
        return loss_fn(queries, passages, n_passages=n_passages, doc_ids=ids, offset=0)
    g = _group(None)
    sizes = all_gather_sizes(queries.shape[0], group=g, device=queries.device)
    if len(set(sizes)) != 1:
        raise DistributedError(
            f"cross-rank negatives need the same number of queries on every rank, got {sizes}; make "
            "global_batch_size a multiple of local_batch_size × ranks"
        )
    rank = dist.get_rank(g)
    p_sizes = [s * n_passages for s in sizes]
    all_passages = gather_with_grad(passages, sizes=p_sizes, group=g)  # (Σ B_r · n, d)
    ids = combine(*[gather_tensor(k, sizes=p_sizes, group=g) for k in keys]) if keys else None
    offset = sum(sizes[:rank])  # global index of our first query among all gathered groups
    return loss_fn(queries, all_passages, n_passages=n_passages, doc_ids=ids, offset=offset)


# ==================================================================================================
# DDP / FSDP2
# ==================================================================================================
class ForwardingDDP(nn.parallel.DistributedDataParallel):
    """``DistributedDataParallel`` that also answers the wrapped module's own attributes.

    A recipe can keep calling ``model.settings``, ``model.tokenizer`` or ``model.encode(...)`` on the
    wrapped model; only ``model(...)`` (and ``parameters()``/``state_dict()``) goes through DDP.
    """

    _sync_countdown: int = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def sync_on_last_of(self, forwards: int) -> None:
        """All-reduce gradients only in the backward that follows the last of the next ``forwards``
        grad-enabled forward passes (DDP's ``no_sync`` for the others).

        GradCache replays every chunk with its own forward + backward, and gradient accumulation runs a
        backward per micro-batch; reducing after each one sends the whole gradient over the network
        ``forwards`` times per step where once is enough (the complaint "DDP is slower than one GPU with
        cached losses"). Gradients accumulate locally and the last backward reduces their sum, so the
        result is unchanged. Check :attr:`pending_sync_forwards` is 0 after the step.
        """
        self._sync_countdown = forwards

    @property
    def pending_sync_forwards(self) -> int:
        """Planned forwards that have not happened yet (non-zero after a step means a wrong plan)."""
        return self._sync_countdown

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._sync_countdown > 0 and torch.is_grad_enabled():
            self._sync_countdown -= 1
            # DDP decides at forward time whether the coming backward reduces (as no_sync does).
            self.require_backward_grad_sync = self._sync_countdown == 0
        return super().forward(*args, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place, so it needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    # transformers lists the classes that must stay whole on one device (the decoder/encoder layers):
    # exactly the units FSDP should gather one at a time.
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    # Outermost only: never shard a module inside another sharded block.
    return [b for b in blocks if not any(o is not b and b in list(o.modules()) for o in blocks)]


def wrap_model(
    model: nn.Module,
    strategy: Strategy,
    ctx: DistContext | None = None,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Wrap a (Bi)Encoder for data-parallel training; call before building the optimizer.

    ``ddp``: ``DistributedDataParallel`` (rank 0's weights are broadcast, so all ranks start equal).
    ``fsdp2``: ``fully_shard`` on every transformer block (from the backbone's ``_no_split_modules``)
    and on the whole model; parameters become sharded ``DTensor``s, and the optimizer must be built
    from the wrapped model's parameters. LoRA works under both (frozen and trainable parameters may
    share an FSDP2 group).

    Args:
        model: the module to wrap (same initial weights on every rank for ``fsdp2``: seed first).
        strategy: ``ddp`` or ``fsdp2``.
        ctx: the distributed context (default: the current one); a single process returns ``model``.
        reshard_after_forward: FSDP2: free gathered block parameters after the forward.
        param_dtype: FSDP2: compute dtype of gathered parameters (e.g. bfloat16), gradients reduced in
            float32; None computes in the stored dtype.

    Raises:
        DistributedError: unknown strategy.
    """
    ctx = ctx or _CONTEXT
    if not ctx.is_distributed:
        return model
    if strategy == "ddp":
        import inspect

        # Our buffers are constants (rotary tables); re-broadcasting them every forward is waste.
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in params
            else {"broadcast_buffers": False}
        )
        return ForwardingDDP(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **no_sync
        )
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        mp = (
            MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
        )
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
        if mp is not None:
            kwargs["mp_policy"] = mp
        for block in _transformer_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise DistributedError(f"distributed.strategy: {strategy!r} is not one of: ddp, fsdp2")


def total_grad_norm(parameters: Sequence[nn.Parameter] | Any) -> Tensor:
    """The global L2 norm of all gradients, as a plain tensor also under FSDP2 (sharded ``DTensor``s)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2: reduce the per-shard norms
    return full() if full is not None else norm


def clip_grad_norm(parameters: Sequence[nn.Parameter] | Any, max_norm: float | None) -> Tensor:
    """Global gradient norm (returned) and, when ``max_norm`` is set, clip to it; DDP/FSDP2/plain alike."""
    params = [p for p in parameters if p.grad is not None]
    norm = total_grad_norm(params)
    if max_norm is not None and params and torch.isfinite(norm):
        coef = float(max_norm) / (float(norm) + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)  # a Python float: valid for DTensor and plain gradients alike
    return norm


# ==================================================================================================
# Stopping together
# ==================================================================================================
def agree_on_signal(local_signal: int | None, ctx: DistContext | None = None) -> int | None:
    """Tell every rank about a stop signal any one rank received (one tiny all-reduce per call).

    Call it at the same point of every step on every rank; all ranks then stop after the same step, save
    the same checkpoint and exit with the same code. With no signal anywhere it returns None.

    Args:
        local_signal: the signal number this rank received (e.g. ``signal.SIGTERM``), or None.
        ctx: the distributed context (default: the current one).

    Returns:
        The highest signal number any rank received (SIGTERM 15 > SIGINT 2), or None.
    """
    ctx = ctx or _CONTEXT
    if not ctx.is_distributed or not dist.is_initialized():
        return local_signal
    t = torch.tensor([int(local_signal or 0)], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    value = int(t.item())
    return value or None


# ==================================================================================================
# Checkpoints (torch.distributed.checkpoint)
# ==================================================================================================
_PREFIX = "step_"
_DCP = "dcp"
_META = ".metadata"


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    # DCP warns on every single-process save/load that it "assumes" one process: that is the intent.
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


class DistributedCheckpointer:
    """Save and restore training state from all ranks at once, with DCP.

    Layout of one checkpoint (a shared filesystem is needed across nodes)::

        <root>/step_00000040/
          trainer_state.json     step, epoch, step-in-epoch (the data position), ... (rank 0)
          scheduler.json         LR scheduler state (rank 0)
          distributed.json       world size and strategy that wrote it (rank 0)
          rank_00000.json        this rank's data position and rank/world (every rank)
          rank_00000.safetensors this rank's python/numpy/torch(/CUDA) RNG states (every rank)
          dcp/                   model + optimizer through torch.distributed.checkpoint: each rank writes
            __0_0.distcp ...     its own shards (DDP: replicated tensors written once)
            .metadata            written last, by rank 0, after every rank's files are on disk
        <root>/latest            names the newest complete checkpoint

    ``dcp/.metadata`` is the commit marker: every other file is written and fsynced *before* the DCP
    save starts, and DCP writes its metadata (temp file + rename) only after all ranks report their
    shards written. A folder without it is an interrupted save and is never resumed from.
    LoRA: only trainable parameters (and their optimizer state) are stored; the frozen base is
    reloaded from its source.

    Args:
        root: the checkpoint folder.
        ctx: the distributed context (default: the current one).
        keep_last: newest checkpoints to keep (plus the best one).
        strategy: recorded in ``distributed.json`` (informational).
    """

    def __init__(
        self,
        root: str | Path,
        ctx: DistContext | None = None,
        *,
        keep_last: int = 2,
        strategy: str = "ddp",
    ) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.root = Path(root)
        self.ctx = ctx or _CONTEXT
        self.keep_last = keep_last
        self.strategy = strategy

    # -- discovery ------------------------------------------------------------------------------
    @staticmethod
    def is_complete(path: Path) -> bool:
        """True when ``path`` is a checkpoint whose DCP metadata (the commit marker) exists."""
        return (path / _DCP / _META).is_file()

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob(f"{_PREFIX}*") if p.is_dir() and self.is_complete(p)]
        return sorted(done, key=lambda p: int(p.name[len(_PREFIX) :]))

    def _pointer(self, name: str) -> Path | None:
        f = self.root / name
        if not f.is_file():
            return None
        target = self.root / f.read_text(encoding="utf-8").strip()
        return target if self.is_complete(target) else None

    def latest(self) -> Path | None:
        """The newest complete checkpoint (the pointer, else the highest complete step), or None."""
        found = self._pointer("latest")
        if found is not None:
            return found
        done = self.list()
        return done[-1] if done else None

    def best(self) -> Path | None:
        """The checkpoint marked best by validation, or None."""
        return self._pointer("best")

    # -- state dicts ----------------------------------------------------------------------------
    @staticmethod
    def _options(full: bool = False) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Frozen parameters (LoRA's base) are neither saved nor expected back: strict=False. A trainable
        # tensor missing from the checkpoint still fails, in dcp.load.
        return StateDictOptions(
            ignore_frozen_params=True, full_state_dict=full, cpu_offload=full, strict=False
        )

    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if optimizer is None:
            return {"model": get_model_state_dict(model, options=self._options())}
        msd, osd = get_state_dict(model, optimizer, options=self._options())
        return {"model": msd, "optim": osd}

    # -- saving -----------------------------------------------------------------------------------
    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        state: Any,
        scheduler: dict[str, Any] | None = None,
        rng: dict[str, Tensor] | None = None,
        is_best: bool = False,
    ) -> Path:
        """Write one checkpoint from every rank (a collective: all ranks must call it).

        Args:
            model: the wrapped (DDP/FSDP2) or plain model.
            optimizer: its optimizer, or None.
            state: a :class:`embedtune.training.checkpoint.TrainState` (dataclass) — same on all ranks.
            scheduler: the LR scheduler's ``state_dict()``.
            rng: this rank's RNG states (default: captured now).
            is_best: also point ``best`` at this checkpoint.

        Returns:
            The checkpoint folder.

        Raises:
            EmbedtuneError: (``CheckpointError``) a file could not be written; earlier checkpoints stay.
        """
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save as st_save

        from embedtune.training.checkpoint import CheckpointError, capture_rng_state

        ctx = self.ctx
        name = f"{_PREFIX}{state.step:08d}"
        folder = self.root / name
        try:
            if ctx.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if folder.exists():  # an interrupted save of this step, or a re-save: start clean
                    shutil.rmtree(folder)
                folder.mkdir()
            barrier()
            r = ctx.rank
            state_dict = asdict(state)
            position = {
                "rank": r,
                "world_size": ctx.world_size,
                "epoch": state_dict.get("epoch"),
                "step_in_epoch": state_dict.get("step_in_epoch"),
                "step": state.step,
            }
            _write_bytes(folder / f"rank_{r:05d}.json", json.dumps(position).encode())
            _write_bytes(folder / f"rank_{r:05d}.safetensors", st_save(rng or capture_rng_state()))
            if ctx.is_main:
                meta = {"world_size": ctx.world_size, "strategy": self.strategy}
                _write_bytes(folder / "distributed.json", json.dumps(meta).encode())
                _write_bytes(folder / "scheduler.json", json.dumps(scheduler or {}).encode())
                _write_bytes(folder / "trainer_state.json", json.dumps(state_dict, indent=1).encode())
            # Last: DCP writes .metadata only after every rank's shards are written (the commit marker).
            with _single_process_quiet():
                dcp.save(
                    self._state(model, optimizer),
                    checkpoint_id=str(folder / _DCP),
                    no_dist=not dist.is_initialized(),
                )
        except OSError as exc:
            previous = self.latest()
            raise CheckpointError(
                f"rank {ctx.rank}: could not save checkpoint {folder} ({exc.strerror or exc}); "
                f"{'the previous checkpoint ' + str(previous) + ' is intact' if previous else 'no earlier checkpoint'}. "
                "Free space (or lower checkpoint.keep_last) and resume with checkpoint.resume=latest."
            ) from exc
        barrier()
        if ctx.is_main:
            self._set_pointer("latest", name)
            if is_best:
                self._set_pointer("best", name)
            self._rotate()
        barrier()
        return folder

    def _set_pointer(self, name: str, target: str) -> None:
        _write_bytes(self.root / name, target.encode())

    def _rotate(self) -> None:
        done = self.list()
        keep = set(done[-self.keep_last :])
        keep.update(p for p in (self.latest(), self.best()) if p is not None)
        newest = int(done[-1].name[len(_PREFIX) :]) if done else -1
        for p in self.root.glob(f"{_PREFIX}*"):
            if not p.is_dir() or p in keep:
                continue
            # Old complete checkpoints, and folders of interrupted saves older than the newest one.
            if self.is_complete(p) or int(p.name[len(_PREFIX) :]) < newest:
                shutil.rmtree(p, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------
    def resolve(self, resume: str) -> Path:
        """``latest``, ``best`` or a folder → a complete checkpoint.

        Raises:
            EmbedtuneError: (``CheckpointError``) nothing complete to resume from.
        """
        from embedtune.training.checkpoint import CheckpointError

        if resume in ("latest", "best"):
            found = self.latest() if resume == "latest" else self.best()
            if found is None:
                raise CheckpointError(
                    f"checkpoint.resume={resume}: no complete distributed checkpoint (with dcp/.metadata) "
                    f"in {self.root}"
                )
            return found
        path = Path(resume)
        if not self.is_complete(path):
            raise CheckpointError(
                f"checkpoint.resume={resume}: not a complete distributed checkpoint (no {_DCP}/{_META}; "
                "the save was interrupted — resume from an earlier one)"
            )
        return path

    def load(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        allow_world_change: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """Restore model, optimizer and this rank's RNG in place (a collective: all ranks call it).

        Args:
            path: a complete checkpoint folder.
            model: the wrapped or plain model.
            optimizer: its optimizer, or None (weights only).
            allow_world_change: accept a checkpoint written by a different number of ranks. DCP reshards
                weights and optimizer state, and the data position is global, so training continues on
                the same examples; but per-rank RNG streams (dropout) cannot be carried over, so each rank
                is reseeded from (step, rank) and the run is no longer bitwise identical.

        Returns:
            ``(TrainState, scheduler_state)``; load the latter into the LR scheduler.

        Raises:
            EmbedtuneError: (``CheckpointError``) the checkpoint was written by a different number of
                ranks (and ``allow_world_change`` is off), or cannot be read.
        """
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load as st_load
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        from embedtune.training.checkpoint import CheckpointError, TrainState, restore_rng_state

        p = Path(path)
        ctx = self.ctx
        try:
            meta = json.loads((p / "distributed.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{p}: not a distributed checkpoint ({exc})") from exc
        same_world = meta["world_size"] == ctx.world_size
        if not same_world and not allow_world_change:
            raise CheckpointError(
                f"{p} was written by {meta['world_size']} ranks but this job has {ctx.world_size}; exact "
                f"resume needs the same number: relaunch with --nproc-per-node × --nnodes = {meta['world_size']}, "
                "or set distributed.resume_on_other_world_size: true to continue (not bitwise exact)"
            )
        sd = self._state(model, optimizer)
        try:
            with _single_process_quiet():
                dcp.load(sd, checkpoint_id=str(p / _DCP), no_dist=not dist.is_initialized())
            rng = st_load((p / f"rank_{ctx.rank:05d}.safetensors").read_bytes()) if same_world else None
            state = TrainState(**json.loads((p / "trainer_state.json").read_text()))
            scheduler = json.loads((p / "scheduler.json").read_text())
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{p}: cannot read checkpoint on rank {ctx.rank}: {exc}") from exc
        if optimizer is None:
            set_model_state_dict(model, sd["model"], options=self._options())
        else:
            set_state_dict(
                model,
                optimizer,
                model_state_dict=sd["model"],
                optim_state_dict=sd["optim"],
                options=self._options(),
            )
        if rng is not None:
            restore_rng_state(rng)
        else:
            # A new, reproducible stream per rank: the old ranks' streams do not map onto the new ranks.
            torch.manual_seed(1_000_003 * (state.step + 1) + ctx.rank)
            if ctx.is_main:
                print(
                    f"warning: resumed {p} ({meta['world_size']} ranks) on {ctx.world_size} ranks: weights, "
                    "optimizer, schedule and data position restored; random streams reseeded, so the run is "
                    "not bitwise identical to an uninterrupted one",
                    flush=True,
                )
        return state, scheduler


# ==================================================================================================
# The final model as plain safetensors
# ==================================================================================================
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


def save_consolidated(model: nn.Module, path: str | Path, ctx: DistContext | None = None) -> Path | None:
    """Write the trained model as one plain folder (a collective: all ranks must call it).

    DDP and single process: rank 0 calls ``BiEncoder.save_pretrained`` (weights are replicated). FSDP2:
    the full state dict is gathered to rank 0's CPU (one block at a time, never the whole model on one
    GPU), LoRA deltas merged, and written as ``model.safetensors`` with the same config, tokenizer,
    sentence-transformers and ``embedtune.json`` files as ``save_pretrained`` writes.

    Args:
        model: the wrapped or plain :class:`~embedtune.models.biencoder.BiEncoder`.
        path: output folder.
        ctx: the distributed context (default: the current one).

    Returns:
        The folder on rank 0, None on the other ranks.
    """
    ctx = ctx or _CONTEXT
    out = Path(path)
    inner = unwrap(model)
    if not _is_fsdp(inner):
        if ctx.is_main:
            inner.save_pretrained(out)  # type: ignore[operator]
        barrier()
        return out if ctx.is_main else None

    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict + cpu_offload: gathered shard by shard, materialised only on rank 0's CPU.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        _write_plain_folder(inner, full, out, save_file)
    barrier()
    return out if ctx.is_main else None


def _write_plain_folder(inner: nn.Module, full: dict[str, Tensor], out: Path, save_file: Any) -> None:
    from embedtune.models import saving
    from embedtune.models.settings import EncoderSettings

    backbone = inner.backbone  # type: ignore[attr-defined]
    is_peft = hasattr(backbone, "peft_config")
    prefix = "backbone.base_model.model." if is_peft else "backbone."
    if is_peft:
        full = _merge_lora(inner, full)
    weights = {k[len(prefix) :]: v.contiguous().clone() for k, v in full.items() if k.startswith(prefix)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    base = inner.base_model  # type: ignore[attr-defined]
    settings = inner.settings  # type: ignore[attr-defined]
    (out / "config.json").write_text(json.dumps(saving.stock_config_dict(base.config), indent=2) + "\n")
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


def install_stop_handlers(on_signal: Callable[[int], None]) -> dict[int, Any]:
    """Route SIGTERM/SIGINT to ``on_signal`` (returns the previous handlers, for restoring)."""
    return {
        s: signal.signal(s, lambda signum, _frame: on_signal(signum)) for s in (signal.SIGTERM, signal.SIGINT)
    }
