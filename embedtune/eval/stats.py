"""Uncertainty of retrieval metrics: bootstrap confidence intervals and paired significance tests.

A mean NDCG@10 over 300 queries is an estimate; another 300 queries from the same distribution would
give another number. This module says how far it could move, and whether the difference between two
systems evaluated on the *same* queries is larger than that noise:

* :func:`bootstrap_ci` -- a confidence interval of a mean by resampling queries with replacement
  (percentile or BCa interval, Efron & Tibshirani 1993, ch. 13-14).
* :func:`paired_randomization_test` -- Fisher's randomisation test on paired per-query values (under
  the null hypothesis the two systems are exchangeable, so each query's difference may flip its sign):
  exact enumeration of the ``2**n`` sign patterns when ``n_resamples`` covers them, else a seeded Monte
  Carlo sample (Smucker, Allan & Carterette, CIKM 2007, recommend it for IR).
* :func:`paired_bootstrap_test` -- the paired bootstrap test (Sakai, SIGIR 2006): resample queries,
  centre the bootstrap means of the differences on zero, and count how often they are as extreme as
  the observed difference; it also gives the difference's confidence interval.

The numbers equal ``scipy.stats.bootstrap`` (``method="percentile"`` or ``"BCa"``) and
``scipy.stats.permutation_test`` (``permutation_type="samples"``) given the same seed: the resampling
draws the same indices from ``numpy.random.default_rng(seed)`` and the p-values use scipy's
conventions (``+1`` in numerator and denominator for Monte Carlo tests, a relative tolerance of
``100 * eps`` for ties, two-sided = twice the smaller one-sided p-value). ``tests/unit/eval/test_stats.py``
checks this. The implementation needs numpy only; scipy is a test dependency.

Several metrics are resampled with *the same* query indices (a bootstrap replicate is one resampled
query set), and no correction for testing several metrics at once is applied: report the metric you
chose in advance, or correct (Holm) yourself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from embedtune.errors import ConfigError, DataError

__all__ = [
    "CI_METHODS",
    "ComparisonRow",
    "bootstrap_ci",
    "bootstrap_means",
    "compare_per_query",
    "load_run",
    "metric_intervals",
    "paired_bootstrap_test",
    "paired_randomization_test",
    "read_qrels",
    "read_trec_run",
]

#: Interval methods of :func:`bootstrap_ci`.
CI_METHODS: tuple[str, ...] = ("percentile", "bca")

#: Bound on the numbers held at once while resampling (rows of resamples x queries x metrics).
_CHUNK_ELEMENTS = 4_000_000

# scipy's relative tolerance for "equal" statistics (floating-point noise must not break ties).
_TIE_EPS = float(np.finfo(np.float64).eps) * 100


def _as_matrix(values: Sequence[float] | np.ndarray, name: str = "values") -> np.ndarray:
    """(n,) or (n, m) float64 array, with a clear error for empty or non-finite input."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise DataError(
            f"{name}: need per-query values (a non-empty 1-D or 2-D array), got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name}: per-query values must be finite numbers (found NaN or inf)")
    return arr


def _check(n_resamples: int, confidence: float) -> None:
    if isinstance(n_resamples, bool) or int(n_resamples) < 1:
        raise ConfigError(f"n_resamples: must be an integer >= 1, got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence: must be in (0, 1) such as 0.95, got {confidence!r}")


