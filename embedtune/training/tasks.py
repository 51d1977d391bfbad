"""Tasks: what differs between training a bi-encoder, distilling into one, and training a reranker.

The recipe (:mod:`embedtune.training.recipe`) runs one loop for every task; a task supplies only:

=======================================  ==========================================================
``build_model(parallel)``                the model to train, on ``parallel.device``, not yet wrapped
``batches(model)``                       the training data: ``len`` examples per epoch, and
                                         ``collate(epoch, positions)`` → one micro-batch
``forward_backward(model, batch, ...)``  the loss of one micro-batch, back-propagated × ``scale``
``inference_model(model, parallel)``     the model validation encodes with (bi-encoders only)
``trainable_state(model)``               what a checkpoint stores of the model
``save_final(model, out, parallel)``     the final model folder(s)
=======================================  ==========================================================

:func:`task_for` picks the task from the recipe: ``recipe: rerank`` → the cross-encoder
(:class:`embedtune.reranker.train.RerankTask`), a ``distill:`` block → :class:`~embedtune.training.
distill.DistillTask`, else :class:`BiEncoderTask`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from embedtune.errors import ConfigError, EmbedtuneError
from embedtune.models.biencoder import freeze_unused_pooler, set_attention_dropout
from embedtune.training.config import TrainConfig
from embedtune.training.gradcache import GradCache
from embedtune.training.loss import build_loss, sequence_fingerprints
from embedtune.training.parallel import Parallel

__all__ = [
    "BiEncoderTask",
    "Task",
    "TrainingBatches",
    "TrainingData",
    "apply_attention_dropout",
    "apply_lora",
    "autocast",
    "task_for",
]


class TrainingBatches(Protocol):
    """A task's training data as micro-batches addressed by ``(epoch, positions)`` — no iterator state."""

    def __len__(self) -> int:
        """Examples per epoch."""
        ...

    def collate(self, epoch: int, positions: Sequence[int]) -> dict[str, Any]:
        """The collated examples at ``positions`` of ``epoch``'s order (tensors on the CPU)."""
        ...


class Task(Protocol):
    """What one kind of training does; see the module docstring."""

    whole_batch_per_rank: bool
    """True when each rank's share of the global batch is one loss (GradCache): no accumulation."""

    def build_model(self, parallel: Parallel) -> nn.Module: ...

    def batches(self, model: nn.Module) -> TrainingBatches: ...

    def forward_backward(
        self, model: nn.Module, batch: dict[str, Any], parallel: Parallel, *, scale: float
    ) -> Tensor: ...

    def inference_model(self, model: nn.Module, parallel: Parallel) -> nn.Module: ...

    def trainable_state(self, model: nn.Module) -> dict[str, Tensor]: ...

    def save_final(self, model: nn.Module, out: Path, parallel: Parallel) -> tuple[Path, Path | None]: ...


def task_for(cfg: TrainConfig) -> Task:
    """The task a recipe asks for: ``recipe: rerank``, a ``distill:`` block, or the bi-encoder."""
    if cfg.recipe == "rerank":
        from embedtune.reranker.train import RerankTask

        return RerankTask(cfg)
    if cfg.distill is not None:
        from embedtune.training.distill import DistillTask

        return DistillTask(cfg)
    return BiEncoderTask(cfg)


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    """bfloat16 autocast on ``device`` (compute in bf16, weights stay float32), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


# ================================================================================================ data
class TrainingData:
    """The bi-encoder training set: :class:`~embedtune.data.dataset.TrainDataset` + the collator.

    The data set is a pure function of ``(seed, epoch, index)``, so the data position of a run is just
    ``(epoch, step_in_epoch)`` and any rank can collate any rows.

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

    def items(self, epoch: int, positions: Sequence[int]) -> list[Any]:
        """The :class:`~embedtune.data.dataset.TrainItem` s at ``positions`` of ``epoch``."""
        self.dataset.set_epoch(epoch)
        return [self.dataset[i] for i in positions]

    def collate(self, epoch: int, positions: Sequence[int]) -> dict[str, Any]:
        """``{"query", "passages", "doc_ids", ...}`` for the examples at ``positions`` (the collator's layout)."""
        return self.collator(self.items(epoch, positions))

    def batch(self, epoch: int, step_in_epoch: int, batch_size: int) -> dict[str, Any]:
        """The whole collated global batch number ``step_in_epoch`` of ``epoch`` (tests, benchmarks)."""
        start = step_in_epoch * batch_size
        return self.collate(epoch, range(start, start + batch_size))


