"""Plots for the checkpointing benchmark (``results/checkpoint/*.csv``): DataFrame -> Figure.

Pure functions on the object API (never pyplot state); each takes an optional ``ax`` (or pair of
axes) and returns the Figure. Colour-blind palette (Okabe-Ito).
"""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.style import OKABE_ITO

# One colour per strategy, in this order, from the palette every figure uses.
STRATEGY_COLOURS = [OKABE_ITO[c] for c in ("blue", "orange", "green", "vermillion", "purple",
                                           "sky_blue", "yellow", "black")]
STRATEGY_ORDER = ["store_all", "torch_checkpoint", "revolve", "multistage_host", "multistage_disk"]
MARKERS = dict(zip(STRATEGY_ORDER, "osD^v"))


def colour(strategy: str) -> str:
    """Fixed colour per strategy, so every figure agrees."""
    order = STRATEGY_ORDER + [strategy]
    return STRATEGY_COLOURS[order.index(strategy) % len(STRATEGY_COLOURS)]


def style_axis(ax: Axes, xlabel: str, ylabel: str, *, logx: bool = False, logy: bool = False) -> Axes:
    """Label ``ax`` and set its log scales; returns ``ax``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return ax


def _new_axes(n: int, width: float = 5.0) -> list[Axes]:
    fig = Figure(figsize=(width * n, 3.8), layout="constrained")
    return list(fig.subplots(1, n, squeeze=False)[0])


def memory_time_vs_n(df: pd.DataFrame, axes: tuple[Axes, Axes] | None = None) -> Figure:
    """(a) Fast-tier peak (MiB) and time per step (ms) vs sequence length N, one line per strategy.

    df: vs_n.csv (columns strategy, n_steps, fast_peak_mib, time_per_step_ms). Skipped points
    (NaN, column ``skipped``) leave a gap.
    """
    ax_mem, ax_time = axes if axes is not None else _new_axes(2)
    present = [s for s in STRATEGY_ORDER if s in set(df["strategy"])]
    present += sorted(set(df["strategy"]) - set(present))
    for strategy in present:
        d = df[df["strategy"] == strategy].sort_values("n_steps")
        kw = dict(color=colour(strategy), marker=MARKERS.get(strategy, "o"), label=strategy)
        ax_mem.plot(d["n_steps"], d["fast_peak_mib"], **kw)
        ax_time.plot(d["n_steps"], d["time_per_step_ms"], **kw)
    style_axis(ax_mem, "sequence length N (steps)", "fast-tier peak (MiB)", logx=True, logy=True)
    style_axis(ax_time, "sequence length N (steps)", "time per step (ms)", logx=True)
    ax_time.legend(frameon=False, fontsize="small")
    return ax_mem.figure


def overhead_vs_ratio(df: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """(b) Measured cost per step (units of t_f) vs transfer/compute ratio, beside the cost model.

    df: vs_ratio.csv (columns strategy, ratio, cost_fwd_units, model_cost_fwd_units).
    """
    ax = ax if ax is not None else _new_axes(1, 5.5)[0]
    for strategy in [s for s in STRATEGY_ORDER if s in set(df["strategy"])]:
        d = df[df["strategy"] == strategy].sort_values("ratio")
        c = colour(strategy)
        ax.plot(d["ratio"], d["cost_fwd_units"], color=c, marker=MARKERS.get(strategy, "o"),
                label=f"{strategy} (measured)")
        ax.plot(d["ratio"], d["model_cost_fwd_units"], color=c, linestyle="--",
                label=f"{strategy} (cost model)")
    style_axis(ax, "transfer / compute ratio T_w / t_f", "time per step / t_f", logx=True)
    ax.legend(frameon=False, fontsize="small")
    return ax.figure


def overhead_vs_n(df: pd.DataFrame, ax: Axes | None = None, *, band: float = 0.10) -> Figure:
    """(c) Measured time per step / (t_f + t_b) vs N (solid), beside the cost model (dashed).

    df: vs_n.csv (columns strategy, n_steps, overhead_vs_plain, model_overhead_vs_plain). The
    shaded band is +-``band`` around multistage_host's overhead at the smallest N (the flatness
    target), when that strategy is present.
    """
    ax = ax if ax is not None else _new_axes(1, 5.5)[0]
    present = [s for s in STRATEGY_ORDER if s in set(df["strategy"])]
    present += sorted(set(df["strategy"]) - set(present))
    for strategy in present:
        d = df[df["strategy"] == strategy].sort_values("n_steps")
        c = colour(strategy)
        ax.plot(d["n_steps"], d["overhead_vs_plain"], color=c, marker=MARKERS.get(strategy, "o"),
                label=f"{strategy} (measured)")
        if d["model_overhead_vs_plain"].notna().any():
            ax.plot(d["n_steps"], d["model_overhead_vs_plain"], color=c, linestyle="--",
                    alpha=0.7)
    ms = df[(df["strategy"] == "multistage_host") & df["overhead_vs_plain"].notna()]
    if not ms.empty:
        ref = ms.sort_values("n_steps")["overhead_vs_plain"].iloc[0]
        ax.axhspan(ref * (1 - band), ref * (1 + band), color=colour("multistage_host"),
                   alpha=0.12, lw=0, label=f"multistage_host +-{band:.0%}")
    style_axis(ax, "sequence length N (steps)", "time per step / (t_f + t_b)", logx=True)
    ax.legend(frameon=False, fontsize="small", title="dashed: cost model", title_fontsize="small")
    return ax.figure
