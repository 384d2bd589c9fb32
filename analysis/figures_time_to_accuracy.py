"""Time to accuracy at matched peak memory (issue 24): per peak-memory budget, the fastest
configuration of each memory-saving method that fits, and how long it takes to reach a target
validation accuracy; from ``results/study/frontier/frontier.csv`` (peak memory and step time,
``python -m varstudy.study frontier``) and ``results/study/accuracy/evals.csv`` (accuracy
curves of the recipe, ``python -m varstudy.study accuracy``, the same model and task).

NOTE [time to accuracy]: a configuration's *steps to target* is read from the accuracy study's
validation evaluations: the mean over seeds of the accuracy at each evaluated step, the first
step where it reaches ``TARGET`` (linearly interpolated from the evaluation before; the first
evaluation's step when that one already reaches it; NaN when the recipe's steps never do). Its
*time to target* is those steps times its step-time ratio to exact from the frontier run
(``time_ratio``), in exact-step units, and ``time_vs_exact`` that over exact's. Its *accuracy at
a fixed time* is the mean curve at ``FIXED_STEPS`` / time_ratio steps: the accuracy reached in
the wall time of the recipe's ``FIXED_STEPS`` exact steps (interpolated; past the recipe's last
evaluation the last value, marked as a lower bound). Which curve (:func:`curve_of`):

* exact-gradient methods (checkpointing, accumulation, both) follow exact's curve: they compute
  the minibatch gradient (checkpointing bit for bit, accumulation up to rounding: tested in
  tests/test_encoder_checkpoint.py and tests/test_accumulation.py; dropout masks differ);
* a uniform sketch follows the accuracy study's run of the same family and ρ with every linear
  randomized (scope ``all``, as in the frontier); a rows plan, the study's plan of the same
  objective at the same nominal ρ (scope ``plan:plan_<objective>_<ρ>``: a plan of the same
  budget and objective, built on the recipe's minibatches, not the frontier's own);
* a sketch or plan under checkpointing or accumulation follows the sketch's curve. Under
  accumulation the sketch is drawn per micro-batch, which changes its variance (stratified for
  rows: never above, NOTE [accumulated variance] in :mod:`varstudy.study.frontier_variance`);
  the frontier table's ``var_ratio_*`` columns give the measured difference.

A *method* is the set of savings a configuration combines (:func:`method_of`): checkpointing
(torch or Revolve), accumulation, a sketch or a plan. Per budget b (fraction of exact's peak of
live activation bytes) and method, the fastest configuration with peak_ratio ≤ b is the one with
the smallest time to target; those that never reach it rank after, by accuracy at the fixed
time (:func:`choose`). CPU step-time ratios are not a GPU's: the answer is for the machine the
frontier ran on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis import plots_frontier, tables
from analysis.figures_accuracy import BUDGET_STEPS, TARGET
from analysis.results import FIGURES, RESULTS, config, load, most_common, save, write_text
from analysis.style import new_figure
from varstudy.errors import VarstudyError

FRONTIER = "study/frontier/frontier.csv"
EVALS = "study/accuracy/evals.csv"
BUDGETS = (0.5, 0.25, 0.1)
FIXED_STEPS = BUDGET_STEPS  # the fixed time: the recipe's whole budget of exact steps
METRIC = "accuracy"
FRONTIER_COLUMNS = ("config", "kind", "strategy", "family", "ratio", "peak_ratio", "time_ratio")
POINT_COLUMNS = ("config", "method", "peak_ratio", "time_ratio", "curve", "seeds",
                 "steps_to_target", "time_to_target", "time_vs_exact", "accuracy_at_time",
                 "at_time_lower_bound")
CHOICE_COLUMNS = ("budget", "method", *POINT_COLUMNS[:1], *POINT_COLUMNS[2:])
ACCUMULATION = "accumulation"
RERUN_FRONTIER = "python -m varstudy.study frontier"


def method_of(front: pd.DataFrame) -> pd.Series:
    """Per frontier row, the savings it combines: "checkpointing", "accumulation", "sketch",
    "plan" joined by " + " in the order accumulation, checkpointing, sketch/plan; "exact" for
    none. A table without ``micro_batches`` (written before issue 24) has no accumulation."""
    micro = front["micro_batches"] if "micro_batches" in front else pd.Series(1, front.index)
    objective = front["objective"] if "objective" in front else pd.Series(np.nan, front.index)
    out = []
    for m, strategy, family, obj in zip(micro, front["strategy"], front["family"], objective):
        parts = [ACCUMULATION] * (int(m) > 1) + ["checkpointing"] * (strategy != "none")
        if family != "exact":
            parts.append("plan" if isinstance(obj, str) and obj else "sketch")
        out.append(" + ".join(parts) or "exact")
    return pd.Series(out, index=front.index, name="method")


def curve_of(row) -> tuple[str, float, str]:
    """The accuracy study's (family, ratio, scope) whose curve a frontier row follows (NOTE
    [time to accuracy])."""
    if row.family == "exact":
        return "exact", 1.0, "none"
    objective = getattr(row, "objective", None)
    if isinstance(objective, str) and objective:
        return row.family, float(row.ratio), f"plan:plan_{objective}_{float(row.ratio):g}"
    return row.family, float(row.ratio), "all"


def mean_curves(evals: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Validation ``metric`` per (family, ratio, scope, step): the mean over seeds
    (``value``) and the number of seeds (``seeds``)."""
    rows = evals[evals["metric"] == metric].assign(ratio=lambda d: d["ratio"].astype(float))
    return (rows.groupby(["family", "ratio", "scope", "step"], as_index=False)
            .agg(value=("value", "mean"), seeds=("seed", "nunique")))


