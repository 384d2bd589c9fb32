"""The 3-epoch variant of the accuracy recipe (issue 23): does a sampler whose proxy needs an
earlier visit of the same example (WTA-CRS) cost almost nothing once it has one?

Input: ``results/study/three_epochs/accuracy`` (``python -m varstudy.study accuracy --preset cpu
--epochs 3 --families exact rows wta-crs rows-adaptive --ratios 0.3 --scopes encoder --out
results/study/three_epochs``): the recipe (B 32, dynamic padding, lr 5e-5, the head exact) for
three epochs instead of 200 steps. WTA-CRS draws ∝ ‖x_l‖ in its first epoch (nothing cached
yet) and from the cached output-gradient norms of each example's previous visit afterwards,
so the question is per epoch.

NOTE [per-epoch scores]: besides the recipe's two scores (best validation accuracy, test
accuracy at it), each run gets ``best_epoch<e>``: its best validation accuracy among the
evaluations of epoch e (steps (e − 1)·S < step ≤ e·S, S = ``steps_per_epoch`` of ``runs.csv``).
Every score is paired by seed against exact ("configuration − exact") and, for the samplers,
against uniform rows ("sampler − rows"); each (score, kind of contrast) is one Holm family (NOTE
[multiple comparisons] in :mod:`analysis.stats`). Only seeds a configuration shares with the
other side of a contrast count (``n``), so a partly finished study gives a table of the seeds it
has, with no interval below two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import tables
from analysis.figures_accuracy import BASE_FAMILY, SCORES, paired_cell
from analysis.results import FIGURES, RESULTS, load, save, write_text
from analysis.stats import paired_contrast, with_holm
from analysis.style import family_style, new_figure, order_families, style_axes
from varstudy.errors import VarstudyError

STUDY = "study/three_epochs/accuracy"
RUN_COLUMNS = ("family", "ratio", "scope", "seed", "best_value", "test_at_best",
               "steps_per_epoch", "total_steps")
EVAL_COLUMNS = ("family", "ratio", "scope", "seed", "step", "metric", "value")
METRIC = "accuracy"
AGAINST_EXACT = "configuration − exact"
AGAINST_BASE = f"sampler − {BASE_FAMILY}"
CONTRAST_COLUMNS = ("contrast", "holm_family", "value", "n", "mean_a", "mean_b", "diff_mean",
                    "diff_sd", "diff_ci_low", "diff_ci_high", "p_value", "distinguishable")


def epoch_scores(runs: pd.DataFrame, evals: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``best_epoch<e>`` per epoch e (NOTE [per-epoch scores]); a run's epochs
    are ceil(total_steps / steps_per_epoch)."""
    per_epoch = runs["steps_per_epoch"].astype(int)
    if (per_epoch <= 0).any():
        raise VarstudyError("runs.csv has a run with steps_per_epoch ≤ 0; valid choices: "
                            "rerun the study")
    n_epochs = int(np.ceil((runs["total_steps"] / per_epoch).max()))
    val = evals[evals["metric"] == METRIC]
    keys = ["family", "ratio", "scope", "seed"]
    spe = runs.set_index(keys)["steps_per_epoch"]
    val = val.join(spe, on=keys, how="inner")
    val = val.assign(epoch=np.ceil(val["step"] / val["steps_per_epoch"]).astype(int))
    best = (val.pivot_table(index=keys, columns="epoch", values="value", aggfunc="max")
            .rename(columns=lambda e: f"best_epoch{e}"))
    out = runs.join(best, on=keys)
    for e in range(1, n_epochs + 1):  # an epoch without an evaluation: no score
        if f"best_epoch{e}" not in out:
            out[f"best_epoch{e}"] = np.nan
    return out


def score_names(columns) -> dict[str, str]:
    """Score column -> what it is, for the scores among ``columns``: the recipe's two first,
    then one per epoch."""
    columns = list(columns)
    epochs = sorted(int(c.removeprefix("best_epoch")) for c in columns
                    if c.startswith("best_epoch"))
    return {**{v: n for v, n in SCORES.items() if v in columns},
            **{f"best_epoch{e}": f"best validation accuracy in epoch {e}" for e in epochs}}


def contrasts(runs: pd.DataFrame) -> pd.DataFrame:
    """Every configuration against exact and every other sampler against ``BASE_FAMILY``,
    per score, paired by seed, Holm within (score, kind) (``CONTRAST_COLUMNS`` + Holm's)."""
    by = {f: g.set_index("seed") for f, g in runs.groupby("family", sort=False)}
    if "exact" not in by:
        raise VarstudyError(f"{STUDY}/runs.csv has no exact runs to pair with; valid choices: "
                            "a study that includes family 'exact'")
    families = [f for f in order_families(by) if f != "exact"]
    rows = []
    for value in score_names(runs):
        for fam in families:
            pairs = [(f"{fam} − exact", AGAINST_EXACT, "exact")]
            if fam != BASE_FAMILY and BASE_FAMILY in by:
                pairs.append((f"{fam} − {BASE_FAMILY}", AGAINST_BASE, BASE_FAMILY))
            for name, kind, other in pairs:
                stats_ = paired_contrast(by[fam][value].dropna(), by[other][value].dropna())
                rows.append(dict(contrast=name, holm_family=kind, value=value, **stats_))
    table = pd.DataFrame(rows, columns=list(CONTRAST_COLUMNS))
    return with_holm(table, ["value", "holm_family"])


