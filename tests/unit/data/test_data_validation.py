"""Malformed inputs: each must be reported as ``file:line: field: what — fix``, and nothing else may escape.

The table below covers every layout (inline JSONL, corpus-ID JSON and its corpus folder, BEIR files,
mined negatives). Each case writes one bad file into an otherwise valid data set and checks the first
problem's exact location prefix plus the gist of the message.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pytest
from _data_helpers import DOCS, write_corpus_folder, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedtune.data.formats import read_training_file
from embedtune.data.problems import SHOWN_PROBLEMS, DataValidationError
from embedtune.errors import DataError

G = '{"query": "q", "pos_doc": "p"}'  # a good inline line


def _cid(*records: object, corpus: str = '[{"path": "wiki"}]') -> str:
    """Corpus-ID JSON with one record per line: record k starts on line k + 3."""
    body = ",\n".join(json.dumps(r) for r in records)
    return f'{{"corpus": {corpus},\n"data": [\n{body}\n]}}\n'


def _rec(**kw: object) -> dict:
    base = {
        "question_id": "q1",
        "question": "q",
        "corpus_id": "wiki",
        "pos_doc": [{"id": "d1"}],
        "neg_doc": [{"id": "d2"}],
    }
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


GOOD_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\n"
GOOD_QUERIES = '{"_id": "q1", "text": "first"}\n'
GOOD_CORPUS = "".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in DOCS.items())

# (case id, which file is bad, its content, expected line, expected field, words in the message)
CASES: list[tuple[str, str, str | bytes, int | None, str, str]] = [
    # ---- inline JSONL
    ("inline-invalid-json", "inline", G + '\n{"query": "q", "pos_doc": }\n', 2, "(line)", "invalid JSON"),
    ("inline-json-array", "inline", "[" + G + "]\n", 1, "(file)", "a JSON array where JSONL"),
    ("inline-not-object", "inline", G + '\n"just a string"\n', 2, "(line)", "expected a JSON object"),
    ("inline-missing-query", "inline", '{"pos_doc": "p"}\n', 1, "query", "missing"),
    ("inline-empty-query", "inline", '{"query": "  ", "pos_doc": "p"}\n', 1, "query", "empty string"),
    (
        "inline-query-number",
        "inline",
        '{"query": 5, "pos_doc": "p"}\n',
        1,
        "query",
        "expected a string, got a number",
    ),
    ("inline-question-list", "inline", '{"question": [], "pos_doc": "p"}\n', 1, "question", "got a list"),
    ("inline-missing-pos", "inline", G + '\n{"query": "q"}\n', 2, "pos_doc", "missing"),
    ("inline-empty-pos-list", "inline", '{"query": "q", "pos_doc": []}\n', 1, "pos_doc", "empty list"),
    ("inline-empty-pos-string", "inline", '{"query": "q", "pos_doc": ""}\n', 1, "pos_doc", "empty string"),
    (
        "inline-pos-number",
        "inline",
        '{"query": "q", "pos_doc": 3}\n',
        1,
        "pos_doc",
        "expected a string or a list",
    ),
    (
        "inline-pos-item-number",
        "inline",
        '{"query": "q", "pos_doc": ["a", 3]}\n',
        1,
        "pos_doc[1]",
        "got a number",
    ),
    (
        "inline-pos-object-no-text",
        "inline",
        '{"query": "q", "pos_doc": [{"txt": "a"}]}\n',
        1,
        "pos_doc[0].text",
        "missing",
    ),
    (
        "inline-neg-item-empty",
        "inline",
        '{"query": "q", "pos_doc": "p", "neg_doc": ["", "x"]}\n',
        1,
        "neg_doc[0]",
        "empty string",
    ),
    (
        "inline-neg-bool",
        "inline",
        '{"query": "q", "pos_doc": "p", "neg_doc": true}\n',
        1,
        "neg_doc",
        "got a boolean",
    ),
    (
        "inline-pos-in-neg",
        "inline",
        '{"query": "q", "pos_doc": "p", "neg_doc": ["n", "p"]}\n',
        1,
        "neg_doc[1]",
        "also a positive",
    ),
    (
        "inline-non-utf8",
        "inline",
        (G + '\n{"query": "caf\xe9", "pos_doc": "p"}\n').encode("latin-1"),
        2,
        "(line)",
        "not UTF-8",
    ),
    (
        "inline-duplicate-id",
        "inline",
        '{"question_id": "a", "query": "q", "pos_doc": "p"}\n'
        + G
        + '\n{"question_id": "a", "query": "r", "pos_doc": "s"}\n',
        3,
        "question_id",
        "duplicate id 'a' (first at line 1)",
    ),
    (
        "inline-id-list",
        "inline",
        '{"question_id": [1], "query": "q", "pos_doc": "p"}\n',
        1,
        "question_id",
        "expected a non-empty string",
    ),
    ("inline-blank-lines-keep-numbers", "inline", G + "\n\n\n{oops}\n", 4, "(line)", "invalid JSON"),
    # ---- corpus-ID JSON
    (
        "cid-invalid-json",
        "cid",
        '{"corpus": [{"path": "wiki"}],\n"data": [\n{"question": }\n]}',
        3,
        "(file)",
        "invalid JSON",
    ),
    (
        "cid-two-values",
        "cid",
        '{"corpus": [], "data": []}\n{"corpus": [], "data": []}\n',
        2,
        "(file)",
        "Extra data",
    ),
    ("cid-top-level-list", "cid", "[]\n", 1, "(file)", "top level is a list"),
    ("cid-missing-data", "cid", '{"corpus": [{"path": "wiki"}]}', None, "data", "missing"),
    (
        "cid-corpus-not-list",
        "cid",
        '{"corpus": "wiki", "data": []}',
        None,
        "corpus",
        "expected an object or a list",
    ),
    (
        "cid-corpus-folder-missing",
        "cid",
        '{"corpus": [{"path": "nope"}], "data": []}',
        None,
        "corpus[0].path",
        "does not exist",
    ),
    (
        "cid-unknown-corpus-id",
        "cid",
        _cid(_rec(), _rec(question_id="q2", corpus_id="web")),
        4,
        "data[1].corpus_id",
        "unknown corpus id 'web'",
    ),
    (
        "cid-unknown-pos-id",
        "cid",
        _cid(_rec(pos_doc=[{"id": "zz"}])),
        3,
        "data[0].pos_doc[0].id",
        "unknown document id 'zz'",
    ),
    (
        "cid-unknown-neg-plain-id",
        "cid",
        _cid(_rec(neg_doc=["d3", "nope"])),
        3,
        "data[0].neg_doc[1]",
        "unknown document id 'nope'",
    ),
    ("cid-missing-question", "cid", _cid(_rec(question=...)), 3, "data[0].question", "missing"),
    ("cid-pos-not-list", "cid", _cid(_rec(pos_doc="d1")), 3, "data[0].pos_doc", "expected a list"),
    ("cid-pos-empty", "cid", _cid(_rec(pos_doc=[])), 3, "data[0].pos_doc", "empty list"),
    (
        "cid-pos-entry-without-id",
        "cid",
        _cid(_rec(pos_doc=[{"doc": "d1"}])),
        3,
        "data[0].pos_doc[0].id",
        "missing",
    ),
    (
        "cid-id-wrong-type",
        "cid",
        _cid(_rec(neg_doc=[{"id": 1.5}])),
        3,
        "data[0].neg_doc[0].id",
        "got a number",
    ),
    (
        "cid-duplicate-question-id",
        "cid",
        _cid(_rec(), _rec()),
        4,
        "data[1].question_id",
        "duplicate question_id 'q1'",
    ),
    (
        "cid-pos-in-neg",
        "cid",
        _cid(_rec(neg_doc=[{"id": "d1"}])),
        3,
        "data[0].neg_doc[0].id",
        "also a positive",
    ),
    ("cid-record-not-object", "cid", _cid(_rec(), 5), 4, "data[1]", "expected an object"),
    # ---- the corpus folder of a corpus-ID file
    ("docs-missing-id", "docs", '{"id": "d1", "text": "a"}\n{"text": "b"}\n', 2, "id", "missing"),
    (
        "docs-duplicate-id",
        "docs",
        '{"id": "d1", "text": "a"}\n{"id": "d2", "text": "b"}\n{"id": "d1", "text": "c"}\n',
        3,
        "id",
        "duplicate document id 'd1'",
    ),
    (
        "docs-text-not-string",
        "docs",
        '{"id": "d1", "text": "a"}\n{"id": "d2", "text": {"x": 1}}\n',
        2,
        "text",
        "expected a string, got an object",
    ),
    (
        "docs-invalid-json",
        "docs",
        '{"id": "d1", "text": "a"}\n{"id": "d2", "text": "b"\n',
        2,
        "(line)",
        "invalid JSON",
    ),
    (
        "docs-empty-text",
        "docs",
        '{"id": "d1", "text": "a"}\n{"id": "d2", "text": "   "}\n',
        2,
        "text",
        "empty",
    ),
    (
        "docs-non-utf8",
        "docs",
        b'{"id": "d1", "text": "a"}\n{"id": "d2", "text": "\xff"}\n',
        2,
        "(line)",
        "not UTF-8",
    ),
    ("meta-missing", "meta", "", None, "merlin_metadata.json", "no merlin_metadata.json"),
    ("meta-no-corpus-id", "meta", '{"class": "TextQADataset"}', None, "corpus_id", "missing"),
    # ---- BEIR
    ("qrels-columns", "qrels", GOOD_QRELS + "q1 d2 1\n", 3, "(line)", "expected 3 tab-separated columns"),
    ("qrels-score", "qrels", GOOD_QRELS + "q1\td2\thigh\n", 3, "score", "'high' is not an integer"),
    ("qrels-unknown-query", "qrels", GOOD_QRELS + "q9\td2\t1\n", 3, "query-id", "unknown query id 'q9'"),
    ("qrels-unknown-doc", "qrels", GOOD_QRELS + "q1\tzz\t1\n", 3, "corpus-id", "unknown document id 'zz'"),
    ("qrels-duplicate", "qrels", GOOD_QRELS + "q1\td1\t2\n", 3, "corpus-id", "duplicate judgement"),
    ("queries-missing-id", "queries", GOOD_QUERIES + '{"text": "second"}\n', 2, "_id", "missing"),
    (
        "beir-corpus-missing-id",
        "corpus",
        GOOD_CORPUS + '{"title": "t", "text": "x"}\n',
        len(DOCS) + 1,
        "_id",
        "missing",
    ),
    (
        "negatives-unknown-doc",
        "negatives",
        '{"query_id": "q1", "neg_doc": ["d2", "zz"]}\n',
        1,
        "neg_doc[1]",
        "unknown document id 'zz'",
    ),
    (
        "negatives-unknown-query",
        "negatives",
        '{"query_id": "q7", "neg_doc": ["d2"]}\n',
        1,
        "query_id",
        "has no positive",
    ),
]


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def _setup(root: Path, kind: str, content: str | bytes) -> tuple[Path, dict, Path]:
    """Write a data set whose `kind` file is `content`; return (path to read, read kwargs, the bad file)."""
    if kind == "inline":
        _write(root / "train.jsonl", content)
        return root / "train.jsonl", {}, root / "train.jsonl"
    if kind in ("cid", "docs", "meta"):
        write_corpus_folder(root / "wiki", DOCS)
        _write(root / "train.json", content if kind == "cid" else _cid(_rec()))
        if kind == "docs":
            _write(root / "wiki" / "docs.jsonl", content)
            return root / "train.json", {}, root / "wiki" / "docs.jsonl"
        if kind == "meta":
            meta = root / "wiki" / "merlin_metadata.json"
            if content:
                _write(meta, content)
                return root / "train.json", {}, meta
            meta.unlink()
            return root / "train.json", {}, root / "wiki"
        return root / "train.json", {}, root / "train.json"
    # BEIR
    _write(root / "corpus.jsonl", content if kind == "corpus" else GOOD_CORPUS)
    _write(root / "queries.jsonl", content if kind == "queries" else GOOD_QUERIES)
    _write(root / "qrels" / "train.tsv", content if kind == "qrels" else GOOD_QRELS)
    bad = {"corpus": "corpus.jsonl", "queries": "queries.jsonl", "qrels": "qrels/train.tsv"}.get(kind)
    if kind == "negatives":
        _write(root / "negatives.jsonl", content)
        return root, {"negatives": str(root / "negatives.jsonl")}, root / "negatives.jsonl"
    assert bad is not None
    return root, {}, root / bad


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("case", "kind", "content", "line", "field", "words"), CASES, ids=[c[0] for c in CASES]
)
def test_malformed_input_is_reported_exactly(
    tmp_path: Path, case: str, kind: str, content: str | bytes, line: int | None, field: str, words: str
) -> None:
    path, kwargs, bad_file = _setup(tmp_path / "ds", kind, content)
    with pytest.raises(DataValidationError) as info:
        read_training_file(path, **kwargs)
    first = info.value.problems[0]
    where = f"{bad_file}:{line}" if line is not None else f"{bad_file}"
    assert str(first).startswith(f"{where}: {field}: "), str(first)
    assert words in first.what, str(first)
    assert first.fix and " — " in str(first)  # every problem says how to fix it
    assert str(first) in str(info.value)  # and the error message shows it


def test_all_problems_are_collected_then_counted(tmp_path: Path) -> None:
    lines = [G] + ['{"query": "q"}'] * 30 + ["{bad json"] * 5
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError) as info:
        read_training_file(path)
    err = info.value
    assert err.total == 35 and len(err.problems) == 35
    message = str(err).splitlines()
    assert message[0].startswith("35 problems")
    assert (
        len(message) == 1 + SHOWN_PROBLEMS + 1
        and message[-1].strip() == f"... and {35 - SHOWN_PROBLEMS} more"
    )
    # Problems come in file order, the last lines included.
    assert [p.line for p in err.problems] == list(range(2, 37))


def test_skip_mode_drops_and_counts_with_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([G, '{"query": "q"}', G.replace('"q"', '"r"'), "{bad"]) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = read_training_file(path, on_bad_row="skip")
    skip_warnings = [w for w in caught if "skipped" in str(w.message)]
    assert len(skip_warnings) == 1 and "skipped 2 bad row(s)" in str(skip_warnings[0].message)
    assert len(data) == 2 and data.skipped_rows == 2 and data.problem_count == 2
    assert [p.line for p in data.problems] == [2, 4]


def test_skip_mode_on_corpus_id_keeps_good_records(tmp_path: Path) -> None:
    path, _, _ = _setup(
        tmp_path, "cid", _cid(_rec(), _rec(question_id="q2", pos_doc=[{"id": "zz"}]), _rec(question_id="q3"))
    )
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        data = read_training_file(path, on_bad_row="skip")
    assert [ex.query_id for ex in data.examples] == ["q1", "q3"]


# ---------------------------------------------------------------------- property test

_VALID_INLINE = (
    b'{"question_id": "a", "query": "what is x", "pos_doc": ["x is y"], "neg_doc": [{"text": "z"}, "w"]}\n'
    b'{"id": 7, "question": "and q", "pos_doc": "p", "neg_doc": []}\n'
)
_VALID_CID = _cid(_rec(), _rec(question_id="q2", pos_doc=["d3"], neg_doc=[{"id": "d4"}, "d5"])).encode()
_VALID_DOCS = "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in list(DOCS.items())[:5]).encode()

_corruption = st.lists(
    st.tuples(
        st.sampled_from(["flip", "delete", "insert", "truncate"]),
        st.floats(0, 1, allow_nan=False),
        st.binary(min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=4,
)


def _corrupt(data: bytes, ops: list[tuple[str, float, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, where, noise in ops:
        i = int(where * max(len(buf) - 1, 0))
        if op == "flip" and buf:
            buf[i] = noise[0]
        elif op == "delete":
            del buf[i : i + len(noise)]
        elif op == "insert":
            buf[i:i] = noise
        elif op == "truncate":
            del buf[i:]
    return bytes(buf)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(["inline", "cid", "docs", "corpus", "queries", "qrels"]), ops=_corruption)
def test_random_corruption_raises_only_our_error(target: str, ops: list[tuple[str, float, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "cache"
        if target == "inline":
            _write(root / "t.jsonl", _corrupt(_VALID_INLINE, ops))
            path = root / "t.jsonl"
        elif target in ("corpus", "queries", "qrels"):
            # BEIR: the corpus goes through Arrow's JSON reader first, the rest line by line.
            valid = {"corpus": GOOD_CORPUS, "queries": GOOD_QUERIES, "qrels": GOOD_QRELS}
            for kind, name in (
                ("corpus", "corpus.jsonl"),
                ("queries", "queries.jsonl"),
                ("qrels", "qrels/train.tsv"),
            ):
                content = valid[kind].encode()
                _write(root / "b" / name, _corrupt(content, ops) if kind == target else content)
            path = root / "b"
        else:
            write_corpus_folder(root / "wiki", DOCS)
            write_jsonl(
                root / "wiki" / "docs.jsonl", [{"id": k, "text": v} for k, v in list(DOCS.items())[:5]]
            )
            _write(root / "train.json", _corrupt(_VALID_CID, ops) if target == "cid" else _VALID_CID)
            if target == "docs":
                _write(root / "wiki" / "docs.jsonl", _corrupt(_VALID_DOCS, ops))
            path = root / "train.json"
        for mode in ("error", "skip"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = read_training_file(path, on_bad_row=mode, cache_dir=cache, format=None)
            except DataError as exc:
                assert str(exc)  # our error, with a message
            else:
                # Whatever was accepted is consistent: every reference resolves to a corpus row.
                for ex in data.examples:
                    assert ex.positives and all(
                        0 <= r < len(data.corpus) for r in ex.positives + ex.negatives
                    )


def test_empty_data_list_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path, _, _ = _setup(tmp_path, "cid", '{"corpus": [{"path": "wiki"}], "data": []}')
    with pytest.raises(DataValidationError, match="data: no records"):
        read_training_file(path)
