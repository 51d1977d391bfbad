"""Pooling: turn per-token hidden states into one vector per text.

All methods take the backbone's hidden states and a *pooling mask*: the attention mask with, when
instruction tokens are excluded (``pool_instruction: false``), the prefix tokens set to 0. They work
for left and right padding alike, because they locate tokens by the mask, never by position, and use
only operations that export to ONNX (cumsum, argmax, gather).

The semantics match sentence-transformers' ``Pooling`` module, so a saved model gives the same
vectors there: ``weighted_mean`` weights a token by its 1-based position among the real tokens
(SGPT), ``cls`` takes the first pooled token and ``last`` the last one.

NeMo AutoModel's names: ``avg`` is ``mean``. NeMo's ``weighted_avg`` is *not* a weighted mean: it is the
plain sum of the token vectors (``last_hidden.sum(dim=1)``), which after L2 normalisation — NeMo's
default and ours — is exactly ``mean``. So ``weighted_avg`` reads as ``mean`` (same direction; the
norm differs only when ``normalize`` is off, which the NeMo importer refuses for it), and the
position-weighted mean has one name only, ``weighted_mean``.
"""

from __future__ import annotations

import torch

from embedtune.errors import ConfigError

POOLING_METHODS: tuple[str, ...] = ("mean", "cls", "last", "weighted_mean")
_ALIASES = {
    "avg": "mean",
    "mean_tokens": "mean",
    "first": "cls",
    "cls_token": "cls",
    "last_token": "last",
    "lasttoken": "last",
    "eos": "last",
    "weighted_avg": "mean",  # NeMo's weighted_avg is an unweighted sum: mean once L2-normalised
    "weightedmean": "weighted_mean",
    "position_weighted": "weighted_mean",
}

# Our names <-> sentence-transformers' ``pooling_mode`` names.
TO_SENTENCE_TRANSFORMERS = {
    "mean": "mean",
    "cls": "cls",
    "last": "lasttoken",
    "weighted_mean": "weightedmean",
}
FROM_SENTENCE_TRANSFORMERS = {v: k for k, v in TO_SENTENCE_TRANSFORMERS.items()}


def canonical_pooling(name: str) -> str:
    """Return the canonical pooling name for ``name`` (accepting aliases such as ``avg``).

    Raises:
        ConfigError: if the name is unknown; the message lists the accepted names.
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in POOLING_METHODS:
        allowed = ", ".join(POOLING_METHODS) + " (aliases: " + ", ".join(sorted(_ALIASES)) + ")"
        raise ConfigError(f"pooling: unknown method {name!r} — use one of {allowed}")
    return key


def mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the masked token vectors. hidden (b, s, h), mask (b, s) -> (b, h)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (b, s, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def weighted_mean(hidden: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean (SGPT): token i of the text (1-based, counted from the first real token)
    gets weight i, so later tokens, which have seen more context in a decoder, count more."""
    positions = torch.cumsum(
        attention_mask, dim=1
    )  # (b, s): 1..n over real tokens, whatever the padding side
    weights = (positions * mask).to(hidden.dtype).unsqueeze(-1)  # (b, s, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def first_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first pooled token's vector ([CLS] for encoders), for either padding side."""
    seq = mask.shape[1]
    # argmax returns the first maximum: the first position where the mask is 1.
    reversed_positions = torch.arange(seq, 0, -1, device=mask.device)  # (s,): s..1
    index = (mask * reversed_positions).argmax(dim=1)  # (b,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last pooled token's vector, for either padding side (not simply position -1)."""
    seq = mask.shape[1]
    positions = torch.arange(1, seq + 1, device=mask.device)  # (s,): 1..s
    index = (mask * positions).argmax(dim=1)  # (b,): the last position where the mask is 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    method: str,
    pooling_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool token vectors into one vector per sequence.

    Args:
        hidden: (batch, seq, hidden) token vectors from the backbone.
        attention_mask: (batch, seq) 1 for real tokens, 0 for padding.
        method: a name accepted by :func:`canonical_pooling`.
        pooling_mask: (batch, seq) the tokens to pool; defaults to ``attention_mask``. Instruction
            tokens are attended to (they are in ``attention_mask``) but may be left out here.

    Returns:
        (batch, hidden) pooled vectors, in the dtype of ``hidden``.
    """
    method = canonical_pooling(method)
    mask = attention_mask if pooling_mask is None else pooling_mask
    if method == "mean":
        return mean(hidden, mask)
    if method == "weighted_mean":
        return weighted_mean(hidden, mask, attention_mask)
    if method == "cls":
        return first_token(hidden, mask)
    return last_token(hidden, mask)
