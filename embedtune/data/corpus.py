"""Memory-mapped document collections.

A :class:`Corpus` is an Arrow IPC file (``id``, ``text``) written once into a cache directory and then
memory-mapped, so a 1,000,000-document corpus costs the pages actually read, not a Python dict of
strings. Beside it the cache keeps the IDs sorted (for ``index_of`` by binary search and bulk lookup
through Arrow's hash join), the source line of every row (for error messages) and a ``meta.json``
holding the content fingerprint and any problems found while building it, so a cache hit reports the
same problems as the first read.

Building reads JSONL with Arrow's streaming JSON reader when the file is clean (fast path) and falls
back to a line-by-line Python reader that names every bad line when it is not.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from embedtune.data.lazy import LazySequence
from embedtune.data.problems import DataValidationError, Problem, ProblemLog

#: Bump when the cache layout changes, so old caches are rebuilt rather than misread.
CACHE_VERSION = 2
_BATCH_ROWS = 50_000
_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])


def default_cache_dir() -> Path:
    """Where built corpora are cached: ``$EMBEDTUNE_CACHE_DIR`` or ``~/.cache/embedtune``."""
    root = os.environ.get("EMBEDTUNE_CACHE_DIR")
    if root:
        return Path(root) / "corpora"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embedtune" / "corpora"


def text_hash(text: str) -> int:
    """A stable 63-bit hash of a string (non-negative, fits an int64 tensor).

    Used for document IDs in batches: two passages with the same text get the same ID, so the loss can
    mask them as false negatives whichever file or corpus they came from.
    """
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _stat_key(paths: Sequence[Path], kind: str, options: Any) -> str:
    """Cache key from the files' identity (path, size, mtime) and how they are read, without reading them."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CACHE_VERSION}|{kind}|{json.dumps(options, sort_keys=True)}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _hash_files(paths: Sequence[Path]) -> tuple[str, list[int]]:
    """Content fingerprint of the files and, per file, its number of lines."""
    h = hashlib.blake2b(digest_size=16)
    line_counts = []
    for p in paths:
        n = 0
        last = b"\n"
        with open(p, "rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
                n += chunk.count(b"\n")
                last = chunk[-1:]
        line_counts.append(n + (0 if last == b"\n" else 1))
    return h.hexdigest(), line_counts


def _id_sequence(column: pa.ChunkedArray) -> LazySequence[str]:
    """The document IDs as a read-only sequence, read from the memory-mapped table on demand."""

    def iterate() -> Iterator[str]:
        for chunk in column.chunks:
            yield from chunk.to_pylist()

    return LazySequence(
        len(column),
        lambda i: column[i].as_py(),
        iterate=iterate,
        get_slice=lambda a, b: column.slice(a, b - a).to_pylist(),
    )


class Corpus:
    """A memory-mapped collection of documents (``id``, ``text``), opened from a built cache folder.

    Build one with :meth:`from_jsonl`, :meth:`from_folder` or :meth:`from_texts`; all of them validate
    the input and reuse the cache when the files have not changed.

    Attributes:
        ids: The document IDs in row order (a lazy sequence).
        fingerprint: A content hash of the source files (for downstream caches).
        sources: The source files, as the user named them.
        problems: Problems found while building (rows skipped under ``on_bad_row: skip``).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            raise ValueError(f"corpus cache {self.directory} has version {meta.get('version')}")
        self.fingerprint: str = meta["fingerprint"]
        self.sources: list[str] = meta["sources"]
        self._file_starts: list[int] = meta["file_starts"]
        self.problems: list[Problem] = [Problem(**p) for p in meta["problems"]]
        self.problem_count: int = meta["problem_count"]
        self.skipped_rows: int = meta["skipped_rows"]
        # Zero-copy: the table's buffers point into the mapped file.
        self._table = ipc.open_file(pa.memory_map(str(self.directory / "docs.arrow"))).read_all()
        sorted_table = ipc.open_file(pa.memory_map(str(self.directory / "sorted_ids.arrow"))).read_all()
        self._sorted_ids: pa.Array = sorted_table.column(0).combine_chunks()
        self._order = np.load(self.directory / "order.npy", mmap_mode="r")
        self._lines = np.load(self.directory / "lines.npy", mmap_mode="r")
        texts = self._table.column("text")
        self._text_chunks = texts.chunks
        self._chunk_starts = [0, *np.cumsum([len(c) for c in self._text_chunks]).tolist()]
        self.ids: Sequence[str] = _id_sequence(self._table.column("id"))

    # Pickle as the cache folder, not the data: DataLoader workers started with "spawn" reopen the
    # memory map instead of receiving a copy of a corpus that may be gigabytes.
    def __getstate__(self) -> dict[str, Any]:
        return {"directory": str(self.directory)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])  # type: ignore[misc]

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self._table.num_rows

    def __repr__(self) -> str:
        return f"Corpus({len(self)} documents from {', '.join(self.sources)})"

    def text(self, i: int) -> str:
        """The text of row ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"document row {i} is out of range (corpus has {len(self)})")
        c = bisect.bisect_right(self._chunk_starts, i) - 1
        return self._text_chunks[c][i - self._chunk_starts[c]].as_py()

    def texts(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """The texts of several rows, in the order given."""
        if len(indices) < 64:
            return [self.text(int(i)) for i in indices]
        return self._table.column("text").take(pa.array(np.asarray(indices, dtype=np.int64))).to_pylist()

    def get_index(self, doc_id: str) -> int | None:
        """The row of ``doc_id`` (its first occurrence), or None when the corpus has no such ID."""
        ids = self._sorted_ids
        lo, hi = 0, len(ids)
        while lo < hi:  # leftmost binary search: the stable sort puts the first occurrence first
            mid = (lo + hi) // 2
            if ids[mid].as_py() < doc_id:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(ids) and ids[lo].as_py() == doc_id:
            return int(self._order[lo])
        return None

    def index_of(self, doc_id: str) -> int:
        """The row of ``doc_id``.

        Raises:
            KeyError: when the corpus has no document with that ID.
        """
        i = self.get_index(doc_id)
        if i is None:
            raise KeyError(f"document id {doc_id!r} is not in {self!r}")
        return i

    def indices_of(self, doc_ids: Sequence[str]) -> np.ndarray:
        """Rows of many IDs at once (one hash lookup in Arrow); -1 where an ID is unknown."""
        if not len(doc_ids):
            return np.zeros(0, dtype=np.int64)
        pos = pc.index_in(pa.array(doc_ids, type=pa.string()), value_set=self._sorted_ids)
        pos_np = pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        out = np.full(len(pos_np), -1, dtype=np.int64)
        ok = pos_np >= 0
        out[ok] = np.asarray(self._order)[pos_np[ok]]
        return out

    def location(self, i: int) -> tuple[str, int]:
        """The source file and line (or Parquet row) of row ``i``, for messages."""
        f = bisect.bisect_right(self._file_starts, i) - 1
        return self.sources[f], int(self._lines[i])

    # ------------------------------------------------------------------ building
    @classmethod
    def from_jsonl(
        cls,
        path: str | os.PathLike[str],
        *,
        id_field: str = "id",
        text_field: str = "text",
        title_field: str | None = None,
        on_bad_row: str = "error",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Corpus:
        """Build (or reopen from cache) a corpus from one JSONL file.

        Args:
            path: The JSONL file, one document object a line.
            id_field: The ID field (``"_id"`` for BEIR); integer IDs are read as strings.
            text_field: The text field.
            title_field: An optional title field; the text becomes ``(title + " " + text).strip()``.
            on_bad_row: ``"error"`` or ``"skip"`` (see :class:`~embedtune.data.problems.ProblemLog`).
            cache_dir: Cache root (default :func:`default_cache_dir`).

        Raises:
            DataValidationError: listing every bad line, when ``on_bad_row`` is ``"error"``.
        """
        return cls._build(
            [Path(path)],
            [str(path)],
            {"id": id_field, "text": text_field, "title": title_field},
            on_bad_row,
            cache_dir,
        )

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike[str],
        *,
        on_bad_row: str = "error",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Corpus:
        """Build a corpus from every ``*.jsonl``, ``*.json`` (JSON Lines) and ``*.parquet`` file in a folder.

        Each document has ``id`` and ``text``.

        This is the document part of a NeMo corpus folder (the one holding ``merlin_metadata.json``).

        Raises:
            DataValidationError: when the folder has no document files or they have problems.
        """
        folder_p = Path(folder)
        # What datasets.load_dataset(folder) would read: JSON Lines (.jsonl, or .json) and Parquet.
        files = sorted(
            p
            for p in folder_p.iterdir()
            if p.is_file()
            and p.suffix in (".jsonl", ".parquet", ".json")
            and p.name != "merlin_metadata.json"
        )
        if not files:
            raise DataValidationError(
                [
                    Problem(
                        str(folder),
                        None,
                        "corpus",
                        "the corpus folder has no .jsonl or .parquet document files",
                        "put the documents (one {'id': ..., 'text': ...} per line) in a .jsonl file in this folder",
                    )
                ]
            )
        names = [str(Path(folder) / p.name) for p in files]
        return cls._build(files, names, {"id": "id", "text": "text", "title": None}, on_bad_row, cache_dir)

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        *,
        source: str = "<memory>",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Corpus:
        """Build a corpus from in-memory texts (IDs default to ``"0"``, ``"1"``, ...). Mainly for tests."""
        ids = [str(i) for i in range(len(texts))] if ids is None else [str(i) for i in ids]
        h = hashlib.blake2b(digest_size=16)
        for i, t in zip(ids, texts):
            h.update(i.encode() + b"\0" + t.encode("utf-8", "surrogatepass") + b"\0")
        fingerprint = h.hexdigest()
        cached = _open_cached(cache_dir, f"mem-{fingerprint}")
        if cached is not None:
            return cached
        writer = CorpusWriter([source], fingerprint, cache_dir=cache_dir, key=f"mem-{fingerprint}")
        writer.start_file(0)
        for line, (i, t) in enumerate(zip(ids, texts), start=1):
            writer.add(i, t, line)
        return writer.finish(ProblemLog("error"))

    @classmethod
    def _build(
        cls,
        files: list[Path],
        names: list[str],
        fields: dict[str, str | None],
        on_bad_row: str,
        cache_dir: str | os.PathLike[str] | None,
    ) -> Corpus:
        key = _stat_key(files, "corpus", {**fields, "on_bad_row": on_bad_row})
        cached = _open_cached(cache_dir, key)
        if cached is not None:
            if cached.problem_count and on_bad_row == "error":
                raise DataValidationError(cached.problems, cached.problem_count)
            return cached
        fingerprint, line_counts = _hash_files(files)
        for fast in (True, False):
            log = ProblemLog(on_bad_row)
            writer = CorpusWriter(names, fingerprint, cache_dir=cache_dir, key=key)
            ok = True
            for file_idx, (path, name) in enumerate(zip(files, names)):
                writer.start_file(file_idx)
                if path.suffix == ".parquet":
                    _read_parquet(path, name, writer, log)
                elif fast:
                    ok = _read_jsonl_fast(path, fields, line_counts[file_idx], writer)
                    if not ok:
                        break
                else:
                    _read_jsonl_slow(path, name, fields, writer, log)
            if ok:
                break
            # Something was unusual: start again with the reader that names every bad line.
            writer.abandon()
        return writer.finish(log)


def _open_cached(cache_dir: str | os.PathLike[str] | None, key: str) -> Corpus | None:
    roots = (
        [Path(cache_dir)]
        if cache_dir
        else [default_cache_dir(), Path(tempfile.gettempdir()) / "embedtune-corpora"]
    )
    for root in roots:
        target = root / f"corpus-{key}"
        if (target / "meta.json").exists():
            try:
                return Corpus(target)
            except Exception:  # a cache from another version or a crashed writer: rebuild it
                shutil.rmtree(target, ignore_errors=True)
    return None


class CorpusWriter:
    """Streams rows into a new corpus cache folder and publishes it atomically.

    Rows are buffered in batches of 50,000 and appended to an Arrow IPC file, so memory stays flat
    however large the input is. ``finish`` sorts the IDs, reports duplicate IDs and renames the folder
    into place (a concurrent writer of the same key simply loses the race harmlessly).
    """

    def __init__(
        self,
        sources: list[str],
        fingerprint: str,
        *,
        key: str,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(cache_dir or default_cache_dir())
        self.sources = sources
        self.fingerprint = fingerprint
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f"tmp-{uuid.uuid4().hex[:8]}-", dir=self.root))
        except OSError:
            if cache_dir is not None:
                raise
            # A read-only home (containers, CI): the default cache moves to the temp folder.
            self.root = Path(tempfile.gettempdir()) / "embedtune-corpora"
            self.root.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f"tmp-{uuid.uuid4().hex[:8]}-", dir=self.root))
        self.target = self.root / f"corpus-{key}"
        self._sink = pa.OSFile(str(self.tmp / "docs.arrow"), "wb")
        self._writer = ipc.new_file(self._sink, _SCHEMA)
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._pending_lines: list[int] = []
        self._lines: list[np.ndarray] = []
        self._file_starts: list[int] = []
        self.rows = 0

    def start_file(self, file_idx: int) -> None:
        """Begin the rows of source file ``file_idx`` (files must come in order)."""
        self._flush_rows()
        assert file_idx == len(self._file_starts)
        self._file_starts.append(self.rows)

    def add(self, doc_id: str, text: str, line: int) -> int:
        """Append one document; returns its row."""
        self._ids.append(doc_id)
        self._texts.append(text)
        self._pending_lines.append(line)
        self.rows += 1
        if len(self._ids) >= _BATCH_ROWS:
            self._flush_rows()
        return self.rows - 1

    def add_batch(self, batch: pa.RecordBatch, lines: np.ndarray) -> None:
        """Append a batch with columns ``id`` and ``text`` (already validated)."""
        self._flush_rows()
        self._writer.write_batch(batch)
        self._lines.append(np.asarray(lines, dtype=np.int64))
        self.rows += batch.num_rows

    def abandon(self) -> None:
        """Delete the half-written folder (the fast reader gave up; the slow one starts afresh)."""
        self._writer.close()
        self._sink.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _flush_rows(self) -> None:
        if not self._ids:
            return
        batch = pa.RecordBatch.from_arrays(
            [pa.array(self._ids, pa.string()), pa.array(self._texts, pa.string())], schema=_SCHEMA
        )
        self._writer.write_batch(batch)
        self._lines.append(np.asarray(self._pending_lines, dtype=np.int64))
        self._ids, self._texts, self._pending_lines = [], [], []

    def finish(self, log: ProblemLog) -> Corpus:
        """Write the index files, check for duplicate IDs and publish the cache folder.

        Raises:
            DataValidationError: when problems were found and ``log.on_bad_row`` is ``"error"``.
        """
        self._flush_rows()
        self._writer.close()
        self._sink.close()
        try:
            table = ipc.open_file(pa.memory_map(str(self.tmp / "docs.arrow"))).read_all()
            lines = np.concatenate(self._lines) if self._lines else np.zeros(0, dtype=np.int64)
            assert len(lines) == table.num_rows
            ids = table.column("id")
            order = pc.sort_indices(ids).to_numpy() if len(ids) else np.zeros(0, dtype=np.int64)
            sorted_ids = ids.take(pa.array(order)).combine_chunks() if len(ids) else pa.array([], pa.string())
            if len(sorted_ids) > 1:
                same = pc.equal(sorted_ids.slice(1), sorted_ids.slice(0, len(sorted_ids) - 1))
                dup_pos = np.flatnonzero(same.to_numpy(zero_copy_only=False))
                first_of: dict[int, int] = {}
                for k in dup_pos:
                    first = first_of.setdefault(int(k), int(order[k]))
                    first_of[int(k) + 1] = first
                    row = int(order[k + 1])
                    f = bisect.bisect_right(self._file_starts, row) - 1
                    ff = bisect.bisect_right(self._file_starts, first) - 1
                    doc_id = sorted_ids[int(k) + 1].as_py()
                    log.add(
                        Problem(
                            self.sources[f],
                            int(lines[row]),
                            "id",
                            f"duplicate document id {doc_id!r} (first at {self.sources[ff]}:{int(lines[first])})",
                            "give every document a unique id, or delete the repeated document",
                        )
                    )
                    log.skipped_rows += 1
            if log.total and log.on_bad_row == "error":
                raise DataValidationError(log.problems, log.total)
            with (
                pa.OSFile(str(self.tmp / "sorted_ids.arrow"), "wb") as sink,
                ipc.new_file(sink, pa.schema([("id", pa.string())])) as w,
            ):
                w.write_table(pa.table({"id": sorted_ids}))
            np.save(self.tmp / "order.npy", order.astype(np.int64))
            np.save(self.tmp / "lines.npy", lines)
            meta = {
                "version": CACHE_VERSION,
                "fingerprint": self.fingerprint,
                "sources": self.sources,
                "file_starts": self._file_starts or [0],
                "problems": [asdict(p) for p in log.problems],
                "problem_count": log.total,
                "skipped_rows": log.skipped_rows,
            }
            (self.tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.replace(self.tmp, self.target)
            except OSError:  # another process published the same corpus first: use theirs
                shutil.rmtree(self.tmp, ignore_errors=True)
            corpus = Corpus(self.target)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        log.finish(", ".join(self.sources))
        return corpus


# ---------------------------------------------------------------------- readers


class _FastPathFailed(Exception):
    pass


def _read_jsonl_fast(path: Path, fields: dict[str, str | None], n_lines: int, writer: CorpusWriter) -> bool:
    """Read a clean JSONL corpus with Arrow's C++ JSON reader; False when the slow reader must take over.

    It gives up on anything unusual (a parse error, a wrong type, a missing or empty field, blank lines
    that would shift line numbers) so that the slow reader can name the exact line.
    """
    import pyarrow.json as pj

    id_f, text_f, title_f = fields["id"], fields["text"], fields["title"]
    cols = [(id_f, pa.string()), (text_f, pa.string())]
    if title_f:
        cols.append((title_f, pa.string()))
    schema = pa.schema(cols)
    try:
        # Small blocks, one thread: peak memory stays ~250 MB for a 1M-document corpus (16 MB blocks
        # with threads reached ~460 MB) and it is no slower on a 2-core machine (benchmarks/data_load.py).
        reader = pj.open_json(
            str(path),
            read_options=pj.ReadOptions(block_size=1 << 21, use_threads=False),
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
        row = 0
        for batch in reader:
            ids, texts = batch.column(id_f), batch.column(text_f)
            for arr in (ids, texts):
                arr.validate(full=True)  # Arrow does not check UTF-8 while parsing
                if arr.null_count or pc.any(pc.equal(pc.utf8_length(arr), 0)).as_py():
                    raise _FastPathFailed
            if pc.any(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)).as_py():
                raise _FastPathFailed  # whitespace-only text: let the slow reader name the line
            if title_f:
                title = batch.column(title_f).fill_null("")
                title.validate(full=True)
                texts = pc.utf8_trim_whitespace(pc.binary_join_element_wise(title, texts, " "))
                if pc.any(pc.equal(pc.utf8_length(texts), 0)).as_py():
                    raise _FastPathFailed
            out = pa.RecordBatch.from_arrays([ids, texts], schema=_SCHEMA)
            writer.add_batch(out, np.arange(row + 1, row + 1 + out.num_rows))
            row += out.num_rows
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, _FastPathFailed, UnicodeDecodeError):
        return False
    # Arrow skips blank lines; only when every line is a row do rows map to lines one to one.
    return row == n_lines