def bootstrap_means(
    values: Sequence[float] | np.ndarray, n_resamples: int = 10_000, seed: int = 0
) -> np.ndarray:
    """Means of ``n_resamples`` bootstrap resamples of the rows (queries) of ``values``.

    Args:
        values: (n,) or (n, m) per-query values (m metrics resampled with the same query indices).
        n_resamples: bootstrap replicates.
        seed: seed of ``numpy.random.default_rng``; replicate ``b`` uses the ``b``-th row of
            ``rng.integers(0, n, (n_resamples, n))``, as ``scipy.stats.bootstrap`` does.

    Returns:
        (n_resamples, m) float64.
    """
    x = _as_matrix(values)
    n, m = x.shape
    rng = np.random.default_rng(seed)
    out = np.empty((int(n_resamples), m), dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // (n * m))
    for start in range(0, int(n_resamples), step):
        rows = min(step, int(n_resamples) - start)
        # Drawing the index matrix in row chunks consumes the generator exactly as one big draw does.
        idx = rng.integers(0, n, (rows, n))
        # (rows, n, m) -> mean over queries; per metric this is np.mean over the last axis as in scipy.
        out[start : start + rows] = np.mean(np.moveaxis(x[idx], 2, 1), axis=-1)
    return out


def _percentile_of_score(theta_b: np.ndarray, theta_hat: np.ndarray) -> np.ndarray:
    # scipy's "mean" kind: (count(<) + count(<=)) / (2 B).
    below = np.count_nonzero(theta_b < theta_hat, axis=0)
    at_or_below = np.count_nonzero(theta_b <= theta_hat, axis=0)
    return (below + at_or_below) / (2.0 * theta_b.shape[0])


def _bca_levels(x: np.ndarray, theta_b: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """BCa's adjusted percentile levels (fractions) for each column (Efron & Tibshirani eq. 14.9-14.15)."""
    nd = NormalDist()
    n = x.shape[0]
    theta_hat = np.mean(x, axis=0)
    p0 = _percentile_of_score(theta_b, theta_hat)
    # Jackknife means: leave one query out (the mean's jackknife needs no loop).
    jack = (np.sum(x, axis=0) - x) / (n - 1) if n > 1 else x.copy()
    d = np.mean(jack, axis=0) - jack
    num = np.sum(d**3, axis=0)
    den = 6.0 * np.sum(d**2, axis=0) ** 1.5
    with np.errstate(divide="ignore", invalid="ignore"):
        a_hat = num / den
    lo = np.empty(x.shape[1])
    hi = np.empty(x.shape[1])
    z_lo, z_hi = nd.inv_cdf(alpha), nd.inv_cdf(1 - alpha)
    for j in range(x.shape[1]):
        if not 0 < p0[j] < 1 or not np.isfinite(a_hat[j]):
            lo[j] = hi[j] = math.nan  # degenerate (constant values): BCa is undefined, as in scipy
            continue
        z0 = nd.inv_cdf(float(p0[j]))
        for z, out in ((z_lo, lo), (z_hi, hi)):
            out[j] = nd.cdf(z0 + (z0 + z) / (1 - a_hat[j] * (z0 + z)))
    return lo, hi


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: str = "percentile",
    theta_b: np.ndarray | None = None,
) -> np.ndarray:
    """Two-sided bootstrap confidence interval of the mean of each column of ``values``.

    Args:
        values: (n,) or (n, m) per-query values.
        confidence: confidence level (0.95 = a 95 % interval).
        n_resamples: bootstrap replicates.
        seed: resampling seed (see :func:`bootstrap_means`).
        method: ``percentile`` or ``bca`` (bias-corrected and accelerated).
        theta_b: precomputed :func:`bootstrap_means` of ``values`` (to share one resampling).

    Returns:
        (m, 2) array of ``[low, high]`` (shape (1, 2) for 1-D input). Constant values give ``[v, v]``
        with the percentile method and NaN with BCa (undefined there).

    Raises:
        ConfigError: a bad ``confidence``, ``n_resamples`` or ``method``.
        DataError: empty or non-finite values.
    """
    _check(n_resamples, confidence)
    if method not in CI_METHODS:
        raise ConfigError(f"method: {method!r} is not one of {', '.join(CI_METHODS)}")
    x = _as_matrix(values)
    if theta_b is None:
        theta_b = bootstrap_means(x, n_resamples, seed)
    alpha = (1 - confidence) / 2
    if method == "percentile":
        lo = np.percentile(theta_b, alpha * 100, axis=0)
        hi = np.percentile(theta_b, (1 - alpha) * 100, axis=0)
        return np.stack([lo, hi], axis=1)
    lo_level, hi_level = _bca_levels(x, theta_b, alpha)
    out = np.full((x.shape[1], 2), math.nan)
    for j in range(x.shape[1]):
        if np.isfinite(lo_level[j]):
            out[j] = np.percentile(theta_b[:, j], [lo_level[j] * 100, hi_level[j] * 100])
    return out


@dataclass(frozen=True)
class TestResult:
    """One paired test of the mean difference ``mean(a - b)``.

    Attributes:
        statistic: the observed mean difference.
        p_value: two-sided p-value.
        n_resamples: sign patterns or bootstrap replicates used (``2**n`` for an exact test).
        exact: whether every sign pattern was enumerated (randomisation test only).
    """

    statistic: float
    p_value: float
    n_resamples: int
    exact: bool = False


def _differences(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray:
    xa, xb = _as_matrix(a, "a"), _as_matrix(b, "b")
    if xa.shape != xb.shape:
        raise DataError(
            f"paired values need the same queries: a has shape {xa.shape}, b has {xb.shape} — "
            "evaluate both systems on the same queries"
        )
    return xa - xb


def _two_sided(null: np.ndarray, observed: np.ndarray, adjustment: int) -> np.ndarray:
    """scipy's two-sided p-value: twice the smaller one-sided one, with the tie tolerance, clipped."""
    gamma = np.abs(_TIE_EPS * observed)
    total = null.shape[0]
    less = (np.count_nonzero(null <= observed + gamma, axis=0) + adjustment) / (total + adjustment)
    greater = (np.count_nonzero(null >= observed - gamma, axis=0) + adjustment) / (total + adjustment)
    return np.clip(2 * np.minimum(less, greater), 0.0, 1.0)


def paired_randomization_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> list[TestResult]:
    """Paired randomisation (sign-flip permutation) test of ``mean(a - b) == 0``, per column.

    Args:
        a: (n,) or (n, m) per-query values of system A.
        b: the same queries' values of system B.
        n_resamples: random sign patterns; when ``2**n <= n_resamples`` all of them are enumerated
            and the test is exact.
        seed: seed of the random sign patterns.

    Returns:
        One :class:`TestResult` per column.
    """
    _check(n_resamples, 0.5)
    d = _differences(a, b)
    n, m = d.shape
    observed = np.mean(d, axis=0)
    exact = n < 63 and 2**n <= n_resamples
    if exact:
        total = 2**n
        codes = np.arange(total, dtype=np.int64)
    else:
        total = int(n_resamples)
        rng = np.random.default_rng(seed)
    null = np.empty((total, m), dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // (n * m))
    for start in range(0, total, step):
        rows = min(step, total - start)
        if exact:
            bits = (codes[start : start + rows, None] >> np.arange(n)) & 1
        else:
            bits = rng.integers(0, 2, (rows, n))
        signs = (1 - 2 * bits).astype(np.float64)  # (rows, n) in {+1, -1}
        # (rows, m, n): the sign-flipped differences, averaged over queries as np.mean does in scipy.
        null[start : start + rows] = np.mean(signs[:, None, :] * d.T[None, :, :], axis=-1)
    p = _two_sided(null, observed, 0 if exact else 1)
    return [TestResult(float(observed[j]), float(p[j]), total, exact) for j in range(m)]


def paired_bootstrap_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: str = "percentile",
) -> tuple[list[TestResult], np.ndarray]:
    """Paired bootstrap test of ``mean(a - b) == 0`` and the difference's confidence interval, per column.

    The bootstrap means of the differences, shifted to mean zero (the null hypothesis), are compared
    with the observed difference: ``p = (#{|theta*_b - theta| >= |theta|} + 1) / (B + 1)``.

    Returns:
        ``(results, ci)``: one :class:`TestResult` per column, and the (m, 2) interval of the difference.
    """
    _check(n_resamples, confidence)
    d = _differences(a, b)
    theta_b = bootstrap_means(d, n_resamples, seed)
    observed = np.mean(d, axis=0)
    centred = np.abs(theta_b - observed)
    gamma = np.abs(_TIE_EPS * observed)
    p = (np.count_nonzero(centred >= np.abs(observed) - gamma, axis=0) + 1) / (int(n_resamples) + 1)
    ci = bootstrap_ci(d, confidence=confidence, n_resamples=n_resamples, method=method, theta_b=theta_b)
    results = [
        TestResult(float(observed[j]), float(min(1.0, p[j])), int(n_resamples)) for j in range(d.shape[1])
    ]
    return results, ci


# ---------------------------------------------------------------- per-query dictionaries (eval output)

PerQuery = Mapping[str, Mapping[str, float]]


def _matrix(per_query: PerQuery, qids: Sequence[str], metrics: Sequence[str]) -> np.ndarray:
    return np.array([[float(per_query[q][k]) for k in metrics] for q in qids], dtype=np.float64)


def metric_intervals(
    per_query: PerQuery,
    metrics: Sequence[str] | None = None,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: str = "percentile",
) -> dict[str, list[float]]:
    """Bootstrap confidence interval of every metric's mean, over the queries of ``per_query``.

    Args:
        per_query: query ID -> metric -> value (``RetrievalResult.per_query``).
        metrics: which metrics (default: every metric of the first query).

    Returns:
        metric -> ``[low, high]``; empty when there are no queries.
    """
    if not per_query:
        return {}
    qids = sorted(per_query)  # a fixed order: the interval must not depend on dictionary order
    names = list(metrics) if metrics is not None else list(next(iter(per_query.values())))
    ci = bootstrap_ci(
        _matrix(per_query, qids, names),
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
        method=method,
    )
    return {k: [float(ci[j, 0]), float(ci[j, 1])] for j, k in enumerate(names)}


@dataclass(frozen=True)
class ComparisonRow:
    """One metric of a comparison of run A with run B (``delta = A - B``).

    Attributes:
        metric: metric name.
        a: mean of A.
        b: mean of B.
        delta: ``a - b``.
        ci_low: low end of the paired bootstrap interval of ``delta``.
        ci_high: high end.
        p_randomization: two-sided p-value of the paired randomisation test.
        p_bootstrap: two-sided p-value of the paired bootstrap test.
        significant: both p-values are below the chosen level.
        wins: queries where A scores higher; ``losses``: where B does; ``ties``: equal.
    """

    metric: str
    a: float
    b: float
    delta: float
    ci_low: float
    ci_high: float
    p_randomization: float
    p_bootstrap: float
    significant: bool
    wins: int
    losses: int
    ties: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return asdict(self)


def compare_per_query(
    per_query_a: PerQuery,
    per_query_b: PerQuery,
    metrics: Sequence[str] | None = None,
    *,
    alpha: float = 0.05,
    confidence: float | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: str = "percentile",
) -> list[ComparisonRow]:
    """Compare two systems on the same queries, metric by metric.

    Args:
        per_query_a: query ID -> metric -> value of system A.
        per_query_b: the same for system B (the same query IDs).
        metrics: metrics to compare (default: those both have, in A's order).
        alpha: significance level; the interval's confidence defaults to ``1 - alpha``.
        confidence: override the interval's confidence level.
        n_resamples: resamples of both tests.
        seed: seed of both tests.
        method: bootstrap interval method.

    Returns:
        One :class:`ComparisonRow` per metric.

    Raises:
        DataError: the query sets differ, or the runs share no metric.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha: must be in (0, 1) such as 0.05, got {alpha!r}")
    qa, qb = set(per_query_a), set(per_query_b)
    if qa != qb:
        only_a, only_b = sorted(qa - qb), sorted(qb - qa)
        raise DataError(
            f"the runs were not evaluated on the same queries: {len(only_a)} only in A (e.g. {only_a[:3]}), "
            f"{len(only_b)} only in B (e.g. {only_b[:3]}) — evaluate both on the same qrels and split"
        )
    if not qa:
        raise DataError("the runs have no per-query values to compare")
    qids = sorted(qa)
    first_a, first_b = per_query_a[qids[0]], per_query_b[qids[0]]
    names = list(metrics) if metrics is not None else [k for k in first_a if k in first_b]
    if not names:
        raise DataError(f"the runs share no metric (A has {list(first_a)}, B has {list(first_b)})")
    for k in names:
        if k not in first_a or k not in first_b:
            raise DataError(f"metric {k!r} is missing from {'A' if k not in first_a else 'B'}")
    xa, xb = _matrix(per_query_a, qids, names), _matrix(per_query_b, qids, names)
    conf = 1 - alpha if confidence is None else confidence
    rand = paired_randomization_test(xa, xb, n_resamples=n_resamples, seed=seed)
    boot, ci = paired_bootstrap_test(
        xa, xb, confidence=conf, n_resamples=n_resamples, seed=seed, method=method
    )
    rows = []
    for j, k in enumerate(names):
        d = xa[:, j] - xb[:, j]
        rows.append(
            ComparisonRow(
                metric=k,
                a=float(np.mean(xa[:, j])),
                b=float(np.mean(xb[:, j])),
                delta=float(np.mean(d)),
                ci_low=float(ci[j, 0]),
                ci_high=float(ci[j, 1]),
                p_randomization=rand[j].p_value,
                p_bootstrap=boot[j].p_value,
                significant=bool(rand[j].p_value < alpha and boot[j].p_value < alpha),
                wins=int(np.count_nonzero(d > 0)),
                losses=int(np.count_nonzero(d < 0)),
                ties=int(np.count_nonzero(d == 0)),
            )
        )
    return rows


# ---------------------------------------------------------------- reading runs (``embedtune compare``)


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    """Read a TREC run file (``qid Q0 docid rank score tag`` a line) into query ID -> {doc ID -> score}.

    Raises:
        DataError: a line without six fields or with a score that is not a number (file and line named).
    """
    p = Path(path)
    run: dict[str, dict[str, float]] = {}
    with open(p, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise DataError(
                    f"{p}:{line_no}: a TREC run line needs 6 fields (qid Q0 docid rank score tag), "
                    f"got {len(fields)}: {line.strip()[:80]!r}"
                )
            try:
                score = float(fields[4])
            except ValueError:
                raise DataError(f"{p}:{line_no}: score {fields[4]!r} (field 5) is not a number") from None
            run.setdefault(fields[0], {})[fields[2]] = score
    return run


def read_qrels(path: str | Path, split: str = "test") -> dict[str, dict[str, int]]:
    """Relevance judgements from a BEIR folder / evaluation file, or a qrels file.

    A qrels file has either BEIR's ``query-id corpus-id score`` columns (tab separated, optional header)
    or TREC's ``qid 0 docid relevance``.

    Raises:
        DataError: a missing path, or a line with another number of fields or a non-integer relevance.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such qrels file or folder — give a BEIR folder or a qrels .tsv file")
    if p.is_dir() or p.suffix in (".json", ".jsonl"):
        from embedtune.eval.datasets import load_eval_set

        return load_eval_set(p, split).qrels
    qrels: dict[str, dict[str, int]] = {}
    with open(p, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in (3, 4):
                raise DataError(
                    f"{p}:{line_no}: a qrels line needs 3 fields (query-id corpus-id score) or 4 "
                    f"(qid 0 docid relevance), got {len(fields)}"
                )
            qid, doc, rel = (
                (fields[0], fields[1], fields[2]) if len(fields) == 3 else (fields[0], fields[2], fields[3])
            )
            try:
                value = int(float(rel))
            except ValueError:
                if line_no == 1:  # a header line such as "query-id corpus-id score"
                    continue
                raise DataError(f"{p}:{line_no}: relevance {rel!r} is not a number") from None
            qrels.setdefault(qid, {})[doc] = value
    if not qrels:
        raise DataError(f"{p}: no judgements found")
    return qrels


@dataclass
class LoadedRun:
    """Per-query metrics of one system, from an ``embedtune eval --output`` JSON or a TREC run.

    Attributes:
        path: the file.
        per_query: query ID -> metric -> value.
        info: what the file says about itself (model, data, split, limits) where known.
    """

    path: str
    per_query: dict[str, dict[str, float]]
    info: dict[str, Any]


def load_run(
    path: str | Path,
    qrels: Mapping[str, Mapping[str, int]] | None = None,
    k_values: Sequence[int] = (1, 10, 100),
) -> LoadedRun:
    """Read one side of a comparison.

    Args:
        path: an ``embedtune eval --output`` JSON (with ``per_query``) or a TREC run file.
        qrels: judgements, needed for a TREC run (every judged query is scored; one missing from the run
            scores 0, as ``embedtune eval`` does).
        k_values: cut-offs for a TREC run's metrics.

    Raises:
        DataError: a JSON without per-query values, or a TREC run without qrels.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file — give an `embedtune eval --output` JSON or a TREC run file")
    if p.suffix == ".json":
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("per_query"), dict) or not doc["per_query"]:
            raise DataError(
                f"{p}: no 'per_query' values — it must come from `embedtune eval --output` (this version "
                "saves them always), or pass the TREC run file (--run) with --qrels"
            )
        info = {k: doc.get(k) for k in ("model", "data", "split", "limits", "num_queries", "num_docs")}
        return LoadedRun(str(p), {q: dict(m) for q, m in doc["per_query"].items()}, info)
    if qrels is None:
        raise DataError(f"{p}: a TREC run needs --qrels (the BEIR folder or qrels file it is judged on)")
    from embedtune.eval.metrics import per_query_metrics

    run = read_trec_run(p)
    unknown = [q for q in run if q not in qrels]
    full = {q: run.get(q, {}) for q in qrels}
    info: dict[str, Any] = {"run_queries": len(run), "unjudged_run_queries": len(unknown)}
    return LoadedRun(str(p), per_query_metrics(qrels, full, k_values), info)


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON through a temporary file and a rename (never a half-written file)."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
