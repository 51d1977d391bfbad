"""Tokenisation with prefixes (``"query: "``) or instructions, and the pooling mask that goes with it.

One function serves inference (``BiEncoder.encode``), the training collator and ONNX verification, so
that the three can never disagree about which tokens are pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch
from transformers import PreTrainedTokenizerBase


def prefix_token_count(tokenizer: PreTrainedTokenizerBase, prefix: str) -> int:
    """Number of leading tokens that belong to ``prefix`` once it is prepended to a text.

    Counted as sentence-transformers counts its prompt length: the prefix tokenised on its own, with the
    tokenizer's leading special tokens (BOS/[CLS]) and without a trailing one (EOS/[SEP]). Using the same
    rule makes ``include_prompt: false`` in the saved sentence-transformers config pool the same tokens.
    """
    if not prefix:
        return 0
    cache = _PREFIX_COUNTS.setdefault(tokenizer, {})
    if prefix not in cache:
        ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
        trailing_special = bool(ids) and ids[-1] in set(tokenizer.all_special_ids)
        cache[prefix] = len(ids) - int(trailing_special)
    return cache[prefix]


# tokenizer -> {prefix: token count}; weak so that a dropped tokenizer frees its entries.
_PREFIX_COUNTS: WeakKeyDictionary[PreTrainedTokenizerBase, dict[str, int]] = WeakKeyDictionary()


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    prefixes: str | Sequence[str] = "",
    max_length: int,
    pool_prefix: bool = True,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise ``prefix + text`` for each text and build the pooling mask.

    Args:
        tokenizer: a tokenizer with a pad token; its ``padding_side`` decides left or right padding.
        texts: the texts.
        prefixes: one prefix for all texts, or one per text (per-dataset instructions).
        max_length: truncate each ``prefix + text`` to this many tokens (the prefix is never truncated
            away first: it comes first and the tail of the text is cut).
        pool_prefix: when False, prefix tokens get 0 in ``pooling_mask``: they are attended to but not
            pooled (LLM2Vec / NV-Embed style instruction exclusion).
        pad_to_multiple_of: pad the sequence length up to a multiple of this (tensor-core friendly).

    Returns:
        ``input_ids``, ``attention_mask`` and ``pooling_mask``, each a (batch, seq) LongTensor.
    """
    if isinstance(prefixes, str):
        prefix_list = [prefixes] * len(texts)
    else:
        prefix_list = list(prefixes)
        if len(prefix_list) != len(texts):
            raise ValueError(f"got {len(prefix_list)} prefixes for {len(texts)} texts; give one per text")
    full = [p + t for p, t in zip(prefix_list, texts)]
    encoded = tokenizer(
        full,
        padding=True,
        truncation=True,
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    input_ids = encoded["input_ids"]  # (b, s)
    attention_mask = encoded["attention_mask"].long()  # (b, s)
    pooling_mask = attention_mask.clone()
    if not pool_prefix and any(prefix_list):
        counts = torch.tensor([prefix_token_count(tokenizer, p) for p in prefix_list])  # (b,)
        # Rank of each real token in its text (0-based), valid for either padding side.
        rank = torch.cumsum(attention_mask, dim=1) - 1  # (b, s)
        pooling_mask = pooling_mask * (rank >= counts.unsqueeze(1)).long()
        # A text truncated to its prefix alone would pool nothing: fall back to all its tokens.
        empty = pooling_mask.sum(1) == 0
        if bool(empty.any()):
            pooling_mask[empty] = attention_mask[empty]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pooling_mask": pooling_mask}
