"""Time to accuracy at matched peak memory (issue 24 item 2): the pure functions on hand-made
curves, the picks on a synthetic frontier table with accumulation rows and the committed
accuracy evaluations, and the figure with and without accumulation rows."""

import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from analysis import figures  # noqa: E402
from analysis.figures_time_to_accuracy import (EVALS, FRONTIER, accuracy_points,  # noqa: E402
                                               choose, method_of, missing_methods, steps_to,
                                               value_at)

ROOT = Path(__file__).resolve().parent.parent
COMMITTED_EVALS = ROOT / "results" / EVALS

# config, kind, strategy, family, ratio, objective, micro_batches, peak_ratio, time_ratio
SYNTHETIC = pd.DataFrame([
    ("exact", "exact", "none", "exact", 1.0, None, 1, 1.00, 1.00),
    ("torch", "checkpoint", "torch", "exact", 1.0, None, 1, 0.20, 1.36),
    ("revolve s=1", "checkpoint", "revolve", "exact", 1.0, None, 1, 0.18, 2.03),
    ("rows 0.5", "sketch", "none", "rows", 0.5, None, 1, 0.88, 0.90),
    ("rows plan (absolute)", "plan", "none", "rows", 0.1, "absolute", 1, 0.79, 0.82),
    ("torch + rows 0.1", "combined", "torch", "rows", 0.1, None, 1, 0.17, 1.19),
    ("accumulate m=2", "accumulation", "none", "exact", 1.0, None, 2, 0.50, 1.05),
    ("accumulate m=4", "accumulation", "none", "exact", 1.0, None, 4, 0.25, 1.10),
    ("accumulate m=8", "accumulation", "none", "exact", 1.0, None, 8, 0.125, 1.25),
    ("accumulate m=4 + torch", "accumulation", "torch", "exact", 1.0, None, 4, 0.05, 1.45),
    ("accumulate m=8 + torch", "accumulation", "torch", "exact", 1.0, None, 8, 0.03, 1.60),
    ("accumulate m=8 + rows 0.5", "accumulation", "none", "rows", 0.5, None, 8, 0.11, 1.10),
    ("accumulate m=8 + rows plan (absolute)", "accumulation", "none", "rows", 0.1, "absolute",
     8, 0.099, 1.15),
], columns=["config", "kind", "strategy", "family", "ratio", "objective", "micro_batches",
            "peak_ratio", "time_ratio"]).assign(model="minilm", task="rotten_tomatoes",
                                                batch_size=32, seq_len=128, device="cpu",
                                                var_ratio_all=0.0)


def _curve(steps, values):
    return pd.DataFrame(dict(step=steps, value=values))


def test_steps_to_target_by_hand():
    c = _curve([25, 50, 75, 100], [0.5, 0.7, 0.78, 0.82])
    assert steps_to(c, 0.80) == pytest.approx(87.5)  # 75 + (0.02 / 0.04) × 25
    assert steps_to(c, 0.78) == 75.0  # reached at an evaluation
    assert steps_to(c, 0.4) == 25.0  # the first evaluation already: its step
    assert np.isnan(steps_to(c, 0.9))
    assert steps_to(c.iloc[::-1], 0.80) == pytest.approx(87.5)  # order of rows is irrelevant


def test_value_at_by_hand():
    c = _curve([25, 50, 75, 100], [0.5, 0.7, 0.78, 0.82])
    assert value_at(c, 60.0) == (pytest.approx(0.732), False)
    got, bound = value_at(c, 10.0)
    assert np.isnan(got) and not bound  # before the first evaluation: unknown
    assert value_at(c, 150.0) == (0.82, True)  # past the last: a lower bound


def test_methods_and_missing_accumulation():
    methods = dict(zip(SYNTHETIC.config, method_of(SYNTHETIC)))
    assert methods["exact"] == "exact" and methods["revolve s=1"] == "checkpointing"
    assert methods["rows plan (absolute)"] == "plan"
    assert methods["torch + rows 0.1"] == "checkpointing + sketch"
    assert methods["accumulate m=4 + torch"] == "accumulation + checkpointing"
    assert methods["accumulate m=8 + rows plan (absolute)"] == "accumulation + plan"
    assert missing_methods(SYNTHETIC) == []
    old = SYNTHETIC[SYNTHETIC.kind != "accumulation"].drop(columns="micro_batches")
    assert "accumulation" not in set(method_of(old)) and missing_methods(old) == ["accumulation"]


def _mean_steps(evals, family, ratio, scope, target=0.80):
    """Steps to target on the seed-mean curve, computed here independently."""
    rows = evals[(evals.metric == "accuracy") & (evals.family == family)
                 & np.isclose(evals.ratio, ratio) & (evals.scope == scope)]
    mean = rows.groupby("step").value.mean().sort_index()
    above = mean[mean >= target]
    s1 = above.index[0]
    before = mean[mean.index < s1]
    if before.empty:
        return float(s1)
    s0 = before.index[-1]
    return s0 + (target - mean[s0]) / (mean[s1] - mean[s0]) * (s1 - s0)