# ============================================================================================== models
def apply_attention_dropout(
    backbone: nn.Module, p: float | None, parallel: Parallel, *, attn_implementation: str | None = None
) -> None:
    """``model.attention_dropout``: set it on ``backbone``'s attention layers (None: leave the model's own).

    Rank 0 prints the change; the saved config keeps the checkpoint's value. On a CPU, a model left to
    transformers' ``sdpa`` (``attn_implementation`` None) whose attention layers keep a dropout above 0
    then trains with :mod:`embedtune.models.attention`'s blockwise dropout attention instead of PyTorch's
    unfused path; ``model.attn_implementation: sdpa`` keeps PyTorch's. On a CPU the model's
    ``nn.Dropout`` modules become :class:`~embedtune.models.dropout.CpuDropout` (the same rates).
    """
    if p is not None:
        before = set_attention_dropout(backbone, p)
        if parallel.is_main and before != p:
            was = f"{before} -> {p}" if before is not None else f"set to {p}"
            kept = f"the saved config keeps {before}" if before is not None else "the config names none"
            print(f"attention dropout {was} while training (model.attention_dropout; {kept})", flush=True)
    if parallel.device.type != "cpu":
        return
    from embedtune.models.dropout import use_cpu_dropout

    if use_cpu_dropout(backbone) and parallel.is_main:
        print("dropout: masks drawn 16 bits per entry on the CPU (embedtune.models.dropout)", flush=True)
    if attn_implementation is None:
        from embedtune.models.attention import use_blockwise_dropout_attention

        if use_blockwise_dropout_attention(backbone) and parallel.is_main:
            print(
                "attention: blockwise dropout attention on the CPU (PyTorch's fused kernel has none; "
                "model.attn_implementation: sdpa keeps PyTorch's unfused path)",
                flush=True,
            )


def apply_lora(backbone: nn.Module, cfg: Any, *, task_type: str | None = None) -> nn.Module:
    """Wrap ``backbone`` with PEFT LoRA adapters (only they are trainable).

    Args:
        backbone: the model to adapt.
        cfg: the recipe's ``peft`` block.
        task_type: PEFT's task type; ``SEQ_CLS`` (a reranker) keeps the score head (``classifier`` /
            ``score``) out of ``all-linear`` and trains it in full beside the adapters.

    Raises:
        EmbedtuneError: ``target_modules`` matches no module of the backbone.
    """
    from peft import LoraConfig, get_peft_model

    from embedtune.models.zoo import peft_wrapping

    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if cfg.match_all_linear else list(cfg.target_modules),
        bias="none",
        task_type=task_type,
    )
    try:
        with peft_wrapping():
            return get_peft_model(backbone, lora)
    except ValueError as exc:
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
        )
        raise EmbedtuneError(
            f"peft.target_modules {cfg.target_modules}: {exc}. Linear layers of this model: {', '.join(names)}"
        ) from None


