"""Tables: tidy DataFrame in, DataFrame out (aggregation, confidence intervals, ratios to a
baseline, the views each figure draws), plus Markdown / LaTeX export of the accuracy table.

Nothing here plots and nothing here reads files; :mod:`analysis.figures` does the I/O.
Conventions follow ARCHITECTURE.md: a sample is one example; ``ratio`` is ρ = k / n; the exact
baseline is ``family == "exact"`` (``ratio`` 1.0 or NaN).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from varstudy.errors import VarstudyError

from analysis.style import order_families, order_kinds

EXACT = "exact"
MODEL_ROW = "model"
ATTENTION_FFN_KINDS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


# --------------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------------


def require_columns(df: pd.DataFrame, columns: Iterable[str], source: str = "table") -> None:
    """Raise VarstudyError naming ``source`` and the missing columns (and those present)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise VarstudyError(
            f"{source} lacks required column(s) {', '.join(missing)}; "
            f"columns present: {', '.join(map(str, df.columns))}"
        )


def _shown(value) -> str:
    """A key value as a message shows it: ``0.1``, ``gaussian``, ``NaN``."""
    if isinstance(value, (float, np.floating)):
        return "NaN" if np.isnan(value) else f"{float(value):g}"
    return str(value.item() if isinstance(value, np.generic) else value)


def _named(columns: Sequence[str], values) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(f"{c} {_shown(v)}" for c, v in zip(columns, values))


def require_complete(df: pd.DataFrame, keys: Sequence[str], over: Sequence[str],
                     source: str = "table") -> None:
    """Raise VarstudyError (one line, naming ``source``) unless ``df`` is a full grid.

    NOTE [complete inputs]: a series is one value of the ``keys`` columns (a configuration, a
    layer); every series must have exactly one row for each value of the ``over`` columns
    that any series has (the seeds of an accuracy study, the steps and minibatches of a
    measure run). A configuration with fewer seeds than the others, or a step missing from one
    layer, would otherwise turn into a shorter mean, a gap in a curve or an empty table cell
    with no word said. Key columns absent from ``df`` are left out; nothing is checked without
    an ``over`` column; empty ``keys`` refuse duplicates of ``over`` alone (one row per
    configuration).
    """
    keys = [k for k in keys if k in df.columns]
    over = [o for o in over if o in df.columns]
    if not over or df.empty:
        return
    counts = df.groupby(keys + over, dropna=False, sort=False).size()
    if (counts > 1).any():
        first = counts[counts > 1].index[0]
        raise VarstudyError(f"{source} has {int(counts.max())} rows for "
                            f"{_named(keys + over, first)} (a run written twice?); valid "
                            "choices: one row each (rerun the command that writes it)")
    if not keys:
        return
    every = df[over].drop_duplicates()
    for key, group in df.groupby(keys, dropna=False, sort=False):
        if len(group) < len(every):
            have = {tuple(map(_shown, t)) for t in group[over].itertuples(index=False)}
            missing = [t for t in every.itertuples(index=False, name=None)
                       if tuple(map(_shown, t)) not in have]
            shown = "; ".join(_named(over, t) for t in missing[:3])
            raise VarstudyError(
                f"{source} is missing rows: {_named(keys, key)} has {len(group)} of the "
                f"{len(every)} {'/'.join(over)} values the other rows have (missing {shown}"
                f"{'; ...' if len(missing) > 3 else ''}); valid choices: finish that run (rerun "
                f"the command that writes it) or remove its rows")


def nearest(values: Iterable[float], target: float) -> float:
    """The element of ``values`` closest to ``target`` (in log space for positive numbers)."""
    vals = np.array(sorted(set(float(v) for v in values if pd.notna(v))))
    if vals.size == 0:
        raise VarstudyError("nearest: no finite values to choose from")
    if target > 0 and (vals > 0).all():
        return float(vals[np.argmin(np.abs(np.log(vals) - np.log(target)))])
    return float(vals[np.argmin(np.abs(vals - target))])


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of the mean.

    ``mean ± t_{(1+level)/2, n-1} · sd / √n`` with the sample standard deviation (ddof 1).
    With one value the interval is (NaN, NaN): a single seed gives no error estimate.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if x.size < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return m, m - float(half), m + float(half)


