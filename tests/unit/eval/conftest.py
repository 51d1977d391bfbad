"""Shared fixtures for the evaluation tests: a fast, exact fake encoder and tiny data sets."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn


@dataclass
class FakeSettings:
    pooling: str = "mean"
    normalize: bool = False
    query_prefix: str = ""
    passage_prefix: str = ""
    max_length: int = 64


class FakeEncoder(nn.Module):
    """Bag-of-words counts hashed into ``dim`` buckets, times a weight vector.

    Embeddings are small integers, so every dot product is exact in float32 whatever the blocking:
    the blocked search can be compared bit for bit with a full matrix product. Counts encode calls.
    """

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.settings = FakeSettings()
        self.tokenizer = None
        self.dim = dim
        self.documents_encoded = 0
        self.queries_encoded = 0
        self.calls: list[dict] = []

    def _embed(self, texts) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        return out * self.weight.detach().numpy()

    def encode_documents(self, texts, **kw):
        self.documents_encoded += len(texts)
        self.calls.append({"kind": "document", "n": len(texts), **kw})
        return self._embed(list(texts))

    def encode_queries(self, texts, **kw):
        self.queries_encoded += len(texts)
        self.calls.append({"kind": "query", "n": len(texts), **kw})
        return self._embed(list(texts))


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder()


WORDS = [
    "cell",
    "protein",
    "gene",
    "virus",
    "cancer",
    "brain",
    "heart",
    "drug",
    "trial",
    "mouse",
    "blood",
    "sleep",
    "diet",
    "risk",
    "dose",
]


def make_dicts(num_docs: int = 60, num_queries: int = 12, seed: int = 0):
    """A random corpus of short texts; each query copies words of 1-3 relevant documents."""
    rng = np.random.default_rng(seed)
    corpus = {f"d{i}": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for i in range(num_docs)}
    doc_ids = list(corpus)
    queries, qrels = {}, {}
    for q in range(num_queries):
        rel = rng.choice(doc_ids, size=int(rng.integers(1, 4)), replace=False)
        words = [w for d in rel for w in corpus[d].split()[:2]]
        queries[f"q{q}"] = " ".join(words)
        qrels[f"q{q}"] = {str(d): int(rng.integers(1, 3)) for d in rel}
        qrels[f"q{q}"][doc_ids[int(rng.integers(num_docs))]] = 0  # a judged non-relevant document
    return corpus, queries, qrels


@pytest.fixture
def beir_folder(tmp_path):
    """A tiny BEIR folder (CRLF qrels with a header, as BEIR ships them)."""
    corpus, queries, qrels = make_dicts()
    root = tmp_path / "tinybeir"
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for d, text in corpus.items():
            title, _, body = text.partition(" ")
            f.write(json.dumps({"_id": d, "title": title, "text": body}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for q, text in queries.items():
            f.write(json.dumps({"_id": q, "text": text}) + "\n")
    with open(root / "qrels" / "test.tsv", "w", newline="") as f:
        f.write("query-id\tcorpus-id\tscore\r\n")
        for q, judged in qrels.items():
            for d, r in judged.items():
                f.write(f"{q}\t{d}\t{r}\r\n")
    return root, corpus, queries, qrels


@pytest.fixture
def make_eval_dicts():
    """The ``make_dicts`` factory (corpus, queries, qrels)."""
    return make_dicts
