"""evaluate_retrieval: the top-k run and its metrics equal trec_eval on the full score list; caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedtune.errors import DataError
from embedtune.eval.datasets import EvalDataWarning, eval_set_from_dicts, load_eval_set
from embedtune.eval.metrics import trec_order
from embedtune.eval.retrieval import evaluate_retrieval, run_evaluation, write_trec_run

pytrec_eval = pytest.importorskip("pytrec_eval")

K = (1, 5, 10)


def full_run(encoder, eval_set):
    """Every query against every document: the run a brute-force evaluator would score."""
    ids = list(eval_set.corpus.ids)
    d = encoder._embed(eval_set.corpus.texts(range(len(ids))))
    qids = list(eval_set.queries)
    q = encoder._embed([eval_set.queries[x] for x in qids])
    scores = (torch.from_numpy(q) @ torch.from_numpy(d).T).tolist()
    return {qid: dict(zip(ids, row)) for qid, row in zip(qids, scores)}


def trec_reference(qrels, run, k_values):
    cuts = ",".join(map(str, k_values))
    measures = {f"ndcg_cut.{cuts}", f"recall.{cuts}", f"map_cut.{cuts}", f"P.{cuts}"}
    per_q = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    out = {}
    for k in k_values:
        out[f"ndcg@{k}"] = np.mean([m[f"ndcg_cut_{k}"] for m in per_q.values()])
        out[f"recall@{k}"] = np.mean([m[f"recall_{k}"] for m in per_q.values()])
        out[f"map@{k}"] = np.mean([m[f"map_cut_{k}"] for m in per_q.values()])
        out[f"precision@{k}"] = np.mean([m[f"P_{k}"] for m in per_q.values()])
        cut = {q: {d: run[q][d] for d in trec_order(run[q])[:k]} for q in run}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        out[f"mrr@{k}"] = np.mean([m["recip_rank"] for m in rr.values()])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_pytrec_eval_on_the_full_score_list(fake_encoder, tmp_path, seed, make_eval_dicts):
    corpus, queries, qrels = make_eval_dicts(seed=seed)
    es = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path)
    result = run_evaluation(fake_encoder, es, K)
    full = full_run(fake_encoder, es)
    ref = trec_reference(qrels, full, K)
    assert result.metrics.keys() == ref.keys()
    for name, value in ref.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-9), name
    # The retrieved top-k is exactly the first k of trec_eval's ordering of the full list (ties included).
    for qid, docs in result.run.items():
        assert list(trec_order(docs)) == trec_order(full[qid])[: max(K)]


def test_evaluate_retrieval_returns_the_metrics(fake_encoder, tmp_path, make_eval_dicts):
    corpus, queries, qrels = make_eval_dicts()
    es = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path)
    assert evaluate_retrieval(fake_encoder, es, K) == run_evaluation(fake_encoder, es, K).metrics


def test_second_evaluation_reuses_cached_corpus_embeddings(fake_encoder, tmp_path, make_eval_dicts):
    corpus, queries, qrels = make_eval_dicts()
    es = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path / "c")
    first = run_evaluation(fake_encoder, es, K, cache_dir=tmp_path / "emb")
    assert not first.corpus_from_cache and fake_encoder.documents_encoded == len(corpus)
    second = run_evaluation(fake_encoder, es, K, cache_dir=tmp_path / "emb")
    assert second.corpus_from_cache
    assert fake_encoder.documents_encoded == len(corpus)  # no corpus encoding the second time
    assert second.metrics == first.metrics

    # Changed weights, encoding options or corpus: a miss, re-encoded.
    with torch.no_grad():
        fake_encoder.weight[0] = 2.0
    assert not run_evaluation(fake_encoder, es, K, cache_dir=tmp_path / "emb").corpus_from_cache
    assert not run_evaluation(fake_encoder, es, K, cache_dir=tmp_path / "emb", bf16=True).corpus_from_cache
    fake_encoder.settings.passage_prefix = "passage: "
    assert not run_evaluation(fake_encoder, es, K, cache_dir=tmp_path / "emb").corpus_from_cache
    corpus2 = dict(corpus, d0=corpus["d0"] + " extra")
    es2 = eval_set_from_dicts(corpus2, queries, qrels, cache_dir=tmp_path / "c")
    before = fake_encoder.documents_encoded
    assert not run_evaluation(fake_encoder, es2, K, cache_dir=tmp_path / "emb").corpus_from_cache
    assert fake_encoder.documents_encoded == before + len(corpus2)


def test_ignore_identical_ids_never_returns_the_query_itself(fake_encoder, tmp_path, make_eval_dicts):
    corpus, _, _ = make_eval_dicts()
    # Queries are documents of the corpus under the same ID (as in ArguAna and Quora).
    queries = {d: corpus[d] for d in list(corpus)[:8]}
    qrels = {d: {list(corpus)[(i + 1) % len(corpus)]: 1} for i, d in enumerate(queries)}
    es = eval_set_from_dicts(corpus, queries, qrels, ignore_identical_ids=True, cache_dir=tmp_path)
    result = run_evaluation(fake_encoder, es, K)
    for qid, docs in result.run.items():
        assert qid not in docs and len(docs) == max(K)
    es_keep = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path)
    kept = run_evaluation(fake_encoder, es_keep, K)
    assert all(qid in docs for qid, docs in kept.run.items())  # each query is its own best match


def test_trec_run_file_round_trips_through_pytrec_eval(fake_encoder, tmp_path, make_eval_dicts):
    corpus, queries, qrels = make_eval_dicts()
    es = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path)
    result = run_evaluation(fake_encoder, es, K)
    path = write_trec_run(result.run, tmp_path / "run.trec")
    with open(path) as f:
        parsed = pytrec_eval.parse_run(f)
    assert parsed == result.run
    first = path.read_text().splitlines()[0].split()
    assert first[1] == "Q0" and first[3] == "1" and first[5] == "embedtune"


def test_beir_folder_loads_and_scores_like_the_dicts(fake_encoder, beir_folder, tmp_path):
    root, corpus, queries, qrels = beir_folder
    es = load_eval_set(root, "test", cache_dir=tmp_path / "c")
    assert es.name == "tinybeir" and es.split == "test" and not es.ignore_identical_ids
    assert es.qrels == qrels and es.queries == queries and es.warnings == []
    ref = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path / "c2")
    assert run_evaluation(fake_encoder, es, K).metrics == run_evaluation(fake_encoder, ref, K).metrics


def test_unknown_ids_in_qrels_warn_with_counts_or_fail_when_strict(beir_folder, tmp_path):
    root, *_ = beir_folder
    with open(root / "qrels" / "test.tsv", "a", newline="") as f:
        f.write("nosuchquery\td1\t1\r\nq0\tnosuchdoc\t1\r\nq1\tnosuchdoc2\t1\r\n")
    with pytest.warns(EvalDataWarning):
        es = load_eval_set(root, "test", cache_dir=tmp_path / "c")
    text = "\n".join(es.warnings)
    assert "skipped 1 line(s) with query-id" in text
    assert "2 of" in text and "judged documents are not in the corpus" in text and "never retrieved" in text
    assert "nosuchquery" not in es.qrels and es.qrels["q0"]["nosuchdoc"] == 1
    with pytest.warns(EvalDataWarning, match="they are skipped"):
        skipped = load_eval_set(root, "test", cache_dir=tmp_path / "c", skip_unknown_documents=True)
    assert "nosuchdoc" not in skipped.qrels["q0"]
    with pytest.raises(DataError, match="nosuchdoc"):
        load_eval_set(root, "test", strict=True, cache_dir=tmp_path / "c")


def _read_qrels_tsv(path):
    """The qrels file as pytrec_eval takes it, parsed here independently of embedtune's readers."""
    qrels: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines()[1:]:  # skip BEIR's header
        qid, did, rel = line.split("\t")
        qrels.setdefault(qid, {})[did] = int(rel)
    return qrels


