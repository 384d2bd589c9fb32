"""Statistics of the studies: paired differences over seeds, rank correlations with bootstrap CIs.

DataFrame in, DataFrame (or numbers) out; nothing here plots or reads files.

* :func:`paired_differences`: every configuration of an accuracy study against the exact model,
  paired by seed (a seed fixes the head's initialisation, the minibatch order and the dropout
  draws, so the seed-to-seed noise that both runs share cancels in the difference).
  With d_s = value(config, s) − value(exact, s) over the n seeds both have:
  mean d̄, sd s_d (ddof 1), the two-sided Student-t interval d̄ ± t_{(1+level)/2, n−1} s_d/√n and
  the p-value of the paired t-test (``scipy.stats.ttest_rel``); the difference is
  *distinguishable* from zero when the interval excludes 0.
* :func:`paired_contrast`: the same statistics for any two configurations (a − b), e.g. one
  scope against the other or one family against another at equal ρ.
* :func:`holm` / :func:`with_holm`: Holm's step-down adjustment of a family of p-values
  (NOTE [multiple comparisons]).
* :func:`rank_correlation`: Spearman's ρ between two per-configuration quantities, with a
  percentile bootstrap interval over configurations (seeded).
* :func:`rank_correlation_difference`: ρ(a, y) − ρ(b, y) for two quantities of the same
  configurations, with a paired percentile bootstrap interval (the same resamples for both), so
  "a predicts y better than b" is a claim only when that interval excludes 0.

NOTE [multiple comparisons]: a table of paired t-tests holds many contrasts, so "distinguishable
from 0" in a count ("14 of 16 are distinguishable") is read with Holm's correction over a stated
family: the p-values sorted p_(1) ≤ … ≤ p_(m) get p̃_(i) = min(1, max_{j ≤ i} (m − j + 1)·p_(j)),
and a contrast is distinguishable after Holm when p̃ < 0.05 (family-wise error ≤ 0.05 under any
dependence between the tests; Holm 1979). The per-contrast 95 % t-interval (``distinguishable``)
stays in the tables as the unadjusted statement.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from varstudy.errors import VarstudyError

EXACT = "exact"
PAIRED_COLUMNS = ("family", "ratio", "scope", "value", "n", "mean_config", "mean_exact",
                  "diff_mean", "diff_sd", "diff_ci_low", "diff_ci_high", "p_value",
                  "distinguishable")


def paired_differences(runs: pd.DataFrame, value: str = "best_value",
                       keys: Sequence[str] = ("family", "ratio", "scope"),
                       level: float = 0.95) -> pd.DataFrame:
    """Paired-t differences of ``value`` between every configuration and the exact model.

    Args:
        runs: one row per run with the ``keys`` columns, ``seed`` and ``value``; the exact
            baseline has ``family == "exact"``.
        value: the per-run score (``best_value``: best validation metric; ``test_at_best``).
        keys: columns naming a configuration.
        level: confidence level of the interval.
    Returns:
        One row per non-exact configuration (the ``keys``, then ``PAIRED_COLUMNS[3:]``), in
        the order of
        ``runs``; ``n`` counts the seeds that both the configuration and exact have.
    """
    missing = [c for c in (*keys, "seed", value) if c not in runs.columns]
    if missing:
        raise VarstudyError(f"runs table lacks column(s) {', '.join(missing)}; columns present: "
                            f"{', '.join(map(str, runs.columns))}")
    exact = runs[runs.family == EXACT]
    if exact.empty:
        raise VarstudyError("runs table has no exact runs to pair with; valid choices: a study "
                            "that includes family 'exact'")
    if exact.seed.duplicated().any():
        raise VarstudyError("runs table has several exact runs for one seed; valid choices: one "
                            "exact run per seed")
    base = exact.set_index("seed")[value]
    rows = []
    for key, group in runs[runs.family != EXACT].groupby(list(keys), sort=False):
        stats_ = paired_contrast(group.set_index("seed")[value], base, level)
        rows.append(dict(zip(keys, key), value=value, mean_config=stats_.pop("mean_a"),
                         mean_exact=stats_.pop("mean_b"), **stats_))
    return pd.DataFrame(rows, columns=[*keys, *PAIRED_COLUMNS[3:]])


def paired_contrast(a: pd.Series, b: pd.Series, level: float = 0.95) -> dict:
    """Paired-t statistics of a − b over the seeds both have (Series indexed by seed).

    Returns n, mean_a, mean_b, diff_mean, diff_sd, diff_ci_low, diff_ci_high, p_value and
    distinguishable (the interval excludes 0); NaNs (and not distinguishable) below 2 pairs.
    """
    pairs = a.rename("a").to_frame().join(b.rename("b"), how="inner").dropna()
    return _paired(pairs, level)


def _paired(pairs: pd.DataFrame, level: float) -> dict:
    d = (pairs.a - pairs.b).to_numpy(dtype=float)
    n = d.size
    out = dict(n=n, mean_a=float(pairs.a.mean()), mean_b=float(pairs.b.mean()),
               diff_mean=float(d.mean()) if n else np.nan, diff_sd=np.nan, diff_ci_low=np.nan,
               diff_ci_high=np.nan, p_value=np.nan, distinguishable=False)
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)
    p = float(stats.ttest_rel(pairs.a, pairs.b).pvalue) if sd > 0 else \
        (1.0 if d.mean() == 0 else 0.0)
    out.update(diff_sd=sd, diff_ci_low=float(d.mean() - half), diff_ci_high=float(d.mean() + half),
               p_value=p, distinguishable=bool(d.mean() - half > 0 or d.mean() + half < 0))
    return out


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values of one family (NOTE [multiple comparisons]), in the input order.

    NaN p-values are not tests: they stay NaN and do not count in the family size m.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise VarstudyError("p-values outside [0, 1] given to holm; valid choices: probabilities")
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    steps = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    return out


def with_holm(table: pd.DataFrame, family: Sequence[str], alpha: float = 0.05) -> pd.DataFrame:
    """``table`` (with ``p_value``) plus ``holm_m`` (tests in the row's family), ``p_holm`` and
    ``distinguishable_holm`` (p_holm < ``alpha``); a family is a group of rows with equal
    ``family`` columns."""
    out = table.copy()
    p_values = out.groupby(list(family), sort=False).p_value
    out["holm_m"] = p_values.transform(lambda p: np.isfinite(p.to_numpy(float)).sum()).astype(int)
    out["p_holm"] = p_values.transform(lambda p: holm(p.to_numpy(float)))
    out["distinguishable_holm"] = out.p_holm < alpha
    return out


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row pair of a and b (R, m): the Pearson correlation of their
    average ranks, as scipy.stats.spearmanr computes it, for all rows at once."""
    ra, rb = stats.rankdata(a, axis=1), stats.rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    return (ra * rb).sum(axis=1) / np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))


