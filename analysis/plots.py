"""Plots: tidy DataFrame (from :mod:`analysis.tables`) in, styled Axes out.

Every function takes an optional ``ax`` (a one-panel figure is made when it is None), draws with
the object API only, styles through :func:`analysis.style.style_axes`, and returns the Axes.
Nothing here computes statistics: the inputs are already aggregated.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from analysis.style import (SAMPLING_STYLE, family_style, new_figure, order_families,
                            percent_ticks, ratio_shades, style_axes)

RATIO_LABEL = "compression ratio ρ = k / n"
VARIANCE_LABEL = r"gradient variance $\mathbb{E}\,\|\hat g - g\|_F^2$"


def _axes(ax: Axes | None) -> Axes:
    return new_figure()[1][0, 0] if ax is None else ax


def _dodge(families: Sequence[str], width: float = 0.06, spread: float = 0.2) -> dict[str, float]:
    """Multiplicative x offsets (log axes) so error bars of families do not overlap: ``width``
    apart in log x, the outermost at most ``spread`` / 2 from the true x in log x (≈ ±10 %)."""
    n = len(families)
    step = min(width, spread / max(n - 1, 1))
    return {f: float(np.exp(step * (i - (n - 1) / 2))) for i, f in enumerate(families)}


# --------------------------------------------------------------------------------------------
# Variance
# --------------------------------------------------------------------------------------------


def plot_paper_ratio(paper: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None,
                     family: str = "gaussian") -> Axes:
    """The seed paper's figure, drawn its way (linear axis near 1): its variance ratio per
    training step, lower bound 1 and the upper bound as it was plotted (α inverted, 1 + α).
    The bound with α as defined, (α + 1)/α, is far off that scale and is given in a note.

    ``paper``: :func:`analysis.tables.paper_view` output.
    """
    ax = _axes(ax)
    st = family_style(family)
    x = paper["train_step"].to_numpy()
    ax.plot(x, paper["paper_ratio"], color=st.color, marker=st.marker, markersize=4, lw=1.4,
            label="paper's variance ratio")
    ax.axhline(1.0, color="0.2", lw=1, ls="-", label="lower bound 1")
    ax.plot(x, paper["paper_bound_plotted"], color="0.2", lw=1, ls="--",
            label="upper bound as plotted, 1 + α")
    lo = min(paper["paper_ratio"].min(), 1.0)
    hi = max(paper["paper_ratio"].max(), paper["paper_bound_plotted"].max())
    pad = max(0.25 * (hi - lo), 0.05)
    ax.set_ylim(lo - pad, hi + pad)
    if "paper_bound" in paper and paper["paper_bound"].notna().any():
        b = paper["paper_bound"]
        ax.text(0.02, 0.97, f"upper bound with α as defined, (α+1)/α:\n"
                f"{b.min():.3g} – {b.max():.3g} (off this scale)", transform=ax.transAxes,
                va="top", fontsize="x-small", color="0.3")
    return style_axes(ax, xlabel="training step", ylabel="variance ratio (paper's formula)",
                      title=title, legend="lower right")


def plot_ratio_over_training(view: pd.DataFrame, *, ax: Axes | None = None,
                             title: str | None = None) -> Axes:
    """Sketch / sampling variance ratio per family over training, with its CI band.

    ``view``: :func:`analysis.tables.ratio_view` output (train_step, family, ratio_mean,
    ratio_ci_low, ratio_ci_high).
    """
    ax = _axes(ax)
    for fam in order_families(view["family"]):
        d = view[view["family"] == fam].sort_values("train_step")
        st = family_style(fam)
        ax.plot(d["train_step"], d["ratio_mean"], color=st.color, marker=st.marker,
                markersize=4, lw=1.4, label=st.label)
        if d[["ratio_ci_low", "ratio_ci_high"]].notna().all(axis=None):
            ax.fill_between(d["train_step"], d["ratio_ci_low"], d["ratio_ci_high"],
                            color=st.color, alpha=0.2, lw=0)
    ax.axhline(1.0, color="0.2", lw=1, ls="--", label="sketch = sampling")
    lo, hi = np.nanmin(view["ratio_ci_low"].fillna(view["ratio_mean"])), \
        np.nanmax(view["ratio_ci_high"].fillna(view["ratio_mean"]))
    style_axes(ax, xlabel="training step", ylabel="Var[sketch] / Var[sampling]", title=title,
               logy=bool(hi > 10 * max(min(lo, 1.0), 1e-300)))
    ax.legend(fontsize="x-small", frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return ax


def plot_variance_vs_ratio(kv: pd.DataFrame, *, ax: Axes | None = None,
                           title: str | None = None, legend: bool = True) -> Axes:
    """Sketch variance per family vs ρ, and the minibatch-sampling variance (grey, dashed).

    ``kv``: rows of one layer kind from :func:`analysis.tables.kind_variance` (family, ratio,
    var_sketch, var_sampling).
    """
    ax = _axes(ax)
    for fam in order_families(kv["family"]):
        d = kv[kv["family"] == fam].sort_values("ratio")
        st = family_style(fam)
        ax.plot(d["ratio"], d["var_sketch"], color=st.color, marker=st.marker, markersize=4,
                lw=1.3, label=st.label)
    samp = kv.groupby("ratio")["var_sampling"].mean().sort_index()
    ax.plot(samp.index, samp.to_numpy(), color=SAMPLING_STYLE.color, lw=2, ls="--",
            label=SAMPLING_STYLE.label)
    style_axes(ax, xlabel=RATIO_LABEL, ylabel=VARIANCE_LABEL,
               title=title, logx=True, logy=True, legend=legend)
    percent_ticks(ax, kv["ratio"])
    return ax


def plot_ratio_heatmap(wide: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None,
                       annotate: bool = True,
                       cbar_label: str = "Var[sketch] / Var[sampling]") -> Axes:
    """Heat map of a wide table on a log colour scale, families on the y axis.

    ``wide``: :func:`analysis.tables.heatmap_matrix` output (rows layers, columns families; a
    table with families as rows is drawn as it is).
    """
    ax = _axes(ax)
    if wide.columns.name == "family":
        wide = wide.T
    vals = wide.to_numpy(dtype=float)
    pos = vals[np.isfinite(vals) & (vals > 0)]
    norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.size else None
    im = ax.imshow(np.ma.masked_invalid(vals), aspect="auto", cmap="viridis", norm=norm,
                   interpolation="nearest")
    ax.set_xticks(range(wide.shape[1]))
    ax.set_xticklabels(wide.columns, rotation=90, fontsize="x-small")
    ax.set_yticks(range(wide.shape[0]))
    ax.set_yticklabels([family_style(f).label for f in wide.index])
    if annotate:
        mid = np.sqrt(pos.min() * pos.max()) if pos.size else 0
        for (i, j), v in np.ndenumerate(vals):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=5.5,
                        color="white" if v < mid else "black")
    cbar = ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.01)
    cbar.set_label(cbar_label)
    style_axes(ax, xlabel="layer (block, kind)", ylabel="sketch family", title=title)
    ax.grid(False)
    return ax


def plot_closed_vs_mc(df: pd.DataFrame, *, ax: Axes | None = None,
                      title: str | None = None, legend: bool = True) -> Axes:
    """Monte Carlo / closed-form sketch variance (± 2 s.e.) against the closed form, per family.

    ``df``: rows with family, var_sketch (closed form), var_sketch_mc and var_sketch_mc_se.
    A correct closed form scatters around 1 within the bars.
    """
    ax = _axes(ax)
    for fam in order_families(df["family"]):
        d = df[df["family"] == fam]
        st = family_style(fam)
        ax.errorbar(d["var_sketch"], d["var_sketch_mc"] / d["var_sketch"],
                    yerr=2 * d["var_sketch_mc_se"] / d["var_sketch"], color=st.color,
                    marker=st.marker, ms=3.5, ls="none", elinewidth=0.7, alpha=0.85,
                    label=st.label)
    ax.axhline(1.0, color="0.2", lw=1, ls="--", label="Monte Carlo = closed form")
    ax.xaxis.set_minor_formatter(NullFormatter())  # log axis over > 1 decade: majors suffice
    return style_axes(ax, xlabel="closed-form sketch variance",
                      ylabel="Monte Carlo / closed form  (± 2 s.e.)", title=title, logx=True,
                      legend=legend)


# --------------------------------------------------------------------------------------------
# Cost: memory, throughput, layer benchmark
# --------------------------------------------------------------------------------------------


def plot_memory_vs_batch(memory: pd.DataFrame, value: str = "saved_mib", *,
                         ax: Axes | None = None, title: str | None = None,
                         ylabel: str = "saved activations (MiB)") -> Axes:
    """Memory vs batch size, one line per (family, ρ): the family's colour, lighter for small ρ.

    ``memory``: rows with family, ratio, batch_size and ``value``.
    """
    ax = _axes(ax)
    for fam in order_families(memory["family"]):
        d = memory[memory["family"] == fam]
        shades = ratio_shades(fam, d["ratio"].fillna(1.0))
        st = family_style(fam)
        for r, g in d.groupby(d["ratio"].fillna(1.0), sort=True):
            g = g.groupby("batch_size", as_index=False)[value].mean()
            label = st.label if fam == "exact" else f"{st.label}, ρ = {100 * r:g}%"
            ax.plot(g["batch_size"], g[value], color=shades[float(r)], marker=st.marker,
                    markersize=4, lw=1.4, label=label)
    return style_axes(ax, xlabel="batch size (examples)", ylabel=ylabel, title=title,
                      legend=True)


def plot_metric_vs_ratio(df: pd.DataFrame, value: str, *, ax: Axes | None = None,
                         ylabel: str, title: str | None = None, err: str | None = None,
                         baseline: float | None = None, baseline_err: float | None = None,
                         baseline_label: str = "exact", legend: bool = True) -> Axes:
    """A metric vs ρ per family (optional ± ``err`` bars), the exact baseline as a black line.

    ``df``: rows with family, ratio, ``value`` (and ``err``); family "exact" rows, if any,
    are drawn as the baseline unless ``baseline`` is given.
    """
    ax = _axes(ax)
    exact = df[df["family"] == "exact"]
    if baseline is None and not exact.empty:
        baseline = float(exact[value].mean())
        if err and baseline_err is None:
            baseline_err = float(exact[err].mean())
    rest = df[(df["family"] != "exact") & df["ratio"].notna()]
    fams = order_families(rest["family"])
    dodge = _dodge(fams) if err else {f: 1.0 for f in fams}
    for fam in fams:
        d = rest[rest["family"] == fam].sort_values("ratio")
        st = family_style(fam)
        yerr = d[err].fillna(0).to_numpy() if err else None
        ax.errorbar(d["ratio"] * dodge[fam], d[value], yerr=yerr, color=st.color,
                    marker=st.marker, ms=4, lw=1.3, capsize=2 if err else 0, label=st.label)
    if baseline is not None and np.isfinite(baseline):
        ax.axhline(baseline, color="black", lw=1.2, label=baseline_label)
        if baseline_err is not None and np.isfinite(baseline_err) and baseline_err > 0:
            ax.axhspan(baseline - baseline_err, baseline + baseline_err, color="black",
                       alpha=0.08, lw=0)
    style_axes(ax, xlabel=RATIO_LABEL, ylabel=ylabel, title=title, logx=True, legend=legend)
    if not rest.empty:
        percent_ticks(ax, rest["ratio"])
    return ax


# --------------------------------------------------------------------------------------------
# Accuracy study: learning curve, paired differences, variance -> accuracy
# --------------------------------------------------------------------------------------------

SCOPE_LINES = {"all": "-", "encoder": "--", "none": ":"}


def plot_learning_curve(curve: pd.DataFrame, *, ax: Axes | None = None,
                        title: str | None = None, budget: int | None = None,
                        target: float | None = None) -> Axes:
    """Validation metric vs optimizer step, one line per (lr, seed); ``budget`` a vertical line,
    ``target`` a horizontal one. ``curve``: step, value, seed, lr."""
    ax = _axes(ax)
    shades = ratio_shades("exact", curve["lr"])
    for lr in sorted(shades):
        for j, (seed, d) in enumerate(curve[curve["lr"] == lr].groupby("seed")):
            ax.plot(d["step"], d["value"], color=shades[lr], lw=1.3, marker=".", ms=4,
                    label=f"lr {lr:g}" if j == 0 else None)
    if budget is not None:
        ax.axvline(budget, color="0.3", ls="--", lw=1, label=f"budget {budget} steps")
    if target is not None:
        ax.axhline(target, color="0.6", ls=":", lw=1, label=f"target {target:g}")
    style_axes(ax, xlabel="optimizer step", ylabel="validation accuracy", title=title,
               legend="lower right")
    return ax


def plot_paired_vs_ratio(paired: pd.DataFrame, *, ax: Axes | None = None, scale: float = 100.0,
                         title: str | None = None, legend: bool = True) -> Axes:
    """Paired accuracy difference to exact (mean and 95% CI, × ``scale``) vs ρ, one line per
    (family, scope): colour by family, line style by scope; 0 (no cost) as a black line."""
    ax = _axes(ax)
    fams = order_families(paired["family"])
    present = set(zip(paired["family"], paired["scope"]))
    dodge = _dodge([f"{f}/{s}" for f in fams for s in SCOPE_LINES if (f, s) in present])
    for fam in fams:
        st = family_style(fam)
        for scope, d in paired[paired["family"] == fam].groupby("scope", sort=False):
            d = d.sort_values("ratio")
            y = d["diff_mean"] * scale
            err = np.vstack([y - d["diff_ci_low"] * scale, d["diff_ci_high"] * scale - y])
            ax.errorbar(d["ratio"] * dodge.get(f"{fam}/{scope}", 1.0), y, yerr=err,
                        color=st.color, marker=st.marker, ms=4, lw=1.3, capsize=2,
                        ls=SCOPE_LINES.get(scope, "-."), label=f"{st.label}, {scope}",
                        mfc="white" if scope == "encoder" else st.color)
    ax.axhline(0.0, color="black", lw=1.0, label="exact (paired)")
    style_axes(ax, xlabel=RATIO_LABEL, ylabel=f"accuracy − exact (× {scale:g})", title=title,
               logx=True, legend=legend)
    if len(paired):
        percent_ticks(ax, paired["ratio"])
    return ax


ZERO_AT = 1e-3  # where a summary of 0 (an exact head) is drawn on a log axis


def plot_summary_vs_cost(df: pd.DataFrame, summary: str, *, ax: Axes | None = None,
                         scale: float = 100.0, title: str | None = None,
                         legend: bool = False) -> Axes:
    """Paired accuracy difference (95% CI) against one variance summary per configuration:
    colour by family, filled markers for scope "all", hollow for "encoder"."""
    ax = _axes(ax)
    x = df[summary].clip(lower=ZERO_AT)
    for (fam, scope), d in df.groupby(["family", "scope"], sort=False):
        st = family_style(fam)
        y = d["diff_mean"] * scale
        err = np.vstack([y - d["diff_ci_low"] * scale, d["diff_ci_high"] * scale - y])
        ax.errorbar(x[d.index], y, yerr=err, color=st.color, marker=st.marker, ms=5, lw=0,
                    elinewidth=1, capsize=2, mfc="white" if scope == "encoder" else st.color,
                    label=f"{st.label}, {scope}")
    ax.axhline(0.0, color="black", lw=1.0)
    zero = bool((df[summary] < ZERO_AT).any())
    xlabel = summary.replace("_", " ") + (f" (0 drawn at {ZERO_AT:g})" if zero else "")
    style_axes(ax, xlabel=xlabel, ylabel=f"accuracy − exact (× {scale:g})", title=title,
               logx=True, legend=legend)
    wide = np.log10(x.max() / x.min()) > 3  # 1-2-5 ticks crowd a range of many decades
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    return ax


def plot_scope_ratios(scopes: pd.DataFrame, family: str, *, ax: Axes | None = None,
                      title: str | None = None, legend: bool = True) -> Axes:
    """Sketch/sampling variance vs ρ of one family: the encoder, head and model totals (mean
    and CI over minibatches) and the per-layer median with its interquartile band."""
    ax = _axes(ax)
    d = scopes[scopes["family"] == family].sort_values("ratio")
    looks = {"encoder": ("-", "o"), "head": ("--", "s"), "all": (":", "^")}
    st = family_style(family)
    for scope, (ls, marker) in looks.items():
        s = d[d["scope"] == scope]
        if s.empty:
            continue
        err = np.vstack([s["ratio_mean"] - s["ratio_ci_low"], s["ratio_ci_high"] - s["ratio_mean"]])
        ax.errorbar(s["ratio"], s["ratio_mean"], yerr=err, color=st.color, ls=ls, marker=marker,
                    ms=4, lw=1.3, capsize=2, label=f"{scope} total")
    a = d[d["scope"] == "all"]
    ax.fill_between(a["ratio"], a["layer_ratio_q1"], a["layer_ratio_q3"], color=st.color,
                    alpha=0.15, lw=0, label="per layer: quartiles")
    ax.plot(a["ratio"], a["layer_ratio_median"], color="0.3", lw=1, label="per layer: median")
    ax.plot(a["ratio"], 1 / a["ratio"], color="0.6", lw=0.8, ls="-.", label="1/ρ")
    style_axes(ax, xlabel=RATIO_LABEL, ylabel="Var[sketch] / Var[sampling]", title=title,
               logx=True, logy=True, legend=legend)
    percent_ticks(ax, a["ratio"])
    return ax
