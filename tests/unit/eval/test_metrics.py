"""Our metrics must equal trec_eval's (through pytrec_eval) on arbitrary runs and qrels."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedtune.errors import ConfigError
from embedtune.eval.metrics import compute_metrics, per_query_metrics, query_metrics, trec_order

pytrec_eval = pytest.importorskip("pytrec_eval")

K_VALUES = (1, 3, 5, 10)

# Short IDs from a small pool so runs and qrels overlap; digits of different lengths ("9" vs "10")
# and a non-ASCII letter make the ID tie-break order visible.
DOC_IDS = st.text(alphabet="ab9130é", min_size=1, max_size=3)
QUERY_IDS = st.sampled_from([f"q{i}" for i in range(6)])
# Few distinct score values -> many ties; or arbitrary floats.
SCORES = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.25]),
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32),
)
RELEVANCE = st.integers(min_value=-1, max_value=3)  # graded, zero and negative judgements

qrels_strategy = st.dictionaries(QUERY_IDS, st.dictionaries(DOC_IDS, RELEVANCE, min_size=1, max_size=8))
run_strategy = st.dictionaries(QUERY_IDS, st.dictionaries(DOC_IDS, SCORES, max_size=14))


def trec_measures() -> set[str]:
    cuts = ",".join(str(k) for k in K_VALUES)
    return {f"ndcg_cut.{cuts}", f"recall.{cuts}", f"map_cut.{cuts}", f"P.{cuts}", "recip_rank"}


def reference(qrels, run) -> dict[str, dict[str, float]]:
    """pytrec_eval's numbers, in our naming; MRR@k = recip_rank on the run cut to its top k."""
    full = pytrec_eval.RelevanceEvaluator(qrels, trec_measures()).evaluate(run)
    out: dict[str, dict[str, float]] = {}
    for qid, m in full.items():
        row = {}
        for k in K_VALUES:
            row[f"ndcg@{k}"] = m[f"ndcg_cut_{k}"]
            row[f"recall@{k}"] = m[f"recall_{k}"]
            row[f"map@{k}"] = m[f"map_cut_{k}"]
            row[f"precision@{k}"] = m[f"P_{k}"]
            cut_run = {qid: {d: run[qid][d] for d in trec_order(run[qid])[:k]}}
            rr = pytrec_eval.RelevanceEvaluator({qid: qrels[qid]}, {"recip_rank"}).evaluate(cut_run)
            row[f"mrr@{k}"] = rr[qid]["recip_rank"]
        out[qid] = row
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qrels=qrels_strategy, run=run_strategy)
def test_equals_pytrec_eval_on_random_runs(qrels, run):
    ours = per_query_metrics(qrels, run, K_VALUES)
    ref = reference(qrels, run)
    assert ours.keys() == ref.keys()  # same queries evaluated (in both qrels and run)
    for qid in ref:
        assert ours[qid].keys() == ref[qid].keys()
        for name, value in ref[qid].items():
            assert ours[qid][name] == pytest.approx(value, abs=1e-6), (qid, name)
    agg = compute_metrics(qrels, run, K_VALUES)
    for name in agg:
        expected = sum(r[name] for r in ref.values()) / len(ref) if ref else 0.0
        assert agg[name] == pytest.approx(expected, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(run=st.dictionaries(DOC_IDS, st.just(1.0), min_size=2, max_size=10), data=st.data())
def test_all_tied_scores_rank_by_docid_descending_like_trec_eval(run, data):
    # One relevant document among all-tied scores: its reciprocal rank reveals where trec_eval put it.
    target = data.draw(st.sampled_from(sorted(run)))
    qrels = {"q": {target: 1}}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate({"q": run})["q"]["recip_rank"]
    assert query_metrics(qrels["q"], run, (100,), ("mrr",))["mrr@100"] == pytest.approx(ref)
    assert 1.0 / (trec_order(run).index(target) + 1) == pytest.approx(ref)


def test_empty_run_counts_as_zero_and_missing_query_is_not_evaluated():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}}
    run = {"q1": {"a": 1.0}, "q2": {}}  # q3 absent
    per_q = per_query_metrics(qrels, run, (10,))
    assert set(per_q) == {"q1", "q2"}
    assert per_q["q2"]["ndcg@10"] == 0.0
    assert compute_metrics(qrels, run, (10,))["ndcg@10"] == pytest.approx(0.5)


def test_no_evaluated_query_gives_zeros():
    assert compute_metrics({"q": {"a": 1}}, {}, (10,), ("ndcg",)) == {"ndcg@10": 0.0}


@pytest.mark.parametrize("k_values", [(), (0,), (10, -1), (1.5,)])
def test_bad_k_values_raise(k_values):
    with pytest.raises(ConfigError, match="k_values"):
        compute_metrics({}, {}, k_values)


def test_unknown_metric_raises():
    with pytest.raises(ConfigError, match="unknown metric"):
        compute_metrics({}, {}, (10,), ("ndcg", "bleu"))
