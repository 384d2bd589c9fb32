"""Variance figures: what the measurement engine reports (results/measure/...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from varstudy.errors import VarstudyError

from analysis import plots, tables
from analysis.results import (FIGURES, RESULTS, MissingResultsError, load, outer_labels, save,
                              write_text)
from analysis.style import facet_grid, family_style, new_figure, order_families, order_kinds

MEASURE_DEFAULT = "measure/default"
MEASURE_TRAINING = "measure/over_training"
SUMMARY_COLUMNS = ("train_step", "layer", "layer_kind", "layer_index", "family", "ratio",
                   "var_sketch_mean", "var_sampling_mean", "ratio_mean", "ratio_ci_low",
                   "ratio_ci_high")


def build_variance_ratio_over_training(layers: pd.DataFrame, summary: pd.DataFrame, *,
                                       layer_kind: str = "ffn_in", layer_index: int | None = None,
                                       family: str = "gaussian", ratio: float = 0.5) -> Figure:
    """Left: the paper's ratio and bounds for one layer; right: sketch / sampling ratio with CI."""
    layer = tables.pick_layer(summary, layer_kind, layer_index)
    ratio = tables.nearest(summary["ratio"], ratio)
    paper = tables.paper_view(layers, layer, family, ratio)
    view = tables.ratio_view(summary, layer, ratio)
    label = tables.layer_label(layer_kind, summary.loc[summary["layer"] == layer,
                                                       "layer_index"].iloc[0])
    fig, ax = new_figure(1, 2, panel=(5.0, 3.6))
    plots.plot_paper_ratio(paper, ax=ax[0, 0], family=family,
                           title=f"as in the paper: {family}, one batch per step")
    plots.plot_ratio_over_training(view, ax=ax[0, 1],
                                   title="corrected: per-example sampling, mean ± 95% CI")
    fig.suptitle(f"Variance ratio over training, layer {label}, ρ = {100 * ratio:g}%")
    return fig


def variance_ratio_over_training(results: Path = RESULTS, out: Path = FIGURES, *,
                                 run: str = MEASURE_TRAINING,
                                 name: str = "variance_ratio_over_training",
                                 **options) -> list[Path]:
    """Figure: variance ratio over training, the paper's way and the corrected way."""
    layers = load(results, f"{run}/layers.csv",
                  ("train_step", "batch", "layer", "family", "ratio", "alpha",
                   *tables.PAPER_COLUMNS))
    summary = load(results, f"{run}/summary.csv", SUMMARY_COLUMNS)
    return save(build_variance_ratio_over_training(layers, summary, **options), out, name)


def variance_ratio_over_training_mpnet(results: Path = RESULTS,
                                       out: Path = FIGURES) -> list[Path]:
    """Figure: the seed paper's setting at base size: MPNet-base layer 6 intermediate.dense
    (768 -> 3072), batch 64, Gaussian ρ = 0.5, over 100 exact training steps."""
    return variance_ratio_over_training(results, out, run="measure/mpnet_over_training",
                                        name="variance_ratio_over_training_mpnet",
                                        layer_kind="ffn_in", layer_index=6, family="gaussian",
                                        ratio=0.5)


