"""Online re-planning: per-layer sketch sizes re-planned during training from the sketches alone.

A plan (:mod:`varstudy.randomized.plan`) needs each layer's constant C_l (its sketch variance is
C_l/ρ_l, or C_l(1/ρ_l − 1) for rows-wor). ``python -m varstudy.plan`` takes them from a measure
run, which captures X. During training a randomized layer no longer has X, but it can keep
statistics that cost n numbers per call and estimate C_l without bias.

NOTE [online statistics]: every family's closed form (:mod:`varstudy.randomized.sketches`) is
affine in a = ‖G‖² = ‖YᵀX‖²:  V = f + g·a, with f = form(s, 0, p, n, k) and g = form(s, 1, p, n,
k) − f, where s = ‖X‖²‖Y‖² and p = Σ_l ‖x_l‖²‖y_l‖² need only the row norms ‖x_l‖² (kept in
forward: n numbers) and Y (there in backward). The layer's own estimate Ĝ is unbiased, so
E‖Ĝ‖² = a + V = f + (1 + g)·a, and

    â = (‖Ĝ‖² − f) / (1 + g)

is an unbiased estimate of a from the sketch itself. Every C_l is affine in a as well (C = form(s,
a, p, n, 1)/n, or form(s, a, p, n, 1)/(n − 1) for rows-wor, as ``varstudy.plan`` reads it from
a measure run), so Ĉ = C(â) is unbiased for the batch's C, for the layer's own family. For rows
and rows-wor, 1 + g = 1 − 1/k vanishes at k = 1 (one drawn row says nothing about a), so layers
under online planning keep k ≥ 2 rows (``min_rows`` raised to 2). A unit the plan makes exact
stores X (``RandomizedLinear.set_exact``): then Ĝ = G, f = g = 0 and â = a exactly.

The relative objective needs each layer's sampling variance, that is per-example gradients, and
these need X: online plans minimize the absolute sketch variance (what plain SGD feels) within
the bytes of uniform ρ. ``reference=True`` also keeps X in every layer (no memory saved: for
validation only) and records the exact C of the same calls beside the estimate, so a run shows
both the online plan and the plan that the exact statistics of the same minibatches give.
Statistics stay on the tensors' device (no host sync); they are read once per re-plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from varstudy.errors import VarstudyError
from varstudy.randomized.layers import RandomizedLinear
from varstudy.randomized.sketches import Sketch

ONLINE_FAMILIES = ("gaussian", "rademacher", "countsketch", "srht", "rows", "rows-wor",
                   "rows-norm")  # the real-rows families' forms need the real rows m


def constant(family: Sketch, s: Tensor, a: Tensor, p: Tensor, n: int) -> Tensor:
    """C of one batch for ``family`` (module docstring of :mod:`varstudy.randomized.plan`)."""
    if family.name == "rows-wor":
        return family.form(s, a, p, n, 1) / (n - 1) if n > 1 else 0.0 * a
    return family.form(s, a, p, n, 1) / n


def estimate_a(sketch: Sketch, g_sq: Tensor, s: Tensor, p: Tensor, n: int, k: int) -> Tensor:
    """â = (‖Ĝ‖² − f)/(1 + g), unbiased for ‖G‖² (NOTE [online statistics])."""
    zero = torch.zeros_like(s)
    f = sketch.form(s, zero, p, n, k)
    g = sketch.form(s, zero + 1, p, n, k) - f
    return (g_sq - f) / (1 + g)


class LayerTracker:
    """Running sums of one layer's online statistics since the last :meth:`reset`.

    ``calls`` backward calls, ``rows`` their token rows in all, ``sum_c`` Σ Ĉ (float64 tensor on
    the layer's device); with ``reference`` also ``sum_c_exact`` Σ C from X.
    """

    def __init__(self, family: Sketch, reference: bool = False) -> None:
        self.family, self.reference = family, reference
        self.reset()

    def reset(self) -> None:
        """Forget the statistics gathered since the last plan."""
        self.calls, self.rows = 0, 0
        self.sum_c: Tensor | None = None
        self.sum_c_exact: Tensor | None = None

    def forward_stats(self, flat: Tensor) -> tuple[Tensor, ...]:
        """What the layer keeps in forward: ‖x_l‖² (n numbers), and X itself with reference."""
        norms = _wide(flat.detach()).square().sum(1)
        return (norms, flat.detach()) if self.reference else (norms,)

    @torch.no_grad()
    def add(self, y: Tensor, g_hat: Tensor, sketch: Sketch, k: int, x_norms: Tensor,
            x: Tensor | None = None) -> None:
        """One backward call: Y (n, d_out), the layer's Ĝ, its sketch and k, the kept stats."""
        n = y.shape[0]
        xn, yn = x_norms.double(), _wide(y).square().sum(1).double()
        s, p = xn.sum() * yn.sum(), (xn * yn).sum()
        a_hat = estimate_a(sketch, g_hat.double().square().sum(), s, p, n, k)
        c = constant(self.family, s, a_hat, p, n)
        self.sum_c = c if self.sum_c is None else self.sum_c + c
        if x is not None:
            a = (_wide(y).T @ _wide(x)).double().square().sum()
            c_exact = constant(self.family, s, a, p, n)
            self.sum_c_exact = c_exact if self.sum_c_exact is None else self.sum_c_exact + c_exact
        self.calls += 1
        self.rows += n


@dataclass
class Replan:
    """One re-plan: the step, the plan applied, and per layer the statistics behind it."""

    step: int
    plan: object  # varstudy.randomized.plan.Plan
    uniform: object
    stats: list
    exact_stats: list | None = None


class OnlinePlanner:
    """Re-plan the randomized layers of ``model`` every ``every`` steps (NOTE [online
    statistics]).

    The model is converted already (``randomize``, one family); the planner attaches a tracker
    to every RandomizedLinear and, at each re-plan, solves
    :func:`~varstudy.randomized.plan.plan_budget` (absolute objective) at the stored numbers of
    uniform ``budget`` ρ from the
    statistics of the steps since the last re-plan, then applies it: each layer gets its ρ, and
    the units the plan keeps exact store X. Call :meth:`step` once per optimizer step;
    :meth:`close` detaches the trackers.
    """

    def __init__(self, model: nn.Module, budget: float, *, every: int = 50,
                 objective: str = "absolute", reference: bool = False) -> None:
        from varstudy.plan import unit_name
        from varstudy.randomized.layers import check_ratio

        if objective != "absolute":
            raise VarstudyError(
                f"online plans minimize the absolute sketch variance, not {objective!r}: the "
                "relative objective needs sampling variances, i.e. per-example gradients, which "
                "need X; valid choices: absolute, or python -m varstudy.plan --objective relative "
                "on a measure run")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise VarstudyError(f"every must be an integer >= 1 step, got {every!r}")
        self.budget, self.every = check_ratio(budget), every
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, RandomizedLinear)}
        if not self.layers:
            raise VarstudyError("the model has no RandomizedLinear to re-plan; valid choices: "
                                "randomize(model, ratio, family) first")
        families = {m.sketch.name for m in self.layers.values()}
        if len(families) > 1 or not families <= set(ONLINE_FAMILIES):
            raise VarstudyError(
                f"online re-planning cannot re-plan a model sketched with "
                f"{', '.join(sorted(families))}: it needs one family whose closed form reads "
                "only the layer's rows (the live and real-row families also need each call's "
                "live rows, rows-adaptive each row's probability); valid choices: one family of "
                f"{', '.join(ONLINE_FAMILIES)}, or python -m varstudy.plan on a measure run")
        self.family = next(iter(self.layers.values())).sketch
        self.units = {n: unit_name(n) for n in self.layers}
        self.trackers = {n: LayerTracker(self.family, reference) for n in self.layers}
        for name, module in self.layers.items():
            module.tracker = self.trackers[name]
            module.min_rows = max(module.min_rows, 2)  # k = 1 leaves ‖G‖² unidentified
        self.min_rows = max(m.min_rows for m in self.layers.values())
        self.steps, self.history = 0, []
        self._last: dict[str, tuple[float, float, float | None]] = {}

    def step(self) -> Replan | None:
        """Count one optimizer step; re-plan (and return it) every ``every`` steps."""
        self.steps += 1
        return self.replan() if self.steps % self.every == 0 else None

    def stats(self, exact: bool = False) -> list:
        """LayerStats per layer from the statistics since the last re-plan (the exact C with
        ``exact``, which needs ``reference``); a layer without calls keeps its last values."""
        from varstudy.randomized.plan import LayerStats

        fresh = [(n, t) for n, t in self.trackers.items() if t.calls]
        values = torch.stack([t.sum_c for _, t in fresh] +
                             [t.sum_c_exact for _, t in fresh if t.sum_c_exact is not None]
                             ).double().cpu().tolist() if fresh else []  # one host sync
        for i, (name, t) in enumerate(fresh):
            c_ref = values[len(fresh) + i] / t.calls if t.sum_c_exact is not None else None
            self._last[name] = (t.rows / t.calls, values[i] / t.calls, c_ref)
        out = []
        for name, module in self.layers.items():
            if name not in self._last:
                continue
            n, c, c_ref = self._last[name]
            if exact and c_ref is None:
                raise VarstudyError("exact statistics need OnlinePlanner(..., reference=True)")
            # a negative estimate (noise around a tiny C) plans as no variance
            out.append(LayerStats(name, self.units[name], module.in_features, n,
                                  max(c_ref if exact else c, 0.0), 0.0))
        return out

    def replan(self) -> Replan:
        """Plan from the statistics so far, apply it, reset the trackers."""
        from varstudy.randomized import plan as P

        stats = self.stats()
        if not stats:
            raise VarstudyError("no layer has run a backward pass since the last re-plan; "
                                "valid choices: call step() after loss.backward()")
        exact = self.stats(exact=True) if self.trackers[stats[0].name].reference else None
        uniform = P.uniform(stats, self.family.name, self.budget, min_rows=self.min_rows)
        plan = P.plan_budget(stats, self.family.name, uniform.total_stored,
                             objective="absolute", min_rows=self.min_rows,
                             uniform_ratio=self.budget)
        self.apply(plan)
        record = Replan(self.steps, plan, uniform, stats, exact)
        self.history.append(record)
        for t in self.trackers.values():
            t.reset()
        return record

    def apply(self, plan) -> None:
        """Give every planned layer its ρ, or make it exact."""
        from varstudy.randomized.plan import EXACT

        for name, ratio in plan.ratios.items():
            module = self.layers[name]
            module.set_exact(ratio == EXACT)
            if ratio != EXACT:
                module.ratio = float(ratio)

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume: steps, the layers' ratios and exact flags, the
        last statistics and the trackers' sums (the history's tables are the caller's)."""
        return dict(steps=self.steps, last=dict(self._last),
                    layers={n: (m.ratio, m.exact) for n, m in self.layers.items()},
                    trackers={n: (t.calls, t.rows, t.sum_c, t.sum_c_exact)
                              for n, t in self.trackers.items()})

    def load_state_dict(self, state: dict) -> None:
        """Restore the planner (ratios, exact units and trackers) from :meth:`state_dict`."""
        self.steps, self._last = state["steps"], dict(state["last"])
        for name, (ratio, exact) in state["layers"].items():
            self.layers[name].ratio = ratio
            self.layers[name].set_exact(exact)
        for name, (calls, rows, sum_c, sum_exact) in state["trackers"].items():
            t = self.trackers[name]
            t.calls, t.rows, t.sum_c, t.sum_c_exact = calls, rows, sum_c, sum_exact

    def close(self) -> None:
        """Detach the trackers from the layers; they keep their current ratios."""
        for module in self.layers.values():
            module.tracker = None


