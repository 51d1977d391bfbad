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

import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from embedtune.errors import EmbedtuneError

# The distributed: block lives with the other recipe blocks (torch-free, so recipes validate fast).
from embedtune.training.config import DistributedConfig

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


def install_stop_handlers(on_signal: Callable[[int], None]) -> dict[int, Any]:
    """Route SIGTERM/SIGINT to ``on_signal`` (returns the previous handlers, for restoring)."""
    return {
        s: signal.signal(s, lambda signum, _frame: on_signal(signum)) for s in (signal.SIGTERM, signal.SIGINT)
    }


# Checkpointing moved to embedtune.training.checkpoint (one checkpointer for one process and N ranks);
# re-exported here so existing imports keep working while training/distributed.py is split.
from embedtune.training.checkpoint import (  # noqa: E402
    DistributedCheckpointer as DistributedCheckpointer,
)
from embedtune.training.checkpoint import save_consolidated as save_consolidated  # noqa: E402
