"""Plan figures: the frontier of planned vs uniform sketch sizes (variance and step time against
stored bytes), and whether a plan buys accuracy (paired by seed with the exact model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import tables
from analysis.results import FIGURES, RESULTS, MissingResultsError, load, save, write_text
from analysis.stats import paired_contrast, paired_differences
from analysis.style import family_style, new_figure, order_families, percent_ticks, style_axes

OBJECTIVE_MARKERS = {"uniform": ("o", "-"), "absolute": ("s", "--"), "relative": ("^", ":")}


def _frontiers(results: Path) -> pd.DataFrame:
    frames = [load(results, str(p.relative_to(results)),
                   ("family", "budget", "objective", "var_sketch_uniform", "var_sketch_planned",
                    "relative_uniform", "relative_planned"))
              for p in sorted((Path(results) / "plans").glob("default_*/frontier.csv"))]
    if not frames:
        raise MissingResultsError("missing input plans/default_*/frontier.csv (not produced yet?)")
    return pd.concat(frames, ignore_index=True)


def _long(front: pd.DataFrame, bench: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (family, budget, kind ∈ uniform/absolute/relative): variances, and the
    layer benchmark's step-time and saved-bytes ratios when it was run."""
    rows = []
    for r in front.itertuples():
        rows.append(dict(family=r.family, budget=r.budget, kind=r.objective,
                         var=r.var_sketch_planned, rel=r.relative_planned,
                         label=f"{r.family}:plan_{r.objective}_{r.budget:g}"))
        rows.append(dict(family=r.family, budget=r.budget, kind="uniform",
                         var=r.var_sketch_uniform, rel=r.relative_uniform, label=r.family))
    d = pd.DataFrame(rows).drop_duplicates(["family", "budget", "kind"])
    if bench is None:
        return d.assign(time_ratio=np.nan, saved_ratio=np.nan)
    b = bench.rename(columns={"family": "label", "ratio": "budget"})
    return d.merge(b[["label", "budget", "time_ratio", "linear_saved_ratio", "saved_ratio"]],
                   on=["label", "budget"], how="left")