def variance_by_scope(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure and table: sketch/sampling variance of the encoder, the head and the model, and
    the per-layer ratio's median and quartiles, vs ρ per family (scopes.csv of the default
    measure run) -> scope_table.{md,tex}."""
    scopes = load(results, f"{MEASURE_DEFAULT}/scopes.csv",
                  ("train_step", "family", "ratio", "scope", "ratio_mean", "ratio_ci_low",
                   "ratio_ci_high", "layer_ratio_q1", "layer_ratio_median", "layer_ratio_q3"))
    scopes = scopes[scopes.train_step == scopes.train_step.min()]
    if not (scopes.scope == "all").any():
        raise VarstudyError(f"{MEASURE_DEFAULT}/scopes.csv has no scope 'all' rows; valid "
                            "choices: scopes.csv as python -m varstudy.measure writes it")
    fams = order_families(scopes.family)
    fig, axes, panels = facet_grid(len(fams), 4, panel=(3.4, 3.0))
    for fam, ax in zip(fams, panels):
        plots.plot_scope_ratios(scopes, fam, ax=ax, legend=False, title=family_style(fam).label)
    outer_labels(axes)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center",
               ncols=3, fontsize="small", frameon=False)
    fig.suptitle("Sketch / sampling variance by scope: encoder, head (pooler + classifier), "
                 "whole model, and per layer")
    paths = save(fig, out, "variance_by_scope")
    wide = scope_table(scopes)
    caption = ("Sketch / sampling variance ratio by scope (Σ sketch / Σ sampling, mean and 95% "
               "t-interval over minibatches) and the per-layer ratio, default measure run")
    paths.append(write_text(out, "scope_table.md", tables.to_markdown(wide, caption)))
    paths.append(write_text(out, "scope_table.tex", tables.to_latex(wide, caption,
                                                                    "tab:scopes")))
    return paths


def _interval(mean: float, low: float, high: float) -> str:
    """``m [low, high]``; ``m (one minibatch)`` where a single minibatch gives no interval."""
    if np.isfinite(low) and np.isfinite(high):
        return f"{mean:.3g} [{low:.3g}, {high:.3g}]"
    return f"{mean:.3g} (one minibatch)"


def scope_table(scopes: pd.DataFrame) -> pd.DataFrame:
    """One row per (family, ρ): the scope totals present (encoder, head, all; a run over the
    encoder alone has no head) with their intervals, and the per-layer median [q1, q3]."""
    table = scopes.assign(cell=[_interval(m, lo, hi) for m, lo, hi in
                                zip(scopes.ratio_mean, scopes.ratio_ci_low,
                                    scopes.ratio_ci_high)])
    present = [s for s in ("encoder", "head", "all") if (scopes.scope == s).any()]
    wide = table.pivot_table(index=["family", "ratio"], columns="scope", values="cell",
                             aggfunc="first", sort=False)[present]
    allrows = scopes[scopes.scope == "all"].set_index(["family", "ratio"]).reindex(wide.index)
    wide["per-layer median [q1, q3]"] = [
        f"{m:.3g} [{a:.3g}, {b:.3g}]" for m, a, b in zip(
            allrows.layer_ratio_median, allrows.layer_ratio_q1, allrows.layer_ratio_q3)]
    wide = wide.reset_index()
    wide.columns.name = None
    return wide


def build_variance_vs_ratio(summary: pd.DataFrame, train_step: int | None = None) -> Figure:
    """Facets by layer kind: sketch variance per family and sampling variance vs ρ."""
    kv = tables.kind_variance(summary, train_step)
    kinds = order_kinds(kv["layer_kind"].unique())
    fig, axes, panels = facet_grid(len(kinds), 3, panel=(3.6, 3.0), sharex=True)
    for kind, ax in zip(kinds, panels):
        d = kv[kv["layer_kind"] == kind]
        plots.plot_variance_vs_ratio(d, ax=ax, legend=False,
                                     title=f"{kind} (mean of {d['n_layers'].max()} layers)")
    outer_labels(axes)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(5, len(labels)),
               fontsize="small", frameon=False)
    fig.suptitle("Sketch vs minibatch-sampling variance of the weight gradient")
    return fig


def variance_vs_ratio(results: Path = RESULTS, out: Path = FIGURES, **options) -> list[Path]:
    """Figure: sketch and sampling variance vs ρ, facets by layer kind."""
    summary = load(results, f"{MEASURE_DEFAULT}/summary.csv", SUMMARY_COLUMNS)
    return save(build_variance_vs_ratio(summary, **options), out, "variance_vs_ratio")


def build_ratio_heatmap(summary: pd.DataFrame, ratio: float = 0.1,
                        train_step: int | None = None) -> Figure:
    """Per-layer × family heat map of Var[sketch] / Var[sampling] at one ρ."""
    ratio = tables.nearest(summary["ratio"], ratio)
    wide = tables.heatmap_matrix(summary, ratio, "ratio_mean", train_step)
    fig, ax = new_figure(1, 1, panel=(2.0 + 0.25 * wide.shape[0], 1.6 + 0.3 * wide.shape[1]))
    plots.plot_ratio_heatmap(wide, ax=ax[0, 0],
                             title=f"Sketch / sampling variance per layer, ρ = {100 * ratio:g}%")
    return fig


def ratio_heatmap(results: Path = RESULTS, out: Path = FIGURES, **options) -> list[Path]:
    """Figure: heat map of the sketch / sampling variance ratio per layer and family."""
    summary = load(results, f"{MEASURE_DEFAULT}/summary.csv", SUMMARY_COLUMNS)
    return save(build_ratio_heatmap(summary, **options), out, "ratio_heatmap")


def closed_form_vs_mc(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure: closed-form sketch variance against its Monte Carlo estimate, every layer."""
    layers = load(results, f"{MEASURE_DEFAULT}/layers.csv",
                  ("layer", "family", "ratio", "var_sketch", "var_sketch_mc",
                   "var_sketch_mc_se", "mc_draws"))
    d = layers[(layers["layer"] != tables.MODEL_ROW) & (layers["mc_draws"] > 0)
               & layers["var_sketch_mc"].notna()]
    if d.empty:
        raise MissingResultsError(f"{MEASURE_DEFAULT}/layers.csv has no Monte Carlo rows")
    where = ", ".join(sorted({tables.layer_label(k, i) for k, i in
                              zip(d["layer_kind"], d["layer_index"])})) \
        if {"layer_kind", "layer_index"} <= set(d.columns) else f"{d['layer'].nunique()} layers"
    n_batches = d.groupby(["train_step", "batch"]).ngroups if "batch" in d else 1
    fig, ax = new_figure(1, 1, panel=(6.0, 4.0))
    plots.plot_closed_vs_mc(d, ax=ax[0, 0], legend=False,
                            title=f"{where}, {n_batches} batch{'es' if n_batches > 1 else ''}, "
                                  f"{int(d['mc_draws'].max())} draws per point")
    fig.legend(*ax[0, 0].get_legend_handles_labels(), loc="outside right center",
               fontsize="x-small", frameon=False)
    fig.suptitle("Closed-form sketch variance checked by Monte Carlo")
    return save(fig, out, "closed_form_vs_mc")


