"""Turn a list of :class:`~embedtune.data.dataset.TrainItem` into the tensors the loss consumes.

Tokenisation goes through :func:`embedtune.models.tokenization.tokenize_texts`, the same function the
encoder uses at inference, so training and inference can never disagree about prefixes, truncation or
which tokens are pooled.

The batch::

    {"query":    {input_ids, attention_mask, pooling_mask},   # (B, Sq)
     "passages": {input_ids, attention_mask, pooling_mask},   # (B * n_passages, Sp), positive first
     "doc_ids":  LongTensor (B, n_passages),                  # text hashes, for false-negative masking
     "positive_ids": LongTensor (B, P_max)}                   # keys of *all* positives, -1 padded

``positive_ids`` row ``i`` holds the keys (same hash as ``doc_ids``) of every positive of query ``i`` —
its sampled positive first, then the others — so the loss can keep them all out of its negatives. Items
that carry no ``positive_ids`` fall back to their sampled positive's key, ``doc_ids[0]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from embedtune.data.config import DataConfig
    from embedtune.data.dataset import TrainItem

__all__ = ["BiEncoderCollator", "positive_id_rows"]

PAD_KEY = -1  # = embedtune.training.loss.PAD_KEY (not imported: the data package does not import training)


def positive_id_rows(items: Sequence[TrainItem]) -> list[list[int]]:
    """Every item's positive keys, sampled positive first, without repeats, padded with -1 to one width."""
    rows = [list(dict.fromkeys((it.doc_ids[0], *it.positive_ids))) for it in items]
    width = max(len(r) for r in rows)
    return [r + [PAD_KEY] * (width - len(r)) for r in rows]


class BiEncoderCollator:
    """Tokenise queries and passages with their own lengths and instructions.

    Args:
        tokenizer: The encoder's tokenizer (pad token set; its padding side is kept).
        q_max_len: Maximum tokens per query, instruction included.
        p_max_len: Maximum tokens per passage, instruction included.
        pad_to_multiple_of: Round each batch's padded length up to a multiple of this.
        query_prefix: Prefix for queries whose dataset gives no instruction (e.g. ``"query: "``).
        passage_prefix: Prefix for passages whose dataset gives no instruction.
        pool_instruction: False leaves instruction/prefix tokens out of ``pooling_mask`` (they are
            still attended to).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        q_max_len: int = 64,
        p_max_len: int = 256,
        pad_to_multiple_of: int | None = None,
        query_prefix: str = "",
        passage_prefix: str = "",
        pool_instruction: bool = True,
    ) -> None:
        if pad_to_multiple_of:
            for name, value in (("q_max_len", q_max_len), ("p_max_len", p_max_len)):
                if value % pad_to_multiple_of:
                    from embedtune.errors import ConfigError

                    raise ConfigError(
                        f"{name}: {value} is not a multiple of pad_to_multiple_of ({pad_to_multiple_of})"
                    )
        self.tokenizer = tokenizer
        self.q_max_len = q_max_len
        self.p_max_len = p_max_len
        self.pad_to_multiple_of = pad_to_multiple_of
        self.query_prefix = query_prefix or ""
        self.passage_prefix = passage_prefix or ""
        self.pool_instruction = pool_instruction

    @classmethod
    def from_encoder(cls, encoder: Any, config: DataConfig) -> BiEncoderCollator:
        """Build a collator from a ``BiEncoder`` (tokenizer, prefixes, pooling setting) and the data config.

        ``config.pool_instruction`` wins over the encoder's ``settings.pool_instruction`` when set.
        """
        s = encoder.settings
        pool = config.pool_instruction
        if pool is None:
            pool = s.pool_instruction if getattr(s, "pool_instruction", None) is not None else True
        return cls(
            encoder.tokenizer,
            q_max_len=config.q_max_len,
            p_max_len=config.p_max_len,
            pad_to_multiple_of=config.pad_to_multiple_of,
            query_prefix=getattr(s, "query_prefix", None) or "",
            passage_prefix=getattr(s, "passage_prefix", None) or "",
            pool_instruction=bool(pool),
        )

    def __call__(self, items: Sequence[TrainItem]) -> dict[str, Any]:
        """Collate items into ``{"query", "passages", "doc_ids", "positive_ids"}`` (see the module docstring)."""
        import torch

        from embedtune.models.tokenization import tokenize_texts

        if not items:
            raise ValueError("cannot collate an empty batch")
        n = len(items[0].passages)
        if any(len(it.passages) != n for it in items):
            raise ValueError("every item of a batch must have the same number of passages")
        q_prefixes = [
            it.query_instruction if it.query_instruction is not None else self.query_prefix for it in items
        ]
        p_prefixes = [
            it.passage_instruction if it.passage_instruction is not None else self.passage_prefix
            for it in items
            for _ in range(n)
        ]
        query = tokenize_texts(
            self.tokenizer,
            [it.query for it in items],
            prefixes=q_prefixes,
            max_length=self.q_max_len,
            pool_prefix=self.pool_instruction,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        passages = tokenize_texts(
            self.tokenizer,
            [p for it in items for p in it.passages],  # (B * n,), each item's positive first
            prefixes=p_prefixes,
            max_length=self.p_max_len,
            pool_prefix=self.pool_instruction,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        doc_ids: torch.Tensor = torch.tensor([list(it.doc_ids) for it in items], dtype=torch.long)  # (B, n)
        positive_ids = torch.tensor(positive_id_rows(items), dtype=torch.long)  # (B, P_max)
        return {"query": query, "passages": passages, "doc_ids": doc_ids, "positive_ids": positive_ids}