def test_qrels_naming_documents_missing_from_the_corpus_score_as_trec_eval(
    fake_encoder, beir_folder, tmp_path
):
    """A relevant document that is not in the corpus is relevant but never retrieved (trec_eval's rule):
    embedtune's metrics equal pytrec_eval's on the same qrels file and the full score list."""
    root, _, _, qrels = beir_folder
    queries_with_rel = [q for q, j in qrels.items() if any(r >= 1 for r in j.values())]
    with open(root / "qrels" / "test.tsv", "a", newline="") as f:
        for q in queries_with_rel[::2]:  # every other query gains a relevant document nobody can retrieve
            f.write(f"{q}\tgone-{q}\t1\r\n")
        f.write(f"{queries_with_rel[1]}\tgone-graded\t2\r\n")
    file_qrels = _read_qrels_tsv(root / "qrels" / "test.tsv")
    with pytest.warns(EvalDataWarning, match="never retrieved"):
        es = load_eval_set(root, "test", cache_dir=tmp_path / "c")
    result = run_evaluation(fake_encoder, es, K)
    ref = trec_reference(file_qrels, full_run(fake_encoder, es), K)
    for name, value in ref.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-9), name
    # The old behaviour, kept behind a flag, scores higher than trec_eval (the denominators shrink).
    with pytest.warns(EvalDataWarning, match="skipped"):
        skipped = load_eval_set(root, "test", cache_dir=tmp_path / "c", skip_unknown_documents=True)
    old = run_evaluation(fake_encoder, skipped, K).metrics
    assert old["recall@10"] > ref["recall@10"] and old["ndcg@10"] > ref["ndcg@10"]


