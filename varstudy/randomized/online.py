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

NOTE [online statistics of the live families]: ``rows-live`` and ``rows-adaptive``
(:mod:`varstudy.randomized.informed`) draw among a layer's live rows (its ``_live(x)``, kept in
forward as a B·L-byte mask beside the n row norms), and their plans model V(k) over those rows
(NOTE [live rows] in :mod:`varstudy.randomized.plan`, the same solver and bytes as
``python -m varstudy.plan``). p and a are taken over the live rows. Per backward call:

* ``rows-live``: the rows-wor-real form over the m live rows, k' = min(k, m): f = m·p·φ/k',
  g = −φ/k', φ = (m − k')/(m − 1), so â as above; the call adds c·m/(m − 1) with c = m·p − â
  (the variance with one kept row) and m, and C = mean(c·m/(m − 1))/mean(m) as
  ``varstudy.plan.live_stats`` reads it from a measure run. A first-token layer (m = B) at
  k ≥ B, and a unit made exact, keep every live row: φ = 0 and â = ‖G‖² exactly.
* ``rows-adaptive``, sampled: V = (M − a)/k with M = Σ_l p_l/q_l at the q the stored sample
  was drawn with (the drawing layer's, for siblings sharing it: NOTE [shared sketches]). Row j
  of SᵀX and SᵀY is x_i/√(k q_i), y_i/√(k q_i) for its drawn row i, so d_j = ‖(SᵀX)_j‖²‖(SᵀY)_j‖²
  = p_i/(k² q_i²), and with D = Σ_j d_j, M̂ = k·D (E = M) and â = (‖Ĝ‖² − D)·k/(k − 1) (the
  off-diagonal pairs of ‖Ĝ‖²: E = a) are unbiased from the stored sketch and Y alone; the call
  adds ĉ = M̂ − â. Stored exactly (a first-token layer at k ≥ B, a unit made exact): â = ‖G‖²
  and M is computed at the q the layer would draw with now (its own running ȳ; uniform over the
  live rows while it has none: a first-token layer stored exactly from the start plans with
  the uniform q's c, rows-live's m·p − a). C = mean(ĉ)/n, over m = B rows for a first-token
  layer.

Unbiased, for each call, for the variance model at that call's q; what the window's mean
cannot see is how q moves after it (the profile keeps learning), the mean-m approximation of
``live_stats`` under varying padding, and a family's own premise (y_l = 0 off the live rows).
With ``reference`` the exact constant uses X and, for ``rows-adaptive``, q of every row, from
the drawing layer's sketch in forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from varstudy.errors import VarstudyError
from varstudy.randomized.informed import RowsAdaptive
from varstudy.randomized.layers import RandomizedLinear
from varstudy.randomized.sketches import Sketch

BASE_FAMILIES = ("gaussian", "rademacher", "countsketch", "srht", "rows", "rows-wor",
                 "rows-norm")  # forms read the layer's rows only
LIVE_FAMILIES = ("rows-live", "rows-adaptive")  # NOTE [online statistics of the live families]
ONLINE_FAMILIES = BASE_FAMILIES + LIVE_FAMILIES


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


def live_estimate_a(g_sq: Tensor, p: Tensor, m: Tensor, k: int) -> Tensor:
    """â of ``rows-live``: k' = min(k, m) of the m live rows without replacement (NOTE [online
    statistics of the live families]); m a float64 tensor, so no host sync."""
    kept = m.clamp(min=1, max=k)
    fpc = torch.where(m > 1, (m - kept) / (m - 1).clamp(min=1), torch.zeros_like(m))
    return (g_sq - m * p * fpc / kept) / (1 - fpc / kept)


def live_constant(p: Tensor, a: Tensor, m: Tensor) -> Tensor:
    """One call's c·m/(m − 1) of ``rows-live``, c = m·p − a (0 for m ≤ 1)."""
    return torch.where(m > 1, (m * p - a) * m / (m - 1).clamp(min=1), torch.zeros_like(a))


def second_moment(p_rows: Tensor, q: Tensor) -> Tensor:
    """M = Σ_l p_l/q_l over the rows with q_l > 0 (p_rows, q: (n,) float64)."""
    return torch.where(q > 0, p_rows / q.clamp(min=torch.finfo(q.dtype).tiny), 0.0).sum()


def sampled_constant(g_sq: Tensor, sx: Tensor, sy: Tensor, k: int) -> Tensor:
    """ĉ = M̂ − â of one ``rows-adaptive`` call from its k drawn rows: SᵀX (k, d_in), SᵀY
    (k, d_out) and ‖Ĝ‖² (NOTE [online statistics of the live families]); k ≥ 2."""
    diag = (_wide(sx).square().sum(1).double() * _wide(sy).square().sum(1).double()).sum()
    return k * diag - (g_sq - diag) * k / (k - 1)


class LayerTracker:
    """Running sums of one layer's online statistics since the last :meth:`reset`.

    ``family`` is the layer's own sketch instance (``rows-adaptive`` keeps its statistics
    there); ``first_token`` marks a first-token layer of the live families. ``calls`` backward
    calls, ``rows`` their token rows in all, ``sum_c`` Σ Ĉ (float64 tensor on the layer's
    device), ``sum_live`` Σ m for the live families; with ``reference`` also ``sum_c_exact``
    Σ C from X.
    """

    def __init__(self, family: Sketch, reference: bool = False,
                 first_token: bool = False) -> None:
        self.family, self.reference, self.first_token = family, reference, first_token
        self.needs_live = family.name in LIVE_FAMILIES
        self.reset()

    def reset(self) -> None:
        """Forget the statistics gathered since the last plan."""
        self.calls, self.rows = 0, 0
        self.sum_c: Tensor | None = None
        self.sum_c_exact: Tensor | None = None
        self.sum_live: Tensor | None = None

    def forward_stats(self, flat: Tensor, live: Tensor | None = None,
                      drawer: Sketch | None = None) -> tuple[Tensor, ...]:
        """What the layer keeps in forward: ‖x_l‖² (n numbers); for the live families the live
        mask (B, L) as bool; with reference X itself and, for ``rows-adaptive``, q (n,) of the
        sketch instance ``drawer`` that drew the stored sample."""
        flat = flat.detach()
        norms = _wide(flat).square().sum(1)
        if not self.needs_live:
            return (norms, flat) if self.reference else (norms,)
        out = (norms, live > 0)
        if self.reference:
            out += (flat,)
            if self.family.name == "rows-adaptive":
                source = drawer if isinstance(drawer, RowsAdaptive) else self.family
                out += (source.probabilities(flat, live),)
        return out

    @torch.no_grad()
    def add(self, y: Tensor, g_hat: Tensor, sketch: Sketch, k: int, x_norms: Tensor,
            *rest: Tensor, sx: Tensor | None = None, sy: Tensor | None = None) -> None:
        """One backward call: Y (n, d_out), the layer's Ĝ, the sketch it ran and k, the stats
        :meth:`forward_stats` kept, and the stored SᵀX and SᵀY (k rows)."""
        n = y.shape[0]
        yn = _wide(y).square().sum(1).double()
        if self.needs_live:
            c, c_exact, live = self._live_call(y, yn, g_hat, sketch, k, x_norms, *rest,
                                               sx=sx, sy=sy)
            self.sum_live = live if self.sum_live is None else self.sum_live + live
        else:
            xn = x_norms.double()
            s, p = xn.sum() * yn.sum(), (xn * yn).sum()
            a_hat = estimate_a(sketch, g_hat.double().square().sum(), s, p, n, k)
            c, c_exact = constant(self.family, s, a_hat, p, n), None
            if rest:
                a = (_wide(y).T @ _wide(rest[0])).double().square().sum()
                c_exact = constant(self.family, s, a, p, n)
        self.sum_c = c if self.sum_c is None else self.sum_c + c
        if c_exact is not None:
            self.sum_c_exact = c_exact if self.sum_c_exact is None else self.sum_c_exact + c_exact
        self.calls += 1
        self.rows += n

    def _live_call(self, y, yn, g_hat, sketch, k, x_norms, live, x=None, q=None, *, sx, sy):
        """(ĉ, C from X or None, m) of one call (NOTE [online statistics of the live
        families])."""
        lv = live.reshape(-1).double()
        m, p_rows = lv.sum(), x_norms.double() * lv * yn
        g_sq = g_hat.double().square().sum()
        a = None if x is None else (_wide(y).T @ (_wide(x) * lv[:, None].to(_wide(x).dtype))
                                    ).double().square().sum()
        if self.family.name == "rows-live":
            p = p_rows.sum()
            c = live_constant(p, live_estimate_a(g_sq, p, m, k), m)
            return c, None if a is None else live_constant(p, a, m), m
        if isinstance(sketch, RowsAdaptive):  # sampled at the drawing layer's q
            c = sampled_constant(g_sq, sx, sy, k)
        else:  # every live row kept: Ĝ = G; q the layer would draw with now
            now = self.family.probabilities(x_norms.double().sqrt()[:, None], live)
            c = second_moment(p_rows, now) - g_sq
        return c, None if a is None else second_moment(p_rows, q.double()) - a, m


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
                f"{', '.join(sorted(families))}: it needs one family whose variance the layer's "
                "own sketch, rows and live rows estimate (rows-real and rows-wor-real are "
                "planned over real rows the layer does not count, wta-crs draws from a "
                "per-example cache); valid choices: one family of "
                f"{', '.join(ONLINE_FAMILIES)}, or python -m varstudy.plan on a measure run")
        self.family = next(iter(self.layers.values())).sketch
        live = self.family.name in LIVE_FAMILIES
        first = {n: live and m.first_token for n, m in self.layers.items()}
        self.units = {n: unit_name(n, first[n]) for n in self.layers}
        self.trackers = {n: LayerTracker(m.sketch, reference, first[n])
                         for n, m in self.layers.items()}
        for name, module in self.layers.items():
            module.tracker = self.trackers[name]
            module.min_rows = max(module.min_rows, 2)  # k = 1 leaves ‖G‖² unidentified
        self.min_rows = max(m.min_rows for m in self.layers.values())
        self.steps, self.history = 0, []
        self._last: dict[str, tuple[float, float, float | None, float | None]] = {}

    def step(self) -> Replan | None:
        """Count one optimizer step; re-plan (and return it) every ``every`` steps."""
        self.steps += 1
        return self.replan() if self.steps % self.every == 0 else None

    def stats(self, exact: bool = False) -> list:
        """LayerStats per layer from the statistics since the last re-plan (the exact C with
        ``exact``, which needs ``reference``); a layer without calls keeps its last values."""
        from varstudy.randomized.plan import LayerStats

        fresh = [(n, t) for n, t in self.trackers.items() if t.calls]
        values = torch.stack([torch.stack([_or_nan(v, t.sum_c) for v in (
            t.sum_c, t.sum_c_exact, t.sum_live)]) for _, t in fresh]
        ).cpu().tolist() if fresh else []  # one host sync
        for (name, t), (c, c_ref, live) in zip(fresh, values):
            self._last[name] = (t.rows / t.calls, c / t.calls,
                                None if t.sum_c_exact is None else c_ref / t.calls,
                                None if t.sum_live is None else live / t.calls)
        out = []
        for name, module in self.layers.items():
            if name not in self._last:
                continue
            n, c, c_ref, live = self._last[name]
            if exact and c_ref is None:
                raise VarstudyError("exact statistics need OnlinePlanner(..., reference=True)")
            out.append(self._layer_stats(name, module.in_features, n,
                                         c_ref if exact else c, live))
        return out

    def _layer_stats(self, name: str, d: int, n: float, c: float, live: float | None):
        """LayerStats of one layer from its window's mean n, mean ĉ and (live families) mean m,
        as ``varstudy.plan.live_stats`` forms them from a measure run."""
        from varstudy.randomized.plan import VARIANCE_STATE, LayerStats

        c = max(c, 0.0)  # a negative estimate (noise around a tiny C) plans as no variance
        family, unit = self.family.name, self.units[name]
        if family not in LIVE_FAMILIES:
            return LayerStats(name, unit, d, n, c, 0.0)
        first, state, m = self.trackers[name].first_token, VARIANCE_STATE[family], live
        m = min(max(m, 1.0), n)
        if family == "rows-live":
            return LayerStats(name, unit, d, n, c / m, 0.0, m=m, first_token=first, state=state)
        return LayerStats(name, unit, d, n, c / (m if first else n), 0.0,
                          m=m if first else None, first_token=first, state=state)

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
                    trackers={n: (t.calls, t.rows, t.sum_c, t.sum_c_exact, t.sum_live)
                              for n, t in self.trackers.items()})

    def load_state_dict(self, state: dict) -> None:
        """Restore the planner (ratios, exact units and trackers) from :meth:`state_dict`."""
        self.steps = state["steps"]  # a checkpoint before the live families held one field less
        self._last = {n: (*v, None)[:4] for n, v in state["last"].items()}
        for name, (ratio, exact) in state["layers"].items():
            self.layers[name].ratio = ratio
            self.layers[name].set_exact(exact)
        for name, sums in state["trackers"].items():
            t = self.trackers[name]
            t.calls, t.rows, t.sum_c, t.sum_c_exact, t.sum_live = (*sums, None)[:5]

    def close(self) -> None:
        """Detach the trackers from the layers; they keep their current ratios."""
        for module in self.layers.values():
            module.tracker = None


