"""Evaluation sets: queries, a corpus and relevance judgements, from any of the data formats.

``load_eval_set(path, split)`` reads, through the readers of ``embedtune.data``:

* a **BEIR folder** (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``): the split's judged
  queries against the whole corpus;
* a **corpus-ID JSON** or **inline JSONL** training-format file: each query's positives are its
  relevant documents (relevance 1), searched among all documents of the file's corpus.

Judgements that name documents missing from the corpus are kept, as trec_eval keeps them: relevant but
never retrieved, so they count in the recall and NDCG denominators and the metrics equal pytrec_eval's on
the same files. ``skip_unknown_documents=True`` drops them instead (embedtune's earlier behaviour; scores
are then higher than trec_eval's). Judgements naming unknown queries cannot be evaluated and are skipped.
Either is reported with counts (``EvalSet.warnings`` and an ``EvalDataWarning``), or, with
``strict=True``, raises ``DataError``.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embedtune.errors import DataError


class EvalDataWarning(UserWarning):
    """Judgements name unknown queries (skipped) or documents (kept or skipped); ``EvalSet.warnings`` lists them."""


def _warn(lines: Sequence[str]) -> None:
    for line in lines:
        warnings.warn(line, EvalDataWarning, stacklevel=4)


#: BEIR data sets whose queries also appear in the corpus under the same ID; BEIR evaluates them with
#: ``ignore_identical_ids`` so that a query does not retrieve itself.
IGNORE_IDENTICAL_IDS_DATASETS: tuple[str, ...] = ("arguana", "quora", "cqadupstack")


class CorpusLike(Protocol):
    """What evaluation needs from a corpus (``embedtune.data.Corpus`` has it all)."""

    ids: Sequence[str]
    fingerprint: str

    def __len__(self) -> int: ...
    def texts(self, indices: Sequence[int] | np.ndarray) -> list[str]: ...
    def indices_of(self, doc_ids: Sequence[str]) -> np.ndarray: ...


def indices_of(corpus: Any, doc_ids: Sequence[str]) -> np.ndarray:
    """Rows of ``doc_ids`` in ``corpus`` (-1 where unknown), through its fastest lookup."""
    if hasattr(corpus, "indices_of"):
        return np.asarray(corpus.indices_of(list(doc_ids)), dtype=np.int64)
    rows = (corpus.get_index(d) for d in doc_ids)
    return np.array([-1 if r is None else r for r in rows], dtype=np.int64)


class CorpusView:
    """Some rows of a corpus, in the order given (used for ``max_corpus`` samples).

    Args:
        base: the full corpus.
        rows: its rows to keep.
    """

    def __init__(self, base: CorpusLike, rows: Sequence[int]) -> None:
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64)
        base_ids = base.ids
        self.ids: list[str] = [base_ids[int(r)] for r in self.rows]
        h = hashlib.blake2b(digest_size=16)
        h.update(str(base.fingerprint).encode())
        h.update(self.rows.tobytes())
        self.fingerprint = h.hexdigest()
        self._row_of: dict[str, int] = {}
        for i, doc_id in enumerate(self.ids):
            self._row_of.setdefault(doc_id, i)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def texts(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """Texts of view rows ``indices``."""
        return self.base.texts(self.rows[np.asarray(indices, dtype=np.int64)])

    def indices_of(self, doc_ids: Sequence[str]) -> np.ndarray:
        """View rows of the IDs; -1 where an ID is not in the view."""
        return np.array([self._row_of.get(d, -1) for d in doc_ids], dtype=np.int64)


@dataclass
class EvalSet:
    """Queries to evaluate, the corpus to search and the relevance judgements.

    Attributes:
        name: a short name for tables ("scifact").
        corpus: the documents (``embedtune.data.Corpus`` or a ``CorpusView`` of one).
        queries: query ID -> text, exactly the queries that are evaluated (each has judgements).
        qrels: query ID -> {document ID -> relevance}; relevance >= 1 is relevant.
        ignore_identical_ids: drop a retrieved document whose ID equals the query's ID (BEIR).
        source: the path it was read from.
        split: the qrels split, for BEIR folders.
        warnings: problems found while loading (unknown IDs), one line each.
        query_prefixes: query ID -> instruction prefix from the data (corpus metadata), for queries
            whose data set has one; None: every query uses the model's query prefix.
        passage_prefix: the data's passage instruction for every document; None: the model's prefix.
    """

    name: str
    corpus: Any
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    ignore_identical_ids: bool = False
    source: str = ""
    split: str | None = None
    warnings: list[str] = field(default_factory=list)
    query_prefixes: dict[str, str] | None = None
    passage_prefix: str | None = None

    def subset(self, max_queries: int | None = None, max_corpus: int | None = None, seed: int = 0) -> EvalSet:
        """A smaller, fixed evaluation set for fast validation during training.

        Args:
            max_queries: keep at most this many queries (a seeded random sample).
            max_corpus: keep every document judged relevant for a kept query, plus a seeded random
                sample of the others up to this many documents in all.
            seed: sample seed; the same seed gives the same subset.

        Returns:
            A new ``EvalSet`` (self when no limit applies).
        """
        rng = random.Random(seed)
        qids = sorted(self.queries)
        if max_queries is not None and len(qids) > max_queries:
            qids = sorted(rng.sample(qids, max_queries))
        queries = {q: self.queries[q] for q in qids}
        qrels = {q: self.qrels[q] for q in qids}
        prefixes = (
            None
            if self.query_prefixes is None
            else {q: p for q, p in self.query_prefixes.items() if q in queries}
        )
        corpus = self.corpus
        if max_corpus is not None and len(corpus) > max_corpus:
            rel_ids = sorted({d for q in qids for d, r in qrels[q].items() if r >= 1})
            rel_rows = [int(r) for r in indices_of(corpus, rel_ids) if r >= 0]
            keep = set(rel_rows)
            others = [i for i in range(len(corpus)) if i not in keep]
            n_more = max(0, max_corpus - len(keep))
            rows = sorted(keep | set(rng.sample(others, min(n_more, len(others)))))
            corpus = CorpusView(corpus, rows)
        if corpus is self.corpus and len(queries) == len(self.queries):
            return self
        return replace(self, corpus=corpus, queries=queries, qrels=qrels, query_prefixes=prefixes)


def _check(
    name: str,
    corpus: Any,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    source: str,
    qrels_source: str,
    strict: bool,
    skip_unknown_documents: bool = False,
) -> tuple[dict[str, str], dict[str, dict[str, int]], list[str]]:
    """Validate IDs; returns the evaluated queries, their qrels and the warnings.

    A judged document that is not in the corpus stays in the qrels (relevant, never retrieved: trec_eval's
    rule) unless ``skip_unknown_documents``.
    """
    if len(corpus) == 0:
        raise DataError(f"{source}: the corpus is empty — an evaluation needs documents to search")
    unknown_q = sorted(q for q in qrels if q not in queries)
    doc_ids = sorted({d for judged in qrels.values() for d in judged})
    rows = indices_of(corpus, doc_ids) if doc_ids else np.zeros(0, dtype=np.int64)
    unknown_d = [d for d, r in zip(doc_ids, rows) if r < 0]
    problems = []
    if unknown_q:
        problems.append(
            f"{qrels_source}: {len(unknown_q)} of {len(qrels)} judged queries are not in the queries "
            f"(e.g. {unknown_q[:3]}); they are skipped"
        )
    if unknown_d:
        missing_set = set(unknown_d)
        n_rel = sum(1 for j in qrels.values() for d, r in j.items() if r >= 1 and d in missing_set)
        what = (
            "they are skipped (--skip-unknown-docs; scores are higher than trec_eval's)"
            if skip_unknown_documents
            else f"their {n_rel} relevant judgement(s) count as relevant but never retrieved, as in trec_eval "
            "(--skip-unknown-docs drops them)"
        )
        problems.append(
            f"{qrels_source}: {len(unknown_d)} of {len(doc_ids)} judged documents are not in the corpus "
            f"(e.g. {unknown_d[:3]}); {what}"
        )
    if problems and strict:
        raise DataError("; ".join(problems) + " — fix the IDs, or drop --strict to evaluate anyway")
    _warn(problems)
    missing = set(unknown_d) if skip_unknown_documents else set()
    kept = {q: {d: r for d, r in j.items() if d not in missing} for q, j in qrels.items() if q in queries}
    if not kept:
        raise DataError(
            f"{qrels_source}: no judged query is in the queries ({len(qrels)} judged, {len(queries)} queries) — "
            "check that the query IDs of the qrels and the queries file match"
        )
    return {q: queries[q] for q in kept}, kept, problems


def eval_set_from_dicts(
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    name: str = "memory",
    ignore_identical_ids: bool = False,
    strict: bool = False,
    cache_dir: str | Path | None = None,
    skip_unknown_documents: bool = False,
) -> EvalSet:
    """Build an evaluation set from Python dictionaries (document ID -> text, query ID -> text, qrels).

    Args:
        corpus: document ID -> text.
        queries: query ID -> text.
        qrels: query ID -> {document ID -> relevance}.
        name: a short name.
        ignore_identical_ids: see ``EvalSet``.
        strict: raise on unknown IDs instead of warning.
        cache_dir: where the corpus is stored (``embedtune.data`` corpus cache).
        skip_unknown_documents: drop judgements naming documents missing from the corpus (default: keep
            them as relevant but never retrieved, as trec_eval does).

    Raises:
        DataError: empty corpus, no judged query among the queries, or (strict) unknown IDs.
    """
    from embedtune.data.corpus import Corpus

    if not corpus:
        raise DataError(f"{name}: the corpus is empty — an evaluation needs documents to search")
    c = Corpus.from_texts(list(corpus.values()), list(corpus.keys()), source=name, cache_dir=cache_dir)
    q, j, problems = _check(
        name,
        c,
        queries,
        qrels,
        source=name,
        qrels_source=name,
        strict=strict,
        skip_unknown_documents=skip_unknown_documents,
    )
    return EvalSet(name, c, q, j, ignore_identical_ids=ignore_identical_ids, source=name, warnings=problems)


def _is_beir_folder(path: Path) -> bool:
    return path.is_dir() and (path / "corpus.jsonl").is_file() and (path / "queries.jsonl").is_file()


def load_eval_set(
    path: str | Path,
    split: str = "test",
    *,
    strict: bool = False,
    ignore_identical_ids: bool | None = None,
    cache_dir: str | Path | None = None,
    skip_unknown_documents: bool = False,
) -> EvalSet:
    """Read an evaluation set from a BEIR folder, a corpus-ID JSON file or an inline JSONL file.

    Args:
        path: the folder or file.
        split: the qrels split of a BEIR folder (``qrels/<split>.tsv``).
        strict: raise ``DataError`` when judgements name unknown queries or documents (default: warn).
        ignore_identical_ids: drop a retrieved document whose ID equals the query's; None: on for BEIR
            folders named like a data set that needs it (ArguAna, Quora, CQADupStack).
        cache_dir: corpus cache root (see ``embedtune.data.corpus``).
        skip_unknown_documents: drop judgements naming documents missing from the corpus (default: keep
            them as relevant but never retrieved, as trec_eval does, so metrics equal pytrec_eval's).

    Returns:
        The ``EvalSet``.

    Raises:
        DataError: missing path, unknown format, empty corpus, no usable judgements.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"{p}: no such file or folder — give a BEIR folder, a corpus-ID .json or an inline .jsonl"
        )
    if p.is_dir():
        if not _is_beir_folder(p):
            raise DataError(
                f"{p}: not a BEIR folder (needs corpus.jsonl, queries.jsonl and qrels/<split>.tsv) — "
                "or pass a training-format .json/.jsonl file"
            )
        return _load_beir(
            p,
            split,
            strict=strict,
            ignore_identical_ids=ignore_identical_ids,
            cache_dir=cache_dir,
            skip_unknown_documents=skip_unknown_documents,
        )
    return _load_training_file(
        p, strict=strict, ignore_identical_ids=ignore_identical_ids, cache_dir=cache_dir
    )