def steps_to(curve: pd.DataFrame, target: float) -> float:
    """Steps at which a mean curve (``step``, ``value``) first reaches ``target``, linearly
    interpolated from the evaluation before (NOTE [time to accuracy]); NaN if never."""
    steps, values = curve["step"].to_numpy(float), curve["value"].to_numpy(float)
    order = np.argsort(steps)
    steps, values = steps[order], values[order]
    hit = np.flatnonzero(values >= target)
    if not len(hit):
        return np.nan
    i = int(hit[0])
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (target - v0) / (v1 - v0) * (s1 - s0))


def value_at(curve: pd.DataFrame, step: float) -> tuple[float, bool]:
    """(mean curve at ``step``, whether it is a lower bound): interpolated between
    evaluations, NaN before the first, the last value past the last (a lower bound)."""
    steps, values = curve["step"].to_numpy(float), curve["value"].to_numpy(float)
    order = np.argsort(steps)
    steps, values = steps[order], values[order]
    if not np.isfinite(step) or step < steps[0]:
        return np.nan, False
    if step > steps[-1]:
        return float(values[-1]), True
    return float(np.interp(step, steps, values)), False


def accuracy_points(front: pd.DataFrame, evals: pd.DataFrame, target: float = TARGET,
                    fixed_steps: float = FIXED_STEPS) -> pd.DataFrame:
    """One row per frontier configuration (``POINT_COLUMNS``): its method, memory and step
    time, the curve it follows (``curve``; ``seeds`` 0 and NaN numbers when the accuracy
    study has none), steps and time to ``target``, accuracy at the time of ``fixed_steps``
    exact steps (NOTE [time to accuracy])."""
    tables.require_columns(front, FRONTIER_COLUMNS, "frontier table")
    curves = mean_curves(evals)
    by_key = {key: g for key, g in curves.groupby(["family", "ratio", "scope"])}
    exact = by_key.get(("exact", 1.0, "none"))
    if exact is None:
        raise VarstudyError("the accuracy evaluations have no exact runs (family exact, scope "
                            "none), so exact-gradient methods have no curve; valid choices: "
                            "an accuracy study that includes exact")
    base = steps_to(exact, target)
    rows = []
    for row, method in zip(front.itertuples(index=False), method_of(front)):
        key = curve_of(row)
        curve = next((g for (f, r, s), g in by_key.items()
                      if f == key[0] and s == key[2] and np.isclose(r, key[1])), None)
        steps = steps_to(curve, target) if curve is not None else np.nan
        at, bound = value_at(curve, fixed_steps / float(row.time_ratio)) \
            if curve is not None else (np.nan, False)
        time = steps * float(row.time_ratio)
        rows.append(dict(config=row.config, method=method, peak_ratio=float(row.peak_ratio),
                         time_ratio=float(row.time_ratio),
                         curve=f"{key[0]} {key[1]:g} ({key[2]})",
                         seeds=0 if curve is None else int(curve["seeds"].min()),
                         steps_to_target=steps, time_to_target=time,
                         time_vs_exact=time / base if base > 0 else np.nan,
                         accuracy_at_time=at, at_time_lower_bound=bound))
    return pd.DataFrame(rows, columns=list(POINT_COLUMNS))


