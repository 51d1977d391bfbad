"""The int8 NDCG check: progress lines, a time budget, and both encoders scored on the same documents."""

from __future__ import annotations

import numpy as np
import pytest

from embedtune.export.verify import SmallEvalSet, compare_ndcg, retrieval_ndcg


class WordEncoder:
    """Bag of words hashed into 32 buckets, plus optional noise (a stand-in for a quantised model)."""

    def __init__(self, noise: float = 0.0, seed: int = 0):
        self.noise, self.rng, self.calls = noise, np.random.default_rng(seed), 0

    def _embed(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), 32), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, hash(w) % 32] += 1
        return out + self.noise * self.rng.standard_normal(out.shape).astype(np.float32)

    def encode_queries(self, texts, **kw):
        return self._embed(texts)

    def encode_documents(self, texts, **kw):
        return self._embed(texts)


def _slice(n_docs=200):
    words = ["cat", "ship", "rain", "jazz", "bread", "stone", "river", "cloud"]
    texts = [f"{words[i % 8]} {words[(i * 3) % 8]} doc{i}" for i in range(n_docs)]
    ids = [f"d{i}" for i in range(n_docs)]
    queries = {f"q{j}": f"{words[j]} {words[(j * 3) % 8]}" for j in range(8)}
    qrels = {f"q{j}": {f"d{j}": 1, f"d{j + 8}": 1} for j in range(8)}
    return SmallEvalSet("toy", queries, qrels, ids, texts)


def test_without_a_budget_it_equals_two_separate_ndcg_runs():
    es = _slice()
    ref, cand = WordEncoder(), WordEncoder(noise=0.3)
    cmp = compare_ndcg(ref, cand, es, budget_s=None)
    assert cmp.complete and cmp.documents == 200 and cmp.queries == 8
    assert cmp.reference == pytest.approx(retrieval_ndcg(WordEncoder(), es))
    assert cmp.delta == pytest.approx(cmp.candidate - cmp.reference)


def test_the_budget_stops_both_encoders_at_the_same_documents_and_says_so():
    es = _slice(500)
    ticks = iter(range(0, 10_000, 7))  # every clock reading is 7 s later: 32 documents per 7 s
    lines: list[str] = []
    ref, cand = WordEncoder(), WordEncoder(noise=0.3)
    cmp = compare_ndcg(ref, cand, es, budget_s=30, log=lines.append, clock=lambda: float(next(ticks)))
    assert not cmp.complete and 0 < cmp.documents < 500 and cmp.documents % 32 == 0
    assert ref.calls == cand.calls  # the same chunks went through both
    assert any("stopped at the 30 s budget" in line for line in lines)
    assert any(f"{cmp.documents}/500 documents" in line for line in lines)
    # The score is the NDCG on the covered documents, relevant ones first (the slice's order).
    sub = SmallEvalSet(
        "toy", es.queries, es.qrels, es.doc_ids[: cmp.documents], es.doc_texts[: cmp.documents]
    )
    assert cmp.reference == pytest.approx(retrieval_ndcg(WordEncoder(), sub))