def test_bad_paths_and_empty_corpus_raise_clear_errors(tmp_path, beir_folder):
    with pytest.raises(DataError, match="no such file or folder"):
        load_eval_set(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="not a BEIR folder"):
        load_eval_set(tmp_path / "empty_dir")
    root, *_ = beir_folder
    with pytest.raises(DataError, match=r"available splits: \['test'\]"):
        load_eval_set(root, "dev", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="corpus is empty"):
        eval_set_from_dicts({}, {"q": "x"}, {"q": {"d": 1}}, cache_dir=tmp_path)
    with pytest.raises(DataError, match="no judged query"), pytest.warns(EvalDataWarning):
        eval_set_from_dicts({"d": "x"}, {"q": "x"}, {"other": {"d": 1}}, cache_dir=tmp_path)


def test_inline_jsonl_searches_all_documents_of_the_file(fake_encoder, tmp_path):
    rows = [
        {"query": "gene virus", "pos_doc": "virus gene cell", "neg_doc": ["heart drug"]},
        {"query": "sleep diet", "pos_doc": ["diet and sleep"], "neg_doc": ["blood dose", "virus gene cell"]},
        {"query": "mouse brain", "pos_doc": "brain of a mouse"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    es = load_eval_set(path, cache_dir=tmp_path / "c")
    texts = set(es.corpus.texts(range(len(es.corpus))))
    assert texts == {"virus gene cell", "heart drug", "diet and sleep", "blood dose", "brain of a mouse"}
    assert len(es.queries) == 3
    rel_texts = {
        es.queries[q]: [es.corpus.texts(es.corpus.indices_of(list(j)))[0]] for q, j in es.qrels.items()
    }
    assert rel_texts == {
        "gene virus": ["virus gene cell"],
        "sleep diet": ["diet and sleep"],
        "mouse brain": ["brain of a mouse"],
    }
    metrics = evaluate_retrieval(fake_encoder, es, (1,))
    assert metrics["recall@1"] == pytest.approx(1.0)  # the word-overlap encoder finds each positive


def test_subset_keeps_relevant_documents_and_is_deterministic(tmp_path, make_eval_dicts):
    corpus, queries, qrels = make_eval_dicts(num_docs=200, num_queries=30)
    es = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path)
    sub = es.subset(max_queries=10, max_corpus=50, seed=3)
    assert len(sub.queries) == 10 and len(sub.corpus) == 50
    kept_ids = set(sub.corpus.ids)
    assert all(d in kept_ids for q in sub.qrels for d, r in sub.qrels[q].items() if r >= 1)
    again = es.subset(max_queries=10, max_corpus=50, seed=3)
    assert list(again.corpus.ids) == list(sub.corpus.ids) and again.queries == sub.queries
    assert sub.corpus.fingerprint != es.corpus.fingerprint
    assert es.subset() is es


def test_unknown_ids_in_dict_qrels_warn_then_unknown_queries_are_skipped(tmp_path):
    corpus = {"d1": "a", "d2": "b"}
    queries = {"q1": "a", "q2": "b"}
    qrels = {"q1": {"d1": 1, "nodoc": 1}, "q2": {"d2": 1}, "noq": {"d1": 1}}
    with pytest.warns(EvalDataWarning) as record:
        es = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path)
    messages = [str(r.message) for r in record]
    assert any("1 of 3 judged queries" in m for m in messages)
    assert any("1 of 3 judged documents" in m and "1 relevant judgement(s)" in m for m in messages)
    # trec_eval's rule: the unknown document stays relevant (and is never retrieved).
    assert es.qrels == {"q1": {"d1": 1, "nodoc": 1}, "q2": {"d2": 1}} and len(es.warnings) == 2
    with pytest.warns(EvalDataWarning):
        skipped = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path, skip_unknown_documents=True)
    assert skipped.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    with pytest.raises(DataError, match="nodoc"):
        eval_set_from_dicts(corpus, queries, qrels, strict=True, cache_dir=tmp_path)


