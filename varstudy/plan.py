"""``python -m varstudy.plan``: per-layer sketch sizes that spend the memory where the variance is.

Reads a measure run (``results/measure/<run>/layers.csv``), estimates each linear layer's
sketch-variance constant C_l for one family, its input width, rows and sampling variance, and
solves (:mod:`varstudy.randomized.plan`) either

* ``--budget RHO``: the fewest sketch variance within the bytes of uniform ratio RHO, for the
  ``--objective absolute`` (total sketch variance, what plain SGD feels) or ``relative``
  (Σ per-layer sketch/sampling ratio, closer to what Adam feels); or
* ``--target-ratio TAU``: the fewest bytes with sketch variance ≤ TAU × sampling variance, for
  the model total or, with ``--per-layer``, for every layer.

Writes the plan (per layer: ratio ρ_l or "exact", rows k at the run's n, predicted variance) to
``--out`` and prints predicted bytes and variance per layer kind against uniform ρ at the same
bytes. Use a plan with ``randomize(model, plan="plan.json")``, ``python -m varstudy.finetune
--plan plan.json`` or ``python -m varstudy.measure --plan plan.json``. A plan is stated as ρ per
layer: at another batch shape a layer keeps k = round(ρ_l · n) rows (NOTE [integer rows]).

``rows-live`` and ``rows-adaptive`` draw among a layer's live rows and store a first-token
layer's B rows exactly once k ≥ B (NOTE [live rows] in varstudy.randomized.plan): their stats
come from the run's ``live_rows``, ``first_token`` and ``var_sketch_one_row`` columns
(:func:`live_stats`), and such a layer is costed at min(k, B) rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from varstudy import cli
from varstudy.cli import option
from varstudy.errors import VarstudyError
from varstudy.names import SKETCH_NAMES
from varstudy.randomized.planfile import VARIANCE_MODELS

PROG = "python -m varstudy.plan"
OBJECTIVES = ("absolute", "relative")
PLAN_FAMILIES = tuple(f for f in SKETCH_NAMES if f in VARIANCE_MODELS)
LIVE_FAMILIES = ("rows-live", "rows-adaptive")  # stats from the live-row columns (live_stats)
LIVE_COLUMNS = ("live_rows", "first_token", "var_sketch_one_row")
DESCRIPTION = ("Per-layer sketch sizes that spend the memory where the variance is: from a measure "
               "run, the fewest sketch variance within a byte budget, or the fewest bytes within "
               "a variance target; writes plan.json and prints it against uniform ratios.")


@dataclass(frozen=True)
class PlanConfig:
    """Which measure run, family and problem a plan solves."""

    source: str = option("results/measure/default", "measure run folder holding layers.csv",
                         flag="--from", metavar="RUN")
    family: str = option("rows", "sketch family of the plan", choices=PLAN_FAMILIES)
    budget: float | None = option(None, "byte budget as the uniform ratio rho that stores as "
                                        "much (exclusive with --target-ratio)")
    target_ratio: float | None = option(None, "sketch variance at most this times the "
                                              "sampling variance (exclusive with --budget)")
    per_layer: bool = option(False, "with --target-ratio: the bound holds for every layer, "
                                    "not only for the model total")
    objective: str = option("absolute", "with --budget: the variance to minimize",
                            choices=OBJECTIVES)
    train_step: int | None = option(None, "measured step whose statistics are used (none: the "
                                          "first)")
    budgets: tuple[float, ...] = option((), "several byte budgets at once, both objectives: "
                                            "--out is then a folder with plan_<objective>_<rho>"
                                            ".json per plan and frontier.csv against uniform")
    min_rows: int = option(1, "fewest rows any sketched layer keeps")
    out: str = option("plan.json", "where to write the plan (a folder with --budgets)")

    def __post_init__(self) -> None:
        given = [self.budget is not None, self.target_ratio is not None, bool(self.budgets)]
        if sum(given) != 1:
            raise VarstudyError("give exactly one of --budget RHO, --target-ratio TAU and "
                                "--budgets RHO,RHO; valid choices: --budget 0.1, "
                                "--target-ratio 1, or --budgets 0.05,0.1,0.2")
        if not all(0 < b <= 1 for b in self.budgets):
            raise VarstudyError(f"--budgets must be ratios in (0, 1], got {self.budgets}")
        cli.check_distinct("budgets", self.budgets)
        if self.budget is not None and not 0 < self.budget <= 1:
            raise VarstudyError(f"--budget must be a ratio in (0, 1], got {self.budget}")
        if self.target_ratio is not None and not 0 < self.target_ratio < math.inf:
            raise VarstudyError(f"--target-ratio must be > 0 and finite, got "
                                f"{self.target_ratio}; valid: 0 < TAU < inf, e.g. 1")
        if isinstance(self.min_rows, bool) or not isinstance(self.min_rows, int) \
                or self.min_rows < 1:
            raise VarstudyError(f"--min-rows must be an integer >= 1, got {self.min_rows!r}")
        if self.per_layer and self.target_ratio is None:
            raise VarstudyError("--per-layer applies to --target-ratio; valid choices: drop "
                                "--per-layer, or use --target-ratio")
        if not self.out.strip():
            raise VarstudyError("--out '' is empty; valid choices: a file path such as plan.json "
                                "(a folder with --budgets)")


FRONTIER_COLUMNS = ("family", "budget", "objective", "stored_numbers", "var_sketch_uniform",
                    "var_sketch_planned", "uniform_over_planned", "relative_uniform",
                    "relative_planned", "relative_uniform_over_planned", "exact_layers",
                    "var_sampling")


def frontier(cfg: PlanConfig):
    """Plans at every budget of ``cfg.budgets`` under both objectives, each against uniform ρ at
    the same bytes: (table with FRONTIER_COLUMNS, {file name: plan JSON})."""
    import pandas as pd

    from varstudy.randomized import plan as P

    stats = stats_from_layers(_layers(cfg), cfg.family, cfg.train_step)
    rows, files = [], {}
    for budget in cfg.budgets:
        uniform = P.uniform(stats, cfg.family, budget, min_rows=cfg.min_rows)
        for objective in OBJECTIVES:
            plan = P.plan_budget(stats, cfg.family, uniform.total_stored, objective=objective,
                                 min_rows=cfg.min_rows, uniform_ratio=budget)
            rel_u, rel_p = uniform.relative(stats), plan.relative(stats)
            rows.append(dict(
                family=cfg.family, budget=budget, objective=objective,
                stored_numbers=plan.total_stored, var_sketch_uniform=uniform.total_var,
                var_sketch_planned=plan.total_var,
                uniform_over_planned=uniform.total_var / max(plan.total_var, 1e-300),
                relative_uniform=rel_u, relative_planned=rel_p,
                relative_uniform_over_planned=rel_u / max(rel_p, 1e-300),
                exact_layers=sum(r == "exact" for r in plan.ratios.values()),
                var_sampling=sum(s.v for s in stats)))
            files[f"plan_{objective}_{budget:g}.json"] = to_json(
                plan, stats, source=cfg.source, nominal_ratio=budget, config=asdict(cfg))
    return pd.DataFrame(rows, columns=list(FRONTIER_COLUMNS)), files


def _layers(cfg: PlanConfig):
    import pandas as pd

    path = Path(cfg.source) / "layers.csv"
    if not path.is_file():
        raise VarstudyError(f"--from {cfg.source}: no layers.csv there; valid choices: the "
                            "folder of a finished python -m varstudy.measure run")
    try:
        return pd.read_csv(path)
    except ValueError as err:  # empty, not UTF-8, not CSV (pandas' errors are ValueErrors)
        raise VarstudyError(f"--from {cfg.source}: layers.csv cannot be read as CSV "
                            f"({cli.one_line(err)[:120]}); valid choices: the folder of a "
                            "finished python -m varstudy.measure run") from None


def make_plan(cfg: PlanConfig):
    """(plan, uniform plan at the same bytes, layer stats) for a config."""
    from varstudy.randomized import plan as P

    stats = stats_from_layers(_layers(cfg), cfg.family, cfg.train_step)
    if cfg.budget is not None:
        uniform = P.uniform(stats, cfg.family, cfg.budget, min_rows=cfg.min_rows)
        plan = P.plan_budget(stats, cfg.family, uniform.total_stored, objective=cfg.objective,
                             min_rows=cfg.min_rows, uniform_ratio=cfg.budget)
    else:
        plan = P.plan_target(stats, cfg.family, cfg.target_ratio, per_layer=cfg.per_layer,
                             min_rows=cfg.min_rows)
        uniform = equal_bytes_uniform(stats, cfg.family, plan.total_stored, cfg.min_rows)
    return plan, uniform, stats


def equal_bytes_uniform(stats, family: str, stored: float, min_rows: int = 1):
    """The uniform plan whose stored numbers come closest to ``stored`` (bisection on ρ)."""
    from varstudy.randomized import plan as P

    lo, hi = 1e-6, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if P.uniform(stats, family, mid, min_rows=min_rows).total_stored < stored:
            lo = mid
        else:
            hi = mid
    return P.uniform(stats, family, hi, min_rows=min_rows)


def unit_name(layer: str, first_token: bool = False) -> str:
    """Storage unit of a linear layer: Q, K and V of one attention block share ``<block>.qkv``
    (they read one tensor, NOTE [shared sketches] in varstudy.randomized.layers); others are their
    own, and so is a first-token layer under rows-live / rows-adaptive (``first_token``: it draws
    among other rows than its siblings, so it shares no sketch with them)."""
    from varstudy.roles import layer_kind

    if layer_kind(layer) in ("query", "key", "value") and not first_token:
        return layer.rpartition(".")[0] + ".qkv"
    return layer


def stats_from_layers(layers, family: str, train_step: int | None = None) -> list:
    """:class:`~varstudy.randomized.plan.LayerStats` per layer from a measure run's
    ``layers.csv`` (a DataFrame).

    C_l comes from the closed-form sketch variance of every batch at the smallest measured ratio
    (module docstring): C_l = mean_b var_b·k_b/n_b, or mean_b var_b·k_b/(n_b − k_b) for rows-wor;
    v_l = mean_b var_sampling; n_l = mean_b n_rows. ``train_step``: default the first measured.
    """
    import numpy as np

    from varstudy.randomized.plan import LayerStats

    need = {"train_step", "layer", "family", "ratio", "k", "n_rows", "d_in", "var_sketch",
            "var_sampling"}
    missing = sorted(need - set(layers.columns))
    if missing:
        raise VarstudyError(f"layers table lacks column(s) {', '.join(missing)}; valid choices: "
                            "a layers.csv written by python -m varstudy.measure")
    if family not in PLAN_FAMILIES:
        raise VarstudyError(f"cannot plan family {family!r}; valid choices: "
                            f"{', '.join(PLAN_FAMILIES)}")
    missing = sorted(set(LIVE_COLUMNS) - set(layers.columns)) if family in LIVE_FAMILIES else []
    if missing:
        raise VarstudyError(f"layers table lacks column(s) {', '.join(missing)}, which a plan of "
                            f"{family} needs; valid choices: a layers.csv written by this "
                            "version of python -m varstudy.measure (rerun the measurement)")
    if family not in set(layers.family):
        raise VarstudyError(f"family {family!r} was not measured in this run; valid choices: "
                            f"{', '.join(sorted(set(layers.family)))}")
    step = layers.train_step.min() if train_step is None else train_step
    rows = layers[(layers.family == family) & (layers.layer != "model")
                  & (layers.train_step == step)]
    if rows.empty:
        raise VarstudyError(f"no rows at train step {train_step}; valid choices: "
                            f"{', '.join(map(str, sorted(set(layers.train_step))))}")
    _check_numbers(rows)
    out = []
    for name, g in rows.groupby("layer", sort=False):
        g = g[g.ratio == g.ratio.min()]
        if family in LIVE_FAMILIES:
            out.append(live_stats(name, g, family))
            continue
        k, n, var = (g[c].to_numpy(dtype=float) for c in ("k", "n_rows", "var_sketch"))
        if family == "rows-wor":
            c = np.where(k < n, var * k / np.maximum(n - k, 1), 0.0)
        else:
            c = var * k / n
        out.append(LayerStats(name, unit_name(name), int(g.d_in.iloc[0]), float(n.mean()),
                              float(c.mean()), float(g.var_sampling.mean())))
    return out


def live_stats(name: str, g, family: str):
    """LayerStats of one layer under rows-live or rows-adaptive from its rows ``g`` (one per
    batch) of layers.csv (NOTE [live rows] in varstudy.randomized.plan), with c_b =
    var_sketch_one_row and m_b = live_rows of batch b:

    * rows-live: V_b(k) = c_b·(m_b/k − 1)/(m_b − 1) for k < m_b, 0 from k = m_b on (the
      rows-wor-real form over the live rows). Planned as C·(m/k − 1) over m = mean_b m_b with
      C = mean_b[c_b·m_b/(m_b − 1)]/m: exactly the mean variance for k ≤ min_b m_b when every
      batch has the same live rows (no padding, or a first-token layer: m_b = B); with padding
      that varies, the 1/k term is exact and the offset C approximates mean_b[c_b/(m_b − 1)].
    * rows-adaptive: V_b(k) = c_b/k (with replacement, c_b = Σ_live p_l/q_l − a), planned as
      C·n/k with C = mean_b c_b/n, n the layer's rows; a first-token layer over m = B rows.
    """
    import numpy as np

    from varstudy.randomized.plan import VARIANCE_STATE, LayerStats

    flags, m, c1, n = (g[c].astype("float64").to_numpy() for c in (
        "first_token", "live_rows", "var_sketch_one_row", "n_rows"))
    values = np.concatenate([flags, m, c1])
    if not np.isfinite(values).all() or (c1 < 0).any() or (m < 1).any() or (m > n).any():
        raise VarstudyError(f"layer {name} has no usable live_rows / first_token / "
                            f"var_sketch_one_row for {family} (missing, negative or more live "
                            "rows than rows); valid choices: a layers.csv written by this "
                            "version of python -m varstudy.measure with that family")
    first = bool(flags.max() > 0)
    v = float(g.var_sampling.mean())
    d = int(g.d_in.iloc[0])
    state = VARIANCE_STATE[family]
    if family == "rows-live":
        live = float(m.mean())
        c = float(np.where(m > 1, c1 * m / np.maximum(m - 1, 1), 0.0).mean()) / live
        return LayerStats(name, unit_name(name, first), d, float(n.mean()), c, v, m=live,
                          first_token=first, state=state)
    rows = float(m.mean()) if first else float(n.mean())
    return LayerStats(name, unit_name(name, first), d, float(n.mean()), float(c1.mean()) / rows,
                      v, m=rows if first else None, first_token=first, state=state)


def _check_numbers(rows) -> None:
    """Refuse a measure run whose variances are negative or not finite (NOTE [never negative]
    in varstudy.randomized.variance: a published variance is >= 0), or whose rows are not."""
    import numpy as np

    for column in ("var_sketch", "var_sampling", "n_rows", "k", "d_in"):
        values = rows[column].to_numpy(dtype=float)
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            first = rows[bad].iloc[0]
            raise VarstudyError(
                f"the measure run has {int(bad.sum())} negative or non-finite {column} "
                f"value(s), e.g. {values[bad][0]!r} at layer {first.layer}, batch "
                f"{first.get('batch')}; valid choices: a run measured by this version of "
                "python -m varstudy.measure (it refuses such numbers)")


def to_json(plan, layers, **extra) -> dict:
    """A plan as a JSON-ready dict: ``family``, ``layers`` {name: {ratio | "exact", k, unit,
    n, d, var_sketch, var_sampling}, and for rows-live / rows-adaptive m (the rows that hold
    its gradient, NOTE [live rows] in varstudy.randomized.plan) and first_token}, totals and
    ``extra`` (provenance)."""
    by = {s.name: s for s in layers}
    return dict(
        family=plan.family, **plan.meta, **extra,
        total=dict(var_sketch=plan.total_var, relative=plan.relative(layers),
                   stored_numbers=plan.total_stored,
                   var_sampling=float(sum(s.v for s in layers))),
        layers={name: dict(ratio=r, k=plan.k[name], unit=by[name].unit, n=by[name].n,
                           d=by[name].d, var_sketch=plan.var[name], var_sampling=by[name].v,
                           **_live_fields(plan.family, by[name]))
                for name, r in plan.ratios.items()})


def _live_fields(family: str, s) -> dict:
    return dict(m=s.m, first_token=s.first_token) if family in LIVE_FAMILIES else {}


def report(plan, uniform, stats) -> str:
    """One screen: per layer kind, stored MiB (float32) and sketch variance, planned vs uniform."""
    import pandas as pd

    from varstudy.roles import layer_kind

    rows = []
    for s in stats:
        rows.append(dict(kind=layer_kind(s.name), planned_mib=plan.stored[s.name] * 4 / 2**20,
                         uniform_mib=uniform.stored[s.name] * 4 / 2**20,
                         planned_var=plan.var[s.name], uniform_var=uniform.var[s.name],
                         exact=plan.ratios[s.name] == "exact"))
    table = pd.DataFrame(rows).groupby("kind", sort=False).agg(
        layers=("exact", "size"), exact=("exact", "sum"), planned_mib=("planned_mib", "sum"),
        uniform_mib=("uniform_mib", "sum"), planned_var=("planned_var", "sum"),
        uniform_var=("uniform_var", "sum"))
    table.loc["total"] = table.sum()
    rel_p, rel_u = plan.relative(stats), uniform.relative(stats)
    lines = [table.to_string(float_format=lambda v: f"{v:.4g}"),
             f"total sketch variance: planned {plan.total_var:.4g}, uniform {uniform.total_var:.4g}"
             f" (uniform/planned {uniform.total_var / max(plan.total_var, 1e-300):.3g}x); "
             f"sum of per-layer ratios: planned {rel_p:.4g}, uniform {rel_u:.4g} "
             f"(uniform/planned {rel_u / max(rel_p, 1e-300):.3g}x)"]
    return "\n".join(lines)


def parser() -> cli.Parser:
    """The command's argument parser, built from PlanConfig."""
    return cli.config_parser(PlanConfig, PROG, DESCRIPTION)


