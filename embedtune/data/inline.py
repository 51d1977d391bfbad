"""Inline JSONL reader: one example a line with the passage texts in it.

``{"query": ..., "pos_doc": ..., "neg_doc": ...}`` (``question`` is accepted for ``query``); a doc field
is a string, a list of strings or a list of ``{"text": ...}`` objects. Passages are deduplicated by text
into a memory-mapped corpus, so a negative shared by many examples is stored once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from embedtune.data.corpus import CorpusWriter, _stat_key, _type_name, iter_jsonl, text_hash
from embedtune.data.model import Instructions, RecordBuilder, RetrievalData
from embedtune.data.problems import DataValidationError, Problem, ProblemLog
from embedtune.data.records import query_id, query_text

__all__ = ["read_inline"]


def _inline_docs(
    obj: dict[str, Any], key: str, required: bool
) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Texts of an inline doc field and the problems (field, what, fix) found in it."""
    value = obj.get(key)
    example = f'"{key}": "some passage" or "{key}": ["passage 1", "passage 2"]'
    if value is None:
        if required:
            return [], [(key, "missing", f"add {example}")]
        return [], []
    if isinstance(value, str):
        if not value.strip():
            return [], [(key, "empty string", f"give the passage text, e.g. {example}")]
        return [value], []
    if isinstance(value, dict):
        value = [value]  # a single {"text": ...} object
    if not isinstance(value, list):
        return [], [(key, f"expected a string or a list, got {_type_name(value)}", f"write {example}")]
    if not value and required:
        return [], [(key, "empty list", "give at least one positive passage")]
    texts: list[str] = []
    problems: list[tuple[str, str, str]] = []
    for k, item in enumerate(value):
        where = f"{key}[{k}]"
        if isinstance(item, dict):
            where += ".text"
            item = item.get("text")
            if item is None:
                problems.append((where, "missing", 'give each passage object a "text" string'))
                continue
        if not isinstance(item, str):
            problems.append(
                (where, f"expected a string, got {_type_name(item)}", "write the passage as a string")
            )
        elif not item.strip():
            problems.append((where, "empty string", "give the passage text, or remove the entry"))
        else:
            texts.append(item)
    return texts, problems


def read_inline(
    path: Path, name: str, on_bad_row: str, cache_dir: str | os.PathLike[str] | None
) -> RetrievalData:
    log = ProblemLog(on_bad_row)
    key = _stat_key([path], "inline", {})
    writer = CorpusWriter([name], "", cache_dir=cache_dir, key=key)
    writer.start_file(0)
    row_of: dict[int, int] = {}  # text hash -> row; ints, not strings, so it stays small
    fingerprint = hashlib.blake2b(digest_size=16)
    seen_qids: dict[str, int] = {}
    out = RecordBuilder()

    def row(text: str, line: int) -> int:
        h = text_hash(text)
        r = row_of.get(h)
        if r is None:
            fingerprint.update(text.encode("utf-8", "surrogatepass") + b"\0")
            r = row_of[h] = writer.add(f"{h:016x}", text, line)
        return r

    try:
        _inline_examples(path, name, log, row, seen_qids, out)
    except BaseException:
        writer.abandon()  # no half-written cache folder left behind, whatever happened
        raise
    if not out.queries and not log.total:
        log.add(Problem(name, None, "(file)", "no examples", "add one JSON example per line"))
    if log.total and on_bad_row == "error":
        writer.abandon()
        raise DataValidationError(log.problems, log.total)
    writer.fingerprint = fingerprint.hexdigest()
    corpus = writer.finish(ProblemLog("error"))
    if log.total:
        log.finish(name)
    return out.build(name, "inline", corpus, [Instructions()], log)


def _inline_examples(
    path: Path,
    name: str,
    log: ProblemLog,
    row: Any,
    seen_qids: dict[str, int],
    out: RecordBuilder,
) -> None:
    """Check every line of an inline file; good examples go to ``out``, their passages through ``row``."""
    for line_no, obj, problem in iter_jsonl(path, name):
        if problem is not None:
            if problem.field == "(file)":
                raise log.fatal(problem)
            log.add(problem)
            log.skipped_rows += 1
            continue
        bad: list[tuple[str, str, str]] = []
        query, p = query_text(obj)
        if p:
            bad.append(p)
        qid, qid_key, p = query_id(obj, ("question_id", "id", "query_id"))
        if p:
            bad.append(p)
        elif qid is not None:
            if qid in seen_qids:
                bad.append(
                    (
                        str(qid_key),
                        f"duplicate id {qid!r} (first at line {seen_qids[qid]})",
                        "give every example a unique id",
                    )
                )
            else:
                seen_qids[qid] = line_no
        pos, ps = _inline_docs(obj, "pos_doc", required=True)
        neg, ns = _inline_docs(obj, "neg_doc", required=False)
        bad += ps + ns
        pos_set = set(pos) if not ns else set()  # with a bad entry, list indices would be off
        bad += [
            (
                f"neg_doc[{k}]",
                "is also a positive of this example",
                "remove it from neg_doc (a positive cannot be its own negative)",
            )
            for k, t in enumerate(neg)
            if t in pos_set
        ]
        if bad:
            log.extend(Problem(name, line_no, f, w, x) for f, w, x in bad)
            log.skipped_rows += 1
            continue
        assert query is not None
        out.add(
            qid if qid is not None else f"line-{line_no}",
            query,
            [row(t, line_no) for t in pos],
            [row(t, line_no) for t in neg],
            line_no,
            0,
        )
