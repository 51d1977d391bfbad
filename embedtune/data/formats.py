"""Readers for the three retrieval-data layouts, with validation that names file, line and field.

* **Inline JSONL** (``*.jsonl``): one example a line, ``query`` (or ``question``), ``pos_doc``,
  ``neg_doc``; a doc field is a string, a list of strings or a list of ``{"text": ...}`` objects.
* **Corpus-ID JSON** (``*.json``, NeMo AutoModel's layout): ``{"corpus": [{"path": folder}], "data":
  [{"question_id", "question", "corpus_id", "pos_doc": [{"id"}], "neg_doc": [...]}]}``; a corpus folder
  holds ``merlin_metadata.json`` and its documents (``id``, ``text``) in ``.jsonl``/``.parquet`` files.
* **BEIR** (a folder): ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

Whatever the layout, :func:`read_training_file` returns :class:`RetrievalData`: queries plus positive
and negative *corpus rows* (never copies of the texts), over a memory-mapped :class:`Corpus`. Every
problem in a file is collected before anything is raised (see :mod:`embedtune.data.problems`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from json.decoder import scanstring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any, overload

import numpy as np

from embedtune.data.corpus import Corpus, CorpusWriter, _stat_key, _type_name, iter_jsonl, text_hash
from embedtune.data.problems import DataValidationError, Problem, ProblemLog

__all__ = [
    "FORMATS",
    "BeirSplit",
    "ConcatCorpus",
    "Corpus",
    "Example",
    "Instructions",
    "RetrievalData",
    "detect_format",
    "load_beir",
    "read_training_file",
]

#: The layouts ``format:`` accepts.
FORMATS = ("inline", "corpus_id", "beir")


# ---------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Instructions:
    """Instructions (prefixes) that go in front of queries and passages of one corpus/dataset."""

    query: str | None = None
    passage: str | None = None


@dataclass(frozen=True)
class Example:
    """One training example: a query and the corpus rows of its positives and negatives.

    Attributes:
        index: Position in the dataset.
        query_id: The ``question_id``/``id`` from the file (``line-N`` when the file has none).
        query: The query text.
        positives: Corpus rows of the positive documents (at least one).
        negatives: Corpus rows of the negative documents (maybe none).
        line: Line of the example in its file (for messages), or None.
        group: Index into :attr:`RetrievalData.instructions` (which corpus the example uses).
    """

    index: int
    query_id: str
    query: str
    positives: tuple[int, ...]
    negatives: tuple[int, ...]
    line: int | None
    group: int = 0


class ConcatCorpus:
    """Several corpora seen as one (rows numbered part after part); for files that use several."""

    def __init__(self, parts: Sequence[Corpus]) -> None:
        self.parts = list(parts)
        self._starts = [0, *np.cumsum([len(p) for p in self.parts]).tolist()]
        h = hashlib.blake2b(digest_size=16)
        for p in self.parts:
            h.update(p.fingerprint.encode())
        self.fingerprint = h.hexdigest()
        self.sources = [s for p in self.parts for s in p.sources]
        self.ids: Sequence[str] = _ConcatIds(self)

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"ConcatCorpus({len(self)} documents in {len(self.parts)} corpora)"

    def _part(self, i: int) -> tuple[Corpus, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"document row {i} is out of range (corpus has {len(self)})")
        k = bisect.bisect_right(self._starts, i) - 1
        return self.parts[k], i - self._starts[k]

    def text(self, i: int) -> str:
        """The text of row ``i``."""
        part, j = self._part(i)
        return part.text(j)

    def texts(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """The texts of several rows."""
        return [self.text(int(i)) for i in indices]

    def get_index(self, doc_id: str) -> int | None:
        """The first row with this ID in any part, or None."""
        for start, part in zip(self._starts, self.parts):
            j = part.get_index(doc_id)
            if j is not None:
                return start + j
        return None

    def index_of(self, doc_id: str) -> int:
        """The first row with this ID. Raises KeyError when absent."""
        i = self.get_index(doc_id)
        if i is None:
            raise KeyError(f"document id {doc_id!r} is not in {self!r}")
        return i

    def location(self, i: int) -> tuple[str, int]:
        """Source file and line of row ``i``."""
        part, j = self._part(i)
        return part.location(j)


class _ConcatIds(Sequence[str]):
    def __init__(self, corpus: ConcatCorpus) -> None:
        self._c = corpus

    def __len__(self) -> int:
        return len(self._c)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        part, j = self._c._part(i if i >= 0 else i + len(self))
        return part.ids[j]

    def __iter__(self) -> Iterator[str]:
        for p in self._c.parts:
            yield from p.ids


AnyCorpus = Corpus | ConcatCorpus


@dataclass
class RetrievalData:
    """Training examples over a corpus, as read (and validated) from one file or BEIR folder.

    Positives and negatives are stored as corpus rows in flat arrays (CSR layout), so 100,000
    examples cost a few arrays, not 100,000 Python objects; :meth:`__getitem__` builds an
    :class:`Example` on demand.
    """

    source: str
    format: str
    corpus: AnyCorpus
    query_ids: list[str]
    queries: list[str]
    pos_offsets: np.ndarray  # (n + 1,) int64
    pos_rows: np.ndarray  # (total positives,) int64
    neg_offsets: np.ndarray  # (n + 1,) int64
    neg_rows: np.ndarray  # (total negatives,) int64
    lines: np.ndarray  # (n,) int64, 0 where unknown
    groups: np.ndarray  # (n,) int32, index into instructions
    instructions: list[Instructions] = field(default_factory=lambda: [Instructions()])
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    skipped_rows: int = 0

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return Example(
            index=i,
            query_id=self.query_ids[i],
            query=self.queries[i],
            positives=tuple(self.positives(i).tolist()),
            negatives=tuple(self.negatives(i).tolist()),
            line=int(self.lines[i]) or None,
            group=int(self.groups[i]),
        )

    @property
    def examples(self) -> Sequence[Example]:
        """The examples as a sequence (built on access)."""
        return _ExampleView(self)

    def positives(self, i: int) -> np.ndarray:
        """Corpus rows of example ``i``'s positives."""
        return self.pos_rows[self.pos_offsets[i] : self.pos_offsets[i + 1]]

    def negatives(self, i: int) -> np.ndarray:
        """Corpus rows of example ``i``'s negatives."""
        return self.neg_rows[self.neg_offsets[i] : self.neg_offsets[i + 1]]

    def negative_counts(self) -> np.ndarray:
        """Number of negatives of every example, shape ``(n,)``."""
        return np.diff(self.neg_offsets)

    def instructions_of(self, i: int) -> Instructions:
        """The instructions that apply to example ``i`` (from its corpus metadata)."""
        return self.instructions[int(self.groups[i])]


