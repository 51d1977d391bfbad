"""The training recipe: ``setup → train → cleanup``, one loop for every task and every world size.

``embedtune train recipe.yaml [key=value ...]`` runs :class:`Recipe` with the task the recipe asks for
(bi-encoder, distillation or cross-encoder reranker; :mod:`embedtune.training.tasks`) under the
parallelism the process was started with (one process, or one rank of ``torchrun`` with DDP or FSDP2;
:mod:`embedtune.training.parallel`). One optimizer step:

1. this rank's rows of the next ``global_batch_size`` examples, one micro-batch per accumulation step
   (the data set is a pure function of ``(seed, epoch, index)``, so the data position is just
   ``(epoch, step_in_epoch)``);
2. per micro-batch: the task's forward + loss + backward (gradients reduced across ranks only after
   the last one); bf16 autocast over float32 weights when asked;
3. refuse a non-finite loss/gradient *before* the optimizer step (every rank agrees); clip; step;
   schedule;
4. log (rank 0; the loss is the mean over ranks); checkpoint every N steps; validate every N steps
   (best checkpoint, early stopping);
5. on SIGTERM/SIGINT (any rank): finish the step, checkpoint, exit 143/130 on every rank.

Resuming restores model (LoRA: adapter) weights, optimizer, scheduler, every RNG state and the data
position, so a resumed run is bitwise identical to an uninterrupted one on the same machine. Every
checkpoint save/restore goes through :class:`RecipeCheckpoints` (one seam).
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from embedtune.config import config_to_dict
from embedtune.errors import ConfigError, EmbedtuneError
from embedtune.training.checkpoint import Checkpointer, Fingerprint, TrainState, data_paths
from embedtune.training.config import TrainConfig
from embedtune.training.loss import same_document_ids
from embedtune.training.monitor import TrainingMonitor
from embedtune.training.optim import build_optimizer, build_scheduler, warmup_steps
from embedtune.training.parallel import Parallel, local_copy
from embedtune.training.signals import EXIT_SIGINT, EXIT_SIGTERM, StopSignals, exit_code
from embedtune.training.tasks import Task, apply_lora, task_for

__all__ = [
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "BiEncoderRecipe",
    "NonFiniteError",
    "Recipe",
    "RecipeCheckpoints",
    "TrainResult",
    "apply_lora",
    "same_document_ids",
    "seed_everything",
    "train",
]


class NonFiniteError(EmbedtuneError):
    """The loss or a gradient became NaN/inf; the optimizer step was not taken."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    exit_code: int
    """0 when training finished, 143/130 when stopped by SIGTERM/SIGINT (checkpoint saved)."""
    state: TrainState
    """Final step/epoch/best metric."""
    model_dir: Path | None
    """The saved final model (merged when LoRA and ``merge_on_save``), or None when stopped early."""
    adapter_dir: Path | None = None
    """The saved LoRA adapter (PEFT format), when LoRA was used."""
    stop_reason: str = ""
    """Why training ended: ``max_steps``, ``epochs``, ``time_budget``, ``early_stopping``, ``signal``."""
    losses: list[float] | None = None
    """The logged loss of every step this process ran (rank 0: the mean over ranks)."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _SilentMonitor:
    """The monitor of ranks other than 0: every method (log, message, close, ...) does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class RecipeCheckpoints:
    """The recipe's one seam for every checkpoint save and restore.

    One :class:`~embedtune.training.checkpoint.Checkpointer` for one process and for every rank under
    ``torchrun`` (one format, see ``docs/checkpoints.md``): the model's trainable weights (LoRA: the
    adapter) and optimizer through DCP, the LR scheduler, every rank's RNG, the :class:`TrainState`
    (data position, validator state) and a fingerprint of the recipe and its data, which a resume must
    match (``checkpoint.allow_config_change`` overrides; another rank count needs
    ``distributed.resume_on_other_world_size``).

    Args:
        recipe: the recipe whose parts are saved (read at each call, so replaced parts are seen).
    """

    def __init__(self, recipe: Recipe) -> None:
        cfg, parallel = recipe.cfg, recipe.parallel
        self.recipe = recipe
        self.store = Checkpointer(
            cfg.checkpoint_dir,
            keep_last=cfg.checkpoint.keep_last,
            rank=parallel.rank,
            world_size=parallel.world_size,
            strategy=parallel.strategy,
        )
        plain = config_to_dict(cfg)
        self.fingerprint = Fingerprint.of(plain, data_paths(plain))

    @property
    def root(self) -> Path:
        """The checkpoint folder."""
        return self.store.root

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return self.store.list()

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return self.store.latest()

    def best(self) -> Path | None:
        """The checkpoint marked best by validation, or None."""
        return self.store.best()

    def resolve(self, resume: str) -> Path:
        """``latest`` (the newest intact one), ``best`` or a folder → a verified checkpoint (raises
        ``CheckpointError`` naming the damaged file)."""
        path = self.store.resolve(resume)
        assert path is not None  # only resume="auto" on an empty folder gives None
        return path

    def saved_this_step(self) -> bool:
        """True when the newest checkpoint is of the current step."""
        latest = self.latest()
        return latest is not None and latest.name == f"step_{self.recipe.state.step:08d}"

    def save(self, *, is_best: bool = False) -> Path:
        """Write a checkpoint of the current step (a collective under ``torchrun``)."""
        r = self.recipe
        return self.store.save(
            r.state,
            model=r.model,
            optimizer=r.optimizer,
            scheduler=r.scheduler,
            fingerprint=self.fingerprint,
            is_best=is_best,
        )

    def restore(self, path: Path) -> TrainState:
        """Restore model, optimizer, scheduler and RNG from ``path``; returns its train state."""
        r = self.recipe
        return self.store.load(
            path,
            model=r.model,
            optimizer=r.optimizer,
            scheduler=r.scheduler,
            fingerprint=self.fingerprint,
            allow_config_change=r.cfg.checkpoint.allow_config_change,
            allow_world_change=r.cfg.distributed.resume_on_other_world_size,
        )

    def load_weights(self, path: Path) -> TrainState:
        """Load only the model weights of ``path`` (the best checkpoint at the end)."""
        return self.store.load_model(path, self.recipe.model)


