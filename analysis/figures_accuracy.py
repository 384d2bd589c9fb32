"""Accuracy-study figures: the exact model's learning curve (how the budget was chosen), the
paired accuracy cost of each (family, ρ, scope), and which variance summary predicts it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots, tables
from analysis.results import (FIGURES, RESULTS, MissingResultsError, load, require_rows,
                              save, write_text)
from analysis.stats import paired_contrast, paired_differences, with_holm
from analysis.style import new_figure
from analysis.summaries import SUMMARIES, link, link_differences, variance_summaries

RUNS = "study/accuracy/runs.csv"
RUN_COLUMNS = ("task", "family", "ratio", "scope", "seed", "metric", "best_value")
BUDGET_STEPS = 200  # the recipe's budget (varstudy.study preset "cpu"), marked on the curve
TARGET = 0.80
GRID_SCOPES = ("all", "encoder")  # uniform ρ; plan scopes are "plan:<name>"
BASE_FAMILY = "rows"  # the family every other one is contrasted with at equal ρ and scope
SCORES = {"best_value": "best validation accuracy",  # per-run score -> what it is, in captions
          "test_at_best": "test accuracy at the best validation step"}
# NOTE [multiple comparisons] (analysis.stats): the Holm families of the paired tables, one per
# score: every configuration against exact (paired_diff), and in paired_contrasts the scope
# contrasts (what the exact head buys) apart from the family contrasts (one family against rows)
AGAINST_EXACT = "configuration − exact"
SCOPE_CONTRAST, FAMILY_CONTRAST = "all − encoder", f"family − {BASE_FAMILY}"
# The samplers that read the mask, the model's structure or earlier gradients answer their own
# question (do they beat uniform rows?), so their comparisons form Holm families of their own
# and adding them leaves the grid's families (and their adjusted p-values) as they were.
INFORMED = ("rows-real", "rows-wor-real", "rows-live", "rows-adaptive")
INFORMED_AGAINST_EXACT = "sampler − exact"
INFORMED_CONTRAST = f"sampler − {BASE_FAMILY}"
HOLM_MARK = "†"


def learning_curve(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure: validation accuracy of the exact model vs step (every learning-rate folder)."""
    frames = []
    for folder in sorted((Path(results) / "study" / "learning_curve").glob("*/accuracy")):
        rel = folder.relative_to(results)
        evals = load(results, f"{rel}/evals.csv", ("step", "metric", "value", "seed"))
        cfg = pd.read_json(folder / "config.json", typ="series") \
            if (folder / "config.json").is_file() else {}
        lr = float(cfg.get("lr", np.nan)) if len(cfg) else np.nan
        frames.append(evals[evals.metric == "accuracy"].assign(lr=lr))
    if not frames:
        raise MissingResultsError("missing input study/learning_curve/*/accuracy (not produced yet?)")
    curve = pd.concat(frames, ignore_index=True)
    steps = curve.step.max()
    try:  # the recipe itself: the accuracy study's exact runs (one per seed)
        evals = load(results, "study/accuracy/evals.csv", ("family", "seed", "step", "metric",
                                                           "value"))
        cfg = pd.read_json(Path(results) / "study/accuracy/config.json", typ="series")
        recipe = evals[(evals.family == "exact") & (evals.metric == "accuracy")].assign(
            lr=float(cfg["lr"]))
    except (MissingResultsError, ValueError, KeyError):
        recipe = None
    fig, ax = new_figure(1, 1 if recipe is None else 2, panel=(5.2, 3.8), sharey=True)
    plots.plot_learning_curve(curve, ax=ax[0, 0], budget=BUDGET_STEPS, target=TARGET,
                              title=f"a {steps}-step schedule ({curve.seed.nunique()} seeds)")
    if recipe is not None:
        plots.plot_learning_curve(recipe, ax=ax[0, 1], target=TARGET,
                                  title=f"the recipe: {BUDGET_STEPS} steps "
                                        f"({recipe.seed.nunique()} seeds), mean best "
                                        f"{recipe.groupby('seed').value.max().mean():.3f}")
    fig.suptitle("How the step budget was chosen: exact MiniLM on rotten_tomatoes (B 32, "
                 "dynamic padding), validation accuracy")
    return save(fig, out, "learning_curve")