def aggregate(df: pd.DataFrame, by: Sequence[str], value: str,
              level: float = 0.95) -> pd.DataFrame:
    """One row per group of ``by``: mean, std (ddof 1), n, ci_low, ci_high of ``value``.

    Groups keep NaN keys (an exact run has ratio NaN), and come back in sorted order.
    """
    require_columns(df, [*by, value], "aggregate input")
    rows = []
    for key, group in df.groupby(list(by), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        vals = group[value].to_numpy(dtype=float)
        vals = vals[np.isfinite(vals)]
        m, lo, hi = mean_ci(vals, level)
        std = float(vals.std(ddof=1)) if vals.size > 1 else float("nan")
        rows.append({**dict(zip(by, key)), "mean": m, "std": std, "n": int(vals.size),
                     "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=[*by, "mean", "std", "n", "ci_low", "ci_high"])


def ratio_to_baseline(df: pd.DataFrame, value: str, on: Sequence[str] = (),
                      baseline: str = EXACT, column: str | None = None) -> pd.DataFrame:
    """Add ``column`` (default ``<value>_to_<baseline>``) = value / value of the baseline row.

    The baseline row is the one with ``family == baseline`` and the same values of ``on``
    (e.g. model, batch_size); several baseline rows in a group are averaged. Rows without a
    baseline get NaN.
    """
    require_columns(df, ["family", value, *on], "ratio_to_baseline input")
    column = column or f"{value}_to_{baseline}"
    base = df[df["family"] == baseline]
    if base.empty:
        raise VarstudyError(f"ratio_to_baseline: no rows with family == {baseline!r}; families: "
                            f"{', '.join(map(str, df['family'].unique()))}")
    out = df.copy()
    if on:
        ref = base.groupby(list(on), dropna=False)[value].mean().rename("_base").reset_index()
        out = out.merge(ref, on=list(on), how="left")
    else:
        out["_base"] = base[value].mean()
    out[column] = out[value] / out["_base"]
    return out.drop(columns="_base")


def family_spread(df: pd.DataFrame, value: str, by: Sequence[str] = ("ratio", "batch_size"),
                  reference: str = "gaussian") -> float:
    """Largest relative gap |v − v_reference| / v_reference between any randomized family and
    ``reference`` at equal ``by`` keys (0 when every family gives the same value)."""
    require_columns(df, ["family", value, *by], "family_spread input")
    rnd = df[df["family"] != EXACT]
    ref = rnd[rnd["family"] == reference].set_index(list(by))[value]
    if ref.empty:
        return float("nan")
    joined = rnd.join(ref.rename("_ref"), on=list(by))
    return float((np.abs(joined[value] - joined["_ref"]) / joined["_ref"]).max())


# --------------------------------------------------------------------------------------------
# Variance views (measurement engine: layers.csv / summary.csv)
# --------------------------------------------------------------------------------------------


def layer_label(kind: str, index) -> str:
    """Short label of a linear layer: ``L3 ffn_in`` (or the kind alone without an index)."""
    return f"L{int(index)} {kind}" if pd.notna(index) else str(kind)


def pick_layer(df: pd.DataFrame, kind: str = "ffn_in", index: int | None = None) -> str:
    """Name of the layer of ``kind`` at ``index`` (default: the middle block, as the paper's
    encoder layer 6 of 12)."""
    require_columns(df, ["layer", "layer_kind", "layer_index"], "layer table")
    cand = df[df["layer_kind"] == kind].drop_duplicates("layer")
    if cand.empty:
        raise VarstudyError(f"no layer of kind {kind!r} in the table; valid choices: "
                            f"{', '.join(order_kinds(df['layer_kind'].dropna().unique()))}")
    idx = cand["layer_index"].astype(float)
    if index is None:
        index = int(np.sort(idx.dropna().unique())[len(idx.dropna().unique()) // 2]) \
            if idx.notna().any() else None
    hit = cand[idx == index] if index is not None else cand
    if hit.empty:
        raise VarstudyError(f"no {kind!r} layer with index {index} in the table; valid "
                            "choices: "
                            f"{', '.join(map(str, sorted(idx.dropna().astype(int).unique())))}")
    return str(hit["layer"].iloc[0])


PAPER_COLUMNS = ("paper_ratio", "paper_bound", "paper_ratio_plotted", "paper_bound_plotted")


def paper_view(layers: pd.DataFrame, layer: str, family: str = "gaussian",
               ratio: float = 0.5) -> pd.DataFrame:
    """The seed paper's figure data: one batch per training step (its first), as it was logged.

    Returns train_step, batch, alpha and the paper_* columns, sorted by step.
    """
    require_columns(layers, ["train_step", "batch", "layer", "family", "ratio", "alpha",
                             *PAPER_COLUMNS], "layers.csv")
    sel = layers[(layers["layer"] == layer) & (layers["family"] == family)
                 & np.isclose(layers["ratio"].astype(float), ratio)]
    if sel.empty:
        raise VarstudyError(f"layers.csv has no rows for layer {layer!r}, family {family!r}, "
                            f"ratio {ratio}")
    first = sel.sort_values(["train_step", "batch"]).groupby("train_step", as_index=False).first()
    return first[["train_step", "batch", "alpha", *PAPER_COLUMNS]].reset_index(drop=True)


def ratio_view(summary: pd.DataFrame, layer: str, ratio: float,
               families: Iterable[str] | None = None) -> pd.DataFrame:
    """Sketch / sampling variance ratio with its CI per (family, train_step) for one layer."""
    cols = ["train_step", "layer", "family", "ratio", "ratio_mean", "ratio_ci_low",
            "ratio_ci_high"]
    require_columns(summary, cols, "summary.csv")
    sel = summary[(summary["layer"] == layer) & np.isclose(summary["ratio"].astype(float), ratio)]
    if families is not None:
        sel = sel[sel["family"].isin(list(families))]
    return sel[cols].sort_values(["family", "train_step"]).reset_index(drop=True)


def kind_variance(summary: pd.DataFrame, train_step: int | None = None,
                  kinds: Sequence[str] = ATTENTION_FFN_KINDS) -> pd.DataFrame:
    """Mean over the layers of each kind of the sketch and the sampling variance.

    One row per (layer_kind, family, ratio) with var_sketch, var_sampling, ratio (the mean of the
    per-layer sketch / sampling ratios) and n_layers. ``train_step`` None takes the first step.
    """
    need = ["train_step", "layer", "layer_kind", "family", "ratio", "var_sketch_mean",
            "var_sampling_mean", "ratio_mean"]
    require_columns(summary, need, "summary.csv")
    step = summary["train_step"].min() if train_step is None else train_step
    sel = summary[(summary["train_step"] == step) & (summary["layer"] != MODEL_ROW)
                  & summary["layer_kind"].isin(list(kinds))]
    out = (sel.groupby(["layer_kind", "family", "ratio"], as_index=False)
           .agg(var_sketch=("var_sketch_mean", "mean"), var_sampling=("var_sampling_mean", "mean"),
                ratio_mean=("ratio_mean", "mean"), n_layers=("layer", "nunique")))
    return out.sort_values(["layer_kind", "family", "ratio"]).reset_index(drop=True)


def heatmap_matrix(summary: pd.DataFrame, ratio: float, value: str = "ratio_mean",
                   train_step: int | None = None) -> pd.DataFrame:
    """Wide table for the per-layer heat map: rows = layers (model order), columns = families.

    Row labels are ``L<index> <kind>``; the model-total row is left out.
    """
    require_columns(summary, ["train_step", "layer", "layer_kind", "layer_index", "family",
                              "ratio", value], "summary.csv")
    step = summary["train_step"].min() if train_step is None else train_step
    sel = summary[(summary["train_step"] == step) & (summary["layer"] != MODEL_ROW)
                  & np.isclose(summary["ratio"].astype(float), ratio)].copy()
    if sel.empty:
        raise VarstudyError(f"summary.csv has no per-layer rows at ratio {ratio}, step {step}")
    kinds = order_kinds(sel["layer_kind"].unique())
    sel["_kind"] = sel["layer_kind"].map({k: i for i, k in enumerate(kinds)})
    sel["_index"] = sel["layer_index"].astype(float).fillna(np.inf)
    sel["label"] = [layer_label(k, i) for k, i in zip(sel["layer_kind"], sel["layer_index"])]
    order = sel.sort_values(["_index", "_kind", "layer"]).drop_duplicates("layer")
    wide = sel.pivot_table(index="layer", columns="family", values=value, aggfunc="mean")
    wide = wide.loc[order["layer"], order_families(wide.columns)]
    wide.index = order["label"].to_numpy()
    wide.index.name, wide.columns.name = "layer", "family"
    return wide


# --------------------------------------------------------------------------------------------
# Accuracy table
# --------------------------------------------------------------------------------------------


def accuracy_summary(runs: pd.DataFrame, value: str = "best_value",
                     level: float = 0.95) -> pd.DataFrame:
    """Per (task, family, ratio, metric): mean, std, n and CI of ``value`` over seeds.

    The exact baseline's ratio is set to 1.0 (it keeps every row).
    """
    require_columns(runs, ["task", "family", "ratio", "metric", value], "runs.csv")
    runs = runs.copy()
    runs.loc[runs["family"] == EXACT, "ratio"] = 1.0
    return aggregate(runs, ["task", "family", "ratio", "metric"], value, level)


def _cell(mean: float, std: float, n: int, scale: float, digits: int, show_n: bool) -> str:
    if not np.isfinite(mean):
        return ""
    text = f"{mean * scale:.{digits}f}"
    if np.isfinite(std):
        text += f" ± {std * scale:.{digits}f}"
    return text + (f" (n={n})" if show_n else "")


def accuracy_table(summary: pd.DataFrame, scale: float = 100.0, digits: int = 2) -> pd.DataFrame:
    """Wide accuracy table of strings: rows (task, family), columns ρ (``50%`` ...), cells
    ``mean ± std`` of the metric × ``scale`` over seeds (``(n=…)`` appended when n varies).

    ``summary`` is :func:`accuracy_summary` output or the study's summary.csv (task, family,
    ratio, metric, mean, std, n).
    """
    require_columns(summary, ["task", "family", "ratio", "metric", "mean", "std", "n"],
                    "accuracy summary")
    s = summary.copy()
    s.loc[s["family"] == EXACT, "ratio"] = 1.0
    show_n = s["n"].nunique() > 1
    s["cell"] = [_cell(m, sd, n, scale, digits, show_n)
                 for m, sd, n in zip(s["mean"], s["std"], s["n"])]
    ratios = sorted(s["ratio"].astype(float).unique(), reverse=True)
    s["col"] = [f"{100 * r:g}%" for r in s["ratio"].astype(float)]
    wide = s.pivot_table(index=["task", "metric", "family"], columns="col", values="cell",
                         aggfunc="first", fill_value="")
    wide = wide[[f"{100 * r:g}%" for r in ratios]]
    order = []
    for task, metric in dict.fromkeys(zip(s["task"], s["metric"])):
        fams = order_families(s.loc[(s["task"] == task) & (s["metric"] == metric), "family"])
        order += [(task, metric, f) for f in fams]
    wide = wide.loc[order].reset_index()
    wide.columns.name = None
    return wide


def to_markdown(table: pd.DataFrame, caption: str | None = None) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency); ``|`` in cells is escaped."""
    def esc(v) -> str:
        return "" if pd.isna(v) else str(v).replace("|", "\\|")

    lines = ([caption, ""] if caption else [])
    lines.append("| " + " | ".join(esc(c) for c in table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text) -> str:
    """Escape LaTeX special characters; ``±`` becomes ``$\\pm$``."""
    if pd.isna(text):
        return ""
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))
    return out.replace("±", r"$\pm$")


def to_latex(table: pd.DataFrame, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    align = "l" * sum(not str(c).endswith("%") for c in table.columns)
    align += "r" * (len(table.columns) - len(align))
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [rf"\begin{{tabular}}{{{align}}}", r"\toprule",
              " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in table.itertuples(False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