class Recipe:
    """One training run: ``setup() → train() → cleanup()``.

    Args:
        cfg: a validated :class:`TrainConfig`.
        task: what to train (default: :func:`~embedtune.training.tasks.task_for` ``(cfg)``).
        parallel: how (default: joined from ``torchrun``'s environment, or the only process).
    """

    def __init__(self, cfg: TrainConfig, task: Task | None = None, parallel: Parallel | None = None) -> None:
        self.cfg = cfg
        self.task = task or task_for(cfg)
        self._parallel = parallel
        self.out = Path(cfg.output_dir)
        self.monitor: Any = None
        self.stop = StopSignals()
        self._last_validation_s = 0.0

    # ============================================================================================ setup
    def setup(self) -> None:
        """Join the job, build the model, data, optimizer, schedule and checkpoints; maybe resume."""
        cfg = self.cfg
        self.parallel = self._parallel or Parallel.from_env(cfg.distributed, device=cfg.device, bf16=cfg.bf16)
        parallel = self.parallel
        threads = cfg.num_threads or parallel.cpu_threads()
        if threads:
            torch.set_num_threads(threads)
        if parallel.device.type == "cpu":
            from embedtune._malloc import keep_freed_memory

            keep_freed_memory()  # a CPU step reallocates the same large buffers: keep them mapped
        # Seed before anything random is created (LoRA init, a new score head, dropout): reproducible.
        seed_everything(cfg.seed)
        self.model = parallel.wrap(self.task.build_model(parallel))  # wrapped before the optimizer
        self.model.train()

        sched = cfg.step_scheduler
        self.data = self.task.batches(self.model)
        self.steps_per_epoch = len(self.data) // sched.global_batch_size
        if self.steps_per_epoch < 1:
            raise EmbedtuneError(
                f"step_scheduler.global_batch_size={sched.global_batch_size} is larger than the training set "
                f"({len(self.data)} examples); lower it"
            )
        self.total_steps = sched.max_steps or self.steps_per_epoch * sched.num_epochs
        # Which rows of every global batch this rank takes, per accumulation step.
        self.plan = parallel.plan(
            sched.global_batch_size, sched.local_batch_size, gradcache=self.task.whole_batch_per_rank
        )
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, self.total_steps)
        self.state = TrainState()
        self.validator = self._build_validator()
        self.refresher = self._build_refresher()
        self.checkpoints = RecipeCheckpoints(self)
        self._resume()

        if parallel.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            log = cfg.logging
            self.monitor = TrainingMonitor(
                self.out,
                self.total_steps,
                start_step=self.state.step,
                progress_bar=log.progress_bar,
                tensorboard=log.tensorboard,
            )
        else:
            self.monitor = _SilentMonitor()
        self.stop = StopSignals(announce=self.monitor.message)
        used, asked = warmup_steps(cfg.lr_scheduler, self.total_steps)
        if used < asked:
            self.monitor.message(
                f"warning: lr_scheduler warmup is {asked} steps but the run has {self.total_steps}; "
                f"warming up over {used} steps so the peak lr {cfg.optimizer.lr:g} is reached "
                "(lower lr_scheduler.warmup_steps to silence this)"
            )
        if parallel.world_size > 1 and parallel.is_main:
            print(
                f"{parallel.describe()}: global batch {sched.global_batch_size} = {self.plan.micro_batch_size} "
                f"per rank per pass × {parallel.world_size} ranks × {self.plan.accumulation_steps} "
                f"accumulation steps; cross-rank negatives {'on' if parallel.gathers_negatives else 'off'}",
                flush=True,
            )

    def _build_validator(self) -> Any:
        if self.cfg.validation is None:
            return None
        from embedtune.eval.validator import Validator

        return Validator(self.cfg.validation)

    def _build_refresher(self) -> Any:
        """The re-mining hook of a ``mining:`` block (None without one); see ``embedtune.mining``."""
        if getattr(self.cfg, "mining", None) is None:
            return None
        if not hasattr(self.data, "dataset"):
            raise ConfigError(
                "mining: re-mining applies to bi-encoder training only; remove the mining block"
            )
        from embedtune.mining import build_refresher

        return build_refresher(self.cfg, self.cfg.output_dir)

    def _refresh_negatives(self) -> None:
        """Re-mine every training set's negatives with the current weights (between two steps).

        Under torchrun the encoding is sharded: each rank embeds an equal share of the corpus and the
        queries, the shares are gathered, and every rank searches the whole corpus (the same embeddings
        give the same negatives on each).
        """
        st = self.state
        self.monitor.message(f"step {st.step}: re-mining hard negatives with the current model ...")
        model = Parallel.unwrap(self.model)
        if self.parallel.grouped and self.parallel.world_size > 1:
            from embedtune.mining import ShardedEncoder

            model = ShardedEncoder(model, self.parallel.rank, self.parallel.world_size)
        self.data.dataset.datasets = self.refresher.refresh(model, self.data.dataset.datasets, st.step)
        self.model.train()
        st.extra["mining"] = self.refresher.state_dict()
        done = self.refresher.history[-1]
        changed = sum(d["examples_changed"] for d in done["datasets"])
        self.monitor.log(
            {"step": st.step, "mining/seconds": done["seconds"], "mining/examples_changed": changed}
        )
        self.monitor.message(
            f"step {st.step}: re-mined in {done['seconds']:.1f}s; {changed} examples got new negatives"
        )

    def _warn_diagnostics(self, diag: dict[str, float], step: int) -> None:
        from embedtune.audit.diagnostics import warnings_for

        for line in warnings_for(diag, step):
            self.monitor.message(f"warning: {line}")

    def _resume(self) -> None:
        ckpts, resume = self.checkpoints, self.cfg.checkpoint.resume
        if resume == "auto":
            resume = "latest" if ckpts.latest() is not None else None
        if not resume:
            if ckpts.list():
                # Never mix two runs' checkpoints (rotation and `latest` would interleave them).
                raise ConfigError(
                    f"checkpoint.resume: {ckpts.root} already holds checkpoints of an earlier run (latest: "
                    f"{ckpts.latest()}); continue it with checkpoint.resume=latest, or choose another "
                    "output_dir (or delete that folder) to start fresh"
                )
            return
        path = ckpts.resolve(resume)
        self.state = ckpts.restore(path)
        if self.validator is not None and "validator" in self.state.extra:
            self.validator.load_state_dict(self.state.extra["validator"])
        if self.refresher is not None and "mining" in self.state.extra:
            datasets = self.refresher.load_state_dict(self.state.extra["mining"], self.data.dataset.datasets)
            if datasets is not None:
                self.data.dataset.datasets = datasets
        if self.parallel.is_main:
            print(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch})", flush=True)

    # ============================================================================================ train
    def train(self) -> TrainResult:
        """Run the loop until the step/epoch/time budget, early stopping or a stop signal."""
        st, sched = self.state, self.cfg.step_scheduler
        reason = "max_steps" if sched.max_steps else "epochs"
        losses: list[float] = []
        # The time budget covers the loop *and* its validations, so that a job with a before/after
        # evaluation (the demo) fits its budget: the last evaluation's duration is kept in reserve.
        t_start = time.perf_counter() - st.elapsed_s
        if self.validator is not None and self.validator.should_run(0) and st.step == 0:
            self._validate()
        with self.stop:
            while st.step < self.total_steps:
                if self.refresher is not None and self.refresher.due(st.step):
                    self._refresh_negatives()
                t0 = time.perf_counter()
                # Diagnostics for step 0 (the first forward sees the initial weights) and each logged step.
                logged = (st.step + 1) % sched.log_every_steps == 0 or st.step + 1 == self.total_steps
                if hasattr(self.task, "diagnostics"):
                    from embedtune.audit.diagnostics import DiagnosticsAccumulator

                    self.task.diagnostics = DiagnosticsAccumulator() if st.step == 0 or logged else None
                loss, grad_norm = self.train_step(self.local_batches(st.epoch, st.step_in_epoch))
                acc = getattr(self.task, "diagnostics", None)
                if acc is not None and self.parallel.grouped:  # every rank's queries, not rank 0's only
                    from embedtune.audit.diagnostics import SUM_KEYS

                    acc.sums = self.parallel.sum_over_ranks(acc.sums, SUM_KEYS)
                diag = acc.means() if acc else {}
                if st.step == 0 and diag:  # the initial weights' numbers (step 1's loss is theirs too)
                    self.monitor.log({"step": 0, **diag})
                    self._warn_diagnostics(diag, 0)
                losses.append(loss)
                st.step += 1
                st.step_in_epoch += 1
                st.examples_seen += sched.global_batch_size
                if st.step_in_epoch >= self.steps_per_epoch:
                    st.epoch, st.step_in_epoch = st.epoch + 1, 0
                st.elapsed_s = time.perf_counter() - t_start
                step_s = time.perf_counter() - t0
                if st.step % sched.log_every_steps == 0 or st.step == self.total_steps:
                    self.monitor.log(
                        {
                            "step": st.step,
                            "epoch": st.epoch,
                            "loss": loss,
                            "lr": self.scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm,
                            "examples_per_s": sched.global_batch_size / step_s,
                            "step_s": round(step_s, 4),
                            "elapsed_s": round(st.elapsed_s, 3),
                            **diag,
                        }
                    )
                    if st.step > 1:  # step 1's numbers were step 0's
                        self._warn_diagnostics(diag, st.step)
                # Every rank learns about a signal any rank received, after the same step.
                signum = self.parallel.agree_signal(self.stop.received)
                # Stop *before* the budget runs out: would one more step of this length overshoot it?
                reserve = self._last_validation_s if self.validator is not None else 0.0
                out_of_time = self.parallel.agree(
                    sched.max_time_minutes is not None
                    and st.elapsed_s + step_s + reserve > 60 * sched.max_time_minutes
                )
                last = st.step == self.total_steps or out_of_time
                early = bool(
                    self.validator is not None
                    and self.validator.should_run(st.step, last_step=last)
                    and self._validate()
                )
                stop = (
                    "signal"
                    if signum
                    else "early_stopping"
                    if early
                    else "time_budget"
                    if out_of_time
                    else ""
                )
                periodic = sched.ckpt_every_steps and st.step % sched.ckpt_every_steps == 0
                if (periodic or stop) and not self.checkpoints.saved_this_step():
                    self.checkpoints.save()
                if stop:
                    reason = stop
                    break
        if reason == "signal":
            assert signum is not None
            self.monitor.message(
                f"stopped by {signal.Signals(signum).name} after step {st.step}; checkpoint saved in "
                f"{self.checkpoints.latest()} — continue with checkpoint.resume=latest"
            )
            return TrainResult(exit_code(signum), st, None, stop_reason=reason, losses=losses)
        if not self.checkpoints.saved_this_step():
            self.checkpoints.save()
        model_dir, adapter_dir = self._save_final()
        return TrainResult(0, st, model_dir, adapter_dir, stop_reason=reason, losses=losses)

    def local_batches(self, epoch: int, step_in_epoch: int) -> list[dict[str, Any]]:
        """This rank's micro-batches of global batch ``step_in_epoch`` of ``epoch``, in accumulation order."""
        start = step_in_epoch * self.cfg.step_scheduler.global_batch_size
        return [self.data.collate(epoch, [start + i for i in rows]) for rows in self.plan.all_positions()]

    def train_step(self, micro_batches: list[dict[str, Any]]) -> tuple[float, float]:
        """Forward, backward, checks and the optimizer step for one global batch.

        Returns:
            (the loss of the global batch — the mean over ranks, the global gradient norm before clipping)

        Raises:
            NonFiniteError: the loss or a gradient is not finite on any rank; nothing was stepped.
        """
        cfg, st, model, parallel = self.cfg, self.state, self.model, self.parallel
        self.optimizer.zero_grad(set_to_none=True)
        scale = 1.0 / len(micro_batches)
        total = 0.0
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Gradients are reduced across ranks once, in the backward of the last micro-batch.
            with parallel.no_sync(model) if not last else nullcontext():
                loss = self.task.forward_backward(model, mb, parallel, scale=scale)
            total += float(loss) * scale
        if parallel.agree(not math.isfinite(total)):
            raise NonFiniteError(
                f"step {st.step + 1}: the loss is {total} (not finite); the optimizer step was not taken. "
                f"Lower optimizer.lr ({cfg.optimizer.lr}), enable max_grad_norm, or check the data; the last "
                f"good checkpoint is {self.checkpoints.latest()}"
            )
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = parallel.clip(params, cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            bad = next(
                (
                    n
                    for n, p in model.named_parameters()
                    if p.grad is not None and not local_copy(p.grad).isfinite().all()
                ),
                "a parameter on another rank",
            )
            raise NonFiniteError(
                f"step {st.step + 1}: the gradient of {bad} is not finite; the optimizer step was not taken. "
                f"Lower optimizer.lr or set max_grad_norm; the last good checkpoint is {self.checkpoints.latest()}"
            )
        self.optimizer.step()
        self.scheduler.step()
        return parallel.mean(total), float(grad_norm)

    def _validate(self) -> bool:
        """Run validation (every rank: an FSDP2 forward is a collective), save the best checkpoint;
        returns True when early stopping triggers."""
        st, validator = self.state, self.validator
        metric = self.cfg.validation.metric
        self.monitor.message(f"step {st.step}: validating on {self.cfg.validation.data} ...")
        t0 = time.perf_counter()
        metrics = validator.run(self.task.inference_model(self.model, self.parallel), st.step)
        self._last_validation_s = time.perf_counter() - t0
        st.extra["validator"] = validator.state_dict()
        st.best_metric, st.best_step = validator.best_value, validator.best_step
        self.monitor.log({"step": st.step, **{f"val/{k}": v for k, v in metrics.items()}})
        self.monitor.message(
            f"step {st.step}: validation {metric} = {metrics[metric]:.4f} (best {validator.best_value:.4f} "
            f"at step {validator.best_step})"
        )
        if validator.improved and st.step > 0:
            self.checkpoints.save(is_best=True)
        return validator.should_stop

    def _save_final(self) -> tuple[Path, Path | None]:
        cfg = self.cfg
        best = self.checkpoints.best()
        best_is_current = best is not None and best.name == f"step_{self.state.step:08d}"
        if (
            self.validator is not None
            and cfg.checkpoint.load_best_at_end
            and best is not None
            and not best_is_current
        ):
            state = self.checkpoints.load_weights(best)
            self.monitor.message(
                f"final model = best checkpoint (step {state.step}, {cfg.validation.metric} "
                f"{self.state.best_metric:.4f})"
            )
        self.model.eval()
        return self.task.save_final(self.model, self.out, self.parallel)

    # ========================================================================================= cleanup
    def cleanup(self) -> None:
        """Close logs, write the loss plot, leave the process group."""
        try:
            if self.monitor is not None:
                val = self.cfg.validation
                metrics = tuple(dict.fromkeys([val.metric, "recall@10"])) if val is not None else ()
                self.monitor.close(plot=self.cfg.logging.plot, metrics=metrics)
        finally:
            parallel = getattr(self, "parallel", None)
            if parallel is not None and self._parallel is None:
                if parallel.grouped:  # a single process has no group to free (and keeps self.model)
                    self._release()
                parallel.close()

    # What holds the process group: DDP's reducer (and FSDP2's mesh) keep a reference to it, and so
    # do the optimizer, data and validator through the model.
    _HOLDS_THE_MODEL = ("model", "optimizer", "scheduler", "data", "validator", "refresher", "checkpoints")

    def _release(self) -> None:
        """Drop the wrapped model and everything built on it, so leaving the group frees it now.

        A process group that something still references outlives ``destroy_process_group``: its gloo
        threads are then joined during interpreter shutdown, where a thread that needs the GIL can
        block the exit for good (seen once as a rank that saved, printed, and never exited). The
        reference cycles left behind are collected by ``destroy_distributed`` just before it leaves.
        """
        for name in self._HOLDS_THE_MODEL:
            self.__dict__.pop(name, None)


BiEncoderRecipe = Recipe
"""The name of :class:`Recipe` before tasks existed (kept for existing callers)."""


def train(cfg: TrainConfig, *, task: Task | None = None, parallel: Parallel | None = None) -> TrainResult:
    """Run a whole recipe — any task, one process or one ``torchrun`` rank: setup, train, cleanup."""
    recipe = Recipe(cfg, task=task, parallel=parallel)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
