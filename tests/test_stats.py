"""Paired differences and rank correlations, checked against scipy on fixed examples."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.stats import paired_contrast, paired_differences, rank_correlation
from varstudy.errors import VarstudyError

EXACT = [0.80, 0.82, 0.79, 0.81, 0.83]
ROWS = [0.78, 0.81, 0.76, 0.80, 0.80]     # lower on every seed: distinguishable
GAUSS = [0.81, 0.80, 0.80, 0.79, 0.84]    # mixed signs: not distinguishable


def _runs():
    rows = [dict(family="exact", ratio=1.0, scope="none", seed=s, best_value=v)
            for s, v in enumerate(EXACT)]
    rows += [dict(family="rows", ratio=0.1, scope="all", seed=s, best_value=v)
             for s, v in enumerate(ROWS)]
    # gaussian misses seed 4 and lists its seeds in another order: pairing is by seed
    rows += [dict(family="gaussian", ratio=0.1, scope="encoder", seed=s, best_value=GAUSS[s])
             for s in (3, 1, 0, 2)]
    return pd.DataFrame(rows)


def test_paired_differences_match_scipy():
    table = paired_differences(_runs()).set_index("family")
    d = np.subtract(ROWS, EXACT)
    ci = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    row = table.loc["rows"]
    assert row.n == 5 and row.scope == "all"
    assert row.diff_mean == pytest.approx(d.mean(), abs=1e-15)
    assert (row.diff_ci_low, row.diff_ci_high) == pytest.approx(ci, abs=1e-12)
    assert row.p_value == pytest.approx(stats.ttest_rel(ROWS, EXACT).pvalue, rel=1e-12)
    assert row.distinguishable and row.diff_ci_high < 0
    g = table.loc["gaussian"]
    d4 = np.subtract(GAUSS[:4], EXACT[:4])
    assert g.n == 4 and g.diff_mean == pytest.approx(d4.mean(), abs=1e-15)
    assert g.p_value == pytest.approx(stats.ttest_rel(GAUSS[:4], EXACT[:4]).pvalue, rel=1e-12)
    assert not g.distinguishable and g.diff_ci_low < 0 < g.diff_ci_high
    assert g.mean_exact == pytest.approx(np.mean(EXACT[:4]))


def test_paired_differences_need_one_exact_run_per_seed():
    runs = _runs()
    with pytest.raises(VarstudyError, match="no exact runs"):
        paired_differences(runs[runs.family != "exact"])
    with pytest.raises(VarstudyError, match="several exact runs"):
        paired_differences(pd.concat([runs, runs[runs.family == "exact"].head(1)]))
    with pytest.raises(VarstudyError, match="lacks column.*test_at_best"):
        paired_differences(runs, value="test_at_best")


def test_rank_correlation_and_bootstrap_interval():
    x = [1, 2, 3, 4, 5, 6, 7, 8]
    y = [2, 1, 4, 3, 6, 5, 8, 7]
    rho, low, high = rank_correlation(x, y, n_boot=500, seed=1)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert low <= rho <= high <= 1 and low > 0
    assert rank_correlation(x, y, n_boot=500, seed=1) == (rho, low, high)  # seeded
    assert rank_correlation(x, x[::-1], n_boot=200) == pytest.approx((-1.0, -1.0, -1.0))
    assert np.isnan(rank_correlation([1, 2], [3, 4])[0])


def test_paired_table_cells_show_intervals_and_lone_pairs():
    from analysis.figures_accuracy import paired_wide
    runs = _runs()
    lone = [dict(family="rows", ratio=0.5, scope="all", seed=0, best_value=0.79)]
    table = paired_differences(pd.concat([runs, pd.DataFrame(lone)], ignore_index=True))
    wide = paired_wide(table.assign(value="best_value"), "best_value").set_index("family")
    d = 100 * np.subtract(ROWS, EXACT)
    low, high = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    assert wide.loc["rows", "10%"].startswith(f"{d.mean():+.2f} [{low:+.2f}, {high:+.2f}]*")
    assert wide.loc["rows", "50%"].startswith("-1.00 [one seed]")
    assert "nan" not in wide.to_string()


def test_paired_contrast_matches_scipy_and_pairs_by_seed():
    a = pd.Series(ROWS, index=range(5))
    b = pd.Series(GAUSS[::-1], index=range(4, -1, -1))  # the same seeds, listed in reverse
    out = paired_contrast(a, b)
    d = np.subtract(ROWS, GAUSS)
    low, high = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    assert out["n"] == 5 and out["diff_mean"] == pytest.approx(d.mean(), abs=1e-15)
    assert (out["diff_ci_low"], out["diff_ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert out["p_value"] == pytest.approx(stats.ttest_rel(ROWS, GAUSS).pvalue, rel=1e-12)
    assert out["mean_a"] == pytest.approx(np.mean(ROWS))
    assert out["distinguishable"] == (high < 0 or low > 0)
    lone = paired_contrast(a, pd.Series([0.5], index=[2]))
    assert lone["n"] == 1 and np.isnan(lone["diff_ci_low"]) and not lone["distinguishable"]


def test_paired_contrasts_compare_scopes_and_families_at_equal_ratio():
    from analysis.figures_accuracy import paired_contrasts
    rows = [dict(family=f, ratio=r, scope=sc, seed=s, best_value=v, test_at_best=v)
            for f, r, sc, values in (("rows", 0.1, "all", ROWS), ("rows", 0.1, "encoder", EXACT),
                                     ("gaussian", 0.1, "all", GAUSS),
                                     ("gaussian", 0.2, "encoder", GAUSS))
            for s, v in enumerate(values)]
    table = paired_contrasts(pd.DataFrame(rows)).query("value == 'best_value'")
    got = {(c, r): m for c, r, m in zip(table.contrast, table.ratio, table.diff_mean)}
    # gaussian 0.2 encoder has no rows 0.2 encoder and no all-scope twin: no contrast
    assert set(got) == {("rows: all − encoder", 0.1), ("gaussian − rows, all", 0.1)}
    assert got["rows: all − encoder", 0.1] == pytest.approx(np.mean(np.subtract(ROWS, EXACT)))
    assert got["gaussian − rows, all", 0.1] == pytest.approx(np.mean(np.subtract(GAUSS, ROWS)))
