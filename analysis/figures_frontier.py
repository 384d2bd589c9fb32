"""The memory-saving frontier (issue 15): checkpointing, sketches, plans and both together on one
model, from ``results/study/frontier/frontier.csv`` (``python -m varstudy.study frontier``; the
figure ``frontier_mpnet`` from ``results/study/mpnet/frontier/``, the same study with ``--model
mpnet-base --out results/study/mpnet``).

Selection is pure (DataFrame -> DataFrame): :func:`frontier_points` (one row per configuration,
its Pareto memberships), :func:`pareto` (the non-dominated rows for given objectives) and
:func:`choose` (per peak-memory budget, the fastest exact option and the fastest option within a
variance budget τ). :func:`frontier` draws the figure and writes ``frontier_table.md``, "Which
memory saving should I use?".

Conventions: memory is the peak of live activation bytes over a whole training step over exact's
(``peak_ratio``), time the median per-round ratio of step times to exact (``time_ratio``), and the
added variance Σ sketch / Σ sampling by scope: the model total (``var_ratio_all``, ``var_ratio`` in
the points) and the encoder's (``var_ratio_encoder``). An *exact option* adds no variance (exact,
checkpointing). A configuration fits a budget b when peak_ratio ≤ b; it fits the variance budget
τ by a scope when that scope's ratio is ≤ τ. Both scopes are reported because they disagree: in
a fine-tuned encoder classifier at step 0 the head dominates the model total, so a plan that keeps
the head exact is within τ by the model total while its encoder layers carry several times the
sampling variance. The fastest is the smallest time_ratio (ties: the smaller peak, then the
name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis import plots_frontier, tables
from analysis.results import FIGURES, RESULTS, config, load, save, write_text
from analysis.style import new_figure

INPUT = "study/frontier"
INPUT_MPNET = "study/mpnet/frontier"
BUDGETS = (0.75, 0.5, 0.25)
TAU = 1.0
POINT_COLUMNS = ("config", "kind", "peak_ratio", "time_ratio", "var_ratio", "var_ratio_encoder",
                 "exact_option", "pareto_exact", "pareto_all")
CHOICE_COLUMNS = ("budget", "criterion", "tau", "config", "peak_ratio", "time_ratio",
                  "var_ratio")
# criterion -> (points column bounded by τ, what it says in the table)
CRITERIA = {"variance": ("var_ratio", "model total"),
            "encoder variance": ("var_ratio_encoder", "encoder total")}


def pareto(df: pd.DataFrame, objectives: Sequence[str]) -> pd.Series:
    """True for the rows no other row dominates (at most as large in every objective, smaller
    in one; all minimized). Rows with a NaN objective are never on the front."""
    values = df[list(objectives)].to_numpy(dtype=float)
    ok = ~np.isnan(values).any(axis=1)
    keep = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(ok):
        others = values[ok]
        dominated = ((others <= values[i]).all(axis=1) & (others < values[i]).any(axis=1)).any()
        keep[i] = not dominated
    return pd.Series(keep, index=df.index)


def frontier_points(front: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (``POINT_COLUMNS``): memory, time and added variance, whether it
    is an exact option, on the Pareto front of the exact options (memory, time) and on the front
    of all options (memory, time, variance)."""
    tables.require_columns(front, ("config", "kind", "peak_ratio", "time_ratio",
                                   "var_ratio_all"), "frontier table")
    points = front.rename(columns={"var_ratio_all": "var_ratio"})
    if "var_ratio_encoder" not in points:
        points = points.assign(var_ratio_encoder=np.nan)
    points = points[["config", "kind", "peak_ratio", "time_ratio", "var_ratio",
                     "var_ratio_encoder"]].reset_index(drop=True)
    points["exact_option"] = points.var_ratio == 0
    exact = points[points.exact_option]
    points["pareto_exact"] = pareto(exact, ["peak_ratio", "time_ratio"]).reindex(
        points.index, fill_value=False)
    points["pareto_all"] = pareto(points, ["peak_ratio", "time_ratio", "var_ratio"])
    return points[list(POINT_COLUMNS)]


