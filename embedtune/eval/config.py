"""``ValidationConfig``: the ``validation:`` block of a training recipe.

```yaml
validation:
  data: ../shared/data/scifact     # BEIR folder, corpus-ID JSON or inline JSONL
  split: test
  every_n_steps: 100
  metric: ndcg@10                  # picks the best checkpoint
  k_values: [1, 10, 100]
  max_queries: 300                 # optional limits, for speed
  max_corpus: 2000
  early_stopping_patience: 5       # stop after 5 evaluations without improvement
  # recipe: rerank only: rerank this bi-encoder's top 50 per query (required there)
  # retriever: minilm
  # rerank_top_k: 50
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from embedtune.errors import ConfigError
from embedtune.eval.metrics import METRIC_NAMES

_METRIC_RE = re.compile(r"^([a-z]+)@(\d+)$")


@dataclass
class ValidationConfig:
    """Full-corpus retrieval evaluation every N training steps, best-checkpoint choice, early stopping."""

    data: str = ""
    """The held-out set: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), a corpus-ID JSON
    file or an inline JSONL file (its queries against all documents in the file). Required."""
    split: str = "test"
    """Qrels split of a BEIR folder (``qrels/<split>.tsv``); ignored for JSON/JSONL files."""
    every_n_steps: int = 500
    """Evaluate every this many optimizer steps (and after the last step)."""
    eval_at_start: bool = False
    """Also evaluate before the first step, to see the base model's score (is fine-tuning helping?)."""
    metric: str = "ndcg@10"
    """The metric that picks the best checkpoint and drives early stopping: one of ndcg, recall, mrr,
    map, precision, ``@k`` with k in ``k_values``. Higher is better."""
    k_values: tuple[int, ...] = (1, 10, 100)
    """Cut-offs to report (the metric's k must be one of them)."""
    batch_size: int = 64
    """Texts per forward pass when encoding queries and documents."""
    max_length: int | None = None
    """Tokens per text when encoding for validation; None: the model's ``max_length``. Shorter is faster
    (the demo plans it on slow machines); compare runs only at the same length."""
    bf16: bool = False
    """Encode under bfloat16 autocast (2-3x faster on CPUs with AMX and on GPUs; scores move ~1e-3)."""
    max_queries: int | None = None
    """Evaluate at most this many queries (a fixed random sample, the same at every evaluation)."""
    max_corpus: int | None = None
    """Search at most this many documents: every relevant document of the kept queries plus a fixed random
    sample of the others. Faster, but scores are higher than on the full corpus: compare runs only with
    the same limits."""
    seed: int = 0
    """Seed of the query and corpus samples."""
    early_stopping_patience: int | None = None
    """Stop training after this many evaluations in a row without improving ``metric`` by more than
    ``min_delta``; None disables early stopping."""
    min_delta: float = 0.0
    """Smallest increase of ``metric`` that counts as an improvement."""
    ignore_identical_ids: bool | None = None
    """Drop a retrieved document whose ID equals the query's ID (BEIR; needed for ArguAna, Quora). None:
    on for data sets known to need it."""
    backend: Literal["exact", "faiss"] = "exact"
    """Search back-end: exact blocked matrix products, or FAISS."""
    retriever: str | None = None
    """``recipe: rerank`` only, and required there: the bi-encoder (folder, hub id or short name) whose
    top ``rerank_top_k`` documents per query the reranker being trained reorders at every validation.
    It searches once, before the first validation; ``metric`` is then the reranked list's."""
    rerank_top_k: int = 50
    """``recipe: rerank``: documents per query that each validation reranks (the retriever's best)."""

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or not self.data.strip():
            raise ConfigError(
                "data: the validation set is required — a BEIR folder, corpus-ID JSON or JSONL path"
            )
        if not self.split:
            raise ConfigError("split: must not be empty (e.g. 'test' or 'dev')")
        if self.every_n_steps < 1:
            raise ConfigError(f"every_n_steps: must be >= 1, got {self.every_n_steps}")
        self.k_values = tuple(self.k_values)
        if not self.k_values or any(int(k) != k or k < 1 for k in self.k_values):
            raise ConfigError(f"k_values: must be positive integers, got {list(self.k_values)}")
        m = _METRIC_RE.match(self.metric)
        if not m or m.group(1) not in METRIC_NAMES:
            raise ConfigError(
                f"metric: {self.metric!r} is not '<name>@<k>' with name one of {list(METRIC_NAMES)} (e.g. 'ndcg@10')"
            )
        if int(m.group(2)) not in self.k_values:
            raise ConfigError(
                f"metric: k={m.group(2)} of {self.metric!r} is not in k_values {list(self.k_values)}; add it there"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        for name in ("max_queries", "max_corpus", "early_stopping_patience", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 or null (no limit), got {value}")
        if self.min_delta < 0:
            raise ConfigError(f"min_delta: must be >= 0, got {self.min_delta}")
        if self.rerank_top_k < 1:
            raise ConfigError(f"rerank_top_k: must be >= 1, got {self.rerank_top_k}")
        if self.retriever is not None and (not isinstance(self.retriever, str) or not self.retriever.strip()):
            raise ConfigError("retriever: a bi-encoder folder, hub id or short name (e.g. minilm), or null")
        if self.backend not in ("exact", "faiss"):
            raise ConfigError(f"backend: {self.backend!r} is not one of: exact, faiss")
