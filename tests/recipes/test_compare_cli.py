"""``embedtune eval`` confidence intervals and ``embedtune compare`` end to end on a tiny model."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from embedtune.cli import main

scipy_stats = pytest.importorskip("scipy.stats")

MODEL = "tiny-bert"  # random 2-layer BERT from the model zoo


def _write_beir(root, n_queries=40, n_docs=80):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    docs = {f"d{i}": " ".join(rng.choices(words, k=12)) for i in range(n_docs)}
    queries = {f"q{i}": " ".join(docs[f"d{i}"].split()[:5]) for i in range(n_queries)}
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in docs.items())
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items())
    )
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n_queries))
    )
    return root, docs, queries


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_eval_ci_and_compare(tmp_path, capsys):
    data, _docs, queries = _write_beir(tmp_path / "tiny")
    out, run = tmp_path / "a.json", tmp_path / "a.trec"
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
            "--ci-resamples",
            "2000",
            "--seed",
            "3",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "95% CI (bootstrap over 40 queries" in printed
    res = json.loads(out.read_text())
    assert len(res["per_query"]) == 40  # saved always, without --per-query
    # The printed/saved interval is scipy's percentile bootstrap over the per-query values (sorted qids).
    qids = sorted(res["per_query"])
    values = np.array([res["per_query"][q]["ndcg@10"] for q in qids])
    ref = scipy_stats.bootstrap(
        (values,),
        np.mean,
        vectorized=True,
        n_resamples=2000,
        rng=np.random.default_rng(3),
        method="percentile",
    ).confidence_interval
    np.testing.assert_allclose(res["ci"]["ndcg@10"], [ref.low, ref.high], atol=1e-9)
    assert res["ci"]["ndcg@10"][0] <= res["metrics"]["ndcg@10"] <= res["ci"]["ndcg@10"][1]

    # A perfect run (each query's relevant document first) vs the tiny model's run.
    perfect = tmp_path / "perfect.trec"
    perfect.write_text("".join(f"{q} Q0 d{q[1:]} 1 1.0 perfect\n" for q in queries))
    cmp_out = tmp_path / "cmp.json"
    rc = main(
        [
            "compare",
            str(perfect),
            str(run),
            "--qrels",
            str(data),
            "--resamples",
            "2000",
            "--output",
            str(cmp_out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    rows = {r["metric"]: r for r in json.loads(cmp_out.read_text())["metrics"]}
    assert rows["ndcg@10"]["a"] == 1.0
    assert rows["ndcg@10"]["b"] == pytest.approx(res["metrics"]["ndcg@10"], abs=1e-12)
    assert rows["ndcg@10"]["significant"] and "ndcg@10: A is better by" in printed

    # JSON and TREC forms of the same evaluation give the same per-query numbers, hence the same test.
    rc = main(["compare", str(out), str(run), "--qrels", str(data), "--resamples", "500"])
    printed = capsys.readouterr().out
    assert rc == 0 and "NOT significant" in printed and "+0.0000" in printed


def test_compare_errors_are_one_line(tmp_path, capsys):
    _write_beir(tmp_path / "tiny")
    run = tmp_path / "r.trec"
    run.write_text("q1 Q0 d1 1 1.0 x\n")
    assert main(["compare", str(run), str(run)]) == 2
    err = capsys.readouterr().err
    assert "needs --qrels" in err and "Traceback" not in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"per_query": {"zz": {"ndcg@10": 1.0}}}))
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"per_query": {"q1": {"ndcg@10": 1.0}}}))
    assert main(["compare", str(other), str(same)]) == 2
    assert "not evaluated on the same queries" in capsys.readouterr().err
