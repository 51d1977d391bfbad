"""``embedtune eval`` and ``embedtune search`` end to end on tiny data with real (small) models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedtune.cli import main

pytrec_eval = pytest.importorskip("pytrec_eval")

MODEL = "tiny-bert"  # random 2-layer BERT from the model zoo: seconds, no download

DOCS = {
    "d1": ("Sleep", "Sleep deprivation impairs memory consolidation in adults."),
    "d2": ("Diet", "A high-fibre diet lowers the risk of colon cancer."),
    "d3": ("Virus", "The influenza virus binds to sialic acid receptors."),
    "d4": ("Heart", "Statins reduce cardiovascular events in high-risk patients."),
    "d5": ("Mice", "Knockout mice lacking the gene show enlarged brains."),
    "d6": ("Blood", "Anaemia is common in chronic kidney disease."),
}
QUERIES = {
    "q1": "does lack of sleep hurt memory",
    "q2": "fibre and colon cancer",
    "q3": "statins and heart attacks",
}
QRELS = {"q1": {"d1": 2, "d6": 0}, "q2": {"d2": 1}, "q3": {"d4": 1, "d5": 1}}


def write_beir(root: Path, qrels=QRELS, docs=DOCS) -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": t, "text": x}) + "\n" for d, (t, x) in docs.items())
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items())
    )
    lines = ["query-id\tcorpus-id\tscore"] + [
        f"{q}\t{d}\t{r}" for q, j in qrels.items() for d, r in j.items()
    ]
    (root / "qrels" / "test.tsv").write_text("\r\n".join(lines) + "\r\n")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_eval_prints_table_writes_json_and_a_run_that_trec_eval_scores_the_same(tmp_path, capsys):
    data = write_beir(tmp_path / "tiny")
    out, run = tmp_path / "res.json", tmp_path / "run.trec"
    rc = main(
        [
            "eval",
            "--model",
            MODEL,
            "--data",
            str(data),
            "--output",
            str(out),
            "--run",
            str(run),
            "--per-query",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    for col in ("NDCG@10", "Recall@1", "Recall@10", "Recall@100", "MRR@10", "MAP@100"):
        assert col in printed
    res = json.loads(out.read_text())
    assert res["num_queries"] == 3 and res["num_docs"] == 6 and set(res["per_query"]) == set(QUERIES)
    with open(run) as f:
        parsed = pytrec_eval.parse_run(f)
    ref = pytrec_eval.RelevanceEvaluator(QRELS, {"ndcg_cut.10", "recall.1,10,100", "map_cut.100"}).evaluate(
        parsed
    )
    for ours, theirs in (("ndcg@10", "ndcg_cut_10"), ("recall@1", "recall_1"), ("map@100", "map_cut_100")):
        expected = sum(m[theirs] for m in ref.values()) / len(ref)
        assert res["metrics"][ours] == pytest.approx(expected, abs=1e-9)
    assert f"{res['metrics']['ndcg@10']:.4f}" in printed

    # The second evaluation of the same model and corpus encodes no documents.
    assert main(["eval", "--model", MODEL, "--data", str(data)]) == 0
    assert "corpus embeddings from cache" in capsys.readouterr().out


def test_eval_on_inline_jsonl(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    rows = [{"query": QUERIES[q], "pos_doc": DOCS[next(iter(j))][1]} for q, j in QRELS.items()]
    rows[0]["neg_doc"] = [DOCS["d6"][1]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res.json"
    assert main(["eval", "--model", MODEL, "--data", str(path), "--output", str(out), "--k", "1", "3"]) == 0
    res = json.loads(out.read_text())
    assert res["num_queries"] == 3 and res["num_docs"] == 4
    assert set(res["metrics"]) >= {"ndcg@3", "recall@1", "mrr@3"}


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    data = write_beir(tmp_path / "tiny")
    assert main(["eval", "--model", str(tmp_path), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not a model folder" in err and "Traceback" not in err

    bad = write_beir(tmp_path / "bad", qrels={**QRELS, "q9": {"d1": 1}, "q2": {"d2": 1, "d99": 1}})
    assert main(["eval", "--model", MODEL, "--data", str(bad)]) == 0
    err = capsys.readouterr().err
    assert (
        "warning" in err
        and "skipped 1 line(s) with query-id" in err
        and "judged documents are not in the corpus (e.g. ['d99'])" in err
        and "never retrieved, as in trec_eval" in err
    )
    assert main(["eval", "--model", MODEL, "--data", str(bad), "--skip-unknown-docs"]) == 0
    assert "they are skipped (--skip-unknown-docs" in capsys.readouterr().err
    assert main(["eval", "--model", MODEL, "--data", str(bad), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "q9" in err and "d99" in err and "test.tsv" in err

    empty = write_beir(tmp_path / "empty", docs={})
    assert main(["eval", "--model", MODEL, "--data", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err

    assert main(["eval", "--model", MODEL, "--data", str(data), "--split", "dev"]) == 2
    assert "available splits" in capsys.readouterr().err


def test_search_ranks_a_document_first_for_its_own_text(tmp_path, capsys):
    data = write_beir(tmp_path / "tiny")
    query = (DOCS["d3"][0] + " " + DOCS["d3"][1]).strip()  # exactly the document's text
    assert main(["search", "--model", MODEL, "--corpus", str(data), "-k", "3", "--json", query]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["id"] == "d3" and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    assert main(["search", "--model", MODEL, "--corpus", str(data / "corpus.jsonl"), "-k", "2", query]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == f"query: {query}" and "d3" in table.splitlines()[1]


def test_cli_subprocess_help_lists_eval_and_search():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "embedtune.cli", "eval", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "--data" in out and "--run" in out and "--strict" in out