def choose(points: pd.DataFrame, budgets: Sequence[float] = BUDGETS) -> pd.DataFrame:
    """Per budget and method (``CHOICE_COLUMNS``): the configuration with peak_ratio ≤ budget
    that reaches the target first; if none of them reaches it, the one with the highest
    accuracy at the fixed time (ties: the smaller peak, then the name). A method with nothing
    under the budget gets a row with ``config`` NA."""
    rows = []
    methods = [m for m in dict.fromkeys(points["method"]) if m != "exact"]
    for b in budgets:
        for method in methods:
            pool = points[(points["method"] == method) & (points["peak_ratio"] <= b)]
            pool = pool.assign(_reached=pool["time_to_target"].notna(),
                               _acc=pool["accuracy_at_time"].fillna(-np.inf))
            best = pool.sort_values(["_reached", "time_to_target", "_acc", "peak_ratio",
                                     "config"], ascending=[False, True, False, True, True])
            pick = best.iloc[0].to_dict() if len(best) else {"config": None}
            rows.append({"budget": float(b), "method": method,
                         **{c: pick.get(c, np.nan) for c in CHOICE_COLUMNS[2:]}})
    return pd.DataFrame(rows, columns=list(CHOICE_COLUMNS))


def missing_methods(front: pd.DataFrame) -> list[str]:
    """The methods issue 24 compares that the frontier table has no rows of (so far only
    accumulation, absent from tables written before it)."""
    return [] if ACCUMULATION in set(" + ".join(method_of(front)).split(" + ")) \
        else [ACCUMULATION]


def _cell_time(row) -> str:
    if pd.isna(row.config):
        return "none fits"
    if pd.isna(row.time_to_target):
        return f"not reached in {FIXED_STEPS} steps"
    return f"{row.time_vs_exact:.2f}× ({row.steps_to_target:.0f} steps)"


def choice_table(choices: pd.DataFrame, target: float = TARGET) -> pd.DataFrame:
    """The answers of :func:`choose` as the Markdown table's rows."""
    at = [np.nan if pd.isna(r.config) or pd.isna(r.accuracy_at_time)
          else ("≥ " if r.at_time_lower_bound else "") + f"{100 * r.accuracy_at_time:.1f} %"
          for r in choices.itertuples()]
    return pd.DataFrame({
        "peak budget (of exact)": choices["budget"].map(lambda b: f"{100 * b:g} %"),
        "method": choices["method"],
        "fastest configuration": choices["config"].fillna("none fits"),
        "peak / exact": choices["peak_ratio"].map(lambda v: f"{v:.3f}" if pd.notna(v) else ""),
        "step time / exact": choices["time_ratio"].map(
            lambda v: f"{v:.2f}" if pd.notna(v) else ""),
        f"time to {100 * target:g} % / exact's": [_cell_time(r) for r in choices.itertuples()],
        f"accuracy at exact's {FIXED_STEPS}-step time": at})


