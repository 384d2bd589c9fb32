"""Paired differences and rank correlations, checked against scipy on fixed examples."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.stats import (holm, paired_contrast, paired_differences, rank_correlation,
                            rank_correlation_difference, with_holm)
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
    # each contrast kind is its own Holm family of one score (NOTE [multiple comparisons])
    fam = dict(zip(table.contrast, zip(table.holm_family, table.holm_m)))
    assert fam == {"rows: all − encoder": ("all − encoder", 1),
                   "gaussian − rows, all": ("family − rows", 1)}
    assert (table.p_holm == table.p_value).all()  # a family of one is not adjusted


# --------------------------------------------------------------------------------------------
# Holm's correction (NOTE [multiple comparisons])
# --------------------------------------------------------------------------------------------


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max
    # 0.02, 0.03, 0.06, 0.06; back in the input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN is no test (m = 2): 0.01 x 2, 0.04 x 1 -> max(0.02, 0.04)
    got = holm([0.01, np.nan, 0.04])
    assert got[[0, 2]] == pytest.approx([0.02, 0.04]) and np.isnan(got[1])
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]  # capped at 1
    assert holm([0.02, 0.02]).tolist() == [0.04, 0.04]  # ties
    assert holm([]).size == 0
    with pytest.raises(VarstudyError, match="outside \\[0, 1\\].*valid choices"):
        holm([0.1, 1.5])


def _holm_rejects(p, alpha):
    """Holm's step-down test as Holm (1979) states it: reject H_(1), H_(2), ... while
    p_(i) <= alpha / (m - i + 1), stop at the first that is not."""
    order = np.argsort(p, kind="stable")
    rejected = set()
    for i, j in enumerate(order):
        if p[j] > alpha / (len(p) - i):
            break
        rejected.add(int(j))
    return rejected


def test_holm_adjusted_p_values_give_the_step_down_test():
    rng = np.random.default_rng(3)
    for m in (1, 2, 5, 16):
        p = np.concatenate([rng.uniform(0, 0.02, m // 2), rng.uniform(0, 1, m - m // 2)])
        adjusted = holm(p)
        assert (adjusted >= p).all() and (adjusted <= np.minimum(1, m * p) + 1e-15).all()
        for alpha in (0.01, 0.05, 0.1):
            assert set(np.flatnonzero(adjusted <= alpha)) == _holm_rejects(p, alpha), (m, alpha)


def test_with_holm_adjusts_within_each_family():
    table = pd.DataFrame(dict(value=["v", "v", "v", "t", "t"], kind=["a", "a", "b", "a", "a"],
                              p_value=[0.01, 0.04, 0.03, 0.005, np.nan]))
    out = with_holm(table, ["value", "kind"])
    assert out.holm_m.tolist() == [2, 2, 1, 1, 1]
    assert out.p_holm.tolist()[:4] == pytest.approx([0.02, 0.04, 0.03, 0.005])
    assert np.isnan(out.p_holm.iloc[4]) and not out.distinguishable_holm.iloc[4]
    assert out.distinguishable_holm.tolist()[:4] == [True, True, True, True]
    assert list(table.columns) == ["value", "kind", "p_value"]  # the input is not changed


def test_committed_paired_tables_carry_holm_for_their_families():
    """The committed figures/paired_*.csv: p_holm is Holm over each (score, family)."""
    from pathlib import Path
    figures = Path(__file__).resolve().parents[1] / "figures"
    for name in ("paired_diff.csv", "paired_contrasts.csv"):
        table = pd.read_csv(figures / name)
        for _, g in table.groupby(["value", "holm_family"]):
            assert (g.holm_m == g.p_value.notna().sum()).all(), name
            assert g.p_holm.to_numpy() == pytest.approx(holm(g.p_value.to_numpy()), rel=1e-12)
            assert (g.distinguishable_holm == (g.p_holm < 0.05)).all()


# --------------------------------------------------------------------------------------------
# Difference of two rank correlations
# --------------------------------------------------------------------------------------------


def test_rank_correlation_difference_pairs_the_resamples():
    y = np.arange(12.0)
    a = y + np.array([0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, -1]) * 0.6  # ranks nearly y's
    b = np.array([5, 2, 9, 0, 11, 3, 7, 1, 10, 4, 8, 6], dtype=float)  # ranks unrelated
    diff, low, high = rank_correlation_difference(a, b, y, n_boot=500, seed=2)
    assert diff == pytest.approx(stats.spearmanr(a, y).statistic - stats.spearmanr(b, y).statistic)
    assert 0 < low <= diff <= high
    assert rank_correlation_difference(a, b, y, n_boot=500, seed=2) == (diff, low, high)
    # the same predictor twice: every paired resample differs by exactly 0
    assert rank_correlation_difference(b, b, y, n_boot=200) == (0.0, 0.0, 0.0)
    # NaN triples are dropped; fewer than 3 left: NaN
    assert np.isnan(rank_correlation_difference([1, 2, np.nan], [1, 2, 3], [3, 2, 1])[0])


def test_link_differences_compare_summaries_over_the_same_configurations():
    from analysis.summaries import SUMMARIES, link_differences
    ratios = [0.5, 0.2, 0.1, 0.05, 0.5, 0.2, 0.1, 0.05]
    scopes = ["all"] * 4 + ["encoder"] * 4
    cost = np.array([-1.0, -2.0, -4.0, -7.0, -0.5, -1.5, -2.5, -4.5])
    paired = pd.DataFrame(dict(family="rows", ratio=ratios, scope=scopes, diff_mean=cost))
    good = -cost + 0.1  # ranks the costs exactly
    bad = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0])
    summaries = pd.concat([pd.DataFrame(dict(
        family="rows", ratio=ratios, scope=scopes, when=when,
        **{name: good if name != "ratio_model" else model for name in SUMMARIES}))
        for when, model in (("step 0", bad), ("end of training", good))])
    out = link_differences(paired, summaries, n_boot=300).set_index(["a", "b"])
    assert len(out) == 2 * (len(SUMMARIES) - 1) + 1 and (out.n_configs == 8).all()
    step0 = out.loc[("step 0: layer_mean", "step 0: ratio_model")]
    rho_bad = stats.spearmanr(bad, cost).statistic
    assert step0.difference == pytest.approx(-1.0 - rho_bad)
    assert step0.difference == pytest.approx(rank_correlation_difference(good, bad, cost)[0])
    assert step0.ci_low <= step0.difference <= step0.ci_high < 0
    end = out.loc[("end of training: layer_mean", "end of training: ratio_model")]
    assert (end.difference, end.ci_low, end.ci_high) == (0.0, 0.0, 0.0)
    across = out.loc[("end of training: ratio_model", "step 0: ratio_model")]
    assert across.difference == pytest.approx(step0.difference)
