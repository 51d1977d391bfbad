"""``recipe: rerank``: a cross-encoder trained by the one recipe loop, on the bi-encoder's data formats.

A rerank recipe is an ordinary training recipe (:class:`~embedtune.training.config.TrainConfig`) with
``recipe: rerank``; the loop, batching, checkpoints, signals, non-finite guard and DDP are the same as
for a bi-encoder. What differs is the task (:class:`RerankTask`):

1. each query's group is its training item: its positive + ``data.n_passages - 1`` negatives (the
   file's own negatives first, filled with random corpus documents that are not positives;
   ``data.fill_negatives``);
2. every (query, passage) pair of the micro-batch is scored: logits (queries, group);
3. softmax cross-entropy with the positive at index 0 (the listwise loss of NeMo's and FlagEmbedding's
   rerankers);
4. the final model is saved in a layout that ``sentence_transformers.CrossEncoder`` loads;
5. a ``validation:`` block reranks ``validation.retriever``'s top ``rerank_top_k`` documents of each
   validation query (searched once) and scores the reordered list: the best checkpoint and early
   stopping follow the reranked ``metric``.

A ``peft:`` block trains LoRA adapters (PEFT's ``SEQ_CLS`` task: the new score head trains in full,
``all-linear`` leaves it out) and saves ``out/model`` merged, whatever ``peft.merge_on_save`` says (a
``CrossEncoder`` folder holds plain weights), plus PEFT's adapter folder in ``out/adapter``.

Keys that mean something else here: ``model.max_length`` = tokens per (query, passage) pair (default
256), ``data.n_passages`` = the group size, ``cross_encoder.template`` = the input prompt (decoders).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedtune.errors import ConfigError
from embedtune.training.config import TrainConfig
from embedtune.training.parallel import Parallel
from embedtune.training.tasks import apply_attention_dropout, apply_lora, autocast

__all__ = ["RerankBatches", "RerankTask", "listwise_loss", "merged_reranker", "train_reranker"]

DEFAULT_PAIR_LENGTH = 256


def listwise_loss(scores: Tensor) -> Tensor:
    """Softmax cross-entropy over each query's group with the positive in column 0.

    Args:
        scores: (batch, group_size) reranker logits, positive first.

    Returns:
        Scalar mean loss.
    """
    labels = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), labels)


class RerankBatches:
    """Training items (query + its group) tokenised as (query, passage) pairs for the cross-encoder.

    Args:
        cfg: the recipe (``data`` block, seed, global batch size).
        model: the (unwrapped) :class:`~embedtune.reranker.model.CrossEncoderReranker` (its tokenizer).
        data: already-read ``RetrievalData`` sets (default: read ``cfg.data.datasets``).
    """

    def __init__(self, cfg: TrainConfig, model: Any, data: Sequence[Any] | None = None) -> None:
        from embedtune.data.dataset import TrainDataset

        batch_size = cfg.step_scheduler.global_batch_size
        if data is None:
            self.dataset = TrainDataset.from_config(cfg.data, batch_size=batch_size, seed=cfg.seed)
        else:
            self.dataset = TrainDataset(list(data), cfg.data, batch_size=batch_size, seed=cfg.seed)
        self.model = model

    def __len__(self) -> int:
        return len(self.dataset)

    def items(self, epoch: int, positions: Sequence[int]) -> list[Any]:
        """The training items at ``positions`` of ``epoch``."""
        self.dataset.set_epoch(epoch)
        return [self.dataset[i] for i in positions]

    def collate(self, epoch: int, positions: Sequence[int]) -> dict[str, Any]:
        """``{"features": tokenised pairs (B·n, S), "n_passages": n}``, pairs grouped per query."""
        items = self.items(epoch, positions)
        queries = [it.query for it in items for _ in it.passages]
        passages = [p for it in items for p in it.passages]
        n = len(items[0].passages)
        return {"features": dict(self.model.tokenize(queries, passages)), "n_passages": n}


class RerankTask:
    """Listwise training of a cross-encoder reranker (``recipe: rerank``).

    Args:
        cfg: a recipe with ``recipe: rerank``.
        data: already-read ``RetrievalData`` sets to train on instead of ``cfg.data.datasets`` (e.g. a
            benchmark's freshly mined negatives).
    """

    whole_batch_per_rank = False

    def __init__(self, cfg: TrainConfig, data: Sequence[Any] | None = None) -> None:
        self.cfg = cfg
        self.data = data

    def build_model(self, parallel: Parallel) -> nn.Module:
        """The cross-encoder (backbone + a new score head, seeded by the recipe) on the device."""
        from embedtune.reranker.model import CrossEncoderReranker

        m = self.cfg.model
        reranker = CrossEncoderReranker.from_pretrained(
            m.name_or_path,
            template=self.cfg.cross_encoder.template,
            max_length=m.max_length or DEFAULT_PAIR_LENGTH,
            pooling=self.cfg.cross_encoder.pooling,
            device=parallel.device,
        )
        if self.cfg.peft is not None:
            # SEQ_CLS: the new score head trains in full beside the adapters, and gets none itself.
            reranker.backbone = apply_lora(reranker.backbone, self.cfg.peft, task_type="SEQ_CLS")
        apply_attention_dropout(
            reranker.backbone, m.attention_dropout, parallel, attn_implementation=m.attn_implementation
        )
        return reranker

    def batches(self, model: nn.Module) -> RerankBatches:
        """The training items as tokenised pairs."""
        return RerankBatches(self.cfg, Parallel.unwrap(model), self.data)

    def forward_backward(
        self, model: nn.Module, batch: dict[str, Any], parallel: Parallel, *, scale: float
    ) -> Tensor:
        """Listwise loss of one micro-batch; back-propagates ``loss × scale``."""
        feats = {k: v.to(parallel.device) for k, v in batch["features"].items()}
        with autocast(parallel.device, self.cfg.bf16):
            scores = model(**feats).view(-1, batch["n_passages"])  # (queries, group)
        loss = listwise_loss(scores)
        (loss * scale).backward()  # a non-finite loss is refused by the recipe before the optimizer step
        return loss.detach()

    def inference_model(self, model: nn.Module, parallel: Parallel) -> nn.Module:
        """The reranker validation reranks ``validation.retriever``'s top documents with: itself, or
        with LoRA a merged *copy* (merging the live model in place and back is not bit-exact)."""
        inner = Parallel.unwrap(model)
        if self.cfg.peft is None or parallel.is_sharded(model):
            return inner
        return merged_reranker(inner)

    def trainable_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Every weight (a cross-encoder trains all of them, and its head is new); with LoRA the adapters
        and the score head."""
        inner = Parallel.unwrap(model)
        if self.cfg.peft is not None:
            return {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}
        return {k: v.detach() for k, v in inner.state_dict().items()}

    def save_final(self, model: nn.Module, out: Path, parallel: Parallel) -> tuple[Path, Path | None]:
        """``out/model`` in the sentence-transformers ``CrossEncoder`` layout (written by rank 0); with
        LoRA the adapters merged into it, and PEFT's adapter folder (score head included) in ``out/adapter``."""
        inner = Parallel.unwrap(model)
        if parallel.is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # A collective: the full weights, gathered shard by shard to rank 0's CPU.
            full = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if parallel.is_main:
                weights = {
                    k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")
                }
                inner.save_pretrained(out / "model", state_dict=weights)  # type: ignore[operator]
            parallel.barrier()
            return out / "model", None
        adapter = out / "adapter" if self.cfg.peft is not None else None
        if parallel.is_main:
            if adapter is not None:
                inner.backbone.save_pretrained(str(adapter))  # type: ignore[operator]
                merged_reranker(inner).save_pretrained(out / "model")
            else:
                inner.save_pretrained(out / "model")  # type: ignore[operator]
        parallel.barrier()
        return out / "model", adapter


def merged_reranker(reranker: Any) -> Any:
    """A copy of a LoRA reranker with its adapters merged into plain layers (the original is untouched)."""
    import copy

    from embedtune.reranker.model import CrossEncoderReranker

    merged = copy.deepcopy(reranker.backbone).merge_and_unload()
    return CrossEncoderReranker(merged, reranker.tokenizer, reranker.settings)


def train_reranker(cfg: TrainConfig, *, data: Sequence[Any] | None = None) -> Any:
    """Train a reranker recipe (``recipe: rerank``) with the one loop; ``data`` overrides its files.

    Returns:
        The recipe's :class:`~embedtune.training.recipe.TrainResult`.
    """
    from embedtune.training.recipe import train

    if cfg.recipe != "rerank":
        raise ConfigError("recipe: train_reranker needs a recipe with recipe: rerank")
    return train(cfg, task=RerankTask(cfg, data=data))
