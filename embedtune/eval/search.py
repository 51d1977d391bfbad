"""Exact top-k search by blocked matrix products, with bounded memory; FAISS behind the same call.

``exact_search`` never builds the full (queries x corpus) score matrix: it multiplies one block of
queries by one block of corpus embeddings at a time and merges each block's candidates into a running
top-k with ``torch.topk``. Peak extra memory is about ``query_block * corpus_block`` scores plus a
running top-k of ``QUERY_CHUNK x k``, for any corpus size; the corpus may be a memory-mapped array, read
one block at a time (once per chunk of queries), and on a GPU each block is copied over once per chunk.

Ties are broken deterministically: among equal scores, the document with the larger ``tie_priority``
wins (default: the smaller corpus row). ``evaluate_retrieval`` passes the rank of each document ID, so
the top-k equals the first k of trec_eval's ordering of the full score list (score descending, then
document ID descending), and therefore equals a full matrix product's top-k exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from embedtune.errors import ConfigError

#: Queries whose running top-k is kept while the corpus streams past (bounds that state to chunk x k).
QUERY_CHUNK = 16384

#: Search back-ends understood by ``search``.
BACKENDS: tuple[str, ...] = ("exact", "faiss")


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float()
    # Copy: a memmap block is read-only, and only the rows we were given are read.
    return torch.from_numpy(np.array(x, dtype=np.float32, copy=True))


def exact_search(
    queries: torch.Tensor | np.ndarray,
    corpus: torch.Tensor | np.ndarray,
    k: int,
    *,
    exclude: Sequence[int] | torch.Tensor | None = None,
    tie_priority: torch.Tensor | None = None,
    query_block: int = 256,
    corpus_block: int = 32768,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k corpus rows by dot product for every query, computed block by block.

    Args:
        queries: (num_queries, dim) embeddings.
        corpus: (num_docs, dim) embeddings; a ``numpy.memmap`` is read one block at a time.
        k: results per query; fewer come back (padded with index -1) when the corpus is smaller.
        exclude: per query, a corpus row that must not be returned (-1 for none); BEIR's
            ``ignore_identical_ids`` passes the row whose ID equals the query's ID.
        tie_priority: (num_docs,) int64; among equal scores the larger priority ranks first.
            Default: ``-row``, i.e. the earlier row wins.
        query_block: queries per block.
        corpus_block: corpus rows per block.
        device: where to compute (default: the queries' device for tensors, else CPU).

    Returns:
        ``(scores, indices)``, both (num_queries, k'), ``k' = min(k, num_docs)``, sorted best first.
        Slots with no result (every remaining document excluded) have score ``-inf`` and index -1.

    Raises:
        ConfigError: ``k`` or a block size is not positive, or the dimensions differ.
    """
    if k < 1 or query_block < 1 or corpus_block < 1:
        raise ConfigError(
            f"k, query_block and corpus_block must be >= 1 (got {k}, {query_block}, {corpus_block})"
        )
    q_all = _as_tensor(queries)
    if device is None:
        device = q_all.device
    num_q, dim = q_all.shape
    num_docs = corpus.shape[0]
    if num_docs and corpus.shape[1] != dim:
        raise ConfigError(f"query dim {dim} != corpus dim {corpus.shape[1]}")
    k_eff = min(k, num_docs)
    out_scores = torch.full((num_q, k_eff), float("-inf"))
    out_idx = torch.full((num_q, k_eff), -1, dtype=torch.long)
    if num_q == 0 or k_eff == 0:
        return out_scores, out_idx
    if tie_priority is None:
        tie_priority = -torch.arange(num_docs, dtype=torch.long)
    tie_priority = tie_priority.to(device)
    excl = None
    if exclude is not None:
        excl = torch.as_tensor(exclude, dtype=torch.long, device=device)

    # Corpus blocks outside, query blocks inside: each corpus block is read (from a memmap, or copied to
    # the GPU) once per chunk of QUERY_CHUNK queries, not once per query block. The running top-k of the
    # chunk's queries, (chunk, k) scores and rows, is the only state kept across corpus blocks.
    for g0 in range(0, num_q, QUERY_CHUNK):
        q_chunk = q_all[g0 : g0 + QUERY_CHUNK].to(device)  # (chunk, dim)
        n_chunk = q_chunk.shape[0]
        best_s = torch.full((n_chunk, 0), float("-inf"), device=device)  # (chunk, <=k)
        best_i = torch.empty((n_chunk, 0), dtype=torch.long, device=device)
        for c0 in range(0, num_docs, corpus_block):
            c = _as_tensor(corpus[c0 : c0 + corpus_block]).to(device)  # (cb, dim)
            cb = c.shape[0]
            new_s, new_i = [], []
            for q0 in range(0, n_chunk, query_block):
                q = q_chunk[q0 : q0 + query_block]  # (qb, dim)
                qb = q.shape[0]
                s = q @ c.T  # (qb, cb)
                if excl is not None:
                    # Drop each query's excluded row if it falls in this block (no (qb, cb) mask built).
                    e = excl[g0 + q0 : g0 + q0 + qb]
                    rows = torch.nonzero((e >= c0) & (e < c0 + cb)).flatten()
                    s[rows, e[rows] - c0] = float("-inf")
                # The block's own top-k first (a view of arange, nothing materialised), then merge it with
                # the running top-k: with a total order (score, priority) top-k composes exactly.
                idx = torch.arange(c0, c0 + cb, device=device).expand(qb, -1)
                blk_s, blk_i = _topk_with_ties(s, idx, k_eff, tie_priority)
                merged = _topk_with_ties(
                    torch.cat([best_s[q0 : q0 + qb], blk_s], dim=1),
                    torch.cat([best_i[q0 : q0 + qb], blk_i], dim=1),
                    k_eff,
                    tie_priority,
                )
                new_s.append(merged[0])
                new_i.append(merged[1])
            best_s, best_i = torch.cat(new_s), torch.cat(new_i)
        best_i = best_i.masked_fill(torch.isneginf(best_s), -1)
        out_scores[g0 : g0 + n_chunk] = best_s.cpu()
        out_idx[g0 : g0 + n_chunk] = best_i.cpu()
    return out_scores, out_idx