def paired_tables(runs: pd.DataFrame) -> pd.DataFrame:
    """Paired differences to exact of the best validation score and of the test score at it."""
    parts = [paired_differences(runs, value) for value in SCORES if value in runs]
    paired = pd.concat(parts, ignore_index=True)
    paired["holm_family"] = np.where(paired.family.isin(INFORMED), INFORMED_AGAINST_EXACT,
                                     AGAINST_EXACT)
    return with_holm(paired, ["value", "holm_family"])


def paired_contrasts(runs: pd.DataFrame) -> pd.DataFrame:
    """The grid's configurations against each other, paired by seed, at every ρ both have:
    "<family>: all − encoder" (what sketching the head costs) and "<family> − rows, <scope>"
    (one family against the base family), for the best validation and the test score."""
    grid = runs[runs.scope.isin(GRID_SCOPES)]
    rows = []
    for value in SCORES:
        if value not in grid:
            continue
        by = {key: g.set_index("seed")[value]
              for key, g in grid.groupby(["family", "scope", "ratio"], sort=False)}
        for (family, scope, ratio), a in by.items():
            against = []
            if scope == "all" and (family, "encoder", ratio) in by:
                against.append((f"{family}: all − encoder", SCOPE_CONTRAST,
                                by[family, "encoder", ratio]))
            if family != BASE_FAMILY and (BASE_FAMILY, scope, ratio) in by:
                against.append((f"{family} − {BASE_FAMILY}, {scope}",
                                INFORMED_CONTRAST if family in INFORMED else FAMILY_CONTRAST,
                                by[BASE_FAMILY, scope, ratio]))
            rows += [dict(contrast=name, ratio=ratio, value=value, **paired_contrast(a, b),
                          holm_family=kind) for name, kind, b in against]
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).sort_values(["value", "contrast"], kind="stable",
                                           ignore_index=True)
    return with_holm(table, ["value", "holm_family"])


def paired_wide(paired: pd.DataFrame, value: str, scale: float = 100.0,
                index: tuple[str, ...] = ("family", "scope")) -> pd.DataFrame:
    """Rows ``index`` (family, scope), columns ρ; cells "mean [low, high]" × scale, "*" when the
    95% interval excludes 0, "†" (:data:`HOLM_MARK`) when the Holm-adjusted p-value of the row's
    family is below 0.05 (where ``paired`` has ``distinguishable_holm``) ("[one seed]" where one
    pair has no interval; "(n=…)" when seeds differ)."""
    p = paired[paired.value == value].copy()
    show_n = p.n.nunique() > 1
    holm = p.distinguishable_holm if "distinguishable_holm" in p else [False] * len(p)
    p["cell"] = [paired_cell(m, lo, hi, d, h, n, scale, show_n)
                 for m, lo, hi, d, h, n in zip(p.diff_mean, p.diff_ci_low, p.diff_ci_high,
                                               p.distinguishable, holm, p.n)]
    p["col"] = [f"{100 * r:g}%" for r in p.ratio]
    wide = p.pivot_table(index=list(index), columns="col", values="cell",
                         aggfunc="first", fill_value="", sort=False)
    cols = [f"{100 * r:g}%" for r in sorted(p.ratio.unique(), reverse=True)]
    wide = wide[[c for c in cols if c in wide.columns]].reset_index()
    wide.columns.name = None
    return wide


def paired_cell(mean: float, low: float, high: float, distinguishable: bool, holm: bool, n: int,
                scale: float = 100.0, show_n: bool = False) -> str:
    """One table cell: "mean [low, high]" × scale, "*" when the interval excludes 0, "†" when
    Holm-significant, "[one seed]" with one pair (no interval), "no paired seed" with none,
    "(n=…)" when ``show_n``."""
    cell = (f"{mean * scale:+.2f} [{low * scale:+.2f}, {high * scale:+.2f}]" if n >= 2
            else f"{mean * scale:+.2f} [one seed]" if n == 1 else "no paired seed")
    return (cell + ("*" if distinguishable else "") + (HOLM_MARK if holm else "")
            + (f" (n={n})" if show_n else ""))