def choose(points: pd.DataFrame, budgets: Sequence[float] = BUDGETS,
           tau: float = TAU) -> pd.DataFrame:
    """Per budget b (fraction of exact's peak), one answer per criterion (``CHOICE_COLUMNS``):
    "exact", the fastest configuration with peak_ratio ≤ b and no added variance; "variance",
    the fastest with peak_ratio ≤ b and the model total var_ratio ≤ ``tau``; "encoder
    variance" (where the points have encoder ratios), the same with var_ratio_encoder ≤ ``tau``.
    ``var_ratio`` is the ratio the criterion bounds. ``config`` is missing (NA) and the numbers
    NaN where none fits."""
    criteria = {"exact": ("var_ratio", 0.0)}
    criteria.update({name: (column, tau) for name, (column, _) in CRITERIA.items()
                     if points[column].notna().any()})
    rows = []
    for b in budgets:
        fits = points[points.peak_ratio <= b]
        for criterion, (column, bound) in criteria.items():
            pool = fits[fits[column] <= bound]
            best = pool.sort_values(["time_ratio", "peak_ratio", "config"]).head(1)
            pick = best.iloc[0] if len(best) else None
            rows.append(dict(budget=float(b), criterion=criterion, tau=float(tau),
                             config=None if pick is None else pick.config,
                             **{c: np.nan if pick is None else float(pick[k])
                                for c, k in (("peak_ratio", "peak_ratio"),
                                             ("time_ratio", "time_ratio"),
                                             ("var_ratio", column))}))
    return pd.DataFrame(rows, columns=list(CHOICE_COLUMNS))


def within_tau(points: pd.DataFrame, tau: float = TAU) -> dict[str, list[str]]:
    """{criterion: configurations that add variance but stay within ``tau`` by its scope}."""
    noisy = points[~points.exact_option]
    return {name: noisy.loc[noisy[column] <= tau, "config"].tolist()
            for name, (column, _) in CRITERIA.items() if points[column].notna().any()}


def _answer(row) -> str:
    if pd.isna(row.config):
        return "none fits"
    text = f"{row.config}: peak {row.peak_ratio:.2f}, time {row.time_ratio:.2f}×"
    return text + (f", variance {row.var_ratio:.3g}× sampling" if row.var_ratio > 0 else "")


def choice_table(choices: pd.DataFrame) -> pd.DataFrame:
    """The answers of :func:`choose` as one row per budget, for the Markdown table."""
    tau = choices.tau.iloc[0]
    rows = []
    for b, g in choices.groupby("budget", sort=False):
        by = g.set_index("criterion")
        row = {"peak memory budget (of exact)": f"{100 * b:g} %",
               "fastest exact option (no added variance)": _answer(by.loc["exact"])}
        for criterion, (_, scope) in CRITERIA.items():
            if criterion in by.index:
                row[f"fastest with added variance ≤ {tau:g} × sampling ({scope})"] = \
                    _answer(by.loc[criterion])
        rows.append(row)
    return pd.DataFrame(rows)


