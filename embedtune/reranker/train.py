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
from embedtune.training.tasks import apply_attention_dropout, autocast

__all__ = ["RerankBatches", "RerankTask", "listwise_loss", "train_reranker"]

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
        apply_attention_dropout(reranker.backbone, m.attention_dropout, parallel)
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
        """The reranker itself: validation reranks ``validation.retriever``'s top documents with it."""
        return Parallel.unwrap(model)

    def trainable_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Every weight (a cross-encoder trains all of them, and its head is new)."""
        return {k: v.detach() for k, v in Parallel.unwrap(model).state_dict().items()}

    def save_final(self, model: nn.Module, out: Path, parallel: Parallel) -> tuple[Path, Path | None]:
        """``out/model`` in the sentence-transformers ``CrossEncoder`` layout (written by rank 0)."""
        if parallel.is_sharded(model):
            raise ConfigError(
                "distributed.strategy: fsdp2 cannot save a reranker yet; train it with strategy: ddp"
            )
        if parallel.is_main:
            Parallel.unwrap(model).save_pretrained(out / "model")  # type: ignore[operator]
        parallel.barrier()
        return out / "model", None


def train_reranker(cfg: TrainConfig, *, data: Sequence[Any] | None = None) -> Any:
    """Train a reranker recipe (``recipe: rerank``) with the one loop; ``data`` overrides its files.

    Returns:
        The recipe's :class:`~embedtune.training.recipe.TrainResult`.
    """
    from embedtune.training.recipe import train

    if cfg.recipe != "rerank":
        raise ConfigError("recipe: train_reranker needs a recipe with recipe: rerank")
    return train(cfg, task=RerankTask(cfg, data=data))