def plan_frontier(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure and table: sketch variance (absolute and relative objectives) and step time vs the
    stored bytes, uniform ρ against the planned sizes -> plan_frontier.md."""
    front = _frontiers(results)
    try:
        bench = load(results, "plans/bench/layers.csv", ("family", "ratio", "time_ratio",
                                                         "saved_ratio"))
    except MissingResultsError:
        bench = None
    d = _long(front, bench)
    fams = order_families(d.family)
    panels = [("var", "total sketch variance (absolute)"),
              ("rel", "Σ per-layer sketch / sampling (relative)")]
    if bench is not None:
        panels.append(("time_ratio", "step time / exact"))
    fig, axes = new_figure(len(fams), len(panels), panel=(3.8, 3.1), squeeze=False)
    for i, fam in enumerate(fams):
        st = family_style(fam)
        for j, (col, ylabel) in enumerate(panels):
            ax = axes[i, j]
            for kind, (marker, ls) in OBJECTIVE_MARKERS.items():
                s = d[(d.family == fam) & (d.kind == kind)].sort_values("budget")
                x = s["saved_ratio"] if col == "time_ratio" else s["budget"]
                ax.plot(x, s[col], marker=marker, ls=ls, color=st.color if kind == "uniform"
                        else "0.25", label=kind if kind == "uniform" else f"{kind} plan")
            style_axes(ax, xlabel="saved bytes / exact (whole step)" if col == "time_ratio"
                       else "bytes: uniform ratio ρ of equal storage", ylabel=ylabel,
                       title=f"{st.label}", logx=col != "time_ratio", logy=col != "time_ratio",
                       legend=(i == 0 and j == 0))
            if col != "time_ratio":
                percent_ticks(ax, d.budget)
    fig.suptitle("Planned vs uniform sketch sizes at equal bytes (MiniLM, B 16, L 64)")
    paths = save(fig, out, "plan_frontier")
    shown = front.assign(
        **{"uniform/planned (absolute)": front.uniform_over_planned.round(2),
           "uniform/planned (relative)": front.relative_uniform_over_planned.round(2)})[
        ["family", "budget", "objective", "uniform/planned (absolute)",
         "uniform/planned (relative)", "exact_layers"]]
    caption = ("At the bytes of uniform ρ, how much less sketch variance a plan has: total "
               "(absolute) and Σ per-layer ratio (relative), for the plan of each objective")
    paths.append(write_text(out, "plan_frontier.md", tables.to_markdown(shown, caption)))
    return paths


def plan_accuracy(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Table and figure: accuracy of the absolute plan, the relative plan, uniform ρ and uniform
    with the head exact, at the bytes of uniform 0.1 and 0.05, paired by seed with exact."""
    runs = load(results, "study/accuracy/runs.csv",
                ("family", "ratio", "scope", "seed", "best_value"))
    planned = runs[runs.scope.str.startswith("plan:")]
    if planned.empty:
        raise MissingResultsError("study/accuracy/runs.csv has no plan runs (not produced yet?)")
    family = planned.family.iloc[0]
    budgets = sorted(planned.ratio.unique())
    keep = runs[(runs.family == "exact") | ((runs.family == family)
                                            & runs.ratio.isin(budgets))]
    paired = paired_differences(keep, "best_value")
    paired["config"] = [_config_label(s) for s in paired.scope]
    fig, axes = new_figure(1, 1, panel=(6.0, 3.6))
    ax = axes[0, 0]
    configs = list(dict.fromkeys(paired.config))
    for i, cfg in enumerate(configs):
        s = paired[paired.config == cfg].sort_values("ratio")
        x = np.array([budgets.index(r) for r in s.ratio]) + 0.15 * (i - (len(configs) - 1) / 2)
        y = 100 * s.diff_mean
        err = np.vstack([y - 100 * s.diff_ci_low, 100 * s.diff_ci_high - y])
        ax.errorbar(x, y, yerr=err, marker="os^v"[i % 4], ls="", capsize=3, label=cfg)
    ax.axhline(0, color="black", lw=1)
    ax.set_xticks(range(len(budgets)), [f"bytes of ρ = {b:g}" for b in budgets])
    style_axes(ax, ylabel="accuracy − exact (× 100)", legend=True,
               title=f"{family}, paired by seed, 95% t-intervals")
    paths = save(fig, out, "plan_accuracy")
    table = paired
    wide = _wide_cells(table)
    caption = "Best validation accuracy − exact × 100, mean [95% paired t-interval] over seeds"
    against = _wide_cells(_against_uniform(keep, family, budgets))
    caption2 = ("Best validation accuracy − uniform ρ at the same bytes (all linears sketched) "
                "× 100, mean [95% paired t-interval] over seeds")
    paths.append(write_text(out, "plan_accuracy.md", tables.to_markdown(wide, caption) + "\n"
                            + tables.to_markdown(against, caption2)))
    return paths


def _cells(paired: pd.DataFrame) -> pd.DataFrame:
    """"mean [low, high] (n=…)" × 100; "[one seed]" where one pair gives no interval."""
    return paired.assign(cell=[(f"{100 * m:+.2f} [{100 * a:+.2f}, {100 * b:+.2f}]" if n >= 2
                                else f"{100 * m:+.2f} [one seed]") + f" (n={n})"
                               for m, a, b, n in zip(paired.diff_mean, paired.diff_ci_low,
                                                     paired.diff_ci_high, paired.n)])


def _wide_cells(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, one column per byte budget."""
    wide = _cells(table).pivot_table(index="config", columns="ratio", values="cell",
                                     aggfunc="first", sort=False)
    wide = wide[sorted(wide.columns, reverse=True)].reset_index()  # largest budget first
    wide.columns = ["configuration"] + [f"bytes of ρ = {c:g}" for c in wide.columns[1:]]
    return wide


def _config_label(scope: str) -> str:
    if scope == "all":
        return "uniform"
    if scope == "encoder":
        return "uniform, head exact"
    return scope.split("_", 1)[1].rsplit("_", 1)[0] + " plan"


def _against_uniform(runs: pd.DataFrame, family: str, budgets) -> pd.DataFrame:
    """Paired differences of every configuration to uniform ρ (scope all) at the same bytes."""
    rows = []
    for budget in budgets:
        at = runs[(runs.family == family) & (runs.ratio == budget)]
        uniform = at[at.scope == "all"].set_index("seed").best_value
        rows += [dict(config=_config_label(scope), ratio=budget,
                      **paired_contrast(g.set_index("seed").best_value, uniform))
                 for scope, g in at[at.scope != "all"].groupby("scope", sort=False)
                 if not uniform.empty]
    return pd.DataFrame(rows, columns=["config", "ratio", "diff_mean", "diff_ci_low",
                                       "diff_ci_high", "n"] if not rows else None)


ONLINE_RUN = "online/rows0.1_replan25_seed0"
OFFLINE_PLAN = "plans/recipe_rows/plan_absolute_0.1.json"
ONLINE_LINES = {"online": ("online plan (its own window)", "s", "-"),
                "online_used": ("online plan, as used (next window)", "D", "--"),
                "offline": ("offline plan from step 0 (recipe_step0)", "^", ":"),
                "uniform": ("uniform ρ = 0.1", "o", "-")}


def online_totals(plans: pd.DataFrame, offline: dict) -> pd.DataFrame:
    """Per re-plan step, the true sketch variance (under the window's exact constants) of the
    online plan, of the plan from the exact statistics, of uniform ρ, of the offline plan, and
    of the previous window's online plan (the one in use during this window)."""
    from varstudy.randomized.online import plan_variance
    from varstudy.randomized.plan import EXACT, LayerStats

    rows, previous = [], None
    for step, g in plans.groupby("step", sort=True):
        stats = [LayerStats(r.layer, r.unit, r.d_in, r.n_rows, r.c_exact, 0.0)
                 for r in g.itertuples()]
        family = g.family.iloc[0]
        row = dict(step=step, exact_stats=g.var_exact_stats.sum(), online=g.var_online.sum(),
                   uniform=g.var_uniform.sum(),
                   offline=plan_variance(offline, stats, family),
                   online_used=(plan_variance(previous, stats, family) if previous is not None
                                else np.nan),
                   exact_units_online=int(g.groupby("unit").exact_online.first().sum()),
                   exact_units_exact_stats=int(g.groupby("unit").exact_exact_stats.first().sum()),
                   c_log_error=float(np.median(np.abs(np.log(g.c_online.clip(lower=1e-300)
                                                             / g.c_exact)))),
                   ratio_rank_corr=float(g.ratio_online.rank().corr(g.ratio_exact_stats.rank())))
        rows.append(row)
        previous = {r.layer: EXACT if r.exact_online else r.ratio_online for r in g.itertuples()}
    return pd.DataFrame(rows)


def online_plans(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure and table: does the online plan (from the sketches alone) track the plan that the
    exact statistics of the same minibatches give? -> online_plans.md."""
    import json

    plans = load(results, f"{ONLINE_RUN}/plans.csv",
                 ("step", "layer", "unit", "d_in", "n_rows", "c_online", "c_exact",
                  "ratio_online", "exact_online", "ratio_exact_stats", "exact_exact_stats",
                  "var_online", "var_exact_stats", "var_uniform"))
    path = Path(results) / OFFLINE_PLAN
    if not path.is_file():
        raise MissingResultsError(f"missing input {OFFLINE_PLAN} (not produced yet?)")
    offline = {name: e["ratio"] for name, e in json.loads(path.read_text())["layers"].items()}
    totals = online_totals(plans, offline)
    fig, axes = new_figure(1, 2, panel=(4.6, 3.5), squeeze=False)
    ax = axes[0, 0]
    for key, (label, marker, ls) in ONLINE_LINES.items():
        ax.plot(totals.step, totals[key] / totals.exact_stats, marker=marker, ls=ls, label=label)
    ax.axhline(1, color="black", lw=1)
    style_axes(ax, xlabel="training step (re-plan every 25)", logy=True, legend=True,
               ylabel="sketch variance / plan from exact stats",
               title="true variance at equal bytes (rows, ρ 0.1)")
    ax = axes[0, 1]
    points = ax.scatter(plans.c_exact, plans.c_online.clip(lower=plans.c_exact.min() / 10),
                        c=plans.step, s=10, cmap="viridis")
    lo, hi = plans.c_exact.min(), plans.c_exact.max()
    ax.plot([lo, hi], [lo, hi], color="black", lw=1)
    fig.colorbar(points, ax=ax, label="step")
    style_axes(ax, xlabel="C_l from X (exact capture)", ylabel="C_l from the sketch (online)",
               logx=True, logy=True, title="per layer and window")
    fig.suptitle("Online re-planning on MiniLM, rotten_tomatoes (B 32, L 64, dynamic padding)")
    paths = save(fig, out, "online_plans")
    shown = totals.assign(**{k: (totals[k] / totals.exact_stats).round(3)
                             for k in ONLINE_LINES})[
        ["step", "online", "online_used", "offline", "uniform", "exact_units_online",
         "exact_units_exact_stats", "c_log_error", "ratio_rank_corr"]].round(3)
    caption = ("Per re-plan: true sketch variance (exact constants of the window) of each plan at "
               "the bytes of uniform ρ 0.1, over the plan from the exact statistics; exact units "
               "of the online plan and of that plan; median |log(C_online / C_exact)| over "
               "layers; rank correlation of the two plans' ratios")
    paths.append(write_text(out, "online_plans.md", tables.to_markdown(shown, caption)))
    return paths