def _summarise_problems(problems: Sequence[Any], total: int) -> list[str]:
    """One line per kind of problem the data readers skipped (with counts), for warnings."""
    by_kind: dict[tuple[str, str, str], list[Any]] = {}
    for prob in problems:
        what = prob.what.split(" ")[0:2]  # "unknown query", "unknown document", "duplicate judgement", ...
        by_kind.setdefault((prob.file, prob.field, " ".join(what)), []).append(prob)
    lines = []
    for (file, fld, what), probs in by_kind.items():
        first = probs[0]
        lines.append(
            f"{file}: skipped {len(probs)} line(s) with {fld}: {what}... (first: line {first.line}: {first.what})"
        )
    if total > len(problems):
        lines.append(f"... {total - len(problems)} more problem(s) not listed")
    return lines


def _load_beir(
    p: Path,
    split: str,
    *,
    strict: bool,
    ignore_identical_ids: bool | None,
    cache_dir: str | Path | None,
    skip_unknown_documents: bool = False,
) -> EvalSet:
    from embedtune.data.formats import load_beir

    qrels_path = p / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(x.stem for x in (p / "qrels").glob("*.tsv")) if (p / "qrels").is_dir() else []
        raise DataError(f"{qrels_path}: no such qrels split {split!r}; available splits: {have or 'none'}")
    # strict: the reader raises, naming every bad line; otherwise it skips them and we report counts.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # Unknown documents are kept by the reader and judged by _check (kept or skipped, and counted);
        # strict: the reader names each bad line, unknown documents included.
        beir = _call_with_cache(
            load_beir,
            p,
            split=split,
            on_bad_row="error" if strict else "skip",
            cache_dir=cache_dir,
            keep_unknown_documents=not strict,
        )
    problems = _summarise_problems(beir.problems, len(beir.problems))
    _warn(problems)
    name = p.name
    if ignore_identical_ids is None:
        ignore_identical_ids = any(name.lower().startswith(n) for n in IGNORE_IDENTICAL_IDS_DATASETS)
    q, j, more = _check(
        name,
        beir.corpus,
        beir.queries,
        beir.qrels,
        source=str(p / "corpus.jsonl"),
        qrels_source=str(qrels_path),
        strict=strict,
        skip_unknown_documents=skip_unknown_documents,
    )
    return EvalSet(
        name,
        beir.corpus,
        q,
        j,
        ignore_identical_ids=bool(ignore_identical_ids),
        source=str(p),
        split=split,
        warnings=problems + more,
    )