def _resamples(rows: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` resamples of the rows with replacement, (n_boot, m, columns), each drawn as
    ``numpy.random.default_rng(seed).integers(0, m, m)`` in turn (one call draws them all)."""
    idx = np.random.default_rng(seed).integers(0, len(rows), (n_boot, len(rows)))
    return rows[idx]


def rank_correlation(x: Sequence[float], y: Sequence[float], *, n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rank correlation of ``x`` and ``y`` and its percentile bootstrap interval.

    Pairs (x_i, y_i) with a NaN are dropped. The interval resamples the pairs with replacement
    ``n_boot`` times (``numpy.random.default_rng(seed)``); resamples with a constant side (no
    ranking possible) are skipped. Returns (rho, low, high); NaNs with fewer than 3 pairs.
    """
    xy = np.column_stack([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 3:
        return float("nan"), float("nan"), float("nan")
    rho = float(stats.spearmanr(xy[:, 0], xy[:, 1]).statistic)
    samples = _resamples(xy, n_boot, seed)
    samples = samples[(np.ptp(samples, axis=1) > 0).all(axis=1)]
    draws = _spearman_rows(samples[:, :, 0], samples[:, :, 1])
    low, high = np.quantile(draws, [0.5 - level / 2, 0.5 + level / 2])
    return rho, float(low), float(high)


def rank_correlation_difference(a: Sequence[float], b: Sequence[float], y: Sequence[float], *,
                                n_boot: int = 2000, level: float = 0.95,
                                seed: int = 0) -> tuple[float, float, float]:
    """Spearman ρ(a, y) − ρ(b, y) over the same configurations and its paired percentile
    bootstrap interval: each resample draws configurations (a_i, b_i, y_i) with replacement
    and recomputes both correlations on it (``numpy.random.default_rng(seed)``); resamples with
    a constant column are skipped. Triples with a NaN are dropped. Returns (difference, low,
    high); NaNs with fewer than 3 triples."""
    t = np.column_stack([np.asarray(v, dtype=float) for v in (a, b, y)])
    t = t[np.isfinite(t).all(axis=1)]
    if len(t) < 3:
        return float("nan"), float("nan"), float("nan")

    difference = float(stats.spearmanr(t[:, 0], t[:, 2]).statistic
                       - stats.spearmanr(t[:, 1], t[:, 2]).statistic)
    samples = _resamples(t, n_boot, seed)
    samples = samples[(np.ptp(samples, axis=1) > 0).all(axis=1)]
    draws = (_spearman_rows(samples[:, :, 0], samples[:, :, 2])
             - _spearman_rows(samples[:, :, 1], samples[:, :, 2]))
    low, high = np.quantile(draws, [0.5 - level / 2, 0.5 + level / 2])
    return difference, float(low), float(high)
