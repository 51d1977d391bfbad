"""Bootstrap intervals and paired tests equal scipy's on the same per-query numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedtune.errors import DataError
from embedtune.eval import stats as S

scipy_stats = pytest.importorskip("scipy.stats")


def _mean_diff(x, y, axis):
    return np.mean(x - y, axis=axis)


def _metric_like(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two systems' per-query values in [0, 1] with many ties (as MRR/recall have)."""
    rng = np.random.default_rng(seed)
    a = np.round(rng.random(n), 1)
    b = np.clip(np.round(a + rng.normal(shift, 0.2, n), 1), 0, 1)
    return a, b


@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_bootstrap_ci_equals_scipy_with_the_same_seed(method):
    a, _ = _metric_like(300, 1)
    ref = scipy_stats.bootstrap(
        (a,), np.mean, vectorized=True, n_resamples=4000, rng=np.random.default_rng(7), method=method
    ).confidence_interval
    ours = S.bootstrap_ci(a, n_resamples=4000, seed=7, method=method.lower())[0]
    # The same indices are drawn, so this is deterministic: equal to rounding.
    np.testing.assert_allclose(ours, [ref.low, ref.high], rtol=0, atol=1e-9)


def test_bootstrap_ci_with_another_seed_agrees_within_monte_carlo_error():
    a, _ = _metric_like(300, 2)
    ref = scipy_stats.bootstrap(
        (a,), np.mean, vectorized=True, n_resamples=20000, rng=np.random.default_rng(123), method="percentile"
    ).confidence_interval
    ours = S.bootstrap_ci(a, n_resamples=20000, seed=5)[0]
    se = np.std(a, ddof=1) / np.sqrt(len(a))
    # Each endpoint is a 2.5 % quantile of 20,000 means: its Monte-Carlo error is a few % of the s.e.
    assert abs(ours[0] - ref.low) < 0.1 * se and abs(ours[1] - ref.high) < 0.1 * se


def test_several_metrics_share_one_resampling_and_each_equals_scipy():
    a, b = _metric_like(200, 3)
    both = np.stack([a, b], axis=1)
    ci = S.bootstrap_ci(both, n_resamples=3000, seed=11)
    for j in range(2):
        ref = scipy_stats.bootstrap(
            (both[:, j],),
            np.mean,
            vectorized=True,
            n_resamples=3000,
            rng=np.random.default_rng(11),
            method="percentile",
        ).confidence_interval
        np.testing.assert_allclose(ci[j], [ref.low, ref.high], atol=1e-9)


@pytest.mark.parametrize("n", [8, 12])
def test_exact_randomization_test_equals_scipy_exactly(n):
    a, b = _metric_like(n, n, shift=0.1)
    ref = scipy_stats.permutation_test(
        (a, b), _mean_diff, permutation_type="samples", vectorized=True, n_resamples=10**6
    )
    (ours,) = S.paired_randomization_test(a, b, n_resamples=10**6)
    assert ours.exact and ours.n_resamples == 2**n
    assert abs(ours.p_value - ref.pvalue) < 1e-12
    assert abs(ours.statistic - ref.statistic) < 1e-12


def test_monte_carlo_randomization_test_agrees_with_scipy_within_monte_carlo_error():
    a, b = _metric_like(300, 4, shift=0.03)
    ref = scipy_stats.permutation_test(
        (a, b),
        _mean_diff,
        permutation_type="samples",
        vectorized=True,
        n_resamples=20000,
        rng=np.random.default_rng(3),
    )
    assert 0.01 < ref.pvalue < 0.99  # a p-value in the interesting range, not a trivial one
    for seed in (0, 1):
        (ours,) = S.paired_randomization_test(a, b, n_resamples=20000, seed=seed)
        assert not ours.exact and ours.statistic == pytest.approx(ref.statistic, abs=1e-15)
        p = ref.pvalue
        # Two independent estimates of the same p: 4 standard errors of their difference.
        assert abs(ours.p_value - p) < 4 * np.sqrt(2 * p * (1 - p) / 20000)
    # Seeded: the same seed gives the same p-value.
    assert S.paired_randomization_test(a, b, n_resamples=2000, seed=5) == S.paired_randomization_test(
        a, b, n_resamples=2000, seed=5
    )


def test_paired_bootstrap_test_against_an_independent_loop():
    a, b = _metric_like(150, 5, shift=0.04)
    (res,), ci = S.paired_bootstrap_test(a, b, n_resamples=2000, seed=9)
    d = a - b
    rng = np.random.default_rng(9)
    count = 0
    means = []
    for _ in range(2000):
        m = d[rng.integers(0, len(d), len(d))].mean()
        means.append(m)
        count += abs(m - d.mean()) >= abs(d.mean())
    assert res.p_value == pytest.approx((count + 1) / 2001, abs=1e-12)
    np.testing.assert_allclose(ci[0], np.percentile(means, [2.5, 97.5]), atol=1e-12)


def test_identical_systems_are_never_significant_and_a_real_gap_is():
    a, _ = _metric_like(300, 6)
    (row,) = S.compare_per_query(
        {str(i): {"m": v} for i, v in enumerate(a)},
        {str(i): {"m": v} for i, v in enumerate(a)},
        n_resamples=2000,
    )
    assert row.delta == 0 and row.p_randomization == 1 and not row.significant
    better = np.clip(a + 0.2, 0, 1)
    (row,) = S.compare_per_query(
        {str(i): {"m": v} for i, v in enumerate(better)},
        {str(i): {"m": v} for i, v in enumerate(a)},
        n_resamples=2000,
    )
    assert row.significant and row.delta > 0 and row.ci_low > 0 and row.p_randomization < 0.001


def test_compare_refuses_different_query_sets():
    with pytest.raises(DataError, match="not evaluated on the same queries"):
        S.compare_per_query({"q1": {"m": 1.0}}, {"q2": {"m": 1.0}})


def test_interval_does_not_depend_on_dictionary_order():
    a, _ = _metric_like(50, 7)
    pq = {f"q{i}": {"m": v} for i, v in enumerate(a)}
    rev = dict(reversed(list(pq.items())))
    assert S.metric_intervals(pq, n_resamples=500) == S.metric_intervals(rev, n_resamples=500)


def test_trec_run_and_qrels_readers_name_the_bad_line(tmp_path):
    run = tmp_path / "r.trec"
    run.write_text("q1 Q0 d1 1 0.5 x\nq1 Q0 d2 2 oops x\n")
    with pytest.raises(DataError, match=r"r.trec:2: score 'oops'"):
        S.read_trec_run(run)
    qrels = tmp_path / "q.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\tx\n")
    with pytest.raises(DataError, match=r"q.tsv:3: relevance 'x'"):
        S.read_qrels(qrels)
    bad_json = tmp_path / "e.json"
    bad_json.write_text(json.dumps({"metrics": {"ndcg@10": 0.5}}))
    with pytest.raises(DataError, match="no 'per_query'"):
        S.load_run(bad_json)
