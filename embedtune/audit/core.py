"""The audit: train/eval leakage and false-negative risk in the negatives of a training set.

What is checked (every document and query is compared by *text*, not by ID, because a training corpus
and an evaluation corpus rarely share an ID space):

Leakage between training data and an evaluation set
    * evaluation queries whose text equals a training query (normalised, :func:`~embedtune.audit.text.text_key`)
      or is a near-duplicate of one (Jaccard of shingles >= ``near_threshold``, MinHash/LSH);
    * the documents the training sees (every positive and negative of every example) that are in the
      evaluation corpus (exact), and the evaluation-*relevant* documents that training sees (exact or
      near-duplicate), in particular those that are training *positives*: a model trained on them was
      shown the answers to the test. Near-duplicates are searched among the evaluation-relevant
      documents only (the ones that can change a score).

False-negative risk in the negatives (per example)
    * ``same_as_positive``: a negative whose text equals one of the example's positives;
    * ``near_duplicate_of_positive``: Jaccard >= ``near_threshold`` with one of its positives;
    * ``positive_of_similar_query``: a negative that is (the same text as, or a near-duplicate of) a
      positive of another example whose query is identical or a near-duplicate;
    * ``scores_above_positive_share`` (with a model): the negative scores above the mining margin's
      threshold (``perc`` 0.95: more than 95 % of the positive's score), NV-Retriever's false-negative
      filter, so the audit flags what ``embedtune mine`` would have removed;
    * the positive/negative score gap (lowest positive score - highest negative score, with a model) and
      the share of examples whose negatives are *too easy*: at the training temperature their softmax
      weight is below 1 % of the positive's (``gap > temperature * ln(100)``), so they teach nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from embedtune.audit.text import NearDuplicateIndex, jaccard, key_and_shingles, shingles, text_key
from embedtune.errors import ConfigError

#: Reasons a negative can be flagged, in the order they are checked.
REASONS: tuple[str, ...] = (
    "same_as_positive",
    "near_duplicate_of_positive",
    "positive_of_similar_query",
    "scores_above_positive_share",
)


@dataclass
class AuditSettings:
    """What the audit checks and how strictly.

    Attributes:
        near_duplicates: run the MinHash/LSH near-duplicate checks (needs ``datasketch``).
        near_threshold: Jaccard similarity of shingle sets from which two texts are near-duplicates.
        margin: the score-based false-negative rule: flag a negative scoring above this share of the
            example's lowest positive score (mining's ``perc`` margin; None disables the rule).
        temperature: the training temperature for the "too easy" share.
        max_examples: how many example pairs of each kind the JSON report lists (counts are complete).
    """

    near_duplicates: bool = True
    near_threshold: float = 0.7
    margin: float | None = 0.95
    temperature: float = 0.05
    max_examples: int = 50

    def __post_init__(self) -> None:
        if not 0 < self.near_threshold <= 1:
            raise ConfigError(f"near_threshold: must be in (0, 1], got {self.near_threshold}")
        if self.margin is not None and not 0 < self.margin <= 1:
            raise ConfigError(f"margin: a share in (0, 1] such as 0.95, got {self.margin}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")


@dataclass
class NegativeFlag:
    """One negative of one example that may be a positive."""

    row: int
    doc_id: str
    reasons: list[str]
    jaccard: float | None = None
    score: float | None = None
    similar_query: str | None = None


@dataclass
class QueryAudit:
    """Everything the audit found about one training example (one line of the per-query file)."""

    index: int
    query_id: str
    query: str
    num_negatives: int
    flags: list[NegativeFlag] = field(default_factory=list)
    eval_query_exact: list[str] = field(default_factory=list)
    eval_query_near: list[tuple[str, float]] = field(default_factory=list)
    positives_eval_relevant: list[str] = field(default_factory=list)
    positive_score: float | None = None
    hardest_negative_score: float | None = None

    @property
    def gap(self) -> float | None:
        if self.positive_score is None or self.hardest_negative_score is None:
            return None
        return self.positive_score - self.hardest_negative_score

    @property
    def leaks(self) -> bool:
        """The example's query or one of its positives is in the evaluation set."""
        return bool(self.eval_query_exact or self.eval_query_near or self.positives_eval_relevant)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gap"] = self.gap
        d["eval_query_near"] = [{"query_id": q, "jaccard": round(s, 4)} for q, s in self.eval_query_near]
        return d


