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
    doc_ids   (N,) or (N, K) int64   K keys per passage, e.g. [hashed document ID, text fingerprint]
                                     (optional); two passages are the same document when any key matches
    positive_ids (B, P_max) int64    the document-ID keys (comparable with ``doc_ids[:, 0]``) of *every*
                                     positive of each local query, padded with -1 (optional)

False-negative masking removes from query ``i``'s candidates every passage that is the same document as
its target positive *or* as any other of its positives (its own target column stays), so a query's
second positive sitting in another query's group is never scored as a negative.
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

__all__ = [
    "PAD_KEY",
    "InfoNCELoss",
    "LossConfig",
    "build_loss",
    "false_negative_mask",
    "info_nce",
    "same_document_ids",
    "sequence_fingerprints",
]

PAD_KEY = -1
"""Padding of ``positive_ids`` rows (document keys are non-negative 63-bit hashes)."""


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


def same_document_ids(*keys: Tensor) -> Tensor:
    """Label passages so that equal labels mean "the same document" under *any* of the given keys.

    Two passages are the same document when they share a document ID or a text fingerprint; the labels
    are the connected components of that relation (the smallest member index), so masking can compare
    one label per passage. ``O(N log N)`` time and ``O(N)`` memory: each key is grouped once by sorting
    (``torch.unique``), then labels are propagated as per-group minima (``scatter_reduce``) with pointer
    jumping until nothing changes (one or two rounds on real batches).

    Args:
        keys: one or more (N,) integer tensors on one device (e.g. hashed IDs, text fingerprints).

    Returns:
        (N,) int64 component labels: ``labels[i]`` is the smallest index of a passage that is the same
        document as passage ``i``.
    """
    if not keys:
        raise ValueError("same_document_ids needs at least one key")
    n = keys[0].shape[0]
    device = keys[0].device
    if any(k.shape != (n,) for k in keys):
        raise ValueError(
            f"same_document_ids: every key must have shape ({n},), got {[tuple(k.shape) for k in keys]}"
        )
    labels = torch.arange(n, device=device)
    if n == 0:
        return labels
    # groups[j][i] = which distinct value of key j passage i has (0 .. G_j - 1).
    groups = [torch.unique(k, return_inverse=True)[1].reshape(-1) for k in keys]
    while True:
        new = labels
        for inv in groups:
            # Smallest label among the members of each group, handed back to every member.
            group_min = torch.full((n,), n, dtype=torch.long, device=device)
            group_min.scatter_reduce_(0, inv, new, reduce="amin", include_self=True)
            new = torch.minimum(new, group_min[inv])
        # Pointer jumping: a label is the index of a member of the same component with a smaller label,
        # so following it once more shortens long chains (label propagation alone takes their length).
        new = new[new]
        if torch.equal(new, labels):
            return labels
        labels = new


def _passage_keys(doc_ids: Tensor, n_total: int) -> Tensor:
    """``doc_ids`` as (N, K) keys: (N, K) stays, (N,) or (B_total, n_passages) becomes (N, 1)."""
    if doc_ids.dim() == 2 and doc_ids.shape[0] == n_total:
        return doc_ids
    if doc_ids.numel() != n_total:
        raise ValueError(
            f"doc_ids must have one key (or one row of keys) per passage: {n_total} passages, got shape "
            f"{tuple(doc_ids.shape)}"
        )
    return doc_ids.reshape(n_total, 1)


def false_negative_mask(doc_ids: Tensor, target_rows: Tensor, positive_ids: Tensor | None = None) -> Tensor:
    """Which passages must not count as negatives of each query: the same document as one of its positives.

    Passage ``c`` is masked for query ``i`` when it is the same document (:func:`same_document_ids` over
    all key columns) as the query's target passage, or as a passage whose document-ID key (column 0) is one
    of ``positive_ids[i]``. The target column itself is never masked.

    Args:
        doc_ids: (N, K) int64 keys per passage (column 0: document ID; others, e.g. a text fingerprint).
        target_rows: (B,) row of each query's target positive in the passages.
        positive_ids: (B, P_max) document-ID keys of every positive of each query, padded with
            :data:`PAD_KEY` (-1), or None (only the target's document is masked).

    Returns:
        (B, N) bool, True = remove from the query's candidates.
    """
    n = doc_ids.shape[0]
    b = target_rows.shape[0]
    labels = same_document_ids(*doc_ids.unbind(dim=1))  # (N,)
    rows = torch.arange(b, device=doc_ids.device)
    # hit[i, l] = query i must not see component l; column n is a sink for padding and unknown keys.
    hit = torch.zeros(b, n + 1, dtype=torch.bool, device=doc_ids.device)
    hit[rows, labels[target_rows]] = True
    if positive_ids is not None:
        positive_ids = positive_ids.to(doc_ids.device)
        if positive_ids.dim() != 2 or positive_ids.shape[0] != b:
            raise ValueError(
                f"positive_ids must be (queries, P_max) = ({b}, P), got shape {tuple(positive_ids.shape)}"
            )
        # Find each positive key among the passages' ID keys by binary search: O((N + B·P) log N).
        sorted_keys, order = doc_ids[:, 0].sort()
        at = torch.searchsorted(sorted_keys, positive_ids).clamp_(max=max(n - 1, 0))  # (B, P)
        found = (sorted_keys[at] == positive_ids) & (positive_ids != PAD_KEY)
        component = torch.where(found, labels[order[at]], n)  # (B, P); n = not in this batch
        hit.scatter_(1, component, True)
    mask = hit[:, labels]  # (B, N): the component of every passage, looked up per query
    mask[rows, target_rows] = False  # the target stays a candidate
    return mask


