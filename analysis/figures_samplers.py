"""How close to the best possible sampler? The row families against the limit (issue "Samplers
that know where the gradient is"): ``sampler_limit.{png,pdf}`` and ``sampler_limit.{md,csv}``.

Inputs: the ``scopes.csv`` of the measure runs in :data:`RUNS` that exist (each needs rows of the
uniform ``rows`` family as the baseline and the limit columns, which measure runs write since
the limit was added). Per run, ρ, family and scope: the scope's sketch variance, the limit of
optimal importance sampling (``var_limit``) and of the best exact-top split
(``var_limit_split``, the lower one), family / limit, uniform rows / family, and the fraction of
the gap from uniform rows to the limit that the family closes, (rows − family) / (rows − limit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from varstudy.errors import VarstudyError

from analysis import tables
from analysis.results import FIGURES, RESULTS, MissingResultsError, load, save, write_text
from analysis.style import family_style, new_figure, order_families, style_axes

RUNS = {  # results folder -> what it is
    "measure/default": "MiniLM, step 0, B 16, L 64, fixed padding",
    "measure/default_dynamic": "MiniLM, step 0, B 16, L ≤ 64, dynamic padding",
    "measure/samplers_recipe_step0": "recipe, step 0 (B 32, dynamic padding)",
    "measure/samplers_recipe_end": "recipe, fine-tuned model (B 32, dynamic)",
    # WTA-CRS's cache (NOTE [wta-crs in a measurement] in varstudy.measure.informed): a first
    # visit (step 0 and the whole first epoch) and, on the trained model, a previous visit at the
    # same weights (a later epoch, the cache's best case); the same runs' other families are
    # those of samplers_recipe_* at ρ 0.05 and 0.1, remeasured, plus ρ 0.3
    "measure/wtacrs_step0_first": "recipe, step 0: WTA-CRS on a first visit",
    "measure/wtacrs_end_first": "trained model: WTA-CRS on a first visit (epoch 1)",
    "measure/wtacrs_end_previous": "trained model: WTA-CRS, previous visit cached",
    # the cache filled by the step-0 model (--wtacrs-cache-model): an example last seen at the
    # start of epoch 1, seen again about an epoch (200 steps) later
    "measure/wtacrs_end_stale": "trained model: WTA-CRS, stale cache",
}
ROW_FAMILIES = ("rows", "rows-wor", "rows-norm", "rows-real", "rows-wor-real", "rows-live",
                "rows-adaptive", "wta-crs")
PANELS_PER_ROW = 4  # the figure's grid: 4 panels a row
LIMITS = ("var_limit_mean", "var_limit_split_mean", "limit_ratio_median")
COLUMNS = ("train_step", "family", "ratio", "scope", "var_sketch_mean", *LIMITS)


def limit_table(scopes: pd.DataFrame, run: str) -> pd.DataFrame:
    """One row per (ρ, family, scope) of the row families: the numbers of the module docstring."""
    s = scopes[scopes.family.isin(ROW_FAMILIES) & (scopes.train_step == scopes.train_step.min())]
    base = s[s.family == "rows"].set_index(["ratio", "scope"]).var_sketch_mean
    if base.empty:
        raise VarstudyError(f"{run}/scopes.csv has no 'rows' family rows, the baseline of the "
                            "limit table; valid choices: a measure run with --families "
                            "including rows")
    out = []
    for r in s.itertuples(False):
        rows = float(base.get((r.ratio, r.scope), np.nan))
        fam, lim, split = r.var_sketch_mean, r.var_limit_mean, r.var_limit_split_mean
        out.append(dict(run=run, ratio=r.ratio, scope=r.scope, family=r.family,
                        var_sketch=fam, var_limit=lim, var_limit_split=split,
                        over_limit=fam / split if split > 0 else np.nan,
                        over_limit_opt=fam / lim if lim > 0 else np.nan,
                        rows_over_family=rows / fam if fam > 0 else np.inf,
                        gap_closed=(rows - fam) / (rows - split) if rows > split else np.nan,
                        layer_median_over_limit=r.limit_ratio_median))
    order = {f: i for i, f in enumerate(ROW_FAMILIES)}
    return pd.DataFrame(out).sort_values(
        ["ratio", "scope", "family"], key=lambda c: c.map(order) if c.name == "family" else c,
        kind="stable", ignore_index=True)


def _markdown(table: pd.DataFrame) -> str:
    shown = table[table.scope.isin(("encoder", "all"))].assign(
        ratio=lambda d: d.ratio.map(lambda v: f"{v:g}"),
        var_sketch=lambda d: d.var_sketch.map(lambda v: f"{v:.3g}"),
        over_limit=lambda d: d.over_limit.map(lambda v: f"{v:.2f}"),
        over_limit_opt=lambda d: d.over_limit_opt.map(lambda v: f"{v:.2f}"),
        rows_over_family=lambda d: d.rows_over_family.map(lambda v: f"{v:.2f}×"),
        gap_closed=lambda d: d.gap_closed.map(lambda v: "" if np.isnan(v) else f"{v:.0%}"),
        layer_median_over_limit=lambda d: d.layer_median_over_limit.map(lambda v: f"{v:.2f}"))
    shown = shown[["run", "ratio", "scope", "family", "var_sketch", "over_limit", "over_limit_opt",
                   "rows_over_family", "gap_closed", "layer_median_over_limit"]]
    shown.columns = ["run", "ρ", "scope", "family", "sketch variance", "÷ limit (split)",
                     "÷ limit (importance)", "uniform rows ÷ family",
                     "gap closed (rows → limit)", "per-layer median ÷ limit"]
    caption = ("Row samplers against the limit (the least variance of an unbiased row sampler "
               "given Y: optimal importance sampling, and the best split of exactly stored "
               "largest rows plus a sampled rest; both need Y, so they are bounds, not "
               "samplers). Scope totals at step 0 of each run; 'gap closed' is (uniform rows − "
               "family) / (uniform rows − split limit).")
    return tables.to_markdown(shown, caption)


def sampler_limit(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure and tables: every row family's encoder sketch variance vs ρ against the limit."""
    found = {}
    for run in RUNS:
        try:
            scopes = load(results, f"{run}/scopes.csv", COLUMNS[:5])
        except MissingResultsError:
            continue
        if scopes.reindex(columns=list(LIMITS)).isna().all().all():
            continue  # written before the limit columns existed: rerun it to include it
        found[run] = load(results, f"{run}/scopes.csv", COLUMNS)
    if not found:
        raise MissingResultsError(f"no measure run with the limit columns among "
                                  f"{', '.join(RUNS)} under {results}")
    table = pd.concat([limit_table(s, run) for run, s in found.items()], ignore_index=True)
    ncols = min(len(found), PANELS_PER_ROW)
    nrows = -(-len(found) // ncols)
    fig, axes = new_figure(nrows, ncols, panel=(4.4, 3.6))
    axes = axes.ravel()
    for ax, run in zip(axes, found):
        plot_limit(table[(table.run == run) & (table.scope == "encoder")], ax, RUNS[run])
    for ax in axes[len(found):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes[:len(found)]:  # one legend for every family drawn in any panel
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[0].legend(handles.values(), handles.keys(), fontsize="x-small", frameon=False)
    fig.suptitle("Encoder sketch variance of the row samplers and the limit (needs Y)")
    paths = save(fig, out, "sampler_limit")
    paths.append(write_text(out, "sampler_limit.md", _markdown(table)))
    paths.append(write_text(out, "sampler_limit.csv", table.to_csv(index=False)))
    return paths


def plot_limit(t: pd.DataFrame, ax, title: str):
    """Encoder sketch variance vs ρ per family, the two limits dashed and dotted."""
    for fam in order_families(t.family):
        g = t[t.family == fam].sort_values("ratio")
        st = family_style(fam)
        ax.plot(g.ratio, g.var_sketch, marker=st.marker, color=st.color, label=st.label)
    lim = t.drop_duplicates("ratio").sort_values("ratio")
    ax.plot(lim.ratio, lim.var_limit, "k--", label="limit: importance q ∝ ‖x‖‖y‖")
    ax.plot(lim.ratio, lim.var_limit_split, "k:", label="limit: exact top + sampled rest")
    ax.set(xscale="log", yscale="log", xlabel="ρ = k / n", ylabel="encoder sketch variance",
           title=title)
    style_axes(ax)
    return ax
