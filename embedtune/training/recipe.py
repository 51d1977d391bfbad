"""The training recipe: ``setup → train → cleanup``, readable top to bottom.

``embedtune train recipe.yaml [key=value ...]`` runs :class:`BiEncoderRecipe`. One optimizer step:

1. take the next ``global_batch_size`` examples of the epoch (the data set is a pure function of
   ``(seed, epoch, index)``, so the data position is just ``(epoch, step_in_epoch)``);
2. tokenise them (query + positive + hard negatives, prefixes/instructions from the data config);
3. forward + InfoNCE + backward, either per micro-batch (gradient accumulation) or over the whole batch
   with GradCache; bf16 autocast when asked;
4. refuse non-finite loss/gradients *before* the optimizer step; clip; step; schedule;
5. log; checkpoint every N steps; validate every N steps (best checkpoint, early stopping);
6. on SIGTERM/SIGINT: finish the step, checkpoint, exit 143/130.

Resuming restores model (LoRA: adapter) weights, optimizer, scheduler, every RNG state and the data
position, so a resumed run is bitwise identical to an uninterrupted one on the same machine.
"""

from __future__ import annotations

import copy
import random
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from embedtune.config import config_to_dict
from embedtune.errors import ConfigError, EmbedtuneError
from embedtune.training.checkpoint import CheckpointManager, TrainState, capture_rng_state, restore_rng_state
from embedtune.training.config import TrainConfig
from embedtune.training.gradcache import GradCache
from embedtune.training.loss import build_loss, same_document_ids, sequence_fingerprints
from embedtune.training.monitor import TrainingMonitor
from embedtune.training.optim import build_optimizer, build_scheduler

__all__ = ["BiEncoderRecipe", "NonFiniteError", "TrainResult", "same_document_ids", "train"]

# Exit codes of a run stopped by a signal (128 + signal number, as shells report them).
EXIT_SIGTERM = 143
EXIT_SIGINT = 130


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