def info_nce(
    queries: Tensor,
    passages: Tensor,
    *,
    n_passages: int,
    temperature: float = 0.02,
    in_batch_negatives: bool = True,
    doc_ids: Tensor | None = None,
    positive_ids: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """InfoNCE over positive + hard negatives (+ in-batch negatives) with false-negative masking.

    For query ``i`` (global index ``g = offset + i``) with target positive ``p_g``::

        loss_i = -s(q_i, p_g) / τ + log Σ_{c in candidates(i)} exp(s(q_i, c) / τ)

    where ``s`` is the dot product (cosine for L2-normalised inputs) and the candidates are the query's
    own group (positive + hard negatives) or, with ``in_batch_negatives``, every passage. With ``doc_ids``,
    passages that are the same document as the target or as any of ``positive_ids[i]`` are removed from
    the candidates (the target itself stays); see :func:`false_negative_mask`.

    Args:
        queries: (B, d) local query embeddings.
        passages: (N, d) all passages, N = B_total * n_passages, grouped by query, positive first.
        n_passages: passages per query (1 positive + hard negatives).
        temperature: τ; logits are scores / τ, i.e. ``scale = 1 / temperature``.
        in_batch_negatives: score each query against every passage, not just its own group.
        doc_ids: (N,), (B_total, n_passages) or (N, K) int64 passage keys for false-negative masking
            (K keys per passage, column 0 the document ID), or None for no masking.
        positive_ids: (B, P_max) document-ID keys of every positive of each *local* query, padded with
            -1; used only with ``doc_ids``. None masks only the target's document.
        offset: global index of ``queries[0]`` among all queries whose passages are in ``passages``.

    Returns:
        Scalar mean loss over the local queries.
    """
    b = queries.shape[0]
    n_total = passages.shape[0]
    assert n_total % n_passages == 0, "passages must hold n_passages rows per query"
    global_q = torch.arange(offset, offset + b, device=queries.device)  # (B,)
    pos_rows = global_q * n_passages  # (B,) row of each query's positive in `passages`
    mask = None
    if doc_ids is not None:
        keys = _passage_keys(doc_ids.to(queries.device), n_total)  # (N, K)
        mask = false_negative_mask(keys, pos_rows, positive_ids)  # (B, N)

    if in_batch_negatives:
        scores = queries @ passages.T  # (B, N)
        labels = pos_rows
    else:
        # Only the query's own group: (B, n_passages, d) -> scores (B, n_passages), positive at 0.
        groups = passages.view(-1, n_passages, passages.shape[-1])[global_q]
        scores = torch.einsum("bd,bkd->bk", queries, groups)
        labels = torch.zeros(b, dtype=torch.long, device=queries.device)
        if mask is not None:
            own = pos_rows[:, None] + torch.arange(n_passages, device=queries.device)  # (B, n_passages)
            mask = mask.gather(1, own)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    # Half-precision logits lose the margin between near-identical cosines at τ = 0.02: use fp32 at least.
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    return F.cross_entropy(scores / temperature, labels)


class InfoNCELoss(nn.Module):
    """InfoNCE with hard negatives, in-batch negatives, ID masking and optional Matryoshka dimensions.

    ``forward`` takes embeddings (not models), so GradCache and cross-rank gathering can wrap it. Use it
    for any query–passage retrieval data (one target positive per query and row); hard negatives make
    it sharper, in-batch negatives make it work with none; ``positive_ids`` keeps a query's other positives out of
    its negatives when it has several.

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
        positive_ids: Tensor | None = None,
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
                positive_ids=positive_ids,
                offset=offset,
            )
        return total / float(sum(weights))


@LOSSES.register("infonce")
def _build_infonce(config: LossConfig, normalize: bool = True) -> nn.Module:
    return InfoNCELoss(config, normalize=normalize)


def build_loss(config: LossConfig, normalize: bool = True) -> nn.Module:
    """Build the loss named by ``config.name`` from the registry."""
    return LOSSES.get(config.name, "loss.name")(config, normalize=normalize)
