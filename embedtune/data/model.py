"""The data model every reader returns: :class:`RetrievalData` (queries, positive and negative corpus
rows, instructions) over a :class:`~embedtune.data.corpus.Corpus` or several (:class:`ConcatCorpus`).

Readers (:mod:`embedtune.data.inline`, :mod:`embedtune.data.corpus_id`, :mod:`embedtune.data.beir`,
:mod:`embedtune.data.hf_layout`) fill a :class:`RecordBuilder` and call :meth:`RecordBuilder.build`.
"""

from __future__ import annotations

import bisect
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from embedtune.data.corpus import Corpus
from embedtune.data.lazy import LazySequence
from embedtune.data.problems import Problem, ProblemLog

__all__ = [
    "AnyCorpus",
    "ConcatCorpus",
    "Example",
    "Instructions",
    "RecordBuilder",
    "RetrievalData",
    "concat_data",
]


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
        self.ids: Sequence[str] = LazySequence(
            len(self), self._id_of, iterate=lambda: (i for p in self.parts for i in p.ids)
        )

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"ConcatCorpus({len(self)} documents in {len(self.parts)} corpora)"

    def _part(self, i: int) -> tuple[Corpus, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"document row {i} is out of range (corpus has {len(self)})")
        k = bisect.bisect_right(self._starts, i) - 1
        return self.parts[k], i - self._starts[k]

    def _id_of(self, i: int) -> str:
        part, j = self._part(i)
        return part.ids[j]

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
        return LazySequence(len(self), self.__getitem__)

    def positives(self, i: int) -> np.ndarray:
        """Corpus rows of example ``i``'s positives."""
        return self.pos_rows[self.pos_offsets[i] : self.pos_offsets[i + 1]]

    def negatives(self, i: int) -> np.ndarray:
        """Corpus rows of example ``i``'s negatives."""
        return self.neg_rows[self.neg_offsets[i] : self.neg_offsets[i + 1]]

    def negative_counts(self) -> np.ndarray:
        """Number of negatives of every example, shape ``(n,)``."""
        return np.diff(self.neg_offsets)

    def select(self, indices: Sequence[int] | np.ndarray) -> RetrievalData:
        """A data set of the examples at ``indices`` (in that order), over the same corpus."""
        idx = np.asarray(indices, dtype=np.int64)
        pos_counts, neg_counts = np.diff(self.pos_offsets)[idx], np.diff(self.neg_offsets)[idx]
        pos_rows = [self.positives(int(i)) for i in idx]
        neg_rows = [self.negatives(int(i)) for i in idx]
        return RetrievalData(
            source=self.source,
            format=self.format,
            corpus=self.corpus,
            query_ids=[self.query_ids[int(i)] for i in idx],
            queries=[self.queries[int(i)] for i in idx],
            pos_offsets=np.concatenate([[0], np.cumsum(pos_counts)]).astype(np.int64),
            pos_rows=np.concatenate(pos_rows).astype(np.int64) if pos_rows else np.zeros(0, np.int64),
            neg_offsets=np.concatenate([[0], np.cumsum(neg_counts)]).astype(np.int64),
            neg_rows=np.concatenate(neg_rows).astype(np.int64) if neg_rows else np.zeros(0, np.int64),
            lines=self.lines[idx],
            groups=self.groups[idx],
            instructions=self.instructions,
            problems=self.problems,
            problem_count=self.problem_count,
            skipped_rows=self.skipped_rows,
        )

    def instructions_of(self, i: int) -> Instructions:
        """The instructions that apply to example ``i`` (from its corpus metadata)."""
        return self.instructions[int(self.groups[i])]


class RecordBuilder:
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


def concat_data(parts: Sequence[RetrievalData]) -> RetrievalData:
    """Several data sets as one: examples in order, corpora side by side, each keeping its instructions.

    Used where a recipe reads one data set but the source lists several (NeMo's ``data_dir_list``).
    """
    if len(parts) == 1:
        return parts[0]
    starts = np.cumsum([0, *[len(p.corpus) for p in parts]])
    group_starts = np.cumsum([0, *[len(p.instructions) for p in parts]])
    corpus = ConcatCorpus(
        [c for p in parts for c in (p.corpus.parts if isinstance(p.corpus, ConcatCorpus) else [p.corpus])]
    )

    def offsets(key: str) -> np.ndarray:
        counts = np.concatenate([np.diff(getattr(p, key)) for p in parts])
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    return RetrievalData(
        source=", ".join(p.source for p in parts),
        format="+".join(dict.fromkeys(p.format for p in parts)),
        corpus=corpus,
        query_ids=[q for p in parts for q in p.query_ids],
        queries=[q for p in parts for q in p.queries],
        pos_offsets=offsets("pos_offsets"),
        pos_rows=np.concatenate([p.pos_rows + starts[k] for k, p in enumerate(parts)]).astype(np.int64),
        neg_offsets=offsets("neg_offsets"),
        neg_rows=np.concatenate([p.neg_rows + starts[k] for k, p in enumerate(parts)]).astype(np.int64),
        lines=np.concatenate([p.lines for p in parts]),
        groups=np.concatenate([p.groups + group_starts[k] for k, p in enumerate(parts)]).astype(np.int32),
        instructions=[i for p in parts for i in p.instructions],
        problems=[x for p in parts for x in p.problems],
        problem_count=sum(p.problem_count for p in parts),
        skipped_rows=sum(p.skipped_rows for p in parts),
    )
