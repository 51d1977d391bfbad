"""Collectives of the training step: gather with gradient (cross-rank negatives), gather, agree on stop.

Every tensor handed to a collective is first moved to the process group's device (``get_context().device``):
NCCL takes CUDA tensors only, and anything the collator built (IDs, masks, fingerprints) is on the CPU.
gloo accepts either, so a CPU test passes both ways: ``tests/unit/distributed/test_collective_devices.py``
asserts the devices.

Why the loss needs no rescaling: each rank's loss is the mean over its own B queries, and DDP/FSDP2
*average* gradients over the W ranks. The backward of the gather sums, into each rank's own passages,
the gradients from the losses of all ranks. The averaged gradient is therefore
``(1/W) Σ_r ∂L_r/∂θ = ∂/∂θ [mean over all W·B queries]`` — the single-process gradient on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from embedtune.training.process_group import DistContext, DistributedError, get_context, negatives_group

__all__ = [
    "agree_on_signal",
    "all_gather_sizes",
    "cross_rank_loss",
    "gather_tensor",
    "gather_with_grad",
    "group_device",
]


def _group(group: Any) -> Any:
    return group if group is not None else negatives_group()


def group_device() -> torch.device:
    """The device every collective input must be on: this rank's training device (CUDA under NCCL)."""
    return get_context().device


def all_gather_sizes(n: int, *, group: Any = None, device: torch.device | None = None) -> list[int]:
    """The first-dimension size of a tensor on every rank (``[n]`` in a single process)."""
    if not dist.is_initialized():
        return [n]
    g = _group(group)
    t = torch.tensor([n], dtype=torch.int64, device=device or group_device())
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size(g))]
    dist.all_gather(out, t, group=g)
    return [int(x.item()) for x in out]


def _all_gather_padded(x: Tensor, sizes: Sequence[int], group: Any) -> Tensor:
    # all_gather needs equal shapes: pad every rank's rows to the largest count, then cut back.
    x = x.to(group_device())  # NCCL takes CUDA tensors only; collator outputs live on the CPU
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
        total = grad.to(group_device()).contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]].to(grad.device), None, None, None


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
    sizes = list(sizes) if sizes is not None else all_gather_sizes(x.shape[0], group=g)
    return _GatherWithGrad.apply(x.to(group_device()), sizes, dist.get_rank(g), g)


def gather_tensor(x: Tensor, *, sizes: Sequence[int] | None = None, group: Any = None) -> Tensor:
    """Concatenate ``x`` from every rank without autograd (IDs, fingerprints, metrics)."""
    if not dist.is_initialized():
        return x
    g = _group(group)
    sizes = list(sizes) if sizes is not None else all_gather_sizes(x.shape[0], group=g)
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
    # On the device of the embeddings (= the group's): the collator built the keys on the CPU.
    keys = [k.reshape(-1).to(passages.device) for k in doc_keys] if doc_keys is not None else []
    if len(keys) > 1 and make_ids is None:
        raise ValueError("cross_rank_loss: several doc_keys need make_ids to combine them")
    combine = make_ids or (lambda k: k)
    if not dist.is_initialized():
        ids = combine(*keys) if keys else None
        return loss_fn(queries, passages, n_passages=n_passages, doc_ids=ids, offset=0)
    g = _group(None)
    sizes = all_gather_sizes(queries.shape[0], group=g)
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
    ctx = ctx or get_context()
    if not ctx.is_distributed or not dist.is_initialized():
        return local_signal
    t = torch.tensor([int(local_signal or 0)], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    value = int(t.item())
    return value or None
