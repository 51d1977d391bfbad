"""The three readers on small fixtures, and the same examples read from every layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import DOCS, EXAMPLES, write_corpus_folder, write_jsonl

from embedtune.data.config import DataConfig
from embedtune.data.dataset import TrainDataset
from embedtune.data.formats import ConcatCorpus, detect_format, load_beir, read_training_file
from embedtune.data.problems import DataValidationError
from embedtune.errors import DataError


def _as_texts(data) -> list[tuple[str, str, list[str], list[str]]]:
    """(query id, query, positive texts, negative texts) of every example, layout-independent."""
    out = []
    for ex in data.examples:
        out.append(
            (
                ex.query_id,
                ex.query,
                data.corpus.texts(list(ex.positives)),
                data.corpus.texts(list(ex.negatives)),
            )
        )
    return out


EXPECTED = [(qid, q, [DOCS[d] for d in pos], [DOCS[d] for d in neg]) for qid, q, pos, neg in EXAMPLES]


def test_inline_reader(inline_file: Path) -> None:
    data = read_training_file(inline_file)
    assert data.format == "inline"
    assert _as_texts(data) == EXPECTED
    # Identical passages share one corpus row, wherever they appear.
    assert len(data.corpus) == len(DOCS)
    assert [ex.line for ex in data.examples] == list(range(1, len(EXAMPLES) + 1))


def test_corpus_id_reader(corpus_id_file: Path) -> None:
    data = read_training_file(corpus_id_file)
    assert data.format == "corpus_id"
    assert _as_texts(data) == EXPECTED
    assert len(data.corpus) == len(DOCS)
    # Records are reported by the line they start on (indent=2 JSON: each record spans several lines).
    lines = [ex.line for ex in data.examples]
    assert lines == sorted(lines) and len(set(lines)) == len(lines) and lines[0] > 1


def test_beir_reader_with_mined_negatives(beir_folder: Path) -> None:
    data = read_training_file(beir_folder, negatives=beir_folder / "negatives.jsonl")
    assert data.format == "beir"
    assert sorted(_as_texts(data)) == sorted(EXPECTED)


def test_beir_reader_without_negatives_has_empty_lists(beir_folder: Path) -> None:
    data = read_training_file(beir_folder)
    assert len(data) == len(EXAMPLES)
    assert (data.negative_counts() == 0).all()


def test_load_beir_joins_title_and_text_and_keeps_zero_scores(tmp_path: Path) -> None:
    root = tmp_path / "b"
    write_jsonl(
        root / "corpus.jsonl", [{"_id": "a", "title": "Title", "text": "body"}, {"_id": "b", "text": "other"}]
    )
    write_jsonl(root / "queries.jsonl", [{"_id": "1", "text": "q one"}, {"_id": "2", "text": "q two"}])
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\ta\t1\n1\tb\t0\n")
    split = load_beir(root, "test")
    assert split.corpus.text(split.corpus.index_of("a")) == "Title body"
    assert split.corpus.text(split.corpus.index_of("b")) == "other"
    assert split.queries == {"1": "q one"}  # only judged queries
    assert split.qrels == {"1": {"a": 1, "b": 0}}


def test_load_beir_names_available_splits(beir_folder: Path) -> None:
    with pytest.raises(DataError, match="available splits: train"):
        load_beir(beir_folder, "dev")


def test_corpus_id_relative_paths_resolve_against_the_json_file(corpus_id_file: Path, monkeypatch) -> None:
    monkeypatch.chdir(corpus_id_file.parent.parent.parent)  # somewhere else entirely
    assert len(read_training_file(corpus_id_file)) == len(EXAMPLES)


def test_corpus_id_instructions_come_from_metadata(tmp_path: Path) -> None:
    write_corpus_folder(
        tmp_path / "a", {"x": "doc x"}, corpus_id="A", query_instruction="Find: ", passage_instruction=""
    )
    write_corpus_folder(
        tmp_path / "b", {"x": "doc b-x", "y": "doc y"}, corpus_id="B", query_instruction="Other: "
    )
    doc = {
        "corpus": [{"path": "a"}, {"path": "b"}],
        "data": [
            {"question": "qa", "corpus_id": "A", "pos_doc": [{"id": "x"}]},
            {"question": "qb", "corpus_id": "B", "pos_doc": [{"id": "x"}], "neg_doc": [{"id": "y"}]},
        ],
    }
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    data = read_training_file(path)
    assert isinstance(data.corpus, ConcatCorpus)
    # The same ID in two corpora resolves within the record's own corpus.
    assert data.corpus.text(data[0].positives[0]) == "doc x"
    assert data.corpus.text(data[1].positives[0]) == "doc b-x"
    assert data.instructions_of(0).query == "Find: " and data.instructions_of(0).passage is None
    assert data.instructions_of(1).query == "Other: "


def test_parquet_corpus_folder(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    (folder / "merlin_metadata.json").write_text(json.dumps({"class": "TextQADataset", "corpus_id": "pq"}))
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["alpha", "beta"]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": ["c"], "text": ["gamma"]}), folder / "part-1.parquet")
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "corpus": [{"path": "pq"}],
                "data": [{"question": "q", "pos_doc": [{"id": "c"}], "neg_doc": ["a"]}],
            }
        )
    )
    data = read_training_file(path)
    assert data.corpus.texts([data[0].positives[0], data[0].negatives[0]]) == ["gamma", "alpha"]
    assert data.corpus.location(data[0].positives[0]) == (str(folder / "part-1.parquet"), 1)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.jsonl", '{"query": "q", "pos_doc": "p"}\n', "inline"),
        ("a.json", '{"corpus": [], "data": []}', "corpus_id"),
        ("a.json", '{"query": "q", "pos_doc": "p"}\n{"query": "r", "pos_doc": "s"}\n', "inline"),
    ],
)
def test_detect_format_from_path(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert detect_format(path) == expected


def test_detect_format_beir_and_refusals(beir_folder: Path, corpus_id_file: Path, tmp_path: Path) -> None:
    assert detect_format(beir_folder) == "beir"
    with pytest.raises(DataValidationError, match="is a corpus folder"):
        detect_format(corpus_id_file.parent / "wiki_corpus")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataValidationError, match="format: cannot tell"):
        detect_format(tmp_path / "x.csv")


def test_format_override_reads_jsonl_named_txt(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text('{"query": "q", "pos_doc": "p"}\n')
    assert len(read_training_file(path, format="inline")) == 1


def test_all_layouts_give_identical_batches(
    inline_file: Path, corpus_id_file: Path, beir_folder: Path, minilm_tokenizer
) -> None:
    """Same examples, same config, same seed: the collated tensors are equal whatever the layout.

    n_passages=2 needs no random fill (every example has a negative): fills draw corpus rows, whose
    numbering depends on the layout.
    """
    from embedtune.data.collator import BiEncoderCollator

    collator = BiEncoderCollator(
        minilm_tokenizer, q_max_len=16, p_max_len=24, pad_to_multiple_of=8, query_prefix="query: "
    )
    batches = []
    for path, extra in (
        (inline_file, {}),
        (corpus_id_file, {}),
        (beir_folder, {"negatives": str(beir_folder / "negatives.jsonl")}),
    ):
        config = DataConfig(datasets=[{"path": str(path), **extra}], n_passages=2, seed=7)
        ds = TrainDataset.from_config(config, batch_size=3)
        epoch_batches = []
        for epoch in range(3):
            ds.set_epoch(epoch)
            epoch_batches.append(collator([ds[i] for i in range(len(ds))]))
        batches.append(epoch_batches)
    # BEIR lists queries in qrels order, which equals the file order here: all three must agree.
    for other in batches[1:]:
        for a, b in zip(batches[0], other):
            for part in ("query", "passages"):
                for key in ("input_ids", "attention_mask", "pooling_mask"):
                    assert a[part][key].shape == b[part][key].shape
                    assert (a[part][key] == b[part][key]).all()
            assert (a["doc_ids"] == b["doc_ids"]).all()
    # And the data really changed between epochs (else the comparison above proves little).
    assert not (
        batches[0][0]["passages"]["input_ids"].shape == batches[0][1]["passages"]["input_ids"].shape
        and (batches[0][0]["passages"]["input_ids"] == batches[0][1]["passages"]["input_ids"]).all()
    )


def test_examples_store_rows_not_texts(corpus_id_file: Path) -> None:
    data = read_training_file(corpus_id_file)
    assert data.pos_rows.dtype == np.int64 and data.neg_rows.dtype == np.int64
    assert data.neg_offsets[-1] == sum(len(n) for *_, n in EXAMPLES)


def test_repeated_documents_in_a_list_are_used_once_with_a_warning(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"query": "a", "pos_doc": "p", "neg_doc": ["n1", "n2", "n1"]},
            {"query": "b", "pos_doc": ["p2", "p2"], "neg_doc": ["n3"]},
            {"query": "c", "pos_doc": "p3", "neg_doc": ["n4"]},
        ],
    )
    with pytest.warns(UserWarning, match="2 example"):
        data = read_training_file(path)
    assert [len(ex.negatives) for ex in data.examples] == [2, 1, 1]
    assert [len(ex.positives) for ex in data.examples] == [1, 1, 1]


def test_corpus_folder_json_lines_file(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "merlin_metadata.json").write_text(json.dumps({"class": "TextQADataset", "corpus_id": "c"}))
    write_jsonl(folder / "docs.json", [{"id": "a", "text": "alpha"}])  # JSON Lines under .json, as HF writes
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps({"corpus": [{"path": "c"}], "data": [{"question": "q", "pos_doc": [{"id": "a"}]}]})
    )
    assert read_training_file(path).corpus.text(0) == "alpha"
