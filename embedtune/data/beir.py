"""BEIR folders: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

:func:`load_beir` reads a split for evaluation; :func:`read_beir_training` turns a split's positive
judgements (plus an optional JSONL of mined negatives) into training examples.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from embedtune.data.corpus import Corpus, iter_jsonl
from embedtune.data.model import Instructions, RecordBuilder, RetrievalData
from embedtune.data.problems import Problem, ProblemLog
from embedtune.data.records import doc_refs, query_id, ref_path

__all__ = ["BeirSplit", "load_beir", "read_beir_training"]


@dataclass
class BeirSplit:
    """One split of a BEIR folder: corpus, the queries judged in the split, and their qrels."""

    corpus: Corpus
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    problems: list[Problem] = field(default_factory=list)


def load_beir(
    folder: str | os.PathLike[str],
    split: str = "test",
    *,
    on_bad_row: str = "error",
    cache_dir: str | os.PathLike[str] | None = None,
    keep_unknown_documents: bool = False,
) -> BeirSplit:
    """Load a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).

    Document text is ``(title + " " + text).strip()``, as BEIR and MTEB do. ``queries`` holds only the
    queries that appear in the split's qrels; ``qrels`` keeps every judgement (scores of 0 included).
    ``keep_unknown_documents``: keep judgements naming a document that is not in the corpus (trec_eval
    counts them as relevant but never retrieved) instead of reporting them as bad lines; evaluation
    uses it and reports their count itself.

    Raises:
        DataValidationError: listing every problem (bad lines, unknown query or document IDs, ...).
    """
    root = Path(folder)
    qrels_path = root / "qrels" / f"{split}.tsv"
    log = ProblemLog(on_bad_row)
    for p, what in (
        (root / "corpus.jsonl", "corpus.jsonl"),
        (root / "queries.jsonl", "queries.jsonl"),
        (qrels_path, f"qrels/{split}.tsv"),
    ):
        if not p.is_file():
            avail = (
                sorted(x.stem for x in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
            )
            fix = (
                f"available splits: {', '.join(avail)}"
                if avail and what.startswith("qrels")
                else "use a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"
            )
            raise log.fatal(Problem(str(folder), None, what, "missing", fix))
    corpus = Corpus.from_jsonl(
        root / "corpus.jsonl", id_field="_id", title_field="title", on_bad_row=on_bad_row, cache_dir=cache_dir
    )
    all_queries = _read_queries(root / "queries.jsonl", str(root / "queries.jsonl"), log)
    qrels = _read_qrels(qrels_path, str(qrels_path), corpus, all_queries, log, keep_unknown_documents)
    log.finish(str(folder))
    queries = {qid: all_queries[qid] for qid in qrels}
    return BeirSplit(corpus=corpus, queries=queries, qrels=qrels, problems=corpus.problems + log.problems)


def _read_queries(path: Path, name: str, log: ProblemLog) -> dict[str, str]:
    queries: dict[str, str] = {}
    for line_no, obj, problem in iter_jsonl(path, name):
        if problem is not None:
            log.add(problem)
            log.skipped_rows += 1
            if problem.field == "(file)":
                break
            continue
        qid, text = obj.get("_id"), obj.get("text")
        if qid is None or isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid) == "":
            log.add(Problem(name, line_no, "_id", "missing or not a string", 'give every query an "_id"'))
        elif not isinstance(text, str) or not text.strip():
            log.add(
                Problem(
                    name, line_no, "text", "missing, empty or not a string", 'give every query its "text"'
                )
            )
        elif str(qid) in queries:
            log.add(
                Problem(
                    name, line_no, "_id", f"duplicate query id {str(qid)!r}", "give every query a unique _id"
                )
            )
        else:
            queries[str(qid)] = text
            continue
        log.skipped_rows += 1
    return queries


def _read_qrels(
    path: Path,
    name: str,
    corpus: Corpus,
    queries: dict[str, str],
    log: ProblemLog,
    keep_unknown_documents: bool = False,
) -> dict[str, dict[str, int]]:
    rows: list[tuple[int, str, str, int]] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                log.add(
                    Problem(name, line_no, "(line)", "bytes that are not UTF-8", "re-save the file as UTF-8")
                )
                continue
            if not line.strip():
                continue
            cols = line.split("\t")
            if line_no == 1 and cols[0] == "query-id":
                continue  # BEIR's header line
            if len(cols) == 4:  # TREC style: qid, iteration, docid, score
                cols = [cols[0], cols[2], cols[3]]
            if len(cols) != 3:
                log.add(
                    Problem(
                        name,
                        line_no,
                        "(line)",
                        f"expected 3 tab-separated columns, got {len(cols)}",
                        "write query-id<TAB>corpus-id<TAB>score",
                    )
                )
                continue
            try:
                score = int(cols[2])
            except ValueError:
                log.add(
                    Problem(
                        name,
                        line_no,
                        "score",
                        f"{cols[2]!r} is not an integer",
                        "write the relevance as an integer (0 = not relevant)",
                    )
                )
                continue
            rows.append((line_no, cols[0], cols[1], score))
    known_docs = corpus.indices_of([d for _, _, d, _ in rows])
    qrels: dict[str, dict[str, int]] = {}
    for (line_no, qid, did, score), r in zip(rows, known_docs.tolist()):
        if qid not in queries:
            log.add(
                Problem(
                    name,
                    line_no,
                    "query-id",
                    f"unknown query id {qid!r}",
                    "add it to queries.jsonl or delete the line",
                )
            )
        elif r < 0 and not keep_unknown_documents:
            log.add(
                Problem(
                    name,
                    line_no,
                    "corpus-id",
                    f"unknown document id {did!r}",
                    "add it to corpus.jsonl or delete the line",
                )
            )
        elif did in qrels.get(qid, {}):
            log.add(
                Problem(
                    name,
                    line_no,
                    "corpus-id",
                    f"duplicate judgement for ({qid!r}, {did!r})",
                    "keep one line per query and document",
                )
            )
        else:
            qrels.setdefault(qid, {})[did] = score
            continue
        log.skipped_rows += 1
    return qrels


def read_beir_training(
    root: Path,
    split: str,
    negatives: str | os.PathLike[str] | None,
    on_bad_row: str,
    cache_dir: str | os.PathLike[str] | None,
) -> RetrievalData:
    beir = load_beir(root, split, on_bad_row=on_bad_row, cache_dir=cache_dir)
    corpus = beir.corpus
    log = ProblemLog(on_bad_row)
    log.extend(beir.problems)
    neg_ids: dict[str, list[tuple[int, str, str]]] = {}
    neg_name = str(negatives) if negatives is not None else ""
    if negatives is not None:
        for line_no, obj, problem in iter_jsonl(Path(negatives), neg_name):
            if problem is not None:
                if problem.field == "(file)":
                    raise log.fatal(problem)
                log.add(problem)
                continue
            qid, _, p = query_id(obj, ("query_id", "_id", "qid"))
            if qid is None:
                log.add(
                    Problem(
                        neg_name,
                        line_no,
                        p[0] if p else "query_id",
                        p[1] if p else "missing",
                        'write {"query_id": ..., "neg_doc": [ids]}',
                    )
                )
                continue
            if qid not in beir.queries:
                log.add(
                    Problem(
                        neg_name,
                        line_no,
                        "query_id",
                        f"query {qid!r} has no positive in qrels/{split}.tsv",
                        "mine negatives for the training split's queries",
                    )
                )
                continue
            raw_negs = obj.get("neg_doc", obj.get("neg"))
            refs, ps = doc_refs(raw_negs, "neg_doc", required=True)
            if ps:
                log.extend(Problem(neg_name, line_no, f, w, x) for f, w, x in ps)
                continue
            neg_ids.setdefault(qid, []).extend(
                (line_no, ref_path("neg_doc", raw_negs, k), d) for k, d in enumerate(refs)
            )
    all_neg = [d for v in neg_ids.values() for _, _, d in v]
    neg_rows: dict[str, int] = {}
    if all_neg:
        uniq = list(dict.fromkeys(all_neg))
        neg_rows = dict(zip(uniq, corpus.indices_of(uniq).tolist()))
    out = RecordBuilder()
    no_positive = 0
    for qid, judged in beir.qrels.items():
        pos = [d for d, s in judged.items() if s > 0]
        if not pos:
            no_positive += 1  # judged not relevant only: nothing to train on, counted below
            continue
        pos_rows = corpus.indices_of(pos).tolist()
        neg: list[int] = []
        for line_no, where, d in neg_ids.get(qid, []):
            r = neg_rows[d]
            if r < 0:
                log.add(
                    Problem(
                        neg_name,
                        line_no,
                        where,
                        f"unknown document id {d!r}",
                        "check the id against corpus.jsonl",
                    )
                )
            elif r in pos_rows:
                log.add(
                    Problem(
                        neg_name,
                        line_no,
                        where,
                        f"document {d!r} is a positive of query {qid!r}",
                        "remove it from the negatives",
                    )
                )
            else:
                neg.append(r)
        out.add(qid, beir.queries[qid], pos_rows, neg, 0, 0)
    if no_positive:
        warnings.warn(
            f"{root}: {no_positive} queries in qrels/{split}.tsv have no positive (score > 0) and are not used",
            UserWarning,
            stacklevel=3,
        )
    log.finish(str(root))
    return out.build(str(root), "beir", corpus, [Instructions()], log)