class TrainingData:
    """The training set as batches addressed by ``(epoch, step_in_epoch)`` — no iterator state to save.

    Args:
        cfg: the recipe (its ``data`` block, seed and global batch size).
        encoder: the model being trained (tokenizer, prefixes, pooling settings).
    """

    def __init__(self, cfg: TrainConfig, encoder: Any) -> None:
        from embedtune.data.collator import BiEncoderCollator
        from embedtune.data.dataset import TrainDataset

        self.dataset = TrainDataset.from_config(
            cfg.data, batch_size=cfg.step_scheduler.global_batch_size, seed=cfg.seed
        )
        self.collator = BiEncoderCollator.from_encoder(encoder, cfg.data)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, epoch: int, step_in_epoch: int, batch_size: int) -> dict[str, Any]:
        """The collated global batch number ``step_in_epoch`` of ``epoch``."""
        self.dataset.set_epoch(epoch)
        start = step_in_epoch * batch_size
        return self.collator([self.dataset[i] for i in range(start, start + batch_size)])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class BiEncoderRecipe:
    """Contrastive fine-tuning of a bi-encoder.

    Args:
        cfg: a validated :class:`TrainConfig`.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self._stop_signal: int | None = None
        self._last_validation_s = 0.0

    # ============================================================================================ setup
    def setup(self) -> None:
        """Load the model, apply LoRA, build data, loss, optimizer, schedule; restore a checkpoint."""
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = torch.device(
            "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        )
        # Seed before anything random is created (LoRA init, dropout), so runs are reproducible.
        seed_everything(cfg.seed)
        self.model = self._load_model()
        self.model.train()

        self.data = self._load_data()
        steps_per_epoch = len(self.data) // cfg.step_scheduler.global_batch_size
        if steps_per_epoch < 1:
            raise EmbedtuneError(
                f"step_scheduler.global_batch_size={cfg.step_scheduler.global_batch_size} is larger than the "
                f"training set ({len(self.data)} examples); lower it"
            )
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.step_scheduler.max_steps or steps_per_epoch * cfg.step_scheduler.num_epochs

        dims = cfg.loss.matryoshka_dims or []
        if dims and max(dims) > self.model.dim:
            raise ConfigError(
                f"loss.matryoshka_dims: {max(dims)} exceeds the embedding size {self.model.dim}"
            )
        self.loss_fn = build_loss(cfg.loss, normalize=self.model.settings.normalize)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, self.total_steps)
        self.ckpt = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last)
        self.state = TrainState()
        self.validator = self._build_validator()

        resume = cfg.checkpoint.resume
        if resume == "auto":
            resume = "latest" if self.ckpt.latest() is not None else None
        if resume:
            self._restore(self.ckpt.resolve(resume))
        elif self.ckpt.list():
            # Never mix two runs' checkpoints (rotation and `latest` would interleave them).
            raise ConfigError(
                f"checkpoint.resume: {self.ckpt.root} already holds checkpoints of an earlier run (latest: "
                f"{self.ckpt.latest()}); continue it with checkpoint.resume=latest, or choose another "
                "output_dir (or delete that folder) to start fresh"
            )

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        self.monitor = TrainingMonitor(
            self.out,
            self.total_steps,
            start_step=self.state.step,
            progress_bar=cfg.logging.progress_bar,
            tensorboard=cfg.logging.tensorboard,
        )

    def _load_model(self) -> nn.Module:
        from embedtune.models import AutoBiEncoder

        m = self.cfg.model
        enc = AutoBiEncoder.from_pretrained(
            m.name_or_path,
            pooling=m.pooling,
            normalize=m.normalize,
            query_prefix=m.query_prefix,
            passage_prefix=m.passage_prefix,
            pool_instruction=m.pool_instruction,
            max_length=m.max_length,
            padding_side=m.padding_side,
            dtype=m.dtype,
            attn_implementation=m.attn_implementation,
            bidirectional=m.bidirectional,
            device=self.device,
        )
        if self.cfg.peft is not None:
            enc.backbone = apply_lora(enc.backbone, self.cfg.peft)
        if m.gradient_checkpointing:
            enc.gradient_checkpointing_enable()
        return enc

    def _load_data(self) -> TrainingData:
        return TrainingData(self.cfg, self.model)

    def _build_validator(self) -> Any:
        if self.cfg.validation is None:
            return None
        from embedtune.eval.validator import Validator

        return Validator(self.cfg.validation)

    def _trainable_state(self) -> dict[str, Tensor]:
        # LoRA: only the adapter (and any modules_to_save) — the frozen base is reloaded from its source.
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad} | {
            n: b.detach() for n, b in self.model.named_buffers() if self.cfg.peft is None
        }

    def _restore(self, path: Path) -> None:
        ck = self.ckpt.load(path)
        missing = set(self._trainable_state()) - set(ck.model)
        if missing:
            raise EmbedtuneError(
                f"{path}: checkpoint does not match this recipe's model (missing {sorted(missing)[:3]}); "
                "resume with the recipe that wrote it"
            )
        self.model.load_state_dict(ck.model, strict=False)
        self.optimizer.load_state_dict(ck.optimizer)
        self.scheduler.load_state_dict(ck.scheduler)
        restore_rng_state(ck.rng)
        self.state = ck.state
        if self.validator is not None and "validator" in self.state.extra:
            self.validator.load_state_dict(self.state.extra["validator"])
        print(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch})", flush=True)

    # ============================================================================================ train
    def train(self) -> TrainResult:
        """Run the training loop until the step/epoch/time budget, early stopping or a signal."""
        cfg, st = self.cfg, self.state
        sched = cfg.step_scheduler
        reason = "max_steps" if sched.max_steps else "epochs"
        # The time budget covers the loop *and* its validations, so that a job with a before/after
        # evaluation (the demo) fits its budget: the last evaluation's duration is kept in reserve.
        t_start = time.perf_counter() - st.elapsed_s
        if self.validator is not None and self.validator.should_run(0) and st.step == 0:
            self._validate()
        with self._signals_to_flag():
            while st.step < self.total_steps:
                t0 = time.perf_counter()
                batch = self.data.batch(st.epoch, st.step_in_epoch, sched.global_batch_size)
                loss, grad_norm = self._train_step(batch)
                st.step += 1
                st.step_in_epoch += 1
                st.examples_seen += sched.global_batch_size
                if st.step_in_epoch >= self.steps_per_epoch:
                    st.epoch, st.step_in_epoch = st.epoch + 1, 0
                st.elapsed_s = time.perf_counter() - t_start
                if st.step % sched.log_every_steps == 0 or st.step == self.total_steps:
                    self.monitor.log(
                        {
                            "step": st.step,
                            "epoch": st.epoch,
                            "loss": loss,
                            "lr": self.scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm,
                            "examples_per_s": sched.global_batch_size / (time.perf_counter() - t0),
                            "step_s": round(time.perf_counter() - t0, 4),
                            "elapsed_s": round(st.elapsed_s, 3),
                        }
                    )
                # Stop *before* the budget runs out: would one more step of this length overshoot it?
                step_s = time.perf_counter() - t0
                reserve = self._last_validation_s if self.validator is not None else 0.0
                out_of_time = self._agree(
                    sched.max_time_minutes is not None
                    and st.elapsed_s + step_s + reserve > 60 * sched.max_time_minutes
                )
                last = st.step == self.total_steps or out_of_time
                early = bool(
                    self.validator is not None
                    and self.validator.should_run(st.step, last_step=last)
                    and self._validate()
                )
                stop = ""
                if self._stop_signal is not None:
                    stop = "signal"
                elif early:
                    stop = "early_stopping"
                elif out_of_time:
                    stop = "time_budget"
                periodic = sched.ckpt_every_steps and st.step % sched.ckpt_every_steps == 0
                if (periodic or stop) and not self._saved_this_step():
                    self._save_checkpoint()
                if stop:
                    reason = stop
                    break
        if reason == "signal":
            sig = self._stop_signal
            self.monitor.message(
                f"stopped by {signal.Signals(sig).name} after step {st.step}; checkpoint saved in "
                f"{self.ckpt.latest()} — continue with checkpoint.resume=latest"
            )
            return TrainResult(
                EXIT_SIGTERM if sig == signal.SIGTERM else EXIT_SIGINT, st, None, stop_reason=reason
            )
        if not self._saved_this_step():
            self._save_checkpoint()
        model_dir, adapter_dir = self._save_final()
        return TrainResult(0, st, model_dir, adapter_dir, stop_reason=reason)

    def _agree(self, flag: bool) -> bool:
        """A stop decision taken from this process's clock; the distributed recipe makes all ranks agree."""
        return flag

    def _micro_batches(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        b = batch["query"]["input_ids"].shape[0]
        n = batch["passages"]["input_ids"].shape[0] // b
        mb = b if self.cfg.gradcache.enabled else self.cfg.step_scheduler.micro_batch_size
        for i in range(0, b, mb):
            yield {
                "query": {k: v[i : i + mb] for k, v in batch["query"].items()},
                "passages": {k: v[i * n : (i + mb) * n] for k, v in batch["passages"].items()},
                "doc_ids": batch["doc_ids"][i : i + mb],
                "positive_ids": batch["positive_ids"][i : i + mb] if "positive_ids" in batch else None,
            }

    def _autocast(self) -> Any:
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _train_step(self, batch: dict[str, Any]) -> tuple[float, float]:
        """Forward, backward, checks and the optimizer step for one global batch; returns (loss, grad norm)."""
        cfg, st = self.cfg, self.state
        model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        micro = list(self._micro_batches(batch))
        scale = 1.0 / len(micro)
        total = 0.0

        def encode(x: dict[str, Tensor]) -> Tensor:
            with self._autocast():
                return model(
                    x["input_ids"].to(self.device),
                    x["attention_mask"].to(self.device),
                    x["pooling_mask"].to(self.device),
                )

        for mb in micro:
            n_passages = mb["passages"]["input_ids"].shape[0] // mb["query"]["input_ids"].shape[0]
            ids = self._negative_ids(mb)
            pos_ids = mb.get("positive_ids") if ids is not None else None

            def loss_of(
                q: Tensor,
                p: Tensor,
                n_passages: int = n_passages,
                ids: Tensor = ids,
                pos_ids: Tensor = pos_ids,
            ) -> Tensor:
                return self.loss_fn(q, p, n_passages=n_passages, doc_ids=ids, positive_ids=pos_ids, offset=0)

            if cfg.gradcache.enabled:
                # The model's device draws the dropout masks that each chunk's replay must repeat.
                loss = GradCache(encode, cfg.gradcache.chunk_size, devices=[self.device])(
                    mb["query"], mb["passages"], loss_of, scale
                )
            else:
                loss = loss_of(encode(mb["query"]), encode(mb["passages"]))
                if torch.isfinite(loss):
                    (loss * scale).backward()
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    f"step {st.step + 1}: the loss is {loss.item()} (not finite); the optimizer step was not "
                    f"taken. Lower optimizer.lr ({cfg.optimizer.lr}), enable max_grad_norm, or check the data; "
                    f"the last good checkpoint is {self.ckpt.latest()}"
                )
            total += loss.item() * scale

        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(grad_norm):
            bad = next(
                n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
            )
            raise NonFiniteError(
                f"step {st.step + 1}: the gradient of {bad} is not finite; the optimizer step was not taken. "
                f"Lower optimizer.lr or set max_grad_norm; the last good checkpoint is {self.ckpt.latest()}"
            )
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return total, float(grad_norm)

    def _negative_ids(self, mb: dict[str, Any]) -> Tensor | None:
        """(N, 2) keys for false-negative masking, [document ID, text fingerprint]: the loss counts two
        passages as the same document when either matches (``loss.same_document_ids``)."""
        if not self.cfg.loss.mask_false_negatives:
            return None
        doc_ids = mb["doc_ids"].reshape(-1)
        fp = sequence_fingerprints(mb["passages"]["input_ids"], mb["passages"]["attention_mask"])
        return torch.stack([doc_ids, fp], dim=1)

    def _validate(self) -> bool:
        """Run validation, save the best checkpoint; returns True when early stopping triggers."""
        st, validator = self.state, self.validator
        metric = self.cfg.validation.metric
        self.monitor.message(f"step {st.step}: validating on {self.cfg.validation.data} ...")
        t0 = time.perf_counter()
        metrics = validator.run(self._inference_model(), st.step)
        self._last_validation_s = time.perf_counter() - t0
        st.extra["validator"] = validator.state_dict()
        st.best_metric, st.best_step = validator.best_value, validator.best_step
        self.monitor.log({"step": st.step, **{f"val/{k}": v for k, v in metrics.items()}})
        self.monitor.message(
            f"step {st.step}: validation {metric} = {metrics[metric]:.4f} (best {validator.best_value:.4f} "
            f"at step {validator.best_step})"
        )
        if validator.improved and st.step > 0:
            self._save_checkpoint(is_best=True)
        return validator.should_stop

    def _inference_model(self) -> nn.Module:
        """The model to evaluate: for LoRA a merged *copy* (unmerged adapters encode ~2x slower; merging
        the live model in place and back is not bit-exact, which would break exact resume)."""
        if self.cfg.peft is None:
            return self.model
        from embedtune.models import BiEncoder

        merged = copy.deepcopy(self.model.backbone).merge_and_unload()
        return BiEncoder(merged, self.model.tokenizer, self.model.settings)

    def _saved_this_step(self) -> bool:
        latest = self.ckpt.latest()
        return latest is not None and latest.name == f"step_{self.state.step:08d}"

    def _save_checkpoint(self, is_best: bool = False) -> Path:
        return self.ckpt.save(
            model=self._trainable_state(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            state=self.state,
            rng=capture_rng_state(),
            is_best=is_best,
        )

    def _save_final(self) -> tuple[Path, Path | None]:
        cfg = self.cfg
        best = self.ckpt.best()
        best_is_current = best is not None and best.name == f"step_{self.state.step:08d}"
        if (
            self.validator is not None
            and cfg.checkpoint.load_best_at_end
            and best is not None
            and not best_is_current
        ):
            ck = self.ckpt.load(best)
            self.model.load_state_dict(ck.model, strict=False)
            self.monitor.message(
                f"final model = best checkpoint (step {ck.state.step}, {cfg.validation.metric} "
                f"{self.state.best_metric:.4f})"
            )
        self.model.eval()
        adapter_dir = None
        if cfg.peft is not None:
            adapter_dir = self.model.save_pretrained(self.out / "adapter", merge_lora=False)
            if not cfg.peft.merge_on_save:
                return adapter_dir, adapter_dir
        return self.model.save_pretrained(self.out / "model", merge_lora=True), adapter_dir

    @contextmanager
    def _signals_to_flag(self) -> Iterator[None]:
        """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits."""

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.monitor.message(f"received {signal.Signals(signum).name}: finishing this step, then saving")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ========================================================================================= cleanup
    def cleanup(self) -> None:
        """Close logs and write the loss plot."""
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            val = self.cfg.validation
            metrics = tuple(dict.fromkeys([val.metric, "recall@10"])) if val is not None else ()
            monitor.close(plot=self.cfg.logging.plot, metrics=metrics)


def apply_lora(backbone: nn.Module, cfg: Any) -> nn.Module:
    """Wrap ``backbone`` with PEFT LoRA adapters (only they are trainable).

    Raises:
        EmbedtuneError: ``target_modules`` matches no module of the backbone.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if cfg.match_all_linear else list(cfg.target_modules),
        bias="none",
    )
    try:
        with warnings.catch_warnings():
            # PEFT reads `model.is_gradient_checkpointing`, which transformers 5 deprecates in favour of
            # `is_activation_checkpointing`: PEFT's own call, harmless, and nothing of ours to change.
            warnings.filterwarnings(
                "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            return get_peft_model(backbone, lora)
    except ValueError as exc:
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
        )
        raise EmbedtuneError(
            f"peft.target_modules {cfg.target_modules}: {exc}. Linear layers of this model: {', '.join(names)}"
        ) from None


def train(cfg: TrainConfig) -> TrainResult:
    """Run a whole recipe: setup, train, cleanup."""
    recipe = BiEncoderRecipe(cfg)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