class _ExampleView(Sequence[Example]):
    def __init__(self, data: RetrievalData) -> None:
        self._d = data

    def __len__(self) -> int:
        return len(self._d)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...
    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self._d[j] for j in range(*i.indices(len(self)))]
        return self._d[i if i >= 0 else i + len(self)]


class _Builder:
    """Accumulates examples into the flat arrays of :class:`RetrievalData`."""

    def __init__(self) -> None:
        self.query_ids: list[str] = []
        self.queries: list[str] = []
        self.pos: list[int] = []
        self.pos_off = [0]
        self.neg: list[int] = []
        self.neg_off = [0]
        self.lines: list[int] = []
        self.groups: list[int] = []
        self.repeated = 0

    def add(
        self, qid: str, query: str, pos: Sequence[int], neg: Sequence[int], line: int, group: int
    ) -> None:
        if len(set(pos)) != len(pos) or len(set(neg)) != len(neg):
            # The same document twice in one list would be sampled twice; use it once (and say so).
            self.repeated += 1
            pos, neg = list(dict.fromkeys(pos)), list(dict.fromkeys(neg))
        self.query_ids.append(qid)
        self.queries.append(query)
        self.pos.extend(pos)
        self.pos_off.append(len(self.pos))
        self.neg.extend(neg)
        self.neg_off.append(len(self.neg))
        self.lines.append(line)
        self.groups.append(group)

    def build(
        self, source: str, fmt: str, corpus: AnyCorpus, instructions: list[Instructions], log: ProblemLog
    ) -> RetrievalData:
        if self.repeated:
            import warnings

            warnings.warn(
                f"{source}: {self.repeated} example(s) list the same document more than once in pos_doc or "
                "neg_doc; each document is used once",
                UserWarning,
                stacklevel=4,
            )
        return RetrievalData(
            source=source,
            format=fmt,
            corpus=corpus,
            query_ids=self.query_ids,
            queries=self.queries,
            pos_offsets=np.asarray(self.pos_off, dtype=np.int64),
            pos_rows=np.asarray(self.pos, dtype=np.int64),
            neg_offsets=np.asarray(self.neg_off, dtype=np.int64),
            neg_rows=np.asarray(self.neg, dtype=np.int64),
            lines=np.asarray(self.lines, dtype=np.int64),
            groups=np.asarray(self.groups, dtype=np.int32),
            instructions=instructions,
            problems=list(log.problems),
            problem_count=log.total,
            skipped_rows=log.skipped_rows,
        )