def build_time_to_accuracy(choices: pd.DataFrame, title: str = "",
                           budgets: Sequence[float] = BUDGETS, exact_accuracy: float | None = None):
    """Figure: time to target vs peak budget and accuracy at the fixed time vs peak budget, one
    line per method (``exact_accuracy``: exact's at the fixed time, a reference line)."""
    fig, axes = new_figure(1, 2, panel=(5.0, 4.0))
    plots_frontier.plot_by_budget(choices, "time_vs_exact", ax=axes[0, 0], budgets=budgets,
                                  ylabel=f"time to {100 * TARGET:g} % validation accuracy / "
                                         "exact's", reference=1.0)
    plots_frontier.plot_by_budget(choices, "accuracy_at_time", ax=axes[0, 1], budgets=budgets,
                                  ylabel=f"validation accuracy at exact's {FIXED_STEPS}-step "
                                         "time", reference=exact_accuracy, legend=False)
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def time_to_accuracy(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure ``time_to_accuracy`` with ``time_to_accuracy.md`` (per budget and method) and
    ``time_to_accuracy.csv`` (every configuration) from the frontier and accuracy studies."""
    evals = load(results, EVALS, ("family", "ratio", "scope", "seed", "step", "metric",
                                  "value"))  # first: a missing input skips, before any check
    front = load(results, FRONTIER, ("config", "peak_ratio", "time_ratio", "ratio"))
    tables.require_columns(front, FRONTIER_COLUMNS, str(Path(results) / FRONTIER))
    for column in ("model", "task"):
        a, b = most_common(front, column), most_common(evals, column)
        if a is not None and b is not None and a != b:
            raise VarstudyError(f"{Path(results) / FRONTIER} is of {column} {a!r} and "
                                f"{Path(results) / EVALS} of {b!r}: its accuracy curves do not "
                                f"apply; valid choices: a frontier run of the accuracy study's "
                                f"{column} ({RERUN_FRONTIER} --{column} {b})")
    points = accuracy_points(front, evals)
    choices = choose(points)
    missing = missing_methods(front)
    note = ("" if not missing else
            f"No {', '.join(missing)} rows in {FRONTIER} (written before issue 24): "
            f"{' and '.join(missing)} not drawn; rerun {RERUN_FRONTIER} to add them.")
    cfg = config(results, "study/frontier/config.json")
    first = front.iloc[0]
    device = first.get("device", cfg.get("device_resolved", "?"))
    setting = (f"{first.get('model', '?')}, frontier at B {first.get('batch_size', '?')}, "
               f"L {first.get('seq_len', '?')}, {device}")
    title = f"Time to {100 * TARGET:g} % at matched peak memory ({setting})"
    exact = points[points.method == "exact"]
    fig = build_time_to_accuracy(
        choices, title + (f"\n{', '.join(missing)}: no rows in this frontier table yet (rerun "
                          "the frontier study)" if missing else ""),
        exact_accuracy=float(exact.accuracy_at_time.iloc[0]) if len(exact) else None)
    paths = save(fig, out, "time_to_accuracy")
    caption = (f"{setting}. Per peak budget and method, the configuration under the budget that "
               f"reaches {100 * TARGET:g} % mean validation accuracy first (NOTE [time to "
               f"accuracy] in analysis/figures_time_to_accuracy.py): steps to target from the "
               f"accuracy study's evaluations (exact-gradient methods on exact's curve) times "
               f"the configuration's step-time ratio from the frontier run; accuracy at exact's "
               f"{FIXED_STEPS}-step time (≥: past the recipe's last evaluation, a lower bound). "
               f"Exact reaches it in {exact.steps_to_target.min():.0f} steps. Step-time "
               "ratios are the frontier machine's, not another's (a CPU's are not a GPU's).")
    text = ["## Time to accuracy at matched peak memory", ""]
    text += ([f"**{note}**", ""] if note else [])
    text += [tables.to_markdown(choice_table(choices), caption)]
    paths.append(write_text(out, "time_to_accuracy.md", "\n".join(text)))
    paths.append(write_text(out, "time_to_accuracy.csv", points.to_csv(index=False)))
    return paths