def test_corpus_id_json_uses_the_data_set_instructions(fake_encoder, tmp_path):
    corp = tmp_path / "corp"
    corp.mkdir()
    meta = {"class": "TextQADataset", "corpus_id": "c1", "query_instruction": "Instruct: find\nQuery: "}
    meta["passage_instruction"] = "passage: "
    (corp / "merlin_metadata.json").write_text(json.dumps(meta))
    docs = {"d1": "virus gene cell", "d2": "heart drug", "d3": "sleep and diet"}
    (corp / "docs.jsonl").write_text(
        "".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in docs.items())
    )
    data = [
        {"question_id": "q1", "question": "gene virus", "corpus_id": "c1", "pos_doc": [{"id": "d1"}]},
        {
            "question_id": "q2",
            "question": "diet",
            "corpus_id": "c1",
            "pos_doc": [{"id": "d3"}],
            "neg_doc": [{"id": "d2"}],
        },
    ]
    path = tmp_path / "held_out.json"
    path.write_text(json.dumps({"corpus": [{"path": "corp"}], "data": data}))
    es = load_eval_set(path, cache_dir=tmp_path / "c")
    assert es.qrels == {"q1": {"d1": 1}, "q2": {"d3": 1}} and len(es.corpus) == 3
    assert es.query_prefixes == {"q1": "Instruct: find\nQuery: ", "q2": "Instruct: find\nQuery: "}
    assert es.passage_prefix == "passage: "
    metrics = evaluate_retrieval(fake_encoder, es, (1,))
    assert metrics["recall@1"] == 1.0
    doc_call = next(c for c in fake_encoder.calls if c["kind"] == "document")
    query_call = next(c for c in fake_encoder.calls if c["kind"] == "query")
    assert doc_call["prefix"] == "passage: "
    assert query_call["prefix"] == ["Instruct: find\nQuery: "] * 2


def test_interrupted_corpus_encoding_leaves_no_cache_entry(
    fake_encoder, tmp_path, monkeypatch, make_eval_dicts
):
    import embedtune.eval.retrieval as retrieval_mod
    from embedtune.eval.retrieval import encode_corpus

    corpus, queries, qrels = make_eval_dicts()
    es = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path / "c")
    monkeypatch.setattr(retrieval_mod, "ENCODE_CHUNK", 16)  # several chunks
    real = fake_encoder.encode_documents
    calls = []

    def failing(texts, **kw):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(texts, **kw)

    monkeypatch.setattr(fake_encoder, "encode_documents", failing)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(fake_encoder, es.corpus, cache_dir=tmp_path / "emb")
    assert list((tmp_path / "emb").iterdir()) == []  # no partial entry, no temporary file
    monkeypatch.setattr(fake_encoder, "encode_documents", real)
    emb, hit = encode_corpus(fake_encoder, es.corpus, cache_dir=tmp_path / "emb")
    again, hit2 = encode_corpus(fake_encoder, es.corpus, cache_dir=tmp_path / "emb")
    assert not hit and hit2
    expected = fake_encoder._embed(es.corpus.texts(range(len(es.corpus))))
    np.testing.assert_array_equal(np.asarray(emb), expected)
    np.testing.assert_array_equal(np.asarray(again), expected)