def contrast_table(table: pd.DataFrame, scale: float = 100.0) -> pd.DataFrame:
    """Rows contrasts, columns scores; cells as :func:`analysis.figures_accuracy.paired_cell`."""
    names = score_names(table["value"].unique())
    show_n = table["n"].nunique() > 1
    cells = {(r.contrast, r.value): paired_cell(r.diff_mean, r.diff_ci_low, r.diff_ci_high,
                                                r.distinguishable, r.distinguishable_holm,
                                                r.n, scale, show_n)
             for r in table.itertuples(index=False)}
    order = list(dict.fromkeys(table.sort_values("holm_family", kind="stable").contrast))
    short = {"best_value": "best validation", "test_at_best": "test at best",
             **{v: f"best in epoch {v.removeprefix('best_epoch')}" for v in names
                if v.startswith("best_epoch")}}
    return pd.DataFrame([{"contrast": c, **{short[v]: cells.get((c, v), "") for v in names}}
                         for c in order])


def three_epochs(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure three_epochs.{png,pdf}: mean validation accuracy vs step per family, epochs
    marked, and the per-epoch paired cost against exact; three_epochs.{csv,md}: the paired
    contrasts of every score (NOTE [per-epoch scores])."""
    runs = load(results, f"{STUDY}/runs.csv", RUN_COLUMNS)
    evals = load(results, f"{STUDY}/evals.csv", EVAL_COLUMNS)
    runs = epoch_scores(runs, evals)
    table = contrasts(runs)
    fig = build_three_epochs(runs, evals, table)
    paths = save(fig, out, "three_epochs")
    Path(out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(out) / "three_epochs.csv", index=False)
    seeds = runs.groupby("family").seed.nunique()
    ratios = ", ".join(f"{r:g}" for r in sorted(set(runs.loc[runs.family != "exact", "ratio"])))
    caption = (f"The recipe for {int(runs.total_steps.max())} steps "
               f"({int(runs.steps_per_epoch.max())} per epoch), encoder scope, ρ = {ratios}; "
               "paired difference × 100 of the best validation accuracy (overall and within each "
               "epoch) and of the test accuracy at the best validation step, mean [95% "
               "t-interval] over the seeds both sides have "
               f"(seeds per family: {', '.join(f'{f} {n}' for f, n in seeds.items())}); * the "
               "interval excludes 0; † Holm-adjusted p < 0.05 within the score's "
               f"'{AGAINST_EXACT}' or '{AGAINST_BASE}' contrasts (p_holm in three_epochs.csv)")
    paths += [Path(out) / "three_epochs.csv",
              write_text(out, "three_epochs.md", tables.to_markdown(contrast_table(table),
                                                                    caption))]
    return paths


def build_three_epochs(runs: pd.DataFrame, evals: pd.DataFrame, table: pd.DataFrame):
    """The figure from DataFrames: (a) validation accuracy vs step, the mean over seeds per
    family (thin lines: seeds), epoch ends dashed; (b) best validation accuracy per epoch −
    exact's, paired mean and 95% interval per family."""
    fig, axes = new_figure(1, 2, panel=(5.2, 3.8))
    ax = axes[0, 0]
    val = evals[evals["metric"] == METRIC]
    for fam in order_families(val["family"]):
        st = family_style(fam)
        d = val[val["family"] == fam]
        for _, s in d.groupby("seed"):
            ax.plot(s["step"], s["value"], color=st.color, lw=0.5, alpha=0.4)
        mean = d.groupby("step")["value"].mean()
        ax.plot(mean.index, mean.to_numpy(), color=st.color, marker=st.marker, ms=3, lw=1.4,
                label=f"{st.label} ({d.seed.nunique()} seed{'s' * (d.seed.nunique() != 1)})")
    per_epoch = int(runs["steps_per_epoch"].max())
    for end in range(per_epoch, int(runs["total_steps"].max()), per_epoch):
        ax.axvline(end, color="0.4", ls="--", lw=0.8)
    style_axes(ax, xlabel="optimizer step (dashed: end of an epoch)",
               ylabel="validation accuracy", title="(a) validation accuracy",
               legend="lower right")
    ax = axes[0, 1]
    epochs = [v for v in score_names(table["value"].unique()) if v.startswith("best_epoch")]
    exact = table[(table.holm_family == AGAINST_EXACT) & table.value.isin(epochs)]
    fams = order_families(c.removesuffix(" − exact") for c in exact.contrast)
    for j, fam in enumerate(fams):
        st = family_style(fam)
        d = exact[exact.contrast == f"{fam} − exact"]
        x = np.array([int(v.removeprefix("best_epoch")) for v in d.value]) + 0.08 * (j - 1)
        y = 100 * d.diff_mean.to_numpy()
        err = np.vstack([y - 100 * d.diff_ci_low.to_numpy(), 100 * d.diff_ci_high.to_numpy() - y])
        ax.errorbar(x, y, yerr=np.nan_to_num(err), color=st.color, marker=st.marker, ms=5,
                    lw=1.2, capsize=2, label=st.label)
    ax.axhline(0.0, color="black", lw=1.0)
    ax.set_xticks(range(1, len(epochs) + 1))
    style_axes(ax, xlabel="epoch", ylabel="best validation accuracy − exact (× 100)",
               title="(b) paired cost per epoch (95% t-interval)", legend="lower right")
    what = ", ".join(str(runs[c].mode().iloc[0]) for c in ("model", "task") if c in runs)
    fig.suptitle(f"Three epochs of the recipe ({what}{', ' if what else ''}encoder scope): "
                 "does a previous visit make WTA-CRS's sampler work?")
    return fig