def plan_variance(ratios: dict, stats: list, family: str) -> float:
    """Σ_l V_l of a plan's ratios ({layer: ρ or "exact"}) under the constants of ``stats``."""
    from varstudy.randomized.plan import EXACT

    total = 0.0
    for s in stats:
        r = ratios.get(s.name, EXACT)
        if r != EXACT:
            total += s.c * (1 / r - (1.0 if family == "rows-wor" else 0.0))
    return total


def replan_rows(record: Replan) -> list[dict]:
    """Tidy rows of one re-plan, one per layer: its online estimate ``c_online`` and (with
    reference) exact ``c_exact`` of the window; for the online plan, the plan the exact
    statistics of the same window give, and uniform ρ: the ratio (1.0 where exact), whether the
    layer is exact, and (with reference) its true sketch variance under ``c_exact``; plus the
    online plan's predicted variance ``var_online_pred``."""
    from varstudy.randomized import plan as P

    family = record.plan.family
    exact = {s.name: s for s in record.exact_stats or ()}
    plans = {"online": record.plan, "uniform": record.uniform}
    if record.exact_stats:
        plans["exact_stats"] = P.plan_budget(record.exact_stats, family,
                                             record.uniform.total_stored, objective="absolute",
                                             min_rows=record.plan.meta["min_rows"],
                                             uniform_ratio=record.uniform.meta["ratio"])
    rows = []
    for s in record.stats:
        row = dict(step=record.step, family=family, layer=s.name, unit=s.unit, d_in=s.d,
                   n_rows=s.n, c_online=s.c,
                   c_exact=exact[s.name].c if s.name in exact else math.nan,
                   var_online_pred=record.plan.var[s.name])
        for label in ("online", "exact_stats", "uniform"):
            plan = plans.get(label)
            ratio = plan.ratios[s.name] if plan else math.nan
            row[f"ratio_{label}"] = 1.0 if ratio == P.EXACT else float(ratio)
            row[f"exact_{label}"] = ratio == P.EXACT
            row[f"var_{label}"] = (plan_variance({s.name: ratio}, [exact[s.name]], family)
                                   if plan and s.name in exact else math.nan)
        rows.append(row)
    return rows


def _wide(t: Tensor) -> Tensor:
    """float64 stays, anything else computes in float32."""
    return t if t.dtype == torch.float64 else t.float()