def accuracy_vs_ratio(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure and tables: paired accuracy cost vs ρ for both scopes; paired_diff.{csv,md,tex}."""
    runs = load(results, RUNS, RUN_COLUMNS)
    paired = paired_tables(runs)
    exact = runs[runs.family == "exact"]
    n_seeds = int(exact.seed.nunique())
    grid = paired[paired.scope.isin(GRID_SCOPES)]  # plans: figure plan_accuracy
    fig, axes = new_figure(1, 2, panel=(5.2, 4.0))
    for ax, value, what in zip(axes.flat, ("best_value", "test_at_best"),
                               ("best validation accuracy", "test accuracy at that step")):
        plots.plot_paired_vs_ratio(grid[grid.value == value], ax=ax, legend=False,
                                   title=f"{what} (exact: {100 * exact[value].mean():.1f})")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right center",
               fontsize="x-small", frameon=False)
    fig.suptitle(f"What randomized backprop costs in accuracy: paired by seed ({n_seeds} "
                 "exact seeds), mean and 95% t-interval")
    paths = save(fig, out, "accuracy_vs_ratio")
    Path(out).mkdir(parents=True, exist_ok=True)
    paired.to_csv(Path(out) / "paired_diff.csv", index=False)
    paths.append(Path(out) / "paired_diff.csv")
    md, tex = [], []
    for value, what in SCORES.items():
        if (paired.value == value).any():
            wide = paired_wide(paired, value)
            caption = (f"Paired difference to exact of the {what} × 100, mean [95% t-interval] "
                       f"over seeds; * the interval excludes 0; {_holm_note(paired, value)}")
            md.append(tables.to_markdown(wide, caption))
            tex.append(tables.to_latex(wide, caption, f"tab:paired-{value}"))
    paths.append(write_text(out, "paired_diff.md", "\n".join(md)))
    paths.append(write_text(out, "paired_diff.tex", "\n".join(tex)))
    return paths + contrast_tables(runs, out) + accuracy_table(runs, out)


def contrast_tables(runs: pd.DataFrame, out: Path) -> list[Path]:
    """paired_contrasts.{csv,md}: the grid's scopes and families against each other."""
    contrasts = paired_contrasts(runs)
    if contrasts.empty:
        return []
    Path(out).mkdir(parents=True, exist_ok=True)
    contrasts.to_csv(Path(out) / "paired_contrasts.csv", index=False)
    md = []
    for value, what in SCORES.items():
        if (contrasts.value == value).any():
            caption = (f"Paired difference a − b of the {what} × 100 between configurations, "
                       "mean [95% t-interval] over seeds; * the interval excludes 0; "
                       f"{_holm_note(contrasts, value)}")
            md.append(tables.to_markdown(paired_wide(contrasts, value, index=("contrast",)),
                                         caption))
    return [Path(out) / "paired_contrasts.csv", write_text(out, "paired_contrasts.md",
                                                           "\n".join(md))]


def _holm_note(table: pd.DataFrame, value: str) -> str:
    """Caption text for the Holm mark: the families of ``value``'s rows and their sizes."""
    sizes = table[table.value == value].groupby("holm_family", sort=False).holm_m.first()
    families = " or ".join(f"the {m} '{name}' contrasts" for name, m in sizes.items())
    return (f"{HOLM_MARK} Holm-adjusted p < 0.05 in its Holm family of this score ({families}; "
            "p_holm in the CSV)")


def accuracy_table(runs: pd.DataFrame, out: Path) -> list[Path]:
    """accuracy_table.{md,tex}: mean ± std over seeds of the best validation score, the test
    score at it and the training time; rows family (scope), columns ρ."""
    labelled = runs.assign(family=[f if s in ("none", "all") else f"{f} ({s})"
                                   for f, s in zip(runs.family, runs.scope)])
    md, tex = [], []
    for value, label, scale, digits in (("best_value", "best validation accuracy × 100", 100, 2),
                                        ("test_at_best", "test accuracy at that step × 100",
                                         100, 2),
                                        ("train_time_s", "training time (s)", 1, 0)):
        if value not in labelled:
            continue
        wide = tables.accuracy_table(tables.accuracy_summary(labelled.assign(metric=label),
                                                             value), scale=scale,
                                     digits=digits)
        caption = f"{label}: mean ± std over seeds; columns: compression ratio ρ (100%: exact)"
        md.append(tables.to_markdown(wide, caption))
        tex.append(tables.to_latex(wide, caption, f"tab:accuracy-{value}"))
    return [write_text(out, "accuracy_table.md", "\n".join(md)),
            write_text(out, "accuracy_table.tex", "\n".join(tex))]


LINK_COLUMNS = ("train_step", "layer", "family", "ratio", "var_sketch", "var_sampling")


def _with_samplers(results: Path, run: str) -> pd.DataFrame:
    """``run``'s layers.csv plus the families only ``measure/samplers_<run name>`` has (the
    structure-aware row samplers, measured with the same model, batches and seed), when that
    run exists."""
    layers = load(results, f"{run}/layers.csv", LINK_COLUMNS)
    extra_run = run.replace("measure/", "measure/samplers_")
    try:
        extra = load(results, f"{extra_run}/layers.csv", LINK_COLUMNS)
    except MissingResultsError:
        return layers
    extra = extra[~extra.family.isin(set(layers.family))]
    return pd.concat([layers, extra[list(layers.columns.intersection(extra.columns))]],
                     ignore_index=True)


def variance_vs_accuracy(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure and table: each variance summary (step 0 and end of exact training) against the
    paired accuracy cost; Spearman's ρ with a bootstrap interval -> variance_accuracy_link.*"""
    runs = load(results, RUNS, RUN_COLUMNS)
    paired = paired_differences(runs, "best_value")
    paired = paired[paired.scope.isin(GRID_SCOPES)]
    summaries = []
    for when, run in (("step 0", "measure/recipe_step0"), ("end of training",
                                                            "measure/recipe_end")):
        layers = _with_samplers(results, run)
        summaries.append(variance_summaries(layers).assign(when=when))
    summaries = pd.concat(summaries, ignore_index=True)
    linked = link(paired, summaries)
    merged = paired.merge(summaries, on=["family", "ratio", "scope"])
    require_rows(merged, f"no (family, ratio) of {RUNS} is in measure/recipe_*/layers.csv",
                 "measure runs over the accuracy grid's families and ratios")
    whens = list(dict.fromkeys(merged.when))
    fig, axes = new_figure(len(whens), len(SUMMARIES), panel=(3.1, 2.9), squeeze=False)
    for i, when in enumerate(whens):
        for j, name in enumerate(SUMMARIES):
            r = linked[(linked.when == when) & (linked.summary == name)].iloc[0]
            title = (f"{when}\nρ_s {r.spearman:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
                     if np.isfinite(r.spearman) else f"{when}\nn < 3")
            plots.plot_summary_vs_cost(merged[merged.when == when], name, ax=axes[i, j],
                                       title=title)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right center",
               fontsize="x-small", frameon=False)
    fig.suptitle("Which variance summary predicts the accuracy cost? (Spearman, bootstrap 95%)")
    paths = save(fig, out, "variance_vs_accuracy")
    linked.to_csv(Path(out) / "variance_accuracy_link.csv", index=False)
    caption = ("Spearman correlation between each variance summary and the paired accuracy "
               "difference over configurations, with a bootstrap 95% interval")
    shown = linked.assign(
        interval=[f"[{a:+.2f}, {b:+.2f}]" if np.isfinite(r) else "fewer than 3 configurations"
                  for r, a, b in zip(linked.spearman, linked.ci_low, linked.ci_high)],
        spearman=[f"{r:+.2f}" if np.isfinite(r) else "" for r in linked.spearman])[
        ["when", "summary", "n_configs", "spearman", "interval"]]
    diffs = link_differences(paired, summaries)
    diffs.to_csv(Path(out) / "variance_accuracy_link_diff.csv", index=False)
    text = [tables.to_markdown(shown, caption), tables.to_markdown(_shown_differences(diffs), (
        "Does one summary rank the costs better than another? Spearman ρ(a) − ρ(b) over the "
        "same configurations with a paired bootstrap 95% interval (the same resamples for "
        "both); ρ is negative here, so a negative difference means a ranks them more "
        "strongly; an interval that includes 0: not distinguishable"))]
    paths += [Path(out) / "variance_accuracy_link.csv",
              Path(out) / "variance_accuracy_link_diff.csv",
              write_text(out, "variance_accuracy_link.md", "\n".join(text))]
    return paths


def _shown_differences(diffs: pd.DataFrame) -> pd.DataFrame:
    finite = np.isfinite(diffs.difference)
    return diffs.assign(
        difference=[f"{d:+.2f}" if ok else "" for d, ok in zip(diffs.difference, finite)],
        interval=[f"[{a:+.2f}, {b:+.2f}]" if ok else "fewer than 3 configurations"
                  for a, b, ok in zip(diffs.ci_low, diffs.ci_high, finite)],
        distinguishable=["yes" if ok and (a > 0 or b < 0) else "no"
                         for a, b, ok in zip(diffs.ci_low, diffs.ci_high, finite)])[
        ["a", "b", "n_configs", "difference", "interval", "distinguishable"]]
