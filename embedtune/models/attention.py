"""Attention with dropout on the attention probabilities, computed block by block on CPUs.

PyTorch's fused CPU attention kernel has no dropout. BERT-family encoders train with dropout 0.1 on
their attention probabilities, so every layer of such a model falls back to
``scaled_dot_product_attention``'s unfused path. That path builds the (L x L) scores, probabilities,
dropout mask and dropped probabilities of the whole batch in float32, keeps three of them for the
backward pass, and draws the mask one element at a time on CPUs whose vendor MKL does not serve.

:func:`dropout_attention` computes the same function, softmax(QK^T·scale + mask) → dropout → ·V,
over blocks of (batch row, heads) small enough to stay in cache:

* the dropout mask is drawn 16 bits at a time from the default generator: a draw of 64 random bits
  decides 4 entries. An entry is dropped with probability ``round(p·65536) / 65536``, which is ``p``
  within 8e-6, and the kept ones are scaled by ``1 / (1 - that probability)``. The mask is kept as
  booleans (one byte per entry);
* the probabilities are recomputed in the backward pass from the saved log-sum-exp, so the only
  (L x L) tensor kept between forward and backward is that boolean mask;
* the scores and probabilities are computed in float32 (float64 for float64 inputs) whatever the
  inputs' precision (bf16 autocast gives bf16 Q, K, V); the output and the gradients come back in the
  inputs' precision.

:data:`IMPLEMENTATION` registers it with transformers' attention interface. Models opt in through their
config's ``_attn_implementation``; the function falls back to transformers' own ``sdpa`` wherever this
path does not apply (no dropout, evaluation, a GPU, grouped-query or causal attention, attention weights
asked for). In training it runs under ``no_grad`` too, so that GradCache's replay draws the masks its
first pass drew. transformers does not serialise the name, so saved configs keep theirs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "IMPLEMENTATION",
    "attention_forward",
    "draw_keep_mask",
    "dropout_attention",
    "realised_drop",
    "register",
    "use_blockwise_dropout_attention",
]

#: The name under which :func:`attention_forward` is registered with transformers.
IMPLEMENTATION = "embedtune_sdpa"

#: Entries of a (block of the) score matrix computed at once: 4 MiB of float32.
BLOCK_ENTRIES = 1 << 20

#: Mask entries drawn per call (a multiple of 4: every 64-bit word decides 4 entries).
DRAW_ENTRIES = 1 << 22

_LEVELS = 1 << 16


def _drop_threshold(p: float) -> tuple[int, float]:
    """The int16 threshold below which an entry is dropped, and the drop probability it realises."""
    k = round(p * _LEVELS)
    return k - (_LEVELS // 2), k / _LEVELS


def realised_drop(p: float) -> float:
    """The drop probability :func:`draw_keep_mask` realises for a requested ``p``: ``p`` within 8e-6."""
    return _drop_threshold(p)[1]


def draw_keep_mask(shape: tuple[int, ...], p: float) -> Tensor:
    """A boolean mask, True where an entry is kept, dropping each with probability ~``p`` (see module).

    Draws from the default CPU generator (``torch.manual_seed`` makes it reproducible, and GradCache's
    RNG replay repeats it), :data:`DRAW_ENTRIES` entries at a time so that the 64-bit words are never
    all held at once; the mask is the same as one draw of the whole would give.
    """
    n = 1
    for s in shape:
        n *= s
    threshold, _ = _drop_threshold(p)
    keep = torch.empty(n, dtype=torch.bool)
    for start in range(0, n, DRAW_ENTRIES):
        m = min(DRAW_ENTRIES, n - start)
        words = torch.randint(-(2**63), 2**63 - 1, ((m + 3) // 4,), dtype=torch.int64)
        torch.ge(words.view(torch.int16)[:m], threshold, out=keep[start : start + m])
    return keep.view(shape)


def _blocks(batch: int, heads: int, q_len: int, kv_len: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, h0, h1) blocks of about :data:`BLOCK_ENTRIES` score entries each."""
    per_head = q_len * kv_len
    if heads * per_head <= BLOCK_ENTRIES:
        rows = max(1, BLOCK_ENTRIES // (heads * per_head))
        return [(b, min(b + rows, batch), 0, heads) for b in range(0, batch, rows)]
    step = max(1, BLOCK_ENTRIES // per_head)
    return [(b, b + 1, h, min(h + step, heads)) for b in range(batch) for h in range(0, heads, step)]


def _mask_block(mask: Tensor | None, b0: int, b1: int, h0: int, h1: int) -> Tensor | None:
    if mask is None:
        return None
    m = mask[b0:b1] if mask.shape[0] > 1 else mask
    return m[:, h0:h1] if m.shape[1] > 1 else m


def _scores(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """Scores of pre-scaled ``q`` against ``k``, masked (bool: True = attend; else additive)."""
    s = torch.matmul(q, k.transpose(-1, -2))
    if mask is None:
        return s
    if mask.dtype == torch.bool:
        return s.masked_fill_(~mask, torch.finfo(s.dtype).min)
    return s.add_(mask.to(s.dtype))


class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float, scale: float
    ) -> Tensor:
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        with torch.autocast("cpu", enabled=False):
            qf = (q.to(work) * scale).contiguous()
            kf, vf = k.to(work).contiguous(), v.to(work).contiguous()
            batch, heads, q_len, _ = qf.shape
            kv_len = kf.shape[2]
            _, dropped = _drop_threshold(p)
            keep = draw_keep_mask((batch, heads, q_len, kv_len), p)
            out = torch.empty(batch, heads, q_len, vf.shape[-1], dtype=work)
            lse = torch.empty(batch, heads, q_len, 1, dtype=work)
            for b0, b1, h0, h1 in _blocks(batch, heads, q_len, kv_len):
                s = _scores(qf[b0:b1, h0:h1], kf[b0:b1, h0:h1], _mask_block(mask, b0, b1, h0, h1))
                lse[b0:b1, h0:h1] = torch.logsumexp(s, dim=-1, keepdim=True)
                probs = torch.softmax(s, dim=-1).mul_(keep[b0:b1, h0:h1])
                out[b0:b1, h0:h1] = torch.matmul(probs, vf[b0:b1, h0:h1])
            out.mul_(1.0 / (1.0 - dropped))
        ctx.save_for_backward(qf, kf, vf, out, lse, keep, mask)
        ctx.scale, ctx.dropped, ctx.dtypes = scale, dropped, (q.dtype, k.dtype, v.dtype)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        qf, kf, vf, out, lse, keep, mask = ctx.saved_tensors
        inv = 1.0 / (1.0 - ctx.dropped)
        with torch.autocast("cpu", enabled=False):
            do = grad_out.to(qf.dtype).contiguous()
            batch, heads, q_len, _ = qf.shape
            kv_len = kf.shape[2]
            # D_i = sum_j dP_ij P_ij = dO_i . O_i (the dropout's scale is inside O).
            delta = (do * out).sum(dim=-1, keepdim=True)
            dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
            for b0, b1, h0, h1 in _blocks(batch, heads, q_len, kv_len):
                blk = (slice(b0, b1), slice(h0, h1))
                s = _scores(qf[blk], kf[blk], _mask_block(mask, b0, b1, h0, h1))
                probs = s.sub_(lse[blk]).exp_()  # softmax, recomputed
                kept = keep[blk]
                dv[blk] = torch.matmul((probs * kept).transpose(-1, -2), do[blk])
                # dS = P ∘ (dP - D), dP = dO Vᵀ ∘ keep · inv; the inv goes on dq/dk (smaller).
                ds = torch.matmul(do[blk], vf[blk].transpose(-1, -2))
                ds.mul_(kept).sub_(delta[blk] * (1.0 - ctx.dropped)).mul_(probs)
                dq[blk] = torch.matmul(ds, kf[blk])
                dk[blk] = torch.matmul(ds.transpose(-1, -2), qf[blk])
            dv.mul_(inv)
            dq.mul_(inv * ctx.scale)
            dk.mul_(inv)  # qf is already scaled
        qt, kt, vt = ctx.dtypes
        return dq.to(qt), dk.to(kt), dv.to(vt), None, None, None


def dropout_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, p: float, scale: float
) -> Tensor:
    """softmax(Q Kᵀ · scale + mask) → dropout(p) → · V, block by block (see the module docstring).

    Args:
        query: (batch, heads, q_len, head_dim) on the CPU.
        key: (batch, heads, kv_len, head_dim).
        value: (batch, heads, kv_len, v_dim).
        mask: broadcastable to (batch, heads, q_len, kv_len): bool (True = attend) or additive; or None.
        p: dropout probability on the attention probabilities, in [0, 1).
        scale: the score scale (usually head_dim ** -0.5).

    Returns:
        (batch, heads, q_len, v_dim) in ``query``'s dtype.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return _DropoutAttention.apply(query, key, value, mask, p, scale)


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-interface signature: :func:`dropout_attention` where it applies, else sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    # Also without gradient in training (GradCache's first pass): its replay must draw the same masks.
    applies = (
        dropout > 0
        and module.training
        and query.device.type == "cpu"
        and query.shape[1] == key.shape[1]
        and not (causal and attention_mask is None and query.shape[2] > 1)
        and not kwargs.get("output_attentions")
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    )
    if not applies:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = dropout_attention(query, key, value, attention_mask, dropout, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :data:`IMPLEMENTATION` with transformers (attention and mask builders; idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def use_blockwise_dropout_attention(backbone: nn.Module) -> bool:
    """Switch a CPU-trained ``backbone`` that runs transformers' ``sdpa`` to :data:`IMPLEMENTATION`.

    Only where it changes something: the model's attention layers have dropout above 0
    (:func:`~embedtune.models.biencoder.attention_dropout_slots`). Returns whether it switched.
    """
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if any(p.device.type != "cpu" for p in base.parameters()):
        return False
    from embedtune.models.biencoder import attention_dropout_slots

    rates = [m.dropout.p if a == "dropout" else m.attention_dropout for m, a in attention_dropout_slots(base)]
    if not any(r > 0 for r in rates):
        return False
    register()
    config._attn_implementation = IMPLEMENTATION
    return True
