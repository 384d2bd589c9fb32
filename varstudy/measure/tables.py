"""summary.csv from layers.csv, scope totals and the one-screen report (DataFrame -> DataFrame)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from varstudy.measure.config import SCOPE_COLUMNS, SUMMARY_COLUMNS
from varstudy.roles import layer_scope
from varstudy.randomized import variance as V


def summarize(layers: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """summary.csv from layers.csv: t-intervals over batches per (step, layer, family, ratio)."""
    keys = ["train_step", "layer", "family", "ratio"]
    out = []
    for key, g in layers.groupby(keys, sort=False):
        sk, sa, rt = (V.mean_ci(g[c], level) for c in
                      ("var_sketch", "var_sampling", "ratio_sketch_sampling"))
        mc = g[g["mc_draws"] > 0]
        mc_se = math.sqrt((mc["var_sketch_mc_se"] ** 2).sum()) / len(mc) if len(mc) else math.nan
        lim, split = _mean(g, "var_limit"), _mean(g, "var_limit_split")
        out.append(dict(zip(keys, key), layer_kind=g["layer_kind"].iloc[0],
                        layer_index=g["layer_index"].iloc[0], k=g["k"].iloc[0],
                        n_batches=len(g), var_sketch_mean=sk[0], var_sketch_ci_low=sk[1],
                        var_sketch_ci_high=sk[2], var_sampling_mean=sa[0],
                        var_sampling_ci_low=sa[1], var_sampling_ci_high=sa[2],
                        var_total=sk[0] + sa[0], ratio_mean=rt[0], ratio_ci_low=rt[1],
                        ratio_ci_high=rt[2],
                        var_sketch_mc_mean=mc["var_sketch_mc"].mean() if len(mc) else math.nan,
                        var_sketch_mc_se=mc_se, var_limit_mean=lim, var_limit_split_mean=split,
                        sketch_over_limit=over_limit(sk[0], split)))
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))


def _mean(g: pd.DataFrame, column: str) -> float:
    """Mean of a column that tables written before it existed lack (NaN then)."""
    return float(g[column].mean()) if column in g else math.nan


def over_limit(sketch, limit):
    """sketch / limit, the limit being the best split (``var_limit_split`` <= ``var_limit``;
    NOTE [a bound, not a sampler] in varstudy.randomized.limit): 1 where both are 0 (the needed
    rows kept exactly), inf where only the limit is 0; scalars or arrays."""
    sketch, limit = np.asarray(sketch, dtype=float), np.asarray(limit, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(limit > 0, sketch / np.where(limit > 0, limit, 1.0),
                         np.where(sketch > 0, np.inf, 1.0))
    return float(ratio) if ratio.ndim == 0 else ratio


def scope_summary(layers: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """scopes.csv from layers.csv: totals per scope and the spread of per-layer ratios.

    NOTE [scopes] (varstudy.roles): a model total is dominated by the layers with the largest
    gradients, so per (train_step, family, ratio) and scope ("encoder", "head", "all"):
    the per-batch sums of var_sketch and var_sampling over the scope's layers (means, t-CIs),
    their ratio (the absolute view, what plain SGD feels; mean and t-CI over batches), and the
    distribution over the scope's layers of each layer's ratio var_sketch_mean / var_sampling_mean
    (the relative view: median, quartiles, extremes).
    """
    rows = layers[layers.layer != "model"].assign(scope=lambda d: d.layer.map(layer_scope))
    both = pd.concat([rows, rows.assign(scope="all")], ignore_index=True)
    keys = ["train_step", "family", "ratio", "scope"]
    out = []
    limits = [c for c in ("var_limit", "var_limit_split") if c in both]
    for key, g in both.groupby(keys, sort=False):
        per_batch = g.groupby("batch")[["var_sketch", "var_sampling", *limits]].sum()
        ratio = per_batch.var_sketch / per_batch.var_sampling
        sk, sa, rt = (V.mean_ci(v, level) for v in (per_batch.var_sketch,
                                                   per_batch.var_sampling, ratio))
        means = g.groupby("layer")[["var_sketch", "var_sampling", *limits]].mean()
        layer_ratio = (means.var_sketch / means.var_sampling).to_numpy(dtype=float)
        q = np.quantile(layer_ratio, [0.0, 0.25, 0.5, 0.75, 1.0])
        lim = {f"{c}_mean": float(per_batch[c].mean()) if c in limits else math.nan
               for c in ("var_limit", "var_limit_split")}
        lim["limit_ratio_median"] = (float(np.median(over_limit(means.var_sketch,
                                                                means.var_limit_split)))
                                     if limits else math.nan)
        out.append(dict(zip(keys, key), n_layers=len(means), n_batches=len(per_batch),
                        var_sketch_mean=sk[0], var_sketch_ci_low=sk[1], var_sketch_ci_high=sk[2],
                        var_sampling_mean=sa[0], var_sampling_ci_low=sa[1],
                        var_sampling_ci_high=sa[2], ratio_mean=rt[0], ratio_ci_low=rt[1],
                        ratio_ci_high=rt[2], layer_ratio_min=q[0], layer_ratio_q1=q[1],
                        layer_ratio_median=q[2], layer_ratio_q3=q[3], layer_ratio_max=q[4],
                        **lim))
    order = {"encoder": 0, "head": 1, "all": 2}
    table = pd.DataFrame(out, columns=list(SCOPE_COLUMNS))
    return table.sort_values(["train_step", "family", "ratio", "scope"], key=lambda c: c.map(
        order) if c.name == "scope" else c, kind="stable", ignore_index=True)


def format_summary(scopes: pd.DataFrame) -> str:
    """One screen: per family × ratio at the last measured step, the sketch/sampling ratio of the
    encoder, the head and the whole model, and the median and quartiles of the per-layer ratio."""
    last = scopes["train_step"].max()
    s = scopes[scopes["train_step"] == last]
    wide = s.pivot_table(index=["family", "ratio"], columns="scope", values="ratio_mean",
                         sort=False)
    allrows = s[s.scope == "all"].set_index(["family", "ratio"])
    table = pd.DataFrame({
        "encoder": wide.get("encoder"), "head": wide.get("head"), "all": wide.get("all"),
        "layer median": allrows.layer_ratio_median,
        "layer q1-q3": [f"{a:.3g}-{b:.3g}" for a, b in zip(allrows.layer_ratio_q1,
                                                          allrows.layer_ratio_q3)]}).reset_index()
    head = (f"sketch/sampling variance at train step {last} ({int(s.n_batches.iloc[0])} batches, "
            f"{int(allrows.n_layers.iloc[0])} layers): scope totals (sum of sketch over sum of "
            "sampling) and the per-layer ratio")
    return head + "\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
