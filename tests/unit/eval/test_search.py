"""Blocked exact search must return exactly what a full matrix product's top-k returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedtune.errors import ConfigError
from embedtune.eval.search import exact_search, search


def full_topk_reference(q, c, k, priority, exclude=None):
    """Full score matrix, then a plain Python sort by (score desc, priority desc) per query."""
    scores = (q.double() @ c.double().T).tolist()
    out_s, out_i = [], []
    for r, row in enumerate(scores):
        cands = [(s, priority[j], j) for j, s in enumerate(row) if exclude is None or exclude[r] != j]
        cands.sort(key=lambda t: (t[0], t[1]), reverse=True)
        out_s.append([t[0] for t in cands[:k]])
        out_i.append([t[2] for t in cands[:k]])
    return out_s, out_i


@settings(max_examples=60, deadline=None)
@given(
    num_q=st.integers(1, 9),
    num_docs=st.integers(1, 40),
    k=st.integers(1, 45),
    query_block=st.integers(1, 10),
    corpus_block=st.integers(1, 50),
    seed=st.integers(0, 2**16),
    use_exclude=st.booleans(),
)
def test_blocked_equals_full_product_with_ties(
    num_q, num_docs, k, query_block, corpus_block, seed, use_exclude
):
    # Small integer embeddings: products are exact in fp32 whatever the blocking, and ties are common.
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (num_q, 4), generator=g).float()
    c = torch.randint(-2, 3, (num_docs, 4), generator=g).float()
    priority = torch.randperm(num_docs, generator=g)
    exclude = torch.randint(-1, num_docs, (num_q,), generator=g).tolist() if use_exclude else None
    s, i = exact_search(
        q, c, k, exclude=exclude, tie_priority=priority, query_block=query_block, corpus_block=corpus_block
    )
    ref_s, ref_i = full_topk_reference(q, c, k, priority.tolist(), exclude)
    assert s.shape == i.shape == (num_q, min(k, num_docs))
    for r in range(num_q):
        n = len(ref_i[r])
        assert i[r, :n].tolist() == ref_i[r]
        assert s[r, :n].tolist() == ref_s[r]
        # Slots beyond the available documents (only the excluded one is missing) are empty.
        assert i[r, n:].tolist() == [-1] * (i.shape[1] - n)
        assert torch.isneginf(s[r, n:]).all()


def test_blocked_equals_torch_topk_on_float_embeddings():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(1000, 16, generator=g), dim=-1)
    full = q @ c.T
    ref_s, ref_i = torch.topk(full, 10, dim=1)
    s, i = exact_search(q, c, 10, query_block=8, corpus_block=64)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-6)


def test_default_tie_break_prefers_earlier_rows():
    q = torch.ones(1, 2)
    c = torch.ones(5, 2)
    _, i = exact_search(q, c, 3, corpus_block=2)
    assert i.tolist() == [[0, 1, 2]]


def test_memmap_corpus_is_read_in_blocks(tmp_path):
    g = torch.Generator().manual_seed(1)
    c = torch.randn(300, 8, generator=g)
    path = tmp_path / "c.npy"
    np.save(path, c.numpy())
    mm = np.load(path, mmap_mode="r")
    q = torch.randn(5, 8, generator=g)
    s1, i1 = exact_search(q, mm, 7, corpus_block=50)
    s2, i2 = exact_search(q, c, 7, corpus_block=300)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2)


def test_empty_corpus_and_no_queries():
    s, i = exact_search(torch.randn(3, 4), torch.empty(0, 4), 10)
    assert s.shape == (3, 0) and i.shape == (3, 0)
    s, i = exact_search(torch.empty(0, 4), torch.randn(5, 4), 10)
    assert s.shape == (0, 5)


def test_bad_arguments_raise():
    with pytest.raises(ConfigError, match="k, query_block"):
        exact_search(torch.randn(1, 4), torch.randn(2, 4), 0)
    with pytest.raises(ConfigError, match="dim"):
        exact_search(torch.randn(1, 4), torch.randn(2, 5), 1)
    with pytest.raises(ConfigError, match="backend"):
        search(torch.randn(1, 4), torch.randn(2, 4), 1, backend="annoy")


def test_faiss_flat_matches_exact_search():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(500, 16, generator=g), dim=-1)
    exclude = list(range(20))  # query r must not get corpus row r
    s1, i1 = search(q, c, 10, backend="faiss", exclude=exclude)
    s2, i2 = search(q, c, 10, backend="exact", exclude=exclude)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-5)
    assert all(r not in i1[r].tolist() for r in range(20))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_search_equals_cpu_search():
    g = torch.Generator().manual_seed(3)
    # Integer embeddings: exact products on both devices, many ties.
    q = torch.randint(-2, 3, (300, 8), generator=g).float()
    c = torch.randint(-2, 3, (5000, 8), generator=g).float()
    priority = torch.randperm(5000, generator=g)
    exclude = torch.randint(-1, 5000, (300,), generator=g)
    cpu = exact_search(q, c, 50, exclude=exclude, tie_priority=priority, corpus_block=700)
    gpu = exact_search(q, c, 50, exclude=exclude, tie_priority=priority, corpus_block=700, device="cuda")
    assert gpu[0].device.type == "cpu"  # results come back on the CPU
    assert torch.equal(cpu[1], gpu[1]) and torch.equal(cpu[0], gpu[0])
    # Float embeddings from a memmap-like numpy array: same top-k indices.
    qf = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=-1)
    cf = torch.nn.functional.normalize(torch.randn(20000, 32, generator=g), dim=-1).numpy()
    s1, i1 = exact_search(qf, cf, 20)
    s2, i2 = exact_search(qf, cf, 20, device="cuda")
    # GPU and CPU sums round differently in the last bit: near-equal neighbours may swap, scores may not.
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-5)
    assert (i1 == i2).float().mean() > 0.99


def test_query_chunks_give_the_same_result(monkeypatch):
    import embedtune.eval.search as search_mod

    g = torch.Generator().manual_seed(4)
    q = torch.randint(-2, 3, (11, 4), generator=g).float()
    c = torch.randint(-2, 3, (37, 4), generator=g).float()
    exclude = torch.randint(-1, 37, (11,), generator=g)
    whole = exact_search(q, c, 6, exclude=exclude, query_block=2, corpus_block=5)
    monkeypatch.setattr(search_mod, "QUERY_CHUNK", 3)
    chunked = exact_search(q, c, 6, exclude=exclude, query_block=2, corpus_block=5)
    ref_s, ref_i = full_topk_reference(q, c, 6, (-torch.arange(37)).tolist(), exclude.tolist())
    assert chunked[1].tolist() == whole[1].tolist() == ref_i
    assert chunked[0].tolist() == ref_s
