"""analysis: table math on hand-computed examples, plot functions on synthetic DataFrames, and the
figure command on the committed results (CPU, no GPU, a few seconds)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from analysis import figures, plots, tables  # noqa: E402
from analysis.style import FAMILY_STYLES, family_style, new_figure  # noqa: E402
from varstudy.errors import VarstudyError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("gaussian", "rademacher", "rows-norm")
RATIOS = (0.1, 0.2, 0.5)
KINDS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


# --------------------------------------------------------------------------------------------
# Synthetic results in the engine's schemas
# --------------------------------------------------------------------------------------------


def _layers_index(n_blocks: int = 2) -> list[tuple[str, str, int]]:
    out = [(f"encoder.layer.{i}.{k}", k, i) for i in range(n_blocks) for k in KINDS]
    return out + [("classifier", "classifier", -1)]


def synthetic_summary(steps=(0,), n_blocks: int = 2) -> pd.DataFrame:
    rows = []
    for step in steps:
        for j, (layer, kind, idx) in enumerate(_layers_index(n_blocks)):
            for f, fam in enumerate(FAMILIES):
                for r in RATIOS:
                    samp = 10.0 * (j + 1)
                    sk = (1 + f) * (1 + j) * (1 / r - 1) * (1 + 0.1 * step)
                    rows.append(dict(
                        train_step=step, layer=layer, layer_kind=kind,
                        layer_index=np.nan if idx < 0 else idx, family=fam, ratio=r, k=int(64 * r),
                        n_batches=4, var_sketch_mean=sk, var_sketch_ci_low=0.9 * sk,
                        var_sketch_ci_high=1.1 * sk, var_sampling_mean=samp,
                        var_sampling_ci_low=0.8 * samp, var_sampling_ci_high=1.2 * samp,
                        var_total=sk + samp, ratio_mean=sk / samp, ratio_ci_low=0.8 * sk / samp,
                        ratio_ci_high=1.2 * sk / samp, var_sketch_mc_mean=sk,
                        var_sketch_mc_se=0.05 * sk))
    return pd.DataFrame(rows)


def synthetic_layers(summary: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for rec in summary.to_dict("records"):
        for b in range(2):
            alpha = 0.01 * (1 + b)
            rows.append(dict(
                train_step=rec["train_step"], batch=b, layer=rec["layer"],
                layer_kind=rec["layer_kind"], layer_index=rec["layer_index"], d_in=8, d_out=8,
                batch_size=4, n_rows=64, family=rec["family"], ratio=rec["ratio"], k=rec["k"],
                grad_sq_norm=1.0, var_sampling=rec["var_sampling_mean"],
                var_sketch=rec["var_sketch_mean"], var_sketch_mc=rec["var_sketch_mean"] * 1.02,
                var_sketch_mc_se=0.05 * rec["var_sketch_mean"], mc_draws=50, alpha=alpha,
                paper_ratio=1.0 + 0.01 * rec["train_step"], paper_bound=(alpha + 1) / alpha,
                paper_ratio_plotted=1.0, paper_bound_plotted=1 + alpha,
                ratio_sketch_sampling=rec["ratio_mean"]))
    return pd.DataFrame(rows)


def synthetic_runs() -> pd.DataFrame:
    rows = []
    for seed in range(3):
        rows.append(dict(task="cola", model="minilm", family="exact", ratio=np.nan,
                         scope="none", seed=seed, metric="matthews",
                         best_value=0.50 + 0.01 * seed, test_at_best=0.49 + 0.01 * seed,
                         final_value=0.5, train_time_s=60.0))
        for fam in FAMILIES[:2]:
            for r in RATIOS:
                for scope in ("all", "encoder"):
                    rows.append(dict(task="cola", model="minilm", family=fam, ratio=r,
                                     scope=scope, seed=seed, metric="matthews",
                                     best_value=0.4 + 0.1 * r + 0.01 * seed
                                     + (0.003 * seed ** 2 if scope == "encoder" else 0.0),
                                     test_at_best=0.39 + 0.1 * r + 0.01 * seed,
                                     final_value=0.4, train_time_s=70.0 + seed))
        for r in (0.1, 0.05):
            for obj in ("absolute", "relative"):
                rows.append(dict(task="cola", model="minilm", family="rows", ratio=r,
                                 scope=f"plan:plan_{obj}_{r:g}", seed=seed, metric="matthews",
                                 best_value=0.45 + 0.02 * seed, test_at_best=0.44,
                                 final_value=0.4, train_time_s=70.0))
    return pd.DataFrame(rows)


def synthetic_memory() -> pd.DataFrame:
    rows = [dict(model="minilm", family="exact", ratio=1.0, batch_size=b, seq_len=128,
                 saved_mib=10.0 * b, saved_linear_mib=6.0 * b, peak_cuda_mib=np.nan, device="cpu")
            for b in (8, 16, 32)]
    rows += [dict(model="minilm", family="gaussian", ratio=r, batch_size=b, seq_len=128,
                  saved_mib=(4 + 6 * r) * b, saved_linear_mib=6 * r * b, peak_cuda_mib=np.nan,
                  device="cpu") for r in RATIOS for b in (8, 16, 32)]
    return pd.DataFrame(rows)


def synthetic_throughput() -> pd.DataFrame:
    rows = [dict(model="minilm", family="exact", ratio=1.0, batch_size=32, examples_per_s=100.0,
                 device="cpu")]
    rows += [dict(model="minilm", family=f, ratio=r, batch_size=32,
                  examples_per_s=90.0 + 10 * (1 - r), device="cpu")
             for f in FAMILIES for r in RATIOS]
    return pd.DataFrame(rows)


def synthetic_max_batch() -> pd.DataFrame:
    rows = [dict(family="exact", ratio=1.0, basis="saved_mib", budget_mib=256.0, max_batch=20)]
    rows += [dict(family="gaussian", ratio=r, basis="saved_mib", budget_mib=256.0,
                  max_batch=int(20 / (0.4 + 0.6 * r))) for r in RATIOS]
    return pd.DataFrame(rows)


def synthetic_bench() -> pd.DataFrame:
    rows = [dict(family="exact", ratio=1.0, step_time_ms=10.0, time_ratio=1.0, saved_mib=100.0,
                 saved_ratio=1.0, linear_saved_ratio=1.0)]
    rows += [dict(family=f, ratio=r, step_time_ms=11.0, time_ratio=1.1, saved_mib=60 + 40 * r,
                  saved_ratio=0.6 + 0.4 * r, linear_saved_ratio=r) for f in FAMILIES for r in RATIOS]
    return pd.DataFrame(rows)


@pytest.fixture
def synthetic_results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    for run, steps in (("default", (0,)), ("over_training", (0, 10, 20)), ("recipe_step0", (0,)),
                       ("recipe_end", (0,))):
        d = res / "measure" / run
        d.mkdir(parents=True)
        summary = synthetic_summary(steps)
        summary.to_csv(d / "summary.csv", index=False)
        layers = synthetic_layers(summary)
        layers.to_csv(d / "layers.csv", index=False)
        if run == "default":
            from varstudy.measure.tables import scope_summary
            scope_summary(layers[layers.layer != "model"]).to_csv(d / "scopes.csv", index=False)
    plans = res / "plans" / "default_rows"
    plans.mkdir(parents=True)
    front = pd.DataFrame([dict(family="rows", budget=b, objective=o, stored_numbers=1000 * b,
                               var_sketch_uniform=1 / b, var_sketch_planned=0.1 / b,
                               uniform_over_planned=10.0, relative_uniform=30 / b,
                               relative_planned=20 / b, relative_uniform_over_planned=1.5,
                               exact_layers=2, var_sampling=0.3)
                          for b in (0.05, 0.1) for o in ("absolute", "relative")])
    front.to_csv(plans / "frontier.csv", index=False)
    (res / "plans" / "bench").mkdir()
    pd.DataFrame([dict(family=f, ratio=b, time_ratio=0.9, saved_ratio=0.7,
                       linear_saved_ratio=b) for b in (0.05, 0.1)
                  for f in ("rows", "rows:plan_absolute_" + f"{b:g}",
                            "rows:plan_relative_" + f"{b:g}")]
                 + [dict(family="exact", ratio=1.0, time_ratio=1.0, saved_ratio=1.0,
                         linear_saved_ratio=1.0)]).to_csv(res / "plans" / "bench" / "layers.csv",
                                                          index=False)
    online = res / "online" / "rows0.1_replan25_seed0"
    online.mkdir(parents=True)
    pd.DataFrame([dict(step=step, family="rows", layer=name, unit=name, d_in=8, n_rows=100.0,
                       c_online=c * (1.1 if step == 25 else 0.9), c_exact=c,
                       ratio_online=r, exact_online=r == 1.0, ratio_exact_stats=r,
                       exact_exact_stats=r == 1.0, var_online=0.0 if r == 1.0 else c / r,
                       var_exact_stats=0.0 if r == 1.0 else c / r, var_uniform=c / 0.1)
                  for step in (25, 50)
                  for name, c, r in (("a", 1.0, 0.05), ("b", 4.0, 0.1), ("head", 50.0, 1.0))]
                 ).to_csv(online / "plans.csv", index=False)
    (res / "plans" / "recipe_rows").mkdir()
    (res / "plans" / "recipe_rows" / "plan_absolute_0.1.json").write_text(json.dumps(
        dict(family="rows", layers={"a": dict(ratio=0.1), "b": dict(ratio=0.1),
                                    "head": dict(ratio="exact")})))
    curve = res / "study" / "learning_curve" / "lr5e-05" / "accuracy"
    curve.mkdir(parents=True)
    pd.DataFrame([dict(step=s, metric="accuracy", value=0.5 + s / 1000, seed=0)
                  for s in (25, 50, 75, 100)]).to_csv(curve / "evals.csv", index=False)
    (curve / "config.json").write_text('{"lr": 5e-05}')
    (res / "study" / "frontier").mkdir(parents=True)
    pd.DataFrame([dict(config=c, kind=k, peak_ratio=p, time_ratio=t, var_ratio_all=v)
                  for c, k, p, t, v in (("exact", "exact", 1.0, 1.0, 0.0),
                                        ("revolve s=2", "checkpoint", 0.4, 1.6, 0.0),
                                        ("rows 0.1", "sketch", 0.6, 0.9, 2.0))]).to_csv(
        res / "study" / "frontier" / "frontier.csv", index=False)
    (res / "study" / "mpnet").mkdir()
    shutil.copytree(res / "study" / "frontier", res / "study" / "mpnet" / "frontier")
    for sub, df in (("accuracy/runs.csv", synthetic_runs()),
                    ("memory/memory.csv", synthetic_memory()),
                    ("throughput/throughput.csv", synthetic_throughput()),
                    ("throughput/max_batch.csv", synthetic_max_batch()),
                    ("../bench/layers.csv", synthetic_bench())):
        (res / "study" / sub).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(res / "study" / sub, index=False)
    return res


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def test_mean_ci_hand_computed():
    # values 1, 2, 3: mean 2, sd 1, se 1/√3, t_{0.975, 2} = 4.302653
    m, lo, hi = tables.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert m == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    m, lo, hi = tables.mean_ci([5.0])
    assert m == 5.0 and math.isnan(lo) and math.isnan(hi)


def test_aggregate_groups_and_ci():
    df = pd.DataFrame({"family": ["a", "a", "a", "b", "b"], "v": [1.0, 2.0, 3.0, 4.0, 6.0]})
    out = tables.aggregate(df, ["family"], "v").set_index("family")
    assert out.loc["a", "mean"] == 2.0 and out.loc["a", "std"] == 1.0 and out.loc["a", "n"] == 3
    # b: mean 5, sd √2, se 1, t_{0.975, 1} = 12.7062
    assert out.loc["b", "ci_high"] == pytest.approx(5 + 12.706204736174698)


def test_ratio_to_baseline_matches_by_keys():
    df = pd.DataFrame({"family": ["exact", "gaussian", "exact", "gaussian"],
                       "batch_size": [8, 8, 16, 16], "tp": [100.0, 50.0, 200.0, 150.0]})
    out = tables.ratio_to_baseline(df, "tp", ["batch_size"])
    assert out["tp_to_exact"].tolist() == [1.0, 0.5, 1.0, 0.75]
    with pytest.raises(VarstudyError, match="no rows with family == 'none'"):
        tables.ratio_to_baseline(df, "tp", baseline="none")


def test_family_spread():
    df = pd.DataFrame({"family": ["exact", "gaussian", "rows", "gaussian", "rows"],
                       "ratio": [1.0, 0.1, 0.1, 0.5, 0.5], "batch_size": [8] * 5,
                       "saved_mib": [100.0, 10.0, 11.0, 50.0, 50.0]})
    assert tables.family_spread(df, "saved_mib") == pytest.approx(0.1)


def test_require_columns_names_missing():
    with pytest.raises(VarstudyError, match="lacks required column.*ratio_mean"):
        tables.require_columns(pd.DataFrame({"a": [1]}), ["a", "ratio_mean"], "summary.csv")


def test_views_on_synthetic_summary():
    summary = synthetic_summary((0, 5))
    layer = tables.pick_layer(summary, "ffn_in")
    assert layer == "encoder.layer.1.ffn_in"  # middle of indices {0, 1}
    kv = tables.kind_variance(summary)
    assert set(kv["layer_kind"]) == set(KINDS) and (kv["n_layers"] == 2).all()
    wide = tables.heatmap_matrix(summary, 0.2)
    assert list(wide.columns) == list(FAMILIES) and wide.shape == (13, 3)
    assert wide.index[0] == "L0 query" and wide.index[-1] == "classifier"
    paper = tables.paper_view(synthetic_layers(summary), layer, "gaussian", 0.5)
    assert paper["train_step"].tolist() == [0, 5] and (paper["batch"] == 0).all()


def test_accuracy_table_markdown_and_latex():
    summary = tables.accuracy_summary(synthetic_runs().query("scope in ('none', 'all')"))
    exact = summary[summary["family"] == "exact"].iloc[0]
    assert exact["ratio"] == 1.0 and exact["mean"] == pytest.approx(0.51)
    wide = tables.accuracy_table(summary)
    assert list(wide.columns) == ["task", "metric", "family", "100%", "50%", "20%", "10%"]
    assert wide["family"].tolist() == ["exact", "gaussian", "rademacher"]
    assert wide.loc[0, "100%"] == "51.00 ± 1.00" and wide.loc[1, "10%"] == "42.00 ± 1.00"
    md = tables.to_markdown(wide, "caption")
    assert "| task | metric | family | 100% | 50% | 20% | 10% |" in md
    assert "| cola | matthews | gaussian |  | 46.00 ± 1.00 | 43.00 ± 1.00 | 42.00 ± 1.00 |" in md
    tex = tables.to_latex(wide, "50% of rows", "tab:acc")
    assert r"\begin{tabular}{lllrrrr}" in tex and r"\caption{50\% of rows}" in tex
    assert r"51.00 $\pm$ 1.00" in tex and r"100\% & 50\%" in tex and r"\bottomrule" in tex


# --------------------------------------------------------------------------------------------
# Plots on synthetic frames
# --------------------------------------------------------------------------------------------


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_plot_variance_vs_ratio_series_and_axes():
    kv = tables.kind_variance(synthetic_summary())
    ax = plots.plot_variance_vs_ratio(kv[kv["layer_kind"] == "ffn_in"])
    assert len(ax.get_lines()) == len(FAMILIES) + 1
    assert _labels(ax) == [family_style(f).label for f in FAMILIES] + ["sampling (minibatch)"]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel().startswith("compression ratio") and "variance" in ax.get_ylabel()
    assert ax.get_lines()[0].get_color() == FAMILY_STYLES["gaussian"].color


def test_plot_ratio_over_training_and_paper():
    summary = synthetic_summary((0, 10, 20))
    layer = tables.pick_layer(summary)
    fig, axes = new_figure(1, 2)
    plots.plot_paper_ratio(tables.paper_view(synthetic_layers(summary), layer), ax=axes[0, 0])
    ax = plots.plot_ratio_over_training(tables.ratio_view(summary, layer, 0.5), ax=axes[0, 1])
    assert _labels(axes[0, 0]) == ["paper's variance ratio", "lower bound 1",
                                   "upper bound as plotted, 1 + α"]
    assert "(α+1)/α" in axes[0, 0].texts[0].get_text()  # off-scale bound, as a note
    assert len(ax.collections) == len(FAMILIES)  # one CI band per family
    assert len(ax.get_lines()) == len(FAMILIES) + 1
    assert ax.get_xlabel() == "training step" and "sampling" in ax.get_ylabel()


def test_plot_heatmap_cells_and_colorbar():
    wide = tables.heatmap_matrix(synthetic_summary(), 0.1)
    ax = plots.plot_ratio_heatmap(wide)
    assert ax.images[0].get_array().shape == wide.T.shape  # families on the y axis
    assert len(ax.texts) == wide.size
    assert [t.get_text() for t in ax.get_yticklabels()] == [family_style(f).label
                                                           for f in FAMILIES]
    assert len(ax.figure.axes) == 2  # heat map + colour bar


def test_plot_memory_and_metric_vs_ratio():
    ax = plots.plot_memory_vs_batch(synthetic_memory())
    assert len(ax.get_lines()) == 1 + len(RATIOS)
    assert _labels(ax)[0] == "exact" and "ρ = 10%" in _labels(ax)[1]
    assert ax.get_xlabel() == "batch size (examples)" and "MiB" in ax.get_ylabel()
    summary = tables.accuracy_summary(synthetic_runs().query("scope in ('none', 'all')"))
    ax = plots.plot_metric_vs_ratio(summary, "mean", err="std", ylabel="matthews")
    assert len(ax.containers) == 2 and _labels(ax) == ["exact", "Gaussian", "Rademacher"]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "matthews"


def test_paired_vs_ratio_keeps_every_point_near_its_ratio():
    """Dodging separates the series but moves no point more than 0.1 in log ρ (about ±10 %)."""
    rows = [dict(family=f, scope=sc, ratio=r, diff_mean=-0.01, diff_ci_low=-0.02,
                 diff_ci_high=0.0)
            for f in ("gaussian", "rows", "countsketch", "rows-norm")
            for sc in ("all", "encoder") for r in (0.05, 0.1, 0.5)]
    ax = plots.plot_paired_vs_ratio(pd.DataFrame(rows))
    xs = [np.asarray(c.lines[0].get_xdata(), dtype=float) for c in ax.containers]
    assert len(xs) == 8
    shift = np.log(np.array(xs) / np.array([0.05, 0.1, 0.5]))
    assert np.abs(shift).max() <= 0.1 + 1e-12  # ±0.1 in log ρ: about ±10 %
    assert len({round(float(s), 9) for s in shift[:, 0]}) == 8  # each series its own offset


# --------------------------------------------------------------------------------------------
# Figure command
# --------------------------------------------------------------------------------------------


def test_figures_build_from_synthetic_results(synthetic_results: Path, tmp_path: Path):
    out = tmp_path / "figs"
    assert figures.main(["all", "--results", str(synthetic_results), "--out", str(out)]) == 0
    for name in ("variance_ratio_over_training", "variance_vs_ratio", "ratio_heatmap",
                 "closed_form_vs_mc", "memory_vs_batch", "throughput_vs_ratio",
                 "accuracy_vs_ratio", "layer_bench", "variance_by_scope", "learning_curve",
                 "variance_vs_accuracy", "plan_frontier", "plan_accuracy", "frontier",
                 "frontier_mpnet", "online_plans"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name
    md = (out / "accuracy_table.md").read_text()
    assert "± 1.00" in md and "| cola | training time (s) | gaussian |  | 71 ± 1 |" in md
    assert "gaussian (encoder)" in md
    assert r"\toprule" in (out / "accuracy_table.tex").read_text()
    paired = pd.read_csv(out / "paired_diff.csv")
    assert set(paired.value) == {"best_value", "test_at_best"} and (paired.n == 3).all()
    assert "*" in (out / "paired_diff.md").read_text()  # distinguishable cells are marked
    contrasts = pd.read_csv(out / "paired_contrasts.csv")
    assert "gaussian: all − encoder" in set(contrasts.contrast) and (contrasts.n == 3).all()
    link = pd.read_csv(out / "variance_accuracy_link.csv")
    assert set(link.when) == {"step 0", "end of training"} and len(link) == 12
    assert "head" in (out / "scope_table.md").read_text()
    assert "relative plan" in (out / "plan_accuracy.md").read_text()
    assert "uniform/planned (absolute)" in (out / "plan_frontier.md").read_text()
    online = (out / "online_plans.md").read_text()  # uniform: (10 + 40 + 500) / 60; offline 50 / 60
    assert "| 25 | 1.0 |  | 0.833 | 9.167 | 1 | 1 |" in online
    for table in ("frontier_table.md", "frontier_mpnet_table.md"):
        assert "| 50 % | revolve s=2: peak 0.40, time 1.60× |" in (out / table).read_text()
    # a requested figure whose inputs are missing is an error; under `all` it is skipped
    assert figures.main(["checkpoint_vs_n", "--results", str(synthetic_results),
                         "--out", str(out)]) == 1
    assert figures.main(["nonsense", "--out", str(out)]) == 2


def test_figures_all_from_committed_results(tmp_path: Path):
    """`python -m analysis.figures all` on the committed results writes every buildable figure."""
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, "-m", "analysis.figures", "all", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr
    wrote = {Path(line.split()[-1]).name for line in proc.stdout.splitlines()
             if line.startswith("wrote ")}
    skipped = {line.split()[1].rstrip(":") for line in proc.stderr.splitlines()
               if line.startswith("skipped ")}
    assert set(figures.FIGURE_ENTRIES) == {n for n in figures.FIGURE_ENTRIES
                                           if f"{n}.png" in wrote} | skipped
    for name in figures.FIGURE_ENTRIES:
        if name not in skipped:
            assert (out / f"{name}.png").is_file() and (out / f"{name}.pdf").is_file()


def _memory_csv(text: str):
    return lambda res: (res / "study" / "memory" / "memory.csv").write_text(text)


def _non_numeric(res: Path) -> None:
    memory = synthetic_memory().astype({"saved_mib": object})
    memory.loc[3, "saved_mib"] = "abc"
    memory.to_csv(res / "study" / "memory" / "memory.csv", index=False)


BAD_FIGURE_INPUTS = [  # (how memory.csv is damaged, words of the one error line)
    ("empty", _memory_csv(""), "is not a readable CSV"),
    ("header only", _memory_csv("family,ratio,batch_size,saved_mib\n"), "no rows"),
    ("no saved_mib", lambda res: synthetic_memory().drop(columns="saved_mib").to_csv(
        res / "study" / "memory" / "memory.csv", index=False), "lacks required column(s) saved"),
    ("non-numeric", _non_numeric, "non-numeric value 'abc' (row 5)"),
]


@pytest.mark.parametrize("damage, words", [c[1:] for c in BAD_FIGURE_INPUTS],
                         ids=[c[0] for c in BAD_FIGURE_INPUTS])
def test_a_bad_input_skips_its_figure_with_one_line(synthetic_results: Path, tmp_path: Path,
                                                    capsys, damage, words):
    damage(synthetic_results)
    out = tmp_path / "figs"
    others = ["variance_vs_ratio", "throughput_vs_ratio", "accuracy_vs_ratio", "layer_bench"]
    # a few figures beside the damaged one (`all` is tested in test_figures_input.py)
    assert figures.main(["memory_vs_batch", *others, "--results", str(synthetic_results),
                         "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: memory_vs_batch skipped: ")
    assert words in errors[0] and "valid choices" in errors[0]
    assert not (out / "memory_vs_batch.png").exists()
    for name in others:
        assert (out / f"{name}.png").is_file(), name  # the others are still built


def test_an_unwritable_out_skips_each_figure_with_one_line(synthetic_results: Path,
                                                           tmp_path: Path, capsys, monkeypatch):
    """A read-only --out (simulated: the tests may run as root, who may write anywhere)."""
    import errno

    def read_only(self, fname, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(fname))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", read_only)
    names = ["variance_vs_ratio", "layer_bench"]
    assert figures.main([*names, "--results", str(synthetic_results),
                         "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" skipped:")[0] for line in err] == [f"error: {n}" for n in names]
    assert all("Permission denied" in line and "valid choices: a writable --out" in line
               for line in err)