def parse(argv: list[str] | None = None) -> PlanConfig:
    """The PlanConfig of the command line ``argv`` (None: sys.argv)."""
    return cli.config_from(PlanConfig, parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m varstudy.plan``; returns the exit status."""
    def body() -> None:
        cfg = parse(argv)
        from varstudy import io as vio

        if cfg.budgets:
            table, files = frontier(cfg)
            folder = vio.check_writable(cfg.out)  # NOTE [staged results] (varstudy.io)
            with vio.output_lock(folder, ".plan.lock"), vio.staged(
                    folder, files=(*files, "frontier.csv"), name="plan") as stage:
                for name, data in files.items():
                    vio.atomic_write_json(stage / name, data)
                vio.atomic_write_csv(stage / "frontier.csv", table)
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            print(f"wrote {len(files)} plans and frontier.csv to {folder}")
            return
        plan, uniform, stats = make_plan(cfg)
        data = to_json(plan, stats, source=cfg.source, nominal_ratio=uniform_ratio(uniform),
                       config=asdict(cfg))
        vio.atomic_write_json(cfg.out, data)
        print(report(plan, uniform, stats))
        print(f"wrote {cfg.out}")
    return cli.run_command(body, argv)


def uniform_ratio(uniform) -> float:
    """The ρ of a uniform plan (``meta['ratio']``)."""
    return float(uniform.meta["ratio"])


if __name__ == "__main__":
    raise SystemExit(main())
