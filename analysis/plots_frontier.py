"""Plots of the memory-saving frontier (checkpointing, sketches and both;
:mod:`analysis.figures_frontier`), with the conventions of :mod:`analysis.plots`: tidy DataFrame
in, styled Axes out, no statistics computed here."""

from __future__ import annotations

from typing import Sequence

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm

from analysis.plots import _axes
from analysis.style import OKABE_ITO, style_axes

FRONTIER_MARKERS = {"exact": "s", "checkpoint": "^", "sketch": "o", "plan": "D",
                    "combined": "*", "accumulation": "v"}
# method (analysis.figures_time_to_accuracy.method_of) -> (colour, marker): Okabe–Ito
METHOD_STYLES = {
    "checkpointing": (OKABE_ITO["black"], "^"),
    "sketch": (OKABE_ITO["vermillion"], "o"),
    "plan": (OKABE_ITO["orange"], "D"),
    "checkpointing + sketch": (OKABE_ITO["purple"], "*"),
    "accumulation": (OKABE_ITO["blue"], "v"),
    "accumulation + checkpointing": (OKABE_ITO["sky_blue"], "<"),
    "accumulation + sketch": (OKABE_ITO["green"], ">"),
    "accumulation + plan": (OKABE_ITO["yellow"], "d"),
}
FRONTIER_CMAP = "viridis"
MEMORY_LABEL = "peak live activation bytes / exact (whole step)"


def _scatter_kinds(ax: Axes, points: pd.DataFrame, y: str):
    """One marker per configuration at (peak_ratio, ``y``): shape by kind, colour by added
    variance (log scale), black where none is added; returns the colour mappable or None."""
    positive = points.loc[points["var_ratio"] > 0, "var_ratio"]
    low = float(positive.min()) if len(positive) else 1e-3
    high = max(float(positive.max()) if len(positive) else 1.0, low * 10)
    norm, mappable = LogNorm(low, high), None
    for kind, marker in FRONTIER_MARKERS.items():
        d = points[points["kind"] == kind]
        zero, noisy = d[~(d["var_ratio"] > 0)], d[d["var_ratio"] > 0]
        ax.scatter(zero["peak_ratio"], zero[y], marker=marker, color="black", s=40, zorder=3)
        if not noisy.empty:
            mappable = ax.scatter(noisy["peak_ratio"], noisy[y], marker=marker,
                                  c=noisy["var_ratio"], cmap=FRONTIER_CMAP, norm=norm, s=40,
                                  edgecolors="0.2", linewidths=0.4, zorder=3)
    return mappable


def _frontier_marks(ax: Axes, points: pd.DataFrame, y: str, budgets: Sequence[float],
                    legend: bool = True) -> None:
    """Budget lines, rings around the all-options Pareto set, the point labels, the kind legend."""
    for b in budgets:
        ax.axvline(b, color="0.6", lw=0.8, ls=":")
        ax.annotate(f"{100 * b:g} %", (b, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(2, -9), textcoords="offset points", fontsize="x-small", color="0.4")
    front = points[points["pareto_all"]]
    ax.scatter(front["peak_ratio"], front[y], s=190, facecolors="none", edgecolors="0.35",
               lw=1.0, label="Pareto, all options" if legend else None, zorder=2)
    for row in points.itertuples():
        ax.annotate(row.config, (row.peak_ratio, getattr(row, y)), xytext=(4, 3),
                    textcoords="offset points", fontsize=5.5, color="0.25")
    for kind, marker in FRONTIER_MARKERS.items():
        if legend and (points["kind"] == kind).any():
            ax.scatter([], [], marker=marker, color="0.5", label=kind)


def plot_frontier(points: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None,
                  budgets: Sequence[float] = ()) -> Axes:
    """Step time / exact vs peak memory / exact, one marker per configuration (shape: its kind;
    colour: its added variance Σ sketch / Σ sampling, log scale; black: none added). The exact
    options' Pareto front is a dashed staircase, the all-options front ringed; dotted lines mark
    the memory ``budgets``. ``points``: :func:`analysis.figures_frontier.frontier_points`."""
    ax = _axes(ax)
    mappable = _scatter_kinds(ax, points, "time_ratio")
    stair = points[points["pareto_exact"]].sort_values("peak_ratio")
    if len(stair):
        ax.step(stair["peak_ratio"], stair["time_ratio"], where="post", color="black", lw=1,
                ls="--", label="Pareto, exact options", zorder=2)
    _frontier_marks(ax, points, "time_ratio", budgets)
    if mappable is not None:
        bar = ax.figure.colorbar(mappable, ax=ax, shrink=0.85)
        bar.set_label("added variance: Σ sketch / Σ sampling", fontsize="small")
    return style_axes(ax, xlabel=MEMORY_LABEL, ylabel="step time / exact", title=title,
                      legend=True)


def plot_frontier_variance(points: pd.DataFrame, *, ax: Axes | None = None,
                           title: str | None = None, budgets: Sequence[float] = ()) -> Axes:
    """Added variance (Σ sketch / Σ sampling, symmetric-log so that the exact options sit at 0)
    vs peak memory / exact; the all-options Pareto set ringed, the memory ``budgets`` dotted."""
    ax = _axes(ax)
    _scatter_kinds(ax, points, "var_ratio")
    _frontier_marks(ax, points, "var_ratio", budgets, legend=False)
    ax.axhline(1.0, color="0.4", lw=0.8, ls="-.")
    ax.annotate("τ = 1 × sampling", (0.0, 1.0), xycoords=("axes fraction", "data"),
                xytext=(3, 3), textcoords="offset points", fontsize="x-small", color="0.3")
    positive = points.loc[points["var_ratio"] > 0, "var_ratio"]
    linthresh = float(positive.min()) / 2 if len(positive) else 1e-3
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.set_ylim(-0.3 * linthresh, max(float(positive.max()) * 3 if len(positive) else 1.0, 3.0))
    return style_axes(ax, xlabel=MEMORY_LABEL, ylabel="added variance: Σ sketch / Σ sampling "
                      "(0: exact options)", title=title)


def plot_by_budget(choices: pd.DataFrame, value: str, *, ax: Axes | None = None,
                   budgets: Sequence[float] = (), ylabel: str = "", reference: float | None = None,
                   legend: bool = True, title: str | None = None) -> Axes:
    """``value`` of each method's pick vs the peak-memory budget (fraction of exact's, log
    scale, largest budget left), one line per method (``METHOD_STYLES``; gaps where none fits or
    the value is NaN, and the legend says so of a method with nothing drawn); ``reference``: a
    grey line for exact. ``choices``:
    :func:`analysis.figures_time_to_accuracy.choose`."""
    ax = _axes(ax)
    for method, g in choices.groupby("method", sort=False):
        color, marker = METHOD_STYLES.get(method, ("0.5", "x"))
        g = g.sort_values("budget")
        label = method + (": fits no budget" if g["config"].isna().all() else
                          ": none reaches it" if g[value].isna().all() else "")
        ax.plot(g["budget"], g[value], color=color, marker=marker, lw=1.2, ms=6, label=label)
    if reference is not None:
        ax.axhline(reference, color="0.5", lw=0.8, ls="--", label="exact (no saving)")
    ax.set_xscale("log")
    if len(budgets):
        ax.set_xticks(sorted(budgets))
        ax.set_xticklabels([f"{100 * b:g} %" for b in sorted(budgets)])
        ax.minorticks_off()
    ax.invert_xaxis()
    return style_axes(ax, xlabel="peak budget: live activation bytes / exact's", ylabel=ylabel,
                      title=title, legend=legend)