def points_table(front: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """Every configuration with its measured numbers and Pareto marks, for the Markdown table."""
    mark = lambda flag: "yes" if flag else ""  # noqa: E731
    return pd.DataFrame({
        "configuration": points.config, "peak / exact": points.peak_ratio.map("{:.3f}".format),
        "forward-end saved / exact": front.forward_ratio.map("{:.3f}".format)
        if "forward_ratio" in front else "",
        "step time / exact": points.time_ratio.map("{:.2f}".format),
        "added variance (all)": points.var_ratio.map("{:.3g}".format),
        "(encoder)": front.var_ratio_encoder.map("{:.3g}".format)
        if "var_ratio_encoder" in front else "",
        "(head)": front.var_ratio_head.map("{:.3g}".format) if "var_ratio_head" in front else "",
        f"≤ τ = {TAU:g} by the model total": (points.var_ratio <= TAU).map(mark),
        f"≤ τ = {TAU:g} by the encoder total": (points.var_ratio_encoder <= TAU).map(mark),
        "Pareto, exact options": points.pareto_exact.map(mark),
        "Pareto, all": points.pareto_all.map(mark)})


def build_frontier(front: pd.DataFrame, title: str = "", budgets: Sequence[float] = BUDGETS):
    """Figure: memory vs time (added variance as colour) and memory vs added variance."""
    points = frontier_points(front)
    fig, axes = new_figure(1, 2, panel=(5.4, 4.4))
    plots_frontier.plot_frontier(points, ax=axes[0, 0], budgets=budgets,
                        title="time vs memory (colour: added variance)")
    plots_frontier.plot_frontier_variance(points, ax=axes[0, 1], budgets=budgets,
                                 title="added variance vs memory")
    if title:
        fig.suptitle(title)
    return fig


def _setting(front: pd.DataFrame) -> str:
    first = front.iloc[0]
    parts = [f"{first.get('model', '?')}", f"B {first.get('batch_size', '?')}",
             f"L {first.get('seq_len', '?')}", f"{first.get('task', '?')}",
             f"{first.get('device', '?')}", f"{int(first.get('repeats', 0))} rounds"]
    return ", ".join(str(p) for p in parts)


def frontier(results: Path = RESULTS, out: Path = FIGURES, run: str = INPUT,
             name: str = "frontier") -> list[Path]:
    """Figure ``name`` and ``<name>_table.md`` from the frontier study's table in ``run``."""
    front = load(results, f"{run}/frontier.csv", ("peak_ratio", "time_ratio", "var_ratio_all",
                                                  "config"))
    tables.require_columns(front, ("kind",), str(Path(results) / run / "frontier.csv"))
    cfg = config(results, f"{run}/config.json")
    setting = _setting(front)
    paths = save(build_frontier(front, title=f"Memory savings on one model ({setting})"),
                 out, name)
    points = frontier_points(front)
    choices = choose(points)
    load_avg = cfg.get("load_avg_after") or [np.nan]
    text = [
        "## Which memory saving should I use?", "",
        tables.to_markdown(choice_table(choices),
                           f"{setting}. Peak: live activation bytes over one training step "
                           "(forward and backward) / exact's. Time: median per-round ratio of "
                           "step times to exact, all configurations interleaved in one run "
                           f"(1-minute load average at the end {load_avg[0]}; on a shared "
                           "machine only these side-by-side ratios are meaningful). Variance: "
                           "Σ sketch / Σ sampling variance on held-out minibatches, over the "
                           "whole model (model total) or over the encoder's layers (encoder "
                           "total)."),
        _within_text(points), "",
        "## All configurations", "",
        tables.to_markdown(points_table(front, points),
                           "Pareto, exact options: no zero-variance configuration is both "
                           "smaller and faster; Pareto, all: none is at most as large, as slow "
                           "and as noisy, and better in one."),
    ]
    paths.append(write_text(out, f"{name}_table.md", "\n".join(text)))
    return paths


def _within_text(points: pd.DataFrame) -> str:
    """One sentence per scope: the configurations that add variance but stay within τ."""
    parts = [f"by the {CRITERIA[name][1]}: {', '.join(found) if found else 'none'}"
             for name, found in within_tau(points).items()]
    return (f"Configurations that add variance but stay within τ = {TAU:g} × sampling, "
            + "; ".join(parts) + ".")


def frontier_mpnet(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """The frontier of MPNet-base (``frontier_mpnet`` and ``frontier_mpnet_table.md``)."""
    return frontier(results, out, INPUT_MPNET, "frontier_mpnet")
