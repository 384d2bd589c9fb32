"""Variance summaries of a converted model, per (family, ratio, conversion scope), and their link
to the accuracy it costs (DataFrame -> DataFrame).

A measure run (``layers.csv``) evaluates every family and ratio on every linear layer of the
exact model; a conversion scope says which layers a fine-tuning run randomized ("all", or
"encoder": pooler and classifier exact). For one scope the converted layers add their sketch
variance and the others none, so from one measure run, per (family, ratio, scope):

* ``ratio_model``: Σ_converted sketch / Σ_all sampling: the whole model's total (absolute view,
  what plain SGD feels; dominated by the layers with the largest gradients);
* ``ratio_encoder`` / ``ratio_head``: the same over the encoder's / the head's layers;
* ``layer_median``, ``layer_q3``: median and upper quartile over all layers of the per-layer
  ratio sketch_l / sampling_l (0 for an exact layer): the relative view, closer to what Adam's
  per-parameter normalisation feels;
* ``layer_mean``: the mean per-layer ratio = the mean relative growth of a layer's gradient
  variance, Var_total,l / Var_sampling,l − 1.

Means are over the run's minibatches (sketch_l and sampling_l are per-layer means first).

:func:`link` gives each summary's Spearman correlation with the accuracy cost;
:func:`link_differences` whether one summary ranks the costs better than another: the
difference of the two correlations over the same configurations, with a paired bootstrap
interval (:func:`analysis.stats.rank_correlation_difference`). "a predicts better than b" is
claimed only when that interval excludes 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from varstudy.errors import VarstudyError
from varstudy.roles import layer_scope

SUMMARIES = ("ratio_model", "ratio_encoder", "ratio_head", "layer_median", "layer_q3",
             "layer_mean")
SCOPE_CONVERTS = {"all": ("encoder", "head"), "encoder": ("encoder",)}


def variance_summaries(layers: pd.DataFrame, scopes=("all", "encoder"),
                       train_step: int | None = None) -> pd.DataFrame:
    """One row per (family, ratio, scope) with the :data:`SUMMARIES` columns.

    ``layers``: a measure run's layers.csv; ``train_step``: default the first measured.
    """
    need = {"train_step", "layer", "family", "ratio", "var_sketch", "var_sampling"}
    if need - set(layers.columns):
        raise VarstudyError(f"layers table lacks {sorted(need - set(layers.columns))}; valid "
                            "choices: a layers.csv of python -m varstudy.measure")
    step = layers.train_step.min() if train_step is None else train_step
    d = layers[(layers.layer != "model") & (layers.train_step == step)]
    per = d.groupby(["family", "ratio", "layer"], sort=False)[["var_sketch", "var_sampling"]] \
        .mean().reset_index()
    per["scope_of_layer"] = per.layer.map(layer_scope)
    rows = []
    for (family, ratio), g in per.groupby(["family", "ratio"], sort=False):
        for scope in scopes:
            converted = g.scope_of_layer.isin(SCOPE_CONVERTS[scope])
            sketch = np.where(converted, g.var_sketch, 0.0)
            ratio_l = sketch / g.var_sampling.to_numpy()
            part = {}
            for name, mask in (("model", np.ones(len(g), bool)),
                               ("encoder", (g.scope_of_layer == "encoder").to_numpy()),
                               ("head", (g.scope_of_layer == "head").to_numpy())):
                part[f"ratio_{name}"] = float(sketch[mask].sum() / g.var_sampling[mask].sum())
            rows.append(dict(family=family, ratio=float(ratio), scope=scope, **part,
                             layer_median=float(np.median(ratio_l)),
                             layer_q3=float(np.quantile(ratio_l, 0.75)),
                             layer_mean=float(ratio_l.mean())))
    return pd.DataFrame(rows, columns=["family", "ratio", "scope", *SUMMARIES])


def link(paired: pd.DataFrame, summaries: pd.DataFrame, *, n_boot: int = 2000,
         seed: int = 0) -> pd.DataFrame:
    """Spearman's ρ (bootstrap CI over configurations) between each summary and the paired
    accuracy difference ``diff_mean``; the summaries at ``train_step`` labelled in a ``when``
    column are kept apart. Returns one row per (when, summary)."""
    from analysis.stats import rank_correlation

    merged = paired.merge(summaries, on=["family", "ratio", "scope"], how="inner")
    rows = []
    for when, g in merged.groupby("when", sort=False) if "when" in merged else [("", merged)]:
        for name in SUMMARIES:
            rho, low, high = rank_correlation(g[name], g.diff_mean, n_boot=n_boot, seed=seed)
            rows.append(dict(when=when, summary=name, n_configs=len(g), spearman=rho,
                             ci_low=low, ci_high=high))
    return pd.DataFrame(rows)


REFERENCE = ("step 0", "ratio_model")  # the model total at step 0: what a measure run reports first


def link_differences(paired: pd.DataFrame, summaries: pd.DataFrame, pairs=None, *,
                     n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """ρ_s(a) − ρ_s(b) between two (when, summary) predictors of the paired accuracy difference
    over the same configurations, with a paired bootstrap interval (seeded).

    ``pairs``: ((when_a, summary_a), (when_b, summary_b)) tuples; default every summary against
    the model total at the same ``when``, and the model total at the last ``when`` against
    :data:`REFERENCE`. Spearman's ρ here is negative (more variance, larger cost), so a negative
    difference means a ranks the costs more strongly than b. Returns one row per pair: a, b
    ("<when>: <summary>"), n_configs, difference, ci_low, ci_high.
    """
    from analysis.stats import rank_correlation_difference

    merged = paired.merge(summaries, on=["family", "ratio", "scope"], how="inner")
    wide = merged.pivot_table(index=["family", "ratio", "scope"], columns="when",
                              values=[*SUMMARIES, "diff_mean"], sort=False)
    whens = list(dict.fromkeys(merged.when))
    if pairs is None:
        pairs = [((w, name), (w, "ratio_model")) for w in whens for name in SUMMARIES
                 if name != "ratio_model"]
        pairs += [((w, "ratio_model"), REFERENCE) for w in whens[1:] if REFERENCE[0] in whens]
    rows = []
    for a, b in pairs:
        y = wide["diff_mean", a[0]]
        diff, low, high = rank_correlation_difference(wide[a[1], a[0]], wide[b[1], b[0]], y,
                                                      n_boot=n_boot, seed=seed)
        rows.append(dict(a=f"{a[0]}: {a[1]}", b=f"{b[0]}: {b[1]}", n_configs=len(wide),
                         difference=diff, ci_low=low, ci_high=high))
    return pd.DataFrame(rows, columns=["a", "b", "n_configs", "difference", "ci_low", "ci_high"])
