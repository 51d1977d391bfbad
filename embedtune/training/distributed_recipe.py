"""The training recipe on several processes: :class:`BiEncoderRecipe` with its distributed parts swapped in.

The loop itself stays in :mod:`embedtune.training.recipe` (one readable file); this subclass changes
only what differs when ``torchrun`` starts N ranks:

=====================  ==============================================================================
part                   under distribution
=====================  ==============================================================================
process group          :func:`~embedtune.training.distributed.init_distributed` before anything else
model                  wrapped in DDP or FSDP2 *before* the optimizer is built
data                   each rank collates only its share of the global batch (same examples, same
                       order, same sampling decisions as one process; see ``BatchPlan``)
loss                   passages (and their document keys) gathered from all ranks with gradients;
                       same-document masking computed over the gathered keys
logging                rank 0 only; the logged loss is the mean over ranks
stop signal            SIGTERM/SIGINT on any rank is agreed on after each step, so all ranks save
                       the same checkpoint and exit 143/130 together
checkpoints            ``torch.distributed.checkpoint`` + per-rank RNG (``DistributedCheckpointer``)
final model            consolidated to one plain folder on rank 0 (``save_consolidated``)
=====================  ==============================================================================
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from embedtune.training import distributed as D
from embedtune.training.recipe import BiEncoderRecipe, TrainResult

__all__ = ["DistributedBiEncoderRecipe", "RankLocalData", "train_distributed"]


class RankLocalData:
    """The recipe's training data, restricted to this rank's share of every global batch.

    ``batch(epoch, step, G)`` collates the examples at this rank's positions (all its micro-batches, in
    accumulation order) of global batch ``step``; the recipe then cuts it into micro-batches as usual.
    The data set is a pure function of ``(seed, epoch, index)``, so no rank reads another's examples
    and each example is exactly the one a single process would use at that position.

    Args:
        data: the recipe's ``TrainingData`` (``dataset`` indexed by position, ``collator``).
        plan: this rank's :class:`~embedtune.training.distributed.BatchPlan`.
    """

    def __init__(self, data: Any, plan: D.BatchPlan) -> None:
        self.data = data
        self.plan = plan

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, epoch: int, step_in_epoch: int, batch_size: int) -> dict[str, Any]:
        """This rank's examples of global batch ``step_in_epoch`` of ``epoch``, collated."""
        assert batch_size == self.plan.global_batch_size
        self.data.dataset.set_epoch(epoch)
        start = step_in_epoch * batch_size
        positions = [start + i for rows in self.plan.all_positions() for i in rows]
        return self.data.collator([self.data.dataset[i] for i in positions])


class _CrossRankLoss(nn.Module):
    """Wraps the recipe's loss: gathers passages and document keys from all ranks, adds the offset."""

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def forward(
        self,
        queries: Tensor,
        passages: Tensor,
        *,
        n_passages: int,
        doc_ids: Tensor | None = None,
        positive_ids: Tensor | None = None,
        offset: int = 0,
    ) -> Tensor:
        # doc_ids are (N, 2) raw keys here [hashed ID, text fingerprint] (see _negative_ids): they are
        # gathered from *all* ranks and the loss labels documents over the gathered keys, or rank-local
        # labels would collide. positive_ids stay local: they belong to the local queries.
        keys = None if doc_ids is None else [doc_ids[:, 0], doc_ids[:, 1]]
        return D.cross_rank_loss(
            functools.partial(self.loss_fn, positive_ids=positive_ids),
            queries,
            passages,
            n_passages=n_passages,
            doc_keys=keys,
            make_ids=_stack_keys,
        )


def _stack_keys(*keys: Tensor) -> Tensor:
    """Gathered (N,) key columns back into the loss's (N, K) keys."""
    return torch.stack(keys, dim=1)


