"""Data parallelism applied to the model: ``DistributedDataParallel`` or FSDP2 (``fully_shard``).

The model is wrapped *before* the optimizer is built. FSDP2 keeps the parameters as float32 shards (the
master weights the optimizer steps) and, with ``param_dtype=bfloat16``, gathers and computes them in
bfloat16 while reducing gradients in float32 (``MixedPrecisionPolicy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from embedtune.training.process_group import DistContext, DistributedError, Strategy, get_context

__all__ = [
    "ForwardingDDP",
    "allocate_fsdp_buffers",
    "clip_grad_norm",
    "is_sharded",
    "total_grad_norm",
    "unwrap",
    "wrap_model",
]


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
    ctx = ctx or get_context()
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


def is_sharded(module: nn.Module) -> bool:
    """True for a module wrapped by FSDP2's ``fully_shard``."""
    return _is_fsdp(module)


def allocate_fsdp_buffers(model: nn.Module) -> None:
    """Gather and free every FSDP2 group once, outside inference mode.

    FSDP2 creates each group's unsharded parameter tensors at the first all-gather and reuses them. If
    that first all-gather runs under ``torch.inference_mode`` (validation at step 0: ``encode`` uses it),
    they become inference tensors, and the first training forward fails writing into them.
    """
    from torch.distributed.fsdp import FSDPModule

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.unshard()
                m.reshard()