@dataclass
class AuditReport:
    """The audit's findings: ``summary`` (counts and shares, JSON-ready) and one entry per example."""

    summary: dict[str, Any]
    queries: list[QueryAudit]
    settings: AuditSettings

    def flagged_rows(self, reasons: Sequence[str] = REASONS) -> dict[int, set[int]]:
        """Example index -> corpus rows of its negatives flagged for any of ``reasons``."""
        out: dict[int, set[int]] = {}
        for q in self.queries:
            rows = {f.row for f in q.flags if set(f.reasons) & set(reasons)}
            if rows:
                out[q.index] = rows
        return out


def _doc_sets(texts: Sequence[str]) -> tuple[list[int], list[frozenset[str]]]:
    pairs = [key_and_shingles(t) for t in texts]
    return [k for k, _ in pairs], [s for _, s in pairs]


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    qs = np.percentile(arr, [5, 25, 50, 75, 95])
    return {
        "count": len(arr),
        "mean": float(arr.mean()),
        **{f"p{p}": float(v) for p, v in zip((5, 25, 50, 75, 95), qs)},
    }


def audit_training_data(
    data: Any,
    eval_set: Any = None,
    *,
    settings: AuditSettings | None = None,
    score: Callable[[list[str], list[str]], tuple[np.ndarray, np.ndarray]] | None = None,
    pair_score: Callable[[list[str], list[str]], np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    """Audit a training set (and optionally its overlap with an evaluation set).

    Args:
        data: ``embedtune.data.formats.RetrievalData`` (``read_training_file``; any layout).
        eval_set: ``embedtune.eval.datasets.EvalSet`` or None.
        settings: thresholds.
        score: optional ``f(queries, documents) -> (query_emb, doc_emb)`` embedding the training queries
            and the referenced documents (a model's ``encode_queries``/``encode_documents``); enables
            the score-based rule and the gap distribution.
        pair_score: optional ``f(queries, documents) -> scores``, one score per (query, document) pair
            (a cross-encoder's ``predict``: raw logits, as mining's ``--reranker`` uses them); replaces
            ``score`` for the score-based rule and the gap. Give one of the two.
        progress: called with a short line before each phase.

    Returns:
        The :class:`AuditReport`.
    """
    st = settings or AuditSettings()
    say = progress or (lambda _msg: None)
    n = len(data)
    corpus = data.corpus
    ids = corpus.ids

    # --- the documents training sees: every referenced row, read once.
    rows = np.unique(np.concatenate([data.pos_rows, data.neg_rows]).astype(np.int64))
    say(f"reading {len(rows)} referenced documents of {n} examples")
    texts = corpus.texts(rows)
    pos_of = {int(r): i for i, r in enumerate(rows)}  # corpus row -> position in `rows`
    keys, sets = _doc_sets(texts)
    q_keys = [text_key(q) for q in data.queries]
    q_sets = [shingles(q) for q in data.queries]

    audits = [
        QueryAudit(
            index=i,
            query_id=data.query_ids[i],
            query=data.queries[i],
            num_negatives=int(data.neg_offsets[i + 1] - data.neg_offsets[i]),
        )
        for i in range(n)
    ]
    flags: dict[tuple[int, int], NegativeFlag] = {}

    def flag(i: int, row: int, reason: str, **extra: Any) -> None:
        f = flags.get((i, row))
        if f is None:
            f = flags[(i, row)] = NegativeFlag(row=row, doc_id=str(ids[row]), reasons=[])
            audits[i].flags.append(f)
        if reason not in f.reasons:
            f.reasons.append(reason)
        for k, v in extra.items():
            if v is not None and getattr(f, k) is None:
                setattr(f, k, v)

    # --- rules 1 and 2: a negative equal to / near-duplicating one of the example's own positives.
    say("comparing negatives with their positives")
    for i in range(n):
        positives = [pos_of[int(r)] for r in data.positives(i)]
        for r in data.negatives(i).tolist():
            j = pos_of[int(r)]
            if any(keys[j] == keys[p] for p in positives):
                flag(i, int(r), "same_as_positive", jaccard=1.0)
            elif st.near_duplicates:
                best = max((jaccard(sets[j], sets[p]) for p in positives), default=0.0)
                if best >= st.near_threshold:
                    flag(i, int(r), "near_duplicate_of_positive", jaccard=round(best, 4))

    # --- rule 3: a negative that is a positive of an identical or near-identical query.
    say("grouping identical and near-identical training queries")
    similar: list[set[int]] = [set() for _ in range(n)]
    by_key: dict[int, list[int]] = {}
    for i, k in enumerate(q_keys):
        by_key.setdefault(k, []).append(i)
    for members in by_key.values():
        if len(members) > 1:
            for i in members:
                similar[i].update(m for m in members if m != i)
    if st.near_duplicates and n > 1:
        index = NearDuplicateIndex(st.near_threshold)
        index.add(list(range(n)), q_sets)
        for i, hits in enumerate(index.query(q_sets)):
            similar[i].update(int(h) for h, _ in hits if int(h) != i)
    for i in range(n):
        if not similar[i]:
            continue
        own = set(data.positives(i).tolist())
        owner_of_row: dict[int, int] = {}  # a similar query's positive row -> that example
        for m in sorted(similar[i]):
            for r in data.positives(m).tolist():
                owner_of_row.setdefault(int(r), m)
        owner_of_key: dict[int, int] = {}
        for r, m in owner_of_row.items():
            owner_of_key.setdefault(keys[pos_of[r]], m)
        for r in data.negatives(i).tolist():
            if r in own:
                continue  # the example's own positive: rule 1
            j = pos_of[int(r)]
            owner = owner_of_row.get(int(r), owner_of_key.get(keys[j]))
            sim: float | None = 1.0
            if owner is None and st.near_duplicates:
                best_sim, best_row = max(
                    ((jaccard(sets[j], sets[pos_of[rr]]), rr) for rr in owner_of_row), default=(0.0, -1)
                )
                if best_sim >= st.near_threshold:
                    owner, sim = owner_of_row[best_row], round(best_sim, 4)
            if owner is not None:
                flag(i, int(r), "positive_of_similar_query", jaccard=sim, similar_query=data.query_ids[owner])

    # --- rule 4 and the score gap: the model's view.
    gaps: list[float] = []
    too_easy = 0
    scored = 0
    if score is not None and pair_score is not None:
        raise ValueError("give score (a bi-encoder) or pair_score (a cross-encoder), not both")
    scores_of = None  # example index -> (positive scores, negative scores)
    if score is not None:
        say(f"scoring {n} queries and {len(rows)} documents with the model")
        q_emb, d_emb = score(list(data.queries), texts)
        q_emb = np.asarray(q_emb, dtype=np.float32)
        d_emb = np.asarray(d_emb, dtype=np.float32)

        def scores_of(i: int) -> tuple[np.ndarray, np.ndarray]:
            p_idx = [pos_of[int(r)] for r in data.positives(i)]
            n_idx = [pos_of[int(r)] for r in data.negatives(i)]
            return d_emb[p_idx] @ q_emb[i], d_emb[n_idx] @ q_emb[i]

    elif pair_score is not None:
        pairs_q: list[str] = []
        pairs_d: list[str] = []
        spans = []
        for i in range(n):
            rows_i = [*data.positives(i).tolist(), *data.negatives(i).tolist()]
            spans.append((len(pairs_q), len(data.positives(i)), len(rows_i)))
            pairs_q += [data.queries[i]] * len(rows_i)
            pairs_d += [texts[pos_of[int(r)]] for r in rows_i]
        say(f"scoring {len(pairs_q)} (query, document) pairs of {n} queries with the cross-encoder")
        flat = np.asarray(pair_score(pairs_q, pairs_d), dtype=np.float32).reshape(-1)
        if len(flat) != len(pairs_q):
            raise ValueError(f"pair_score returned {len(flat)} scores for {len(pairs_q)} pairs")

        def scores_of(i: int) -> tuple[np.ndarray, np.ndarray]:
            start, n_pos, count = spans[i]
            return flat[start : start + n_pos], flat[start + n_pos : start + count]

    if scores_of is not None:
        from embedtune.mining import margin_threshold

        easy_gap = st.temperature * math.log(100.0)
        for i in range(n):
            negs = data.negatives(i).tolist()
            p_scores, n_scores = scores_of(i)
            audits[i].positive_score = float(p_scores.min())
            if not negs:
                continue
            audits[i].hardest_negative_score = float(n_scores.max())
            scored += 1
            gap = audits[i].gap
            assert gap is not None
            gaps.append(gap)
            too_easy += int(gap > easy_gap)
            if st.margin is not None:
                threshold = margin_threshold(p_scores, st.margin, "perc")
                for r, s in zip(negs, n_scores.tolist()):
                    if s > threshold:
                        flag(i, int(r), "scores_above_positive_share", score=round(float(s), 6))

    summary: dict[str, Any] = {
        "training": {
            "source": str(data.source),
            "format": data.format,
            "examples": n,
            "negatives": len(data.neg_rows),
            "documents_referenced": len(rows),
        }
    }
    total_neg = max(1, len(data.neg_rows))
    by_reason = {r: sum(1 for f in flags.values() if r in f.reasons) for r in REASONS}
    summary["negatives"] = {
        "flagged": len(flags),
        "flagged_share": len(flags) / total_neg,
        "examples_with_flags": sum(1 for a in audits if a.flags),
        "by_reason": by_reason,
        "checked": {
            "near_duplicates": st.near_duplicates,
            "model_scores": scores_of is not None,
            "scored_by": "bi-encoder" if score is not None else "cross-encoder" if pair_score else None,
        },
    }
    if scores_of is not None:
        summary["scores"] = {
            "gap": _quantiles(gaps),
            "too_easy_share": too_easy / scored if scored else None,
            "too_easy_rule": f"hardest negative's softmax weight < 1% of the positive's at temperature "
            f"{st.temperature} (gap > {st.temperature * math.log(100):.3f})",
            "mean_positive_score": float(np.mean([a.positive_score for a in audits])),
            "mean_hardest_negative_score": float(
                np.mean([a.hardest_negative_score for a in audits if a.hardest_negative_score is not None])
            )
            if scored
            else None,
        }

    if eval_set is not None:
        summary["overlap"] = _overlap(data, eval_set, audits, rows, keys, sets, q_keys, q_sets, st, say)
    return AuditReport(summary=summary, queries=audits, settings=st)


def _overlap(
    data: Any,
    eval_set: Any,
    audits: list[QueryAudit],
    rows: np.ndarray,
    keys: list[int],
    sets: list[frozenset[str]],
    q_keys: list[int],
    q_sets: list[frozenset[str]],
    st: AuditSettings,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train/eval overlap of queries and documents (fills the examples' ``eval_*`` fields)."""
    cap = st.max_examples
    eval_qids = list(eval_set.queries)
    eval_q_keys = {}
    for qid in eval_qids:
        eval_q_keys.setdefault(text_key(eval_set.queries[qid]), []).append(qid)

    # Queries, exact.
    exact_eval_q: set[str] = set()
    for i, k in enumerate(q_keys):
        if k in eval_q_keys:
            audits[i].eval_query_exact = list(eval_q_keys[k])
            exact_eval_q.update(eval_q_keys[k])
    # Queries, near.
    near_eval_q: dict[str, tuple[str, float]] = {}
    if st.near_duplicates:
        say(f"near-duplicate search: {len(data)} training queries vs {len(eval_qids)} evaluation queries")
        index = NearDuplicateIndex(st.near_threshold)
        index.add(eval_qids, [shingles(eval_set.queries[q]) for q in eval_qids])
        for i, hits in enumerate(index.query(q_sets)):
            hits = [(str(q), s) for q, s in hits if str(q) not in audits[i].eval_query_exact]
            audits[i].eval_query_near = hits
            for q, s in hits:
                if q not in exact_eval_q and (q not in near_eval_q or s > near_eval_q[q][1]):
                    near_eval_q[q] = (data.query_ids[i], s)

    # Documents: the evaluation corpus by text key (streamed in chunks).
    say(f"hashing {len(eval_set.corpus)} evaluation documents")
    train_keys = dict.fromkeys(keys)
    ecorpus = eval_set.corpus
    eval_in_train = 0
    chunk = 20_000
    for start in range(0, len(ecorpus), chunk):
        idx = np.arange(start, min(len(ecorpus), start + chunk))
        eval_in_train += sum(1 for t in ecorpus.texts(idx) if text_key(t) in train_keys)
    # Evaluation-relevant documents (unique by text).
    rel_ids = sorted({d for j in eval_set.qrels.values() for d, r in j.items() if r >= 1})
    rel_rows = ecorpus.indices_of(rel_ids) if rel_ids else np.zeros(0, np.int64)
    present = [(d, int(r)) for d, r in zip(rel_ids, rel_rows) if r >= 0]
    rel_texts = ecorpus.texts([r for _, r in present]) if present else []
    rel_by_key: dict[int, list[str]] = {}
    rel_sets: dict[int, frozenset[str]] = {}
    for (d, _), t in zip(present, rel_texts):
        k, sh = key_and_shingles(t)
        rel_by_key.setdefault(k, []).append(d)
        rel_sets.setdefault(k, sh)
    pos_rows = {int(r) for r in data.pos_rows.tolist()}
    row_to_j = {int(r): j for j, r in enumerate(rows.tolist())}
    pos_keys = {keys[row_to_j[r]] for r in pos_rows}
    seen_keys = set(keys)
    rel_in_train_exact = {k for k in rel_by_key if k in seen_keys}
    rel_pos_exact = {k for k in rel_by_key if k in pos_keys}
    rel_in_train_near: dict[int, float] = {}
    rel_pos_near: dict[int, float] = {}
    near_rel_of: dict[int, list[int]] = {}  # position in `rows` -> relevant keys it near-duplicates
    if st.near_duplicates and rel_by_key:
        say(
            f"near-duplicate search: {len(rows)} training documents vs {len(rel_by_key)} evaluation-relevant ones"
        )
        index = NearDuplicateIndex(st.near_threshold)
        rel_keys = list(rel_by_key)
        index.add(rel_keys, [rel_sets[k] for k in rel_keys])
        for j, hits in enumerate(index.query(sets)):
            is_pos = int(rows[j]) in pos_rows
            for k, s in hits:
                k = int(k)
                near_rel_of.setdefault(j, []).append(k)
                if k not in rel_in_train_exact:
                    rel_in_train_near[k] = max(s, rel_in_train_near.get(k, 0.0))
                if is_pos and k not in rel_pos_exact:
                    rel_pos_near[k] = max(s, rel_pos_near.get(k, 0.0))
    # Per example: positives that are evaluation-relevant (exact or near).
    for i in range(len(data)):
        hit = []
        for r in data.positives(i).tolist():
            j = row_to_j[int(r)]
            if keys[j] in rel_by_key or j in near_rel_of:
                hit.append(str(data.corpus.ids[int(r)]))
        audits[i].positives_eval_relevant = hit
    n_rel = len(rel_by_key)
    ex_near_q = sorted(near_eval_q.items())[:cap]
    return {
        "eval": {
            "source": str(getattr(eval_set, "source", "")),
            "split": getattr(eval_set, "split", None),
            "queries": len(eval_qids),
            "documents": len(ecorpus),
            "relevant_documents": n_rel,
        },
        "queries": {
            "exact": len(exact_eval_q),
            "near": len(near_eval_q),
            "share": (len(exact_eval_q) + len(near_eval_q)) / max(1, len(eval_qids)),
            "training_examples_affected": sum(1 for a in audits if a.eval_query_exact or a.eval_query_near),
            "near_examples": [
                {"eval_query": q, "train_query": t, "jaccard": round(s, 4)} for q, (t, s) in ex_near_q
            ],
        },
        "documents": {
            "eval_corpus_in_training_exact": eval_in_train,
            "eval_relevant_in_training_exact": len(rel_in_train_exact),
            "eval_relevant_in_training_near": len(rel_in_train_near),
            "eval_relevant_train_positive_exact": len(rel_pos_exact),
            "eval_relevant_train_positive_near": len(rel_pos_near),
            "eval_relevant_train_positive_share": (len(rel_pos_exact) + len(rel_pos_near)) / max(1, n_rel),
            "training_examples_with_eval_relevant_positives": sum(
                1 for a in audits if a.positives_eval_relevant
            ),
            "shared_relevant_examples": [
                rel_by_key[k][0] for k in sorted(rel_pos_exact, key=lambda k: rel_by_key[k][0])
            ][:cap],
        },
        "near_duplicates_checked": st.near_duplicates,
    }
