"""Tokenisation with prefixes (``"query: "``) or instructions, and the pooling mask that goes with it.

One function serves inference (``BiEncoder.encode``), the training collator and ONNX verification, so
that the three can never disagree about which tokens are pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch
from transformers import PreTrainedTokenizerBase


def prefix_token_ids(tokenizer: PreTrainedTokenizerBase, prefix: str) -> list[int]:
    """Token ids of ``prefix`` on its own: with the tokenizer's leading special tokens (BOS/[CLS]) and
    without a trailing one (EOS/[SEP]), i.e. what starts every ``prefix + text`` sequence."""
    if not prefix:
        return []
    cache = _PREFIX_IDS.setdefault(tokenizer, {})
    if prefix not in cache:
        ids = list(tokenizer(prefix, add_special_tokens=True)["input_ids"])
        if ids and ids[-1] in set(tokenizer.all_special_ids):
            ids = ids[:-1]
        cache[prefix] = ids
    return cache[prefix]


def prefix_token_count(tokenizer: PreTrainedTokenizerBase, prefix: str) -> int:
    """Number of tokens of ``prefix`` tokenised on its own (sentence-transformers' prompt length)."""
    return len(prefix_token_ids(tokenizer, prefix))


# tokenizer -> {prefix: token ids}; weak so that a dropped tokenizer frees its entries.
_PREFIX_IDS: WeakKeyDictionary[PreTrainedTokenizerBase, dict[str, list[int]]] = WeakKeyDictionary()


def _shared_prefix_length(row: list[int], prefix_ids: list[int]) -> int:
    n = 0
    for a, b in zip(row, prefix_ids):
        if a != b:
            break
        n += 1
    return n


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, name: str = "the model") -> None:
    """Give a tokenizer without a pad token its eos (or unk) token as pad, as decoders need for batching.

    Some tokenizers (GGUF conversions at older transformers, many decoder checkpoints) ship none; padding
    is then impossible. Pooling masks padding out, so which token pads does not change an embedding.

    Raises:
        ModelLoadError: the tokenizer has no pad, eos or unk token to pad with.
    """
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        from embedtune.errors import ModelLoadError

        raise ModelLoadError(f"{name}: the tokenizer has no pad, eos or unk token — set tokenizer.pad_token")
    tokenizer.pad_token = fallback


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

    The prefix tokens left out are those of the prefix tokenised on its own that also start the joint
    sequence. That equals sentence-transformers' prompt length except where a BPE tokenizer merges the
    prefix's last character into the text's first token; there we keep (pool) the merged token.

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
        # Rank of each real token in its text (0-based), valid for either padding side.
        rank = torch.cumsum(attention_mask, dim=1) - 1  # (b, s)
        counts = []
        for row, prefix in enumerate(prefix_list):
            ids = prefix_token_ids(tokenizer, prefix)
            real = input_ids[row][attention_mask[row].bool()][: len(ids)].tolist()
            # Only the tokens the prefix really produced: with BPE the prefix's trailing space often
            # merges into the text's first word (" a"), a token that carries text and must be pooled.
            counts.append(_shared_prefix_length(real, ids))
        pooling_mask = pooling_mask * (rank >= torch.tensor(counts).unsqueeze(1)).long()
        # A text truncated to its prefix alone would pool nothing: fall back to all its tokens.
        empty = pooling_mask.sum(1) == 0
        if bool(empty.any()):
            pooling_mask[empty] = attention_mask[empty]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pooling_mask": pooling_mask}