def _read_jsonl_slow(
    path: Path, name: str, fields: dict[str, str | None], writer: CorpusWriter, log: ProblemLog
) -> None:
    """Read a JSONL corpus line by line, recording a problem for every bad line."""
    id_f, text_f, title_f = fields["id"], fields["text"], fields["title"]
    assert id_f is not None and text_f is not None
    for line_no, obj, problem in iter_jsonl(path, name):
        if problem is not None:
            log.add(problem)
            log.skipped_rows += 1
            if problem.field == "(file)":
                return
            continue
        bad: list[Problem] = []

        def fail(field: str, what: str, fix: str, _line: int = line_no, _bad: list[Problem] = bad) -> None:
            _bad.append(Problem(name, _line, field, what, fix))

        doc_id = obj.get(id_f)
        if doc_id is None:
            fail(id_f, "missing", f'add a unique "{id_f}" string to every document')
        elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            fail(id_f, f"expected a string, got {_type_name(doc_id)}", f'write "{id_f}" as a string')
        elif str(doc_id) == "":
            fail(id_f, "empty", f'give the document a non-empty "{id_f}"')
        text = obj.get(text_f)
        if text is None:
            fail(text_f, "missing", f'add the document text as "{text_f}"')
        elif not isinstance(text, str):
            fail(text_f, f"expected a string, got {_type_name(text)}", f'write "{text_f}" as a string')
        title = obj.get(title_f) if title_f else None
        if title is not None and not isinstance(title, str):
            fail(
                title_f or "title",
                f"expected a string, got {_type_name(title)}",
                "write the title as a string",
            )
            title = None
        if not bad and isinstance(text, str):
            full = f"{title} {text}".strip() if title else text
            if not full.strip():
                fail(text_f, "empty", "give the document some text, or delete it")
            else:
                writer.add(str(doc_id), full, line_no)
                continue
        log.extend(bad)
        log.skipped_rows += 1