def test_picks_on_a_synthetic_frontier_and_the_committed_evals():
    evals = pd.read_csv(COMMITTED_EVALS)
    points = accuracy_points(SYNTHETIC, evals).set_index("config")
    exact = _mean_steps(evals, "exact", 1.0, "none")
    # exact-gradient methods follow exact's curve; time = steps × step-time ratio
    for name in ("torch", "accumulate m=2", "accumulate m=8 + torch"):
        assert points.loc[name, "curve"] == "exact 1 (none)"
        assert points.loc[name, "steps_to_target"] == pytest.approx(exact)
        assert points.loc[name, "time_vs_exact"] == pytest.approx(
            SYNTHETIC.set_index("config").loc[name, "time_ratio"])
    assert points.loc["accumulate m=8 + rows 0.5", "curve"] == "rows 0.5 (all)"
    plan = _mean_steps(evals, "rows", 0.1, "plan:plan_absolute_0.1")
    assert points.loc["accumulate m=8 + rows plan (absolute)", "steps_to_target"] == \
        pytest.approx(plan)
    assert np.isnan(points.loc["torch + rows 0.1", "steps_to_target"])  # 79 % at step 200
    got = choose(points.reset_index()).set_index(["budget", "method"])
    # 50 %: accumulation m=2 (1.05) beats m=4 (1.10) and m=8 (1.25); torch beats Revolve
    assert got.loc[(0.5, "accumulation"), "config"] == "accumulate m=2"
    assert got.loc[(0.5, "checkpointing"), "config"] == "torch"
    assert got.loc[(0.5, "accumulation + checkpointing"), "config"] == "accumulate m=4 + torch"
    assert pd.isna(got.loc[(0.5, "sketch"), "config"])  # rows 0.5 keeps 88 % of the peak
    rows = _mean_steps(evals, "rows", 0.5, "all")
    assert got.loc[(0.5, "accumulation + sketch"), "time_vs_exact"] == \
        pytest.approx(rows * 1.10 / exact)
    # the combination never reaches 80 %: picked by accuracy at the fixed time, no time
    assert got.loc[(0.5, "checkpointing + sketch"), "config"] == "torch + rows 0.1"
    assert np.isnan(got.loc[(0.5, "checkpointing + sketch"), "time_to_target"])
    # 10 %: accumulation alone (0.125) no longer fits; with torch (0.05) or the plan (0.099)
    assert pd.isna(got.loc[(0.1, "accumulation"), "config"])
    assert pd.isna(got.loc[(0.1, "checkpointing"), "config"])
    assert got.loc[(0.1, "accumulation + checkpointing"), "config"] == "accumulate m=4 + torch"
    assert got.loc[(0.1, "accumulation + plan"), "time_vs_exact"] == \
        pytest.approx(plan * 1.15 / exact)
    assert pd.isna(got.loc[(0.1, "accumulation + sketch"), "config"])  # 0.11 > 0.1


def _results(tmp_path, front) -> Path:
    res = tmp_path / "results"
    (res / FRONTIER).parent.mkdir(parents=True)
    (res / EVALS).parent.mkdir(parents=True)
    front.to_csv(res / FRONTIER, index=False)
    shutil.copy(COMMITTED_EVALS, res / EVALS)
    return res


def _build(res, out) -> int:
    return figures.main(["time_to_accuracy", "--results", str(res), "--out", str(out)])


def test_figure_and_table_with_accumulation_rows(tmp_path):
    out = tmp_path / "figs"
    assert _build(_results(tmp_path, SYNTHETIC), out) == 0
    for ext in ("png", "pdf"):
        assert (out / f"time_to_accuracy.{ext}").stat().st_size > 1000
    md = (out / "time_to_accuracy.md").read_text()
    assert "No accumulation rows" not in md
    assert "| 50 % | accumulation | accumulate m=2 | 0.500 | 1.05 | 1.05× (" in md
    assert "| 10 % | accumulation | none fits |" in md
    assert "| 50 % | checkpointing + sketch | torch + rows 0.1 | 0.170 | 1.19 | not reached " \
           "in 200 steps |" in md
    table = pd.read_csv(out / "time_to_accuracy.csv")
    assert list(table.config) == list(SYNTHETIC.config)
    assert table.set_index("config").loc["accumulate m=4", "method"] == "accumulation"


def test_a_table_without_accumulation_rows_draws_without_it_and_says_so(tmp_path, capsys):
    old = SYNTHETIC[SYNTHETIC.kind != "accumulation"].drop(columns="micro_batches")
    out = tmp_path / "figs"
    assert _build(_results(tmp_path, old), out) == 0
    md = (out / "time_to_accuracy.md").read_text()
    assert ("No accumulation rows in study/frontier/frontier.csv (written before issue 24): "
            "accumulation not drawn; rerun python -m varstudy.study frontier") in md
    assert "| accumulation |" not in md and "| 25 % | checkpointing | torch |" in md


def test_a_frontier_of_another_model_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "figs"
    assert _build(_results(tmp_path, SYNTHETIC.assign(model="mpnet-base")), out) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "of model 'mpnet-base'" in err[0] and "valid choices" in err[0]
    assert not (out / "time_to_accuracy.png").exists()