def plan_variance(ratios: dict, stats: list, family: str) -> float:
    """Σ_l V_l of a plan's ratios ({layer: ρ or "exact"}) under the constants of ``stats``; a
    layer with ``m`` has none from k = ρ·n ≥ m rows on (NOTE [live rows] in
    :mod:`varstudy.randomized.plan`)."""
    from varstudy.randomized.plan import EXACT, VARIANCE_MODELS

    wor = 1.0 if VARIANCE_MODELS[family] == "wor" else 0.0
    total = 0.0
    for s in stats:
        r = ratios.get(s.name, EXACT)
        if r == EXACT or (s.m is not None and r * s.n >= s.m * (1 - 1e-12)):
            continue
        rows = s.n if s.m is None else s.m
        total += s.c * (rows / (r * s.n) - wor)
    return total


def replan_rows(record: Replan) -> list[dict]:
    """Tidy rows of one re-plan, one per layer: its online estimate ``c_online`` and (with
    reference) exact ``c_exact`` of the window; for the online plan, the plan the exact
    statistics of the same window give, and uniform ρ: the ratio (1.0 where exact), whether the
    layer is exact, and (with reference) its true sketch variance under ``c_exact``; plus the
    online plan's predicted variance ``var_online_pred``; ``live_rows``: the mean rows m its
    plan is stated over (NOTE [live rows] in :mod:`varstudy.randomized.plan`; NaN: n)."""
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
                   n_rows=s.n, live_rows=math.nan if s.m is None else s.m, c_online=s.c,
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


def _or_nan(value: Tensor | None, like: Tensor) -> Tensor:
    """``value`` as a float64 scalar, or NaN where there is none."""
    return like.new_tensor(math.nan, dtype=torch.float64) if value is None else value.double()


def _wide(t: Tensor) -> Tensor:
    """float64 stays, anything else computes in float32."""
    return t if t.dtype == torch.float64 else t.float()