def _call_with_cache(fn: Any, *args: Any, cache_dir: str | Path | None, **kwargs: Any) -> Any:
    """Pass ``cache_dir`` only when given (the readers choose their own default)."""
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    return fn(*args, **kwargs)


def _load_training_file(
    p: Path, *, strict: bool, ignore_identical_ids: bool | None, cache_dir: str | Path | None
) -> EvalSet:
    from embedtune.data.formats import read_training_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data = _call_with_cache(
            read_training_file, p, on_bad_row="error" if strict else "skip", cache_dir=cache_dir
        )
    problems = _summarise_problems(data.problems, data.problem_count)
    _warn(problems)
    corpus = data.corpus
    ids = corpus.ids
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    query_prefixes: dict[str, str] = {}
    passage_instructions = {instr.passage for instr in data.instructions}
    for i in range(len(data)):
        qid, text = str(data.query_ids[i]), data.queries[i]
        instruction = data.instructions_of(i).query
        if instruction is not None:
            query_prefixes[qid] = instruction
        if qid in queries and queries[qid] != text:
            raise DataError(
                f"{p}:{int(data.lines[i]) or '?'}: query id {qid!r} is used for two different query texts — "
                "make query ids unique"
            )
        queries[qid] = text
        judged = qrels.setdefault(qid, {})
        for row in data.positives(i).tolist():
            judged[ids[int(row)]] = 1
    q, j, more = _check(p.stem, corpus, queries, qrels, source=str(p), qrels_source=str(p), strict=strict)
    passage_prefix = None
    if len(passage_instructions) == 1:
        passage_prefix = next(iter(passage_instructions))
    elif len(passage_instructions) > 1:
        more.append(
            f"{p}: the corpora have different passage instructions {sorted(map(repr, passage_instructions))}; "
            "documents are encoded with the model's passage prefix — evaluate each corpus on its own to use them"
        )
        _warn(more[-1:])
    return EvalSet(
        p.stem,
        corpus,
        q,
        j,
        ignore_identical_ids=bool(ignore_identical_ids),
        source=str(p),
        warnings=problems + more,
        query_prefixes=query_prefixes or None,
        passage_prefix=passage_prefix,
    )