# ---------------------------------------------------------------------- format detection


def detect_format(path: str | os.PathLike[str]) -> str:
    """Choose the layout from the path: a folder with ``corpus.jsonl`` is BEIR, ``.jsonl`` is inline,
    ``.json`` is corpus-ID (unless its first line is a complete inline example).

    Raises:
        DataValidationError: when the path does not exist or no layout fits.
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise DataValidationError(
            [
                Problem(
                    name,
                    None,
                    "path",
                    "does not exist",
                    "check the path (relative paths start at the current directory)",
                )
            ]
        )
    if p.is_dir():
        if (p / "corpus.jsonl").is_file() and (p / "qrels").is_dir():
            return "beir"
        if (p / "merlin_metadata.json").is_file():
            raise DataValidationError(
                [
                    Problem(
                        name,
                        None,
                        "path",
                        "is a corpus folder (it holds merlin_metadata.json), not a training file",
                        "point at the corpus-ID JSON file whose 'corpus' list names this folder",
                    )
                ]
            )
        raise DataValidationError(
            [
                Problem(
                    name,
                    None,
                    "path",
                    "is a folder without corpus.jsonl and qrels/ (BEIR layout)",
                    "point at an inline .jsonl file, a corpus-ID .json file, or a BEIR folder",
                )
            ]
        )
    if p.suffix == ".jsonl":
        return "inline"
    if p.suffix == ".json":
        with open(p, "rb") as f:
            first = f.readline().strip().lstrip(b"\xef\xbb\xbf")
        try:
            obj = json.loads(first)
        except ValueError:
            return "corpus_id"
        if isinstance(obj, dict) and ("query" in obj or "question" in obj) and "data" not in obj:
            return "inline"  # JSONL saved under a .json name, as some tools do
        return "corpus_id"
    raise DataValidationError(
        [
            Problem(
                name,
                None,
                "format",
                f"cannot tell the layout from the suffix {p.suffix!r}",
                "name the file .jsonl (inline) or .json (corpus-ID), or set format: inline|corpus_id|beir",
            )
        ]
    )


def read_training_file(
    path: str | os.PathLike[str],
    format: str | None = None,
    on_bad_row: str = "error",
    *,
    split: str = "train",
    negatives: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> RetrievalData:
    """Read and validate a training file (or BEIR folder) in any supported layout.

    Args:
        path: An inline ``.jsonl`` file, a corpus-ID ``.json`` file or a BEIR folder.
        format: ``"inline"``, ``"corpus_id"`` or ``"beir"``; None chooses from the path.
        on_bad_row: ``"error"`` (default) raises listing every problem; ``"skip"`` drops bad examples
            and documents and warns once with the count.
        split: The BEIR qrels split to train on.
        negatives: BEIR only: a JSONL file of mined negatives, ``{"query_id": ..., "neg_doc": [ids]}``.
        cache_dir: Where memory-mapped corpora are cached (default ``~/.cache/embedtune``).

    Returns:
        The examples and their corpus.

    Raises:
        DataValidationError: (a :class:`~embedtune.errors.DataError`) listing every problem found.
    """
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        from embedtune.errors import ConfigError

        raise ConfigError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "inline":
        return _read_inline(Path(path), str(path), on_bad_row, cache_dir)
    if fmt == "corpus_id":
        return _read_corpus_id(Path(path), str(path), on_bad_row, cache_dir)
    return _read_beir_training(Path(path), split, negatives, on_bad_row, cache_dir)


# ---------------------------------------------------------------------- inline JSONL


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


def _query_id(
    obj: dict[str, Any], keys: tuple[str, ...]
) -> tuple[str | None, str | None, tuple[str, str, str] | None]:
    """(id, field it came from, problem) for an optional query ID field."""
    for key in keys:
        if key in obj:
            v = obj[key]
            if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v) == "":
                return (
                    None,
                    key,
                    (key, f"expected a non-empty string, got {_type_name(v)}", f'write "{key}" as a string'),
                )
            return str(v), key, None
    return None, None, None


def _query_text(
    obj: dict[str, Any], where: str = "", preferred: str = "query"
) -> tuple[str | None, tuple[str, str, str] | None]:
    key = "query" if "query" in obj else "question"
    v = obj.get(key)
    if v is None:
        other = "question" if preferred == "query" else "query"
        return None, (f"{where}{preferred}", "missing", f'add the query text as "{preferred}" (or "{other}")')
    if not isinstance(v, str):
        return None, (
            f"{where}{key}",
            f"expected a string, got {_type_name(v)}",
            f'write "{key}" as a string',
        )
    if not v.strip():
        return None, (f"{where}{key}", "empty string", "give the query text, or delete the example")
    return v, None


def _read_inline(
    path: Path, name: str, on_bad_row: str, cache_dir: str | os.PathLike[str] | None
) -> RetrievalData:
    log = ProblemLog(on_bad_row)
    key = _stat_key([path], "inline", {})
    writer = CorpusWriter([name], "", cache_dir=cache_dir, key=key)
    writer.start_file(0)
    row_of: dict[int, int] = {}  # text hash -> row; ints, not strings, so it stays small
    fingerprint = hashlib.blake2b(digest_size=16)
    seen_qids: dict[str, int] = {}
    out = _Builder()

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
    out: _Builder,
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
        query, p = _query_text(obj)
        if p:
            bad.append(p)
        qid, qid_key, p = _query_id(obj, ("question_id", "id", "query_id"))
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


# ---------------------------------------------------------------------- corpus-ID JSON

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _ScanFailed(Exception):
    pass


def _ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()  # type: ignore[union-attr]


def _parse_with_record_lines(text: str, array_key: str = "data") -> tuple[Any, list[int]]:
    """Parse a JSON document once, noting the line where each element of the top-level ``array_key``
    array starts (``json`` gives no positions; messages need the record's line).

    Walks the top-level object with the decoder's own ``raw_decode`` per value, so each record is parsed
    exactly once. Anything unusual (duplicate keys, syntax errors) falls back to ``json.loads``, which
    raises the canonical error or returns the document without line numbers.
    """
    try:
        i = _ws(text, 0)
        if text[i] != "{":
            raise _ScanFailed
        obj: dict[str, Any] = {}
        offsets: list[int] = []
        i = _ws(text, i + 1)
        if text[i] == "}":
            i += 1
        else:
            while True:
                if text[i] != '"':
                    raise _ScanFailed
                key, i = scanstring(text, i + 1)
                i = _ws(text, i)
                if text[i] != ":" or key in obj:
                    raise _ScanFailed
                i = _ws(text, i + 1)
                if key == array_key and text[i] == "[":
                    items: list[Any] = []
                    i = _ws(text, i + 1)
                    if text[i] == "]":
                        i += 1
                    else:
                        while True:
                            offsets.append(i)
                            value, i = _DECODER.raw_decode(text, i)
                            items.append(value)
                            i = _ws(text, i)
                            if text[i] == ",":
                                i = _ws(text, i + 1)
                                continue
                            if text[i] != "]":
                                raise _ScanFailed
                            i += 1
                            break
                    obj[key] = items
                else:
                    obj[key], i = _DECODER.raw_decode(text, i)
                i = _ws(text, i)
                if text[i] == ",":
                    i = _ws(text, i + 1)
                    continue
                if text[i] != "}":
                    raise _ScanFailed
                i += 1
                break
        if _ws(text, i) != len(text):
            raise _ScanFailed
    except (_ScanFailed, IndexError, ValueError):
        return json.loads(text), []  # raises JSONDecodeError with the canonical message when invalid
    lines, line, prev = [], 1, 0
    for off in offsets:
        line += text.count("\n", prev, off)
        prev = off
        lines.append(line)
    return obj, lines


def _read_json_document(path: Path, name: str, log: ProblemLog) -> tuple[Any, list[int]]:
    """Parse a whole JSON file; fatal problems (bad UTF-8, bad JSON) name the line."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise log.fatal(
            Problem(
                name,
                line,
                "(file)",
                f"bytes that are not UTF-8 (0x{raw[exc.start]:02x})",
                "re-save the file as UTF-8",
            )
        ) from None
    del raw
    try:
        return _parse_with_record_lines(text)
    except json.JSONDecodeError as exc:
        hint = "fix the JSON syntax (check quotes, commas and brackets)"
        if exc.msg == "Extra data":
            hint = "the file holds several JSON values: if it is one example per line, name it .jsonl or set format: inline"
        raise log.fatal(
            Problem(name, exc.lineno, "(file)", f"invalid JSON: {exc.msg} at column {exc.colno}", hint)
        ) from None


