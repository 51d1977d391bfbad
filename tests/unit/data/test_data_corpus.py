"""The memory-mapped corpus: lookups, line numbers, caching, fingerprints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _data_helpers import write_jsonl

from embedtune.data.corpus import Corpus, text_hash
from embedtune.data.problems import DataValidationError

ROWS = [{"_id": f"doc{i}", "title": f"T{i}" if i % 2 else "", "text": f"text number {i}"} for i in range(300)]


def _beir_corpus(tmp_path: Path, rows=ROWS, blank_every: int = 0) -> Path:
    path = tmp_path / "corpus.jsonl"
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r))
        if blank_every and i % blank_every == 0:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lookup_by_row_and_id(tmp_path: Path) -> None:
    c = Corpus.from_jsonl(_beir_corpus(tmp_path), id_field="_id", title_field="title")
    assert len(c) == 300 and c.ids[0] == "doc0" and c.ids[-1] == "doc299"
    assert c.text(0) == "text number 0" and c.text(1) == "T1 text number 1"
    for i in (0, 7, 150, 299):
        assert c.index_of(f"doc{i}") == i and c.get_index(f"doc{i}") == i
    assert c.get_index("doc300") is None and c.get_index("") is None
    with pytest.raises(KeyError, match="doc-x"):
        c.index_of("doc-x")
    assert c.indices_of(["doc5", "nope", "doc299"]).tolist() == [5, -1, 299]
    idx = list(range(299, -1, -3))
    assert c.texts(idx) == [c.text(i) for i in idx]  # the bulk (Arrow take) path agrees
    assert list(c.ids) == [r["_id"] for r in ROWS]
    with pytest.raises(IndexError):
        c.text(300)


def test_line_numbers_survive_blank_lines(tmp_path: Path) -> None:
    path = _beir_corpus(tmp_path, blank_every=50)  # blank lines push later rows down
    c = Corpus.from_jsonl(path, id_field="_id")
    lines = path.read_text().split("\n")
    for i in (0, 49, 51, 120, 299):
        file, line = c.location(i)
        assert file == str(path) and json.loads(lines[line - 1])["_id"] == f"doc{i}"


def test_cache_is_reused_until_the_file_changes(tmp_path: Path) -> None:
    path = _beir_corpus(tmp_path)
    a = Corpus.from_jsonl(path, id_field="_id")
    b = Corpus.from_jsonl(path, id_field="_id")
    assert a.directory == b.directory and a.fingerprint == b.fingerprint
    rows = [*ROWS[:-1], {"_id": "doc299", "text": "changed"}]
    _beir_corpus(tmp_path, rows)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file systems
    c = Corpus.from_jsonl(path, id_field="_id")
    assert c.directory != a.directory and c.fingerprint != a.fingerprint
    assert c.text(299) == "changed"


def test_fingerprint_is_content_based(tmp_path: Path) -> None:
    one, two = tmp_path / "1", tmp_path / "2"
    one.mkdir()
    two.mkdir()
    a = Corpus.from_jsonl(_beir_corpus(one), id_field="_id")
    b = Corpus.from_jsonl(_beir_corpus(two), id_field="_id")
    assert a.directory != b.directory and a.fingerprint == b.fingerprint


def test_cached_problems_are_reported_again(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}, {"text": "z"}]
    )
    for _ in range(2):
        with pytest.raises(DataValidationError) as info:
            Corpus.from_jsonl(path)
        assert {p.line for p in info.value.problems} == {2, 3}
    with pytest.warns(UserWarning, match="skipped"):
        skipped = Corpus.from_jsonl(path, on_bad_row="skip")
    again = Corpus.from_jsonl(path, on_bad_row="skip")  # from cache: problems still attached
    assert again.problem_count == skipped.problem_count == 2
    assert again.index_of("a") == 0 and again.text(0) == "x"  # the first of a duplicate wins


def test_integer_ids_are_strings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 10, "text": "x"}, {"id": "b", "text": "y"}])
    c = Corpus.from_jsonl(path)
    assert c.index_of("10") == 0 and c.ids[0] == "10"


def test_from_texts_and_text_hash(tmp_path: Path) -> None:
    c = Corpus.from_texts(["alpha", "beta"], ["a", "b"])
    assert c.texts([1, 0]) == ["beta", "alpha"] and c.index_of("b") == 1
    assert text_hash("alpha") == text_hash("alpha") != text_hash("beta")
    assert 0 <= text_hash("é" * 100) < 2**63


def test_cache_folder_is_complete_after_a_build(tmp_path: Path) -> None:
    c = Corpus.from_jsonl(_beir_corpus(tmp_path), id_field="_id")
    names = {p.name for p in c.directory.iterdir()}
    assert {"docs.arrow", "sorted_ids.arrow", "order.npy", "lines.npy", "meta.json"} <= names
    # No half-written temporary folders are left beside it.
    assert not [p for p in c.directory.parent.iterdir() if p.name.startswith("tmp-")]


def test_pickles_as_its_cache_folder(tmp_path: Path) -> None:
    import pickle

    c = Corpus.from_jsonl(_beir_corpus(tmp_path), id_field="_id")
    blob = pickle.dumps(c)
    assert len(blob) < 1000  # the folder name, not the documents
    again = pickle.loads(blob)
    assert len(again) == len(c) and again.text(123) == c.text(123) and again.index_of("doc7") == 7


def test_read_only_default_cache_falls_back_to_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(blocked))  # mkdir under a file fails
    c = Corpus.from_texts(["only text in a fallback cache " + str(tmp_path)])
    assert c.text(0).startswith("only text") and not str(c.directory).startswith(str(blocked))
    import shutil

    shutil.rmtree(c.directory)  # it lives in the shared temp folder: leave nothing behind