# ============================================================================================ the task
class BiEncoderTask:
    """Contrastive (InfoNCE) fine-tuning of a bi-encoder: hard + in-batch + cross-rank negatives.

    One micro-batch: encode queries and passages (bf16 autocast when ``bf16``), build each passage's
    document keys (hashed ID, text fingerprint) on the device, gather passages and keys from every rank
    when cross-rank negatives are on, and take the loss of the local queries against all of them. With
    ``gradcache`` the same loss is computed over the rank's whole share, chunk by chunk.

    Args:
        cfg: the recipe.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.whole_batch_per_rank = cfg.gradcache.enabled
        self.loss_fn: nn.Module | None = None
        #: Set by the loop on the steps whose diagnostics are logged (embedtune.audit.diagnostics).
        self.diagnostics: Any = None

    # ------------------------------------------------------------------------------------ building
    def build_model(self, parallel: Parallel) -> nn.Module:
        """The encoder on ``parallel.device``, with LoRA and gradient checkpointing as asked."""
        from embedtune.models import AutoBiEncoder

        m = self.cfg.model
        enc = AutoBiEncoder.from_pretrained(m.name_or_path, **m.encoder_kwargs(), device=parallel.device)
        if self.cfg.peft is not None:
            enc.backbone = apply_lora(enc.backbone, self.cfg.peft)
            freeze_unused_pooler(enc.backbone)  # "all-linear" puts adapters on BERT's unused pooler too
        if m.gradient_checkpointing:
            enc.gradient_checkpointing_enable()
        apply_attention_dropout(
            enc.backbone, m.attention_dropout, parallel, attn_implementation=m.attn_implementation
        )
        dims = self.cfg.loss.matryoshka_dims or []
        if dims and max(dims) > enc.dim:
            raise ConfigError(f"loss.matryoshka_dims: {max(dims)} exceeds the embedding size {enc.dim}")
        self.loss_fn = build_loss(self.cfg.loss, normalize=enc.settings.normalize)
        return enc

    def batches(self, model: nn.Module) -> TrainingData:
        """The training set, tokenised the way ``model`` encodes."""
        return TrainingData(self.cfg, Parallel.unwrap(model))

    # ------------------------------------------------------------------------------------ the loss
    def passage_keys(self, batch: dict[str, Any], device: torch.device) -> Tensor | None:
        """(N, 2) int64 keys per passage on ``device``: [hashed document ID, token-sequence fingerprint].

        Two passages are the same document when either key matches (the loss's ``same_document_ids``);
        None when masking is off.
        """
        if not self.cfg.loss.mask_false_negatives:
            return None
        p = batch["passages"]
        doc_ids = batch["doc_ids"].reshape(-1).to(device)
        fp = sequence_fingerprints(p["input_ids"].to(device), p["attention_mask"].to(device))
        return torch.stack([doc_ids, fp], dim=1)

    def contrastive_loss(
        self,
        queries: Tensor,
        passages: Tensor,
        keys: Tensor | None,
        parallel: Parallel,
        *,
        n_passages: int,
        positive_ids: Tensor | None = None,
    ) -> Tensor:
        """InfoNCE of the local ``queries`` (B, d) against ``passages`` (B·n, d) of this rank or of all.

        With cross-rank negatives the passages and their keys are gathered from every rank (with
        gradient for the embeddings); the local queries' groups then start at row ``rank · B · n``.
        Documents are matched over the *gathered* keys, so two ranks holding the same document mask it
        for each other; ``positive_ids`` (B, P_max), the keys of every positive of each local query,
        keep a query's other positives out of its negatives wherever they sit.
        """
        assert self.loss_fn is not None, "build_model() first"
        offset = 0
        if parallel.gathers_negatives and self.cfg.loss.in_batch_negatives:
            passages = parallel.gather(passages, grad=True)  # (W·B·n, d)
            keys = None if keys is None else parallel.gather(keys)  # (W·B·n, 2)
            offset = parallel.rank * queries.shape[0]  # ranks hold equal shares (BatchPlan)
        if self.diagnostics is not None:  # from the embeddings the loss gets: no extra forward
            from embedtune.audit.diagnostics import contrastive_diagnostics

            self.diagnostics.add(
                contrastive_diagnostics(
                    queries,
                    passages,
                    n_passages=n_passages,
                    temperature=self.cfg.loss.temperature,
                    in_batch_negatives=self.cfg.loss.in_batch_negatives,
                    doc_ids=keys,
                    positive_ids=positive_ids,
                    offset=offset,
                )
            )
        # The loss labels documents over the (gathered) keys; positive_ids stay local (local queries').
        return self.loss_fn(
            queries, passages, n_passages=n_passages, doc_ids=keys, positive_ids=positive_ids, offset=offset
        )

    def extra_loss(
        self, queries: Tensor, passages: Tensor, batch: dict[str, Any], n_passages: int
    ) -> Tensor | None:
        """A term added to the contrastive loss from the local embeddings (distillation); None here."""
        return None

    def forward_backward(
        self, model: nn.Module, batch: dict[str, Any], parallel: Parallel, *, scale: float
    ) -> Tensor:
        """The loss of one micro-batch; back-propagates ``loss × scale``.

        Returns:
            The detached (unscaled) loss.
        """
        cfg = self.cfg
        q_in, p_in = batch["query"], batch["passages"]
        n_passages = p_in["input_ids"].shape[0] // q_in["input_ids"].shape[0]
        keys = self.passage_keys(batch, parallel.device)
        positive_ids = batch.get("positive_ids") if keys is not None else None
        if positive_ids is not None:
            positive_ids = positive_ids.to(parallel.device)

        def loss_of(q: Tensor, p: Tensor) -> Tensor:
            loss = self.contrastive_loss(
                q, p, keys, parallel, n_passages=n_passages, positive_ids=positive_ids
            )
            extra = self.extra_loss(q, p, batch, n_passages)
            return loss if extra is None else loss + extra

        encode = self._encoder(model, parallel, q_in, p_in)
        if cfg.gradcache.enabled:
            # The model's device draws the dropout masks that each chunk's replay must repeat.
            cache = GradCache(encode, cfg.gradcache.chunk_size, devices=[parallel.device])
            return cache(q_in, p_in, loss_of, scale)
        loss = loss_of(encode(q_in), encode(p_in))
        # Also when not finite: the recipe refuses the step before the optimizer sees the gradients.
        (loss * scale).backward()
        return loss.detach()

    def _encoder(
        self, model: nn.Module, parallel: Parallel, q_in: dict[str, Tensor], p_in: dict[str, Tensor]
    ) -> Callable[[dict[str, Tensor]], Tensor]:
        """``encode(inputs) -> (n, d)`` on the device, under autocast.

        GradCache replays every chunk with its own forward and backward; only the last replay reduces
        gradients across ranks (the others run under ``no_sync``), so a step all-reduces once.
        """
        device, bf16 = parallel.device, self.cfg.bf16
        c = self.cfg.gradcache.chunk_size
        replays = math.ceil(q_in["input_ids"].shape[0] / c) + math.ceil(p_in["input_ids"].shape[0] / c)
        grad_forwards = 0

        def encode(x: dict[str, Tensor]) -> Tensor:
            nonlocal grad_forwards
            sync = nullcontext()
            if self.cfg.gradcache.enabled and torch.is_grad_enabled():
                grad_forwards += 1
                if grad_forwards < replays:
                    sync = parallel.no_sync(model)
            with sync, autocast(device, bf16):
                return model(
                    x["input_ids"].to(device), x["attention_mask"].to(device), x["pooling_mask"].to(device)
                )

        return encode

    # ------------------------------------------------------------------------------------ outputs
    def inference_model(self, model: nn.Module, parallel: Parallel) -> nn.Module:
        """The model to validate with: for LoRA a merged *copy* (unmerged adapters encode ~2x slower;
        merging the live model in place and back is not bit-exact, which would break exact resume)."""
        inner = Parallel.unwrap(model)
        if self.cfg.peft is None:
            return model if parallel.is_sharded(model) else inner
        if parallel.is_sharded(model):
            # Sharded LoRA layers cannot be merged into a copy: validate unmerged (same embeddings, slower).
            return model
        from embedtune.models import BiEncoder

        merged = copy.deepcopy(inner.backbone).merge_and_unload()  # type: ignore[union-attr]
        return BiEncoder(merged, inner.tokenizer, inner.settings)  # type: ignore[arg-type]

    def trainable_state(self, model: nn.Module) -> dict[str, Tensor]:
        """LoRA: the adapter (and any modules_to_save) only — the frozen base reloads from its source."""
        inner = Parallel.unwrap(model)
        params = {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}
        buffers = {n: b.detach() for n, b in inner.named_buffers()} if self.cfg.peft is None else {}
        return params | buffers

    def save_final(self, model: nn.Module, out: Path, parallel: Parallel) -> tuple[Path, Path | None]:
        """Write ``out/model`` (merged) and, for LoRA, ``out/adapter``; returns (model dir, adapter dir)."""
        from embedtune.training.checkpoint import save_consolidated

        peft = self.cfg.peft
        inner = Parallel.unwrap(model)
        adapter_dir = None
        if peft is not None and not parallel.is_sharded(model):
            if parallel.is_main:
                inner.save_pretrained(out / "adapter", merge_lora=False)  # type: ignore[operator]
            parallel.barrier()
            adapter_dir = out / "adapter"
            if not peft.merge_on_save:
                return adapter_dir, adapter_dir
        save_consolidated(model, out / "model", parallel.ctx)
        return out / "model", adapter_dir