def _topk_with_ties(
    scores: torch.Tensor, indices: torch.Tensor, k: int, priority: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of (scores, indices), ties ordered by ``priority[indices]`` descending.

    ``torch.topk`` picks an arbitrary member of a tie group at the k boundary, which would make the
    blocked result depend on block sizes. Ties that straddle the boundary are rare with real
    embeddings, so only the rows that have one are re-ranked with a full stable sort.
    """
    k = min(k, scores.shape[1])
    # One more than k: when the (k+1)-th score is strictly below the k-th, nothing left out ties with the
    # k-th score. Cheaper than comparing the whole row with it.
    kk = min(k + 1, scores.shape[1])
    top_s, pos = torch.topk(scores, kk, dim=1)  # (rows, kk), sorted descending
    if kk > k:
        boundary_tie = top_s[:, k] == top_s[:, k - 1]
        top_s, pos = top_s[:, :k].contiguous(), pos[:, :k]
    else:
        boundary_tie = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    top_i = torch.gather(indices, 1, pos)
    kth = top_s[:, -1:]  # (rows, 1)
    # Ties inside the top-k must also follow the priority.
    inner_tie = (top_s[:, 1:] == top_s[:, :-1]).any(1) if k > 1 else torch.zeros_like(boundary_tie)
    fix = boundary_tie | inner_tie
    for r in torch.nonzero(fix).flatten().tolist():
        s_row, i_row = scores[r], indices[r]
        keep = s_row >= kth[r]  # everything that could be in the top-k
        s_row, i_row = s_row[keep], i_row[keep]
        # Two stable sorts: secondary key (priority) first, then primary key (score).
        order = torch.argsort(priority[i_row], descending=True, stable=True)
        s_row, i_row = s_row[order], i_row[order]
        order = torch.argsort(s_row, descending=True, stable=True)
        top_s[r] = s_row[order][:k]
        top_i[r] = i_row[order][:k]
    return top_s, top_i


def faiss_search(
    queries: torch.Tensor | np.ndarray,
    corpus: torch.Tensor | np.ndarray,
    k: int,
    *,
    exclude: Sequence[int] | torch.Tensor | None = None,
    index_factory: str = "Flat",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by inner product with a FAISS index (``pip install faiss-cpu``).

    ``"Flat"`` is exact (ties may be ordered differently from ``exact_search``); other factory strings
    such as ``"HNSW32"`` trade accuracy for speed on large corpora. Same arguments and return value as
    ``exact_search``.

    Raises:
        ConfigError: FAISS is not installed, or ``k`` is not positive.
    """
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError(
            "search backend 'faiss' needs faiss: pip install faiss-cpu (or use 'exact')"
        ) from exc
    if k < 1:
        raise ConfigError(f"k must be >= 1 (got {k})")
    q = _as_tensor(queries).cpu().numpy()
    c = np.ascontiguousarray(np.asarray(corpus, dtype=np.float32))
    num_docs = c.shape[0]
    k_eff = min(k, num_docs)
    num_q = q.shape[0]
    out_s = torch.full((num_q, k_eff), float("-inf"))
    out_i = torch.full((num_q, k_eff), -1, dtype=torch.long)
    if num_q == 0 or k_eff == 0:
        return out_s, out_i
    index = faiss.index_factory(c.shape[1], index_factory, faiss.METRIC_INNER_PRODUCT)
    index.train(c)
    index.add(c)
    # One extra result so that dropping the excluded row still leaves k.
    extra = 1 if exclude is not None else 0
    s, i = index.search(q, min(k_eff + extra, num_docs))
    s_t, i_t = torch.from_numpy(s), torch.from_numpy(i).long()
    if exclude is not None:
        e = torch.as_tensor(exclude, dtype=torch.long).unsqueeze(1)
        drop = i_t == e
        s_t = s_t.masked_fill(drop, float("-inf"))
        order = torch.argsort(s_t, dim=1, descending=True, stable=True)
        s_t, i_t = torch.gather(s_t, 1, order), torch.gather(i_t, 1, order)
    s_t, i_t = s_t[:, :k_eff], i_t[:, :k_eff]
    i_t = i_t.masked_fill(torch.isneginf(s_t) | (i_t < 0), -1)
    out_s[:, : s_t.shape[1]] = s_t
    out_i[:, : i_t.shape[1]] = i_t
    return out_s, out_i


def search(
    queries: torch.Tensor | np.ndarray,
    corpus: torch.Tensor | np.ndarray,
    k: int,
    *,
    backend: str = "exact",
    exclude: Sequence[int] | torch.Tensor | None = None,
    tie_priority: torch.Tensor | None = None,
    query_block: int = 256,
    corpus_block: int = 32768,
    device: str | torch.device | None = None,
    faiss_index: str = "Flat",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k search with the chosen back-end (``"exact"`` blocked matmul, or ``"faiss"``).

    See ``exact_search`` for the arguments and the return value.

    Raises:
        ConfigError: unknown back-end.
    """
    if backend == "exact":
        return exact_search(
            queries,
            corpus,
            k,
            exclude=exclude,
            tie_priority=tie_priority,
            query_block=query_block,
            corpus_block=corpus_block,
            device=device,
        )
    if backend == "faiss":
        return faiss_search(queries, corpus, k, exclude=exclude, index_factory=faiss_index)
    raise ConfigError(f"unknown search backend {backend!r}; choose from {list(BACKENDS)}")