def load_corpus(path: str | Path, *, cache_dir: str | Path | None = None) -> Any:
    """Open the documents at ``path`` for ``embedtune search``.

    Accepts a BEIR folder (its ``corpus.jsonl``), a NeMo corpus folder (``merlin_metadata.json``), a corpus
    JSONL file (``{"_id", "title", "text"}`` as BEIR, or ``{"id", "text"}``), or a training file (the
    documents it contains).

    Raises:
        DataError: the path is missing, or is not one of these.
    """
    import json

    from embedtune.data.corpus import Corpus

    p = Path(path)
    if not p.exists():
        raise DataError(
            f"{p}: no such file or folder — give a corpus .jsonl, a BEIR folder or a training file"
        )
    if p.is_dir():
        if (p / "corpus.jsonl").is_file():
            return _call_with_cache(
                Corpus.from_jsonl,
                p / "corpus.jsonl",
                id_field="_id",
                title_field="title",
                cache_dir=cache_dir,
            )
        if (p / "merlin_metadata.json").is_file():
            return _call_with_cache(Corpus.from_folder, p, cache_dir=cache_dir)
        raise DataError(
            f"{p}: neither a BEIR folder (corpus.jsonl) nor a corpus folder (merlin_metadata.json)"
        )
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            obj = json.loads(first) if first else {}
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:1: invalid JSON ({exc.msg}) — one JSON object per line") from None
        if isinstance(obj, dict) and "text" in obj and ("_id" in obj or "id" in obj) and "query" not in obj:
            beir_style = "_id" in obj
            return _call_with_cache(
                Corpus.from_jsonl,
                p,
                id_field="_id" if beir_style else "id",
                title_field="title" if "title" in obj else None,
                cache_dir=cache_dir,
            )
    from embedtune.data.formats import read_training_file

    return _call_with_cache(read_training_file, p, cache_dir=cache_dir).corpus