class _SilentMonitor:
    """The monitor of ranks other than 0: every method (log, message, close, ...) does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class DistributedBiEncoderRecipe(BiEncoderRecipe):
    """:class:`BiEncoderRecipe` under ``torchrun`` (one instance per rank); see the module docstring.

    Args:
        cfg: a validated ``TrainConfig``; its ``distributed`` block (when the config has one) picks the
            strategy, cross-rank negatives, backend and timeout.
    """

    def __init__(self, cfg: Any) -> None:
        self.dist_cfg: D.DistributedConfig = getattr(cfg, "distributed", None) or D.DistributedConfig()
        self.ctx = D.init_distributed(self.dist_cfg, device=cfg.device)
        if not self.ctx.is_main:
            # Only rank 0 shows progress and writes TensorBoard logs.
            logging = dataclasses.replace(cfg.logging, progress_bar=False, tensorboard=False, plot=False)
            cfg = dataclasses.replace(cfg, logging=logging)
        super().__init__(cfg)
        self._pending_signal: int | None = None
        self._ckpt: D.DistributedCheckpointer | None = None
        self._monitor: Any = None

    # ---------------------------------------------------------------------------------- setup hooks
    def setup(self) -> None:
        """As the base recipe, on the device of this rank, with the distributed parts swapped in."""
        super().setup()
        if self.cfg.num_threads is None and self.ctx.device.type == "cpu":
            # Ranks on one CPU machine would each take every core: share them out.
            import os

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, _local_world())))
        if self._gathers_negatives:
            self.loss_fn = _CrossRankLoss(self.loss_fn)
        _allocate_fsdp_buffers(self.model)

    @property
    def _gathers_negatives(self) -> bool:
        # Without in-batch negatives each query sees only its own group: nothing to gather.
        return self.dist_cfg.cross_device_negatives and self.cfg.loss.in_batch_negatives

    def _load_model(self) -> nn.Module:
        self.device = self.ctx.device  # the base chose cuda/cpu; the rank picks *which* GPU
        model = super()._load_model()
        return D.wrap_model(
            model,
            self.dist_cfg.strategy,
            self.ctx,
            reshard_after_forward=self.dist_cfg.reshard_after_forward,
            # fp32 shards (the master weights the optimizer steps), gathered and computed in bf16.
            param_dtype=torch.bfloat16 if self.cfg.bf16 else None,
        )

    def _load_data(self) -> Any:
        s = self.cfg.step_scheduler
        plan = D.plan_batches(
            s.global_batch_size,
            s.local_batch_size,
            self.ctx.world_size,
            self.ctx.rank,
            gradcache=self.cfg.gradcache.enabled,
        )
        if self.ctx.is_main:
            print(
                f"distributed: {self.ctx.world_size} ranks ({self.ctx.backend}, {self.dist_cfg.strategy}); global "
                f"batch {s.global_batch_size} = {plan.micro_batch_size} per rank per pass × {self.ctx.world_size} "
                f"ranks × {plan.accumulation_steps} accumulation steps; cross-rank negatives "
                f"{'on' if self._gathers_negatives else 'off'}",
                flush=True,
            )
        return RankLocalData(super()._load_data(), plan)

    # The base recipe assigns ``self.ckpt = CheckpointManager(...)`` and ``self.monitor = TrainingMonitor(...)``
    # in setup(); these properties turn them into their distributed forms without changing that code.
    @property
    def ckpt(self) -> D.DistributedCheckpointer:
        assert self._ckpt is not None
        return self._ckpt

    @ckpt.setter
    def ckpt(self, manager: Any) -> None:
        self._ckpt = D.DistributedCheckpointer(
            manager.root, self.ctx, keep_last=manager.keep_last, strategy=self.dist_cfg.strategy
        )

    @property
    def monitor(self) -> Any:
        return self._monitor

    @monitor.setter
    def monitor(self, monitor: Any) -> None:
        if not self.ctx.is_main and not isinstance(monitor, _SilentMonitor):
            monitor.close(plot=False)
            monitor = _SilentMonitor()
        self._monitor = monitor

    # ---------------------------------------------------------------------------------- step hooks
    def _negative_ids(self, mb: dict[str, Any]) -> Tensor | None:
        if not self._gathers_negatives:
            return super()._negative_ids(mb)
        if not self.cfg.loss.mask_false_negatives:
            return None
        from embedtune.training.loss import sequence_fingerprints

        fp = sequence_fingerprints(mb["passages"]["input_ids"], mb["passages"]["attention_mask"])
        return torch.stack(
            [mb["doc_ids"].reshape(-1), fp], dim=1
        )  # (N, 2) raw keys, labelled after the gather

    def _grad_forwards(self, batch: dict[str, Any]) -> int:
        """How many grad-enabled forward passes the base recipe's step makes for ``batch``."""
        micro = list(self._micro_batches(batch))
        if not self.cfg.gradcache.enabled:
            return 2 * len(micro)  # queries, passages; one backward per micro-batch
        c = self.cfg.gradcache.chunk_size
        rows = [(mb["query"]["input_ids"].shape[0], mb["passages"]["input_ids"].shape[0]) for mb in micro]
        return sum(math.ceil(q / c) + math.ceil(p / c) for q, p in rows)  # one replay (+ backward) per chunk

    def _train_step(self, batch: dict[str, Any]) -> tuple[float, float]:
        ddp = self.model if isinstance(self.model, D.ForwardingDDP) else None
        if ddp is not None:  # one gradient all-reduce per step, not one per micro-batch or chunk
            ddp.sync_on_last_of(self._grad_forwards(batch))
        loss, grad_norm = super()._train_step(batch)
        if ddp is not None and ddp.pending_sync_forwards:
            raise RuntimeError(
                f"internal error: the step made fewer forward passes than planned ({ddp.pending_sync_forwards} "
                "left), so gradients were not all-reduced; DistributedBiEncoderRecipe._grad_forwards is out of "
                "date with BiEncoderRecipe._train_step"
            )
        # Every rank learns about a signal any rank received, at the same point of the same step.
        self._stop_signal = D.agree_on_signal(self._pending_signal, self.ctx)
        if not self.ctx.is_distributed:
            return loss, grad_norm
        mean = torch.tensor([loss], dtype=torch.float64, device=self.ctx.device)
        torch.distributed.all_reduce(mean)  # the logged loss: mean over ranks = the global batch's
        return float(mean.item()) / self.ctx.world_size, grad_norm

    def _agree(self, flag: bool) -> bool:
        """A stop decision made from rank-local clocks (the time budget), made the same on all ranks."""
        if not self.ctx.is_distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.ctx.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    @contextmanager
    def _signals_to_flag(self) -> Iterator[None]:
        """SIGTERM/SIGINT only note the signal; it takes effect at the next agreement (end of the step)."""

        def handler(signum: int, frame: Any) -> None:
            if self._pending_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._pending_signal = signum
            print(
                f"rank {self.ctx.rank}: received {signal.Signals(signum).name}: all ranks will save after this step",
                flush=True,
            )

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _inference_model(self) -> nn.Module:
        # Merging a copy of sharded LoRA layers is not possible: validate with the adapters unmerged
        # (same embeddings, slower). Every rank takes part, as FSDP2's forward is a collective.
        if self.cfg.peft is not None and _is_sharded(D.unwrap(self.model)):
            return self.model
        return super()._inference_model()

    # ---------------------------------------------------------------------------------- checkpoints
    def _saved_this_step(self) -> bool:
        latest = self.ckpt.latest()
        return latest is not None and latest.name == f"step_{self.state.step:08d}"

    def _save_checkpoint(self, is_best: bool = False) -> Path:
        return self.ckpt.save(
            self.model,
            self.optimizer,
            state=self.state,
            scheduler=self.scheduler.state_dict(),
            is_best=is_best,
        )

    def _restore(self, path: Path) -> None:
        self.state, scheduler = self.ckpt.load(
            path, self.model, self.optimizer, allow_world_change=self.dist_cfg.resume_on_other_world_size
        )
        self.scheduler.load_state_dict(scheduler)
        if self.validator is not None and "validator" in self.state.extra:
            self.validator.load_state_dict(self.state.extra["validator"])
        if self.ctx.is_main:
            print(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch})", flush=True)

    def _save_final(self) -> tuple[Path, Path | None]:
        cfg = self.cfg
        best = self.ckpt.best()
        if self.validator is not None and cfg.checkpoint.load_best_at_end and best is not None:
            self.ckpt.load(best, self.model, None, allow_world_change=True)  # weights only
            self.monitor.message(f"final model = best checkpoint {best.name}")
        self.model.eval()
        inner = D.unwrap(self.model)
        adapter_dir = None
        if cfg.peft is not None and not _is_sharded(inner):
            if self.ctx.is_main:
                adapter_dir = inner.save_pretrained(self.out / "adapter", merge_lora=False)
            D.barrier()
            if not cfg.peft.merge_on_save:
                return self.out / "adapter", self.out / "adapter"
        model_dir = D.save_consolidated(self.model, self.out / "model", self.ctx)
        return model_dir or self.out / "model", adapter_dir

    # ---------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Close logs, then leave the process group."""
        try:
            super().cleanup()
        finally:
            D.destroy_distributed()


def _allocate_fsdp_buffers(model: nn.Module) -> None:
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


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _local_world() -> int:
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def train_distributed(cfg: Any) -> TrainResult:
    """Run a whole recipe on this rank: setup, train, cleanup (what each ``torchrun`` rank calls)."""
    recipe = DistributedBiEncoderRecipe(cfg)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