def _doc_refs(value: Any, where: str, required: bool) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Document IDs of a corpus-ID ``pos_doc``/``neg_doc`` list, and problems (field, what, fix).

    When there is no problem, entry ``k`` of the result is entry ``k`` of the list (see :func:`_ref_path`).
    """
    if value is None:
        return [], (
            [(where, "missing", f'add "{where.rsplit(".", 1)[-1]}": [{{"id": "<document id>"}}]')]
            if required
            else []
        )
    if not isinstance(value, list):
        return [], [
            (
                where,
                f"expected a list, got {_type_name(value)}",
                'write a list such as [{"id": "d1"}, {"id": "d2"}]',
            )
        ]
    if not value and required:
        return [], [(where, "empty list", "give at least one positive document id")]
    ids: list[str] = []
    problems: list[tuple[str, str, str]] = []
    for k, item in enumerate(value):
        if isinstance(item, dict):
            item = item.get("id")
            if item is None:
                problems.append(
                    (
                        _ref_path(where, value, k),
                        "missing",
                        'give each entry an "id" that names a corpus document',
                    )
                )
                continue
        if isinstance(item, bool) or not isinstance(item, (str, int)) or str(item) == "":
            problems.append(
                (
                    _ref_path(where, value, k),
                    f"expected a document id string, got {_type_name(item)}",
                    'write {"id": "<document id>"}',
                )
            )
        else:
            ids.append(item if isinstance(item, str) else str(item))
    return ids, problems


def _ref_path(where: str, value: list[Any] | bool | tuple[bool, ...], k: int) -> str:
    """JSON path of entry ``k`` of a doc list: ``data[3].pos_doc[0].id`` or ``data[3].neg_doc[1]``.

    ``value`` is the list itself or its :func:`_dict_flags`.
    """
    if isinstance(value, list):
        value = _dict_flags(value)
    is_dict = value if isinstance(value, bool) else value[k]
    return f"{where}[{k}].id" if is_dict else f"{where}[{k}]"


def _dict_flags(value: Any) -> bool | tuple[bool, ...]:
    """Which entries of a doc list are ``{"id": ...}`` objects: one bool when all agree (the usual case)."""
    flags = tuple(isinstance(x, dict) for x in value) if isinstance(value, list) else ()
    if all(flags):
        return True
    if not any(flags):
        return False
    return flags


def _load_corpus_folder(
    folder: Path, display: str, on_bad_row: str, cache_dir: str | os.PathLike[str] | None
) -> tuple[Corpus, str, Instructions]:
    """Open a NeMo corpus folder: its metadata and its (cached, memory-mapped) documents."""
    meta_path = folder / "merlin_metadata.json"
    meta_name = os.path.join(display, "merlin_metadata.json")
    log = ProblemLog("error")
    if not meta_path.is_file():
        raise log.fatal(
            Problem(
                display,
                None,
                "merlin_metadata.json",
                "the corpus folder has no merlin_metadata.json",
                'add one: {"class": "TextQADataset", "corpus_id": "<name>", "query_instruction": "", "passage_instruction": ""}',
            )
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise log.fatal(
            Problem(meta_name, None, "(file)", f"invalid JSON ({exc})", "fix the metadata file's JSON")
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("corpus_id"), str) or not meta["corpus_id"]:
        raise log.fatal(
            Problem(
                meta_name,
                None,
                "corpus_id",
                "missing or not a string",
                'add "corpus_id": "<name used by the data records>"',
            )
        )
    instr = Instructions(meta.get("query_instruction") or None, meta.get("passage_instruction") or None)
    corpus = Corpus.from_folder(folder, on_bad_row=on_bad_row, cache_dir=cache_dir)
    return corpus, meta["corpus_id"], instr


def _read_corpus_id(
    path: Path, name: str, on_bad_row: str, cache_dir: str | os.PathLike[str] | None
) -> RetrievalData:
    log = ProblemLog(on_bad_row)
    doc, lines = _read_json_document(path, name, log)
    if isinstance(doc, list):
        raise log.fatal(
            Problem(
                name,
                1,
                "(file)",
                "the top level is a list",
                'write {"corpus": [{"path": "<folder>"}], "data": [...]}, or use the inline .jsonl layout',
            )
        )
    if not isinstance(doc, dict):
        raise log.fatal(
            Problem(
                name,
                1,
                "(file)",
                f"the top level is {_type_name(doc)}",
                'write {"corpus": [...], "data": [...]}',
            )
        )
    for key in ("corpus", "data"):
        if not isinstance(doc.get(key), list):
            what = "missing" if key not in doc else f"expected a list, got {_type_name(doc[key])}"
            raise log.fatal(
                Problem(
                    name,
                    None,
                    key,
                    what,
                    'write {"corpus": [{"path": "<corpus folder>"}], "data": [{"question": ..., "pos_doc": [{"id": ...}]}]}',
                )
            )
    # The corpora, by corpus_id (metadata) and by folder name, relative to the JSON file.
    corpora: list[Corpus] = []
    instructions: list[Instructions] = []
    by_id: dict[str, int] = {}
    corpus_names: list[str] = []
    for k, entry in enumerate(doc["corpus"]):
        where = f"corpus[{k}].path"
        rel = entry.get("path") if isinstance(entry, dict) else entry
        if not isinstance(rel, str) or not rel:
            raise log.fatal(
                Problem(name, None, where, "missing or not a string", 'write {"path": "<corpus folder>"}')
            )
        folder = (path.parent / rel) if not os.path.isabs(rel) else Path(rel)
        if not folder.is_dir():
            raise log.fatal(
                Problem(
                    name,
                    None,
                    where,
                    f"folder {str(folder)!r} does not exist",
                    "corpus paths are relative to the JSON file; fix the path",
                )
            )
        corpus, corpus_id, instr = _load_corpus_folder(folder, str(folder), on_bad_row, cache_dir)
        by_id.setdefault(corpus_id, len(corpora))
        by_id.setdefault(folder.name, len(corpora))
        corpora.append(corpus)
        corpus_names.append(corpus_id)
        instructions.append(instr)
    if not corpora:
        raise log.fatal(
            Problem(
                name, None, "corpus", "empty list", 'name at least one corpus folder: [{"path": "<folder>"}]'
            )
        )
    known = ", ".join(sorted(by_id))

    # Pass 1: structure of every record. Document IDs go, in record order, into one list per corpus
    # for a single bulk lookup; pass 2 consumes the answers in the same order.
    parsed: list[tuple[int, int, str, str, int, list[str], list[str], tuple[Any, Any]]] = []
    seen_qids: dict[str, int] = {}
    wanted: list[list[str]] = [[] for _ in corpora]
    records = doc["data"]
    for i, rec in enumerate(records):
        line = lines[i] if i < len(lines) else 0
        base = f"data[{i}]"
        bad: list[tuple[str, str, str]] = []
        if not isinstance(rec, dict):
            bad.append(
                (
                    base,
                    f"expected an object, got {_type_name(rec)}",
                    'write {"question": ..., "pos_doc": [{"id": ...}]}',
                )
            )
            log.extend(Problem(name, line or None, f, w, x) for f, w, x in bad)
            log.skipped_rows += 1
            continue
        query, p = _query_text(rec, where=f"{base}.", preferred="question")
        if p:
            bad.append(p)
        qid, qkey, p = _query_id(rec, ("question_id", "id", "query_id"))
        if p:
            bad.append((f"{base}.{p[0]}", p[1], p[2]))
        elif qid is not None:
            if qid in seen_qids:
                bad.append(
                    (
                        f"{base}.{qkey}",
                        f"duplicate question_id {qid!r} (first in data[{seen_qids[qid]}])",
                        "give every record a unique question_id",
                    )
                )
            else:
                seen_qids[qid] = i
        cid = rec.get("corpus_id")
        group = 0
        if cid is None:
            if len(corpora) > 1:
                bad.append(
                    (f"{base}.corpus_id", "missing (the file names several corpora)", f"add one of: {known}")
                )
        elif not isinstance(cid, str) or cid not in by_id:
            bad.append(
                (
                    f"{base}.corpus_id",
                    f"unknown corpus id {cid!r}",
                    f"use one of: {known} (from merlin_metadata.json)",
                )
            )
        else:
            group = by_id[cid]
        pos, ps = _doc_refs(rec.get("pos_doc"), f"{base}.pos_doc", required=True)
        neg, ns = _doc_refs(rec.get("neg_doc"), f"{base}.neg_doc", required=False)
        bad += ps + ns
        if bad:
            log.extend(Problem(name, line or None, f, w, x) for f, w, x in bad)
            log.skipped_rows += 1
            continue
        assert query is not None
        flags = (_dict_flags(rec.get("pos_doc")), _dict_flags(rec.get("neg_doc")))
        parsed.append((i, line, qid if qid is not None else f"data-{i}", query, group, pos, neg, flags))
        wanted[group] += pos
        wanted[group] += neg

    # The parsed JSON is no longer needed (paths for messages come from the flags): free it before the
    # lookup builds its hash table, which lowers peak memory by ~20% on 100,000 records.
    records, rec = [], None
    doc.clear()
    # Pass 2: resolve every ID with one Arrow hash lookup per corpus, then check each reference.
    found = [corpus.indices_of(wanted[g]) for g, corpus in enumerate(corpora)]
    del wanted
    cursor = [0] * len(corpora)
    offsets = [0, *np.cumsum([len(c) for c in corpora]).tolist()]
    out = _Builder()
    for i, line, qid, query, group, pos, neg, flags in parsed:
        n_refs = len(pos) + len(neg)
        rows_all = found[group][cursor[group] : cursor[group] + n_refs]
        cursor[group] += n_refs
        if (rows_all >= 0).all() and not set(neg) & set(pos):
            shift = offsets[group]
            out.add(
                qid,
                query,
                (rows_all[: len(pos)] + shift).tolist(),
                (rows_all[len(pos) :] + shift).tolist(),
                line,
                group,
            )
            continue
        # Something is wrong: build the messages (JSON paths) only now.
        pos_ids = set(pos)
        bad = []
        for kind, ids, r_rows, kind_flags in (
            ("pos_doc", pos, rows_all[: len(pos)], flags[0]),
            ("neg_doc", neg, rows_all[len(pos) :], flags[1]),
        ):
            for k, (d, r) in enumerate(zip(ids, r_rows.tolist())):
                where = _ref_path(f"data[{i}].{kind}", kind_flags, k)
                if r < 0:
                    bad.append(
                        (
                            where,
                            f"unknown document id {d!r} in corpus {corpus_names[group]!r}",
                            "check the id, or add that document to the corpus",
                        )
                    )
                elif kind == "neg_doc" and d in pos_ids:
                    bad.append(
                        (where, f"document {d!r} is also a positive of this record", "remove it from neg_doc")
                    )
        log.extend(Problem(name, line or None, f, w, x) for f, w, x in bad)
        log.skipped_rows += 1
    if not out.queries and not log.total:
        log.add(Problem(name, None, "data", "no records", "add at least one record to data"))
    log.finish(name)
    corpus_all: AnyCorpus = corpora[0] if len(corpora) == 1 else ConcatCorpus(corpora)
    return out.build(name, "corpus_id", corpus_all, instructions, log)


# ---------------------------------------------------------------------- BEIR


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


def _read_beir_training(
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
            qid, _, p = _query_id(obj, ("query_id", "_id", "qid"))
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
            refs, ps = _doc_refs(raw_negs, "neg_doc", required=True)
            if ps:
                log.extend(Problem(neg_name, line_no, f, w, x) for f, w, x in ps)
                continue
            neg_ids.setdefault(qid, []).extend(
                (line_no, _ref_path("neg_doc", raw_negs, k), d) for k, d in enumerate(refs)
            )
    all_neg = [d for v in neg_ids.values() for _, _, d in v]
    neg_rows: dict[str, int] = {}
    if all_neg:
        uniq = list(dict.fromkeys(all_neg))
        neg_rows = dict(zip(uniq, corpus.indices_of(uniq).tolist()))
    out = _Builder()
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
        import warnings

        warnings.warn(
            f"{root}: {no_positive} queries in qrels/{split}.tsv have no positive (score > 0) and are not used",
            UserWarning,
            stacklevel=3,
        )
    log.finish(str(root))
    return out.build(str(root), "beir", corpus, [Instructions()], log)
