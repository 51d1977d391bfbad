"""Contrastive losses for bi-encoder training.

The one loss most retrieval recipes need is InfoNCE over each query's positive, its hard negatives and
(by default) every other passage in the batch, with false negatives masked by document ID. The loss
takes *already gathered* passage embeddings plus the global offset of the local queries, so the same
code serves one process, gradient accumulation and (later) cross-rank negatives under DDP.

Layout of the inputs (the collator's layout: positive first in each group)::

    queries   (B, d)                 local queries; global index = offset + i
    passages  (N, d), N = B_total * n_passages
              rows [g * n_passages, (g + 1) * n_passages) belong to global query g; row g * n_passages
              is its positive, the rest are its hard negatives
    doc_ids   (N,) int64             hashed document ID of every passage (optional)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedtune.config import LOSSES
from embedtune.errors import ConfigError

# The loss: block lives with the other recipe blocks (torch-free, so recipes validate fast).
from embedtune.training.config import LossConfig

__all__ = ["InfoNCELoss", "LossConfig", "build_loss", "info_nce", "sequence_fingerprints"]


def sequence_fingerprints(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Hash every row's real tokens into one int64, so identical texts get identical fingerprints.

    Used to mask false negatives by *text* when two passages have different IDs but the same content.

    Args:
        input_ids: (N, S) token IDs.
        attention_mask: (N, S), 1 for real tokens.

    Returns:
        (N,) int64 fingerprints (position-weighted polynomial hash modulo a 61-bit prime).
    """
    prime = (1 << 61) - 1
    ids = input_ids.to(torch.int64) * attention_mask.to(torch.int64)
    # Position weights so that permuted token sequences hash differently; values stay < 2**62.
    pos = torch.arange(ids.shape[1], dtype=torch.int64, device=ids.device)
    weights = (pos * 1_000_003 + 12_345) % 1_000_000_007
    h = ((ids + 1) * weights) % prime
    lengths = attention_mask.to(torch.int64).sum(dim=1)
    return (h.sum(dim=1) % prime) * 4096 + lengths % 4096


def info_nce(
    queries: Tensor,
    passages: Tensor,
    *,
    n_passages: int,
    temperature: float = 0.02,
    in_batch_negatives: bool = True,
    doc_ids: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """InfoNCE over positive + hard negatives (+ in-batch negatives) with false-negative masking.

    For query ``i`` (global index ``g = offset + i``) with positive ``p_g``::

        loss_i = -s(q_i, p_g) / τ + log Σ_{c in candidates(i)} exp(s(q_i, c) / τ)

    where ``s`` is the dot product (cosine for L2-normalised inputs) and the candidates are the query's
    own group (positive + hard negatives) or, with ``in_batch_negatives``, every passage; passages whose
    ``doc_ids`` equal the positive's are removed from the candidates (the positive itself stays).

    Args:
        queries: (B, d) local query embeddings.
        passages: (N, d) all passages, N = B_total * n_passages, grouped by query, positive first.
        n_passages: passages per query (1 positive + hard negatives).
        temperature: τ; logits are scores / τ, i.e. ``scale = 1 / temperature``.
        in_batch_negatives: score each query against every passage, not just its own group.
        doc_ids: (N,) or (B_total, n_passages) int64 passage IDs for false-negative masking, or None.
        offset: global index of ``queries[0]`` among all queries whose passages are in ``passages``.

    Returns:
        Scalar mean loss over the local queries.
    """
    b = queries.shape[0]
    n_total = passages.shape[0]
    assert n_total % n_passages == 0, "passages must hold n_passages rows per query"
    global_q = torch.arange(offset, offset + b, device=queries.device)  # (B,)
    pos_rows = global_q * n_passages  # (B,) row of each query's positive in `passages`
    if doc_ids is not None:
        doc_ids = doc_ids.reshape(-1).to(queries.device)
        assert doc_ids.shape[0] == n_total, "doc_ids must have one entry per passage"

    if in_batch_negatives:
        scores = queries @ passages.T  # (B, N)
        labels = pos_rows
        if doc_ids is not None:
            same = doc_ids[None, :] == doc_ids[pos_rows][:, None]  # (B, N): same doc as own positive
            same[torch.arange(b, device=queries.device), pos_rows] = False  # keep the positive itself
            scores = scores.masked_fill(same, float("-inf"))
    else:
        # Only the query's own group: (B, n_passages, d) -> scores (B, n_passages), positive at 0.
        groups = passages.view(-1, n_passages, passages.shape[-1])[global_q]
        scores = torch.einsum("bd,bkd->bk", queries, groups)
        labels = torch.zeros(b, dtype=torch.long, device=queries.device)
        if doc_ids is not None:
            gid = doc_ids.view(-1, n_passages)[global_q]  # (B, n_passages)
            same = gid == gid[:, :1]
            same[:, 0] = False
            scores = scores.masked_fill(same, float("-inf"))
    # Half-precision logits lose the margin between near-identical cosines at τ = 0.02: use fp32 at least.
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    return F.cross_entropy(scores / temperature, labels)


class InfoNCELoss(nn.Module):
    """InfoNCE with hard negatives, in-batch negatives, ID masking and optional Matryoshka dimensions.

    ``forward`` takes embeddings (not models), so GradCache and cross-rank gathering can wrap it. Use it
    for any query–passage retrieval data with one positive per query; hard negatives make it sharper,
    in-batch negatives make it work with none.

    Args:
        config: the ``loss:`` block.
        normalize: whether the encoder L2-normalises; truncated Matryoshka embeddings are then
            re-normalised so that each prefix is trained as a cosine embedding.
    """

    def __init__(self, config: LossConfig, normalize: bool = True) -> None:
        super().__init__()
        self.config = config
        self.normalize = normalize

    def forward(
        self,
        queries: Tensor,
        passages: Tensor,
        *,
        n_passages: int,
        doc_ids: Tensor | None = None,
        offset: int = 0,
    ) -> Tensor:
        """Compute the loss; see :func:`info_nce` for the layout of the arguments."""
        cfg = self.config
        ids = doc_ids if cfg.mask_false_negatives else None
        dims: Sequence[int | None] = cfg.matryoshka_dims or [None]
        weights = cfg.matryoshka_weights or [1.0] * len(dims)
        total = queries.new_zeros((), dtype=torch.promote_types(queries.dtype, torch.float32))
        for dim, w in zip(dims, weights):
            q, p = queries, passages
            if dim is not None:
                if dim > q.shape[-1]:
                    raise ConfigError(
                        f"loss.matryoshka_dims: {dim} is larger than the embedding size {q.shape[-1]}"
                    )
                q, p = q[..., :dim], p[..., :dim]
                if self.normalize:
                    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
            total = total + w * info_nce(
                q,
                p,
                n_passages=n_passages,
                temperature=cfg.temperature,
                in_batch_negatives=cfg.in_batch_negatives,
                doc_ids=ids,
                offset=offset,
            )
        return total / float(sum(weights))


@LOSSES.register("infonce")
def _build_infonce(config: LossConfig, normalize: bool = True) -> nn.Module:
    return InfoNCELoss(config, normalize=normalize)


def build_loss(config: LossConfig, normalize: bool = True) -> nn.Module:
    """Build the loss named by ``config.name`` from the registry."""
    return LOSSES.get(config.name, "loss.name")(config, normalize=normalize)