def _read_parquet(path: Path, name: str, writer: CorpusWriter, log: ProblemLog) -> None:
    """Read a Parquet corpus file (columns ``id``, ``text``); rows are numbered from 1."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowInvalid, OSError) as exc:
        log.add(
            Problem(
                name, None, "(file)", f"not a readable Parquet file ({exc})", "rewrite it as Parquet or JSONL"
            )
        )
        return
    missing = [c for c in ("id", "text") if c not in pf.schema_arrow.names]
    if missing:
        log.add(
            Problem(
                name,
                None,
                ",".join(missing),
                f"column(s) missing (found {', '.join(pf.schema_arrow.names)})",
                "name the document columns 'id' and 'text'",
            )
        )
        return
    row = 0
    for batch in pf.iter_batches(columns=["id", "text"], batch_size=_BATCH_ROWS):
        ids, texts = batch.column(0), batch.column(1)
        if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
            if pa.types.is_integer(ids.type):
                ids = ids.cast(pa.string())
            else:
                log.add(Problem(name, None, "id", f"column has type {ids.type}", "store ids as strings"))
                return
        if not pa.types.is_string(texts.type) and not pa.types.is_large_string(texts.type):
            log.add(Problem(name, None, "text", f"column has type {texts.type}", "store the text as strings"))
            return
        ids, texts = ids.cast(pa.string()), texts.cast(pa.string())
        ok = pc.and_(
            pc.and_(pc.is_valid(ids), pc.is_valid(texts)),
            pc.and_(
                pc.greater(pc.utf8_length(ids.fill_null("")), 0),
                pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(texts.fill_null(""))), 0),
            ),
        )
        ok_np = ok.to_numpy(zero_copy_only=False)
        rows = np.arange(row + 1, row + 1 + batch.num_rows)
        for r in np.flatnonzero(~ok_np):
            field = "id" if not ids[r].is_valid or ids[r].as_py() == "" else "text"
            log.add(
                Problem(
                    name, int(rows[r]), field, "missing or empty", f"give every row a non-empty '{field}'"
                )
            )
            log.skipped_rows += 1
        keep = pa.array(ok_np)
        out = pa.RecordBatch.from_arrays([ids.filter(keep), texts.filter(keep)], schema=_SCHEMA)
        writer.add_batch(out, rows[ok_np])
        row += batch.num_rows


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def iter_jsonl(path: Path, name: str) -> Iterator[tuple[int, dict[str, Any], Problem | None]]:
    """Yield ``(line, object, problem)`` for each non-blank line of a JSONL file.

    Exactly one of ``object`` and ``problem`` is meaningful: bad UTF-8, invalid JSON and non-object
    lines come back as problems (``object`` is ``{}``). A file whose first character opens a JSON array
    yields a single problem with field ``(file)``: that is a JSON file, not JSONL.
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    line_no,
                    {},
                    Problem(
                        name,
                        line_no,
                        "(line)",
                        f"bytes that are not UTF-8 at column {exc.start + 1} (0x{raw[exc.start]:02x})",
                        "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                    ),
                )
                continue
            stripped = line.strip()
            if not stripped:
                continue
            if line_no == 1 and stripped.startswith("["):
                yield (
                    line_no,
                    {},
                    Problem(
                        name,
                        line_no,
                        "(file)",
                        "a JSON array where JSONL (one JSON object per line) is expected",
                        "write one object per line (e.g. jq -c '.[]' file.json > file.jsonl)",
                    ),
                )
                return
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError as exc:
                yield (
                    line_no,
                    {},
                    Problem(
                        name,
                        line_no,
                        "(line)",
                        f"invalid JSON: {exc.msg} at column {exc.colno}",
                        "make the line one complete JSON object (check quotes, commas and brackets)",
                    ),
                )
                continue
            if not isinstance(obj, dict):
                yield (
                    line_no,
                    {},
                    Problem(
                        name,
                        line_no,
                        "(line)",
                        f"expected a JSON object, got {_type_name(obj)}",
                        'write each line as an object such as {"id": ..., "text": ...}',
                    ),
                )
                continue
            yield line_no, obj, None
