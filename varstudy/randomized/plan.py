"""Variance-budgeted per-layer sketch sizes: spend the stored bytes where the variance is.

A randomized layer l that keeps a fraction ρ_l of its n_l input rows stores ρ_l·n_l·d_l numbers
and adds, averaged over minibatches, the sketch variance (closed forms, ARCHITECTURE.md)

    V_l(ρ) = C_l / ρ            "inverse" families          (C_l = E_batch[c_l / n]),
    V_l(ρ) = C_l · (1/ρ − 1)    rows-wor, rows-live ("wor") (C_l = E_batch[c_l / (n − 1)]),

with c_l the family's constant for one batch (gaussian s + a, rows n·p − a, ...; the variance of
k rows is c_l/k; ``planfile.VARIANCE_MODELS`` names each family's form; rows-live and
rows-adaptive over their live rows: NOTE [live rows]). Layers that read one tensor (Q, K, V)
share one stored sketch: they form one **unit** with one ρ. A unit may also be **exact** (X
stored, n_l·d_l numbers, no sketch variance); for the "inverse" families ρ = 1 still has
variance C/1, so exact dominates it.

Problems (all in float64, bytes counted in stored numbers; multiply by the itemsize for bytes):

* :func:`plan_budget`: minimize Σ_u A_u/ρ_u subject to Σ_u D_u ρ_u ≤ M, ρ_min,u ≤ ρ_u ≤ 1, with
  D_u = d_u·n̄_u and A_u = Σ_{l∈u} C_l (``objective="absolute"``: the total sketch variance plain
  SGD feels) or A_u = Σ_{l∈u} C_l / v_l (``"relative"``: each layer's sketch variance over its own
  sampling variance v_l, closer to what Adam's per-parameter normalisation feels).
* :func:`plan_target`: minimize Σ_u D_u ρ_u subject to the sketch variance ≤ τ × the sampling
  variance, for the model total (Σ_l V_l ≤ τ Σ_l v_l) or for every layer (V_l ≤ τ v_l).

NOTE [solution]: for a fixed set E of exact units the rest is convex and separable; the KKT
conditions give ρ_u(λ) = clamp(√(A_u / (λ D_u)), ρ_min,u, 1), and λ is found by bisection so
that the budget (or the variance target) is met exactly (within a bracket taken from the data:
NOTE [scale-free] at _bracket). The exact set is chosen by local search: units whose ρ reaches 1
become exact (same bytes, no variance), then single units are added to or removed from E while
that lowers the objective. Tests compare the result with brute
force over every integer k on small instances.

NOTE [integer rows]: a plan is stated as ρ per layer, so it carries over to any batch shape:
at n rows a layer keeps k = clamp(round(ρ·n), min_rows, n) rows (``sketches.rows_for``). At the
reference n of the statistics (fixed padding) the continuous ρ_u·n_u are rounded by flooring,
then adding one row at a time to the unit whose variance falls most per stored number while the
budget allows; the continuous optimum at the budget less one row of every unit, rounded up,
fits the budget too, and the better of the two is kept, so the plan's objective is at most that
continuous optimum (the stated rounding; tested against brute force over every integer k).
Given ``uniform_ratio``, uniform ρ's own rounding is a third candidate, so a plan at uniform's
bytes is never worse than uniform (at small n the rounded plan could be). The mean n may be
fractional (dynamic padding): k never exceeds it (the last step adds part of a row), so ρ ≤ 1.
Predictions use the rounded k.

NOTE [live rows]: ``rows-live`` and ``rows-adaptive`` (:mod:`varstudy.randomized.informed`) draw
only among a layer's live rows, and a first-token layer (NOTE [first-token layers] in
:mod:`varstudy.randomized.support`) stores its m = B live rows exactly once k ≥ B. Such a layer
carries ``m`` (:class:`LayerStats`): the rows where more rows buy nothing. The solver then works
on m rows (ρ = k/m, bytes m·d at ρ = 1, where the unit counts as exact: variance 0, m rows
stored, not the n rows of an exact input), and the plan states the ratio at the layer's own n
rows, k/n; a first-token unit at m gets ρ = 1 (whatever n, the layer stores its B rows, also
under dynamic padding), any other unit at m gets m/n, or "exact" where m = n (no index kept). ``rows-live`` gives every layer m (its
live rows, which the sampler never exceeds: variance 0 at k ≥ m, (NOTE [solution]'s) "wor"
form over m rows), ``rows-adaptive`` (with replacement, "inverse" form) only its first-token
layers. Uniform ρ keeps k = rows_for(n, ρ) rows, min(k, m) of them stored. A kept row also
stores its state (``LayerStats.state``, float32 numbers: the int64 index of rows-live and
rows-adaptive, rows-adaptive's float32 scale); a unit at m stores rows-live's index only. Not
counted: a few bytes per unit (rows-live's one scale) and rows-adaptive's B·L-byte live mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from varstudy.errors import VarstudyError
from varstudy.randomized.planfile import (EXACT, VARIANCE_MODELS, check_plan_layers,  # noqa: F401
                                          load_plan)

OBJECTIVES = ("absolute", "relative")
# Stored numbers per kept row besides its d values (NOTE [live rows]): an int64 index is two
# float32 numbers, rows-adaptive's float32 scale one more.
VARIANCE_STATE = {"rows-live": 2.0, "rows-adaptive": 3.0}


@dataclass(frozen=True)
class LayerStats:
    """What a plan needs to know of one linear layer (from a measure run).

    name: module name; unit: name of its storage unit (Q/K/V of one attention block share one);
    d: input width d_in; n: mean token rows it sees per batch; c: C_l of the chosen family
    (module docstring); v: its sampling variance Var[g_B] (same units as the variances).
    m: the rows at which more rows buy nothing (NOTE [live rows]; None: n, the exact input),
    with C_l then stated over m rows (V = C·m/k or C·(m/k − 1)); first_token: a first-token
    layer (ρ = 1 where it keeps m rows); state: stored numbers per kept row besides its d.
    """

    name: str
    unit: str
    d: int
    n: float
    c: float
    v: float
    m: float | None = None
    first_token: bool = False
    state: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Per layer a ratio ρ in (0, 1] or ``"exact"``, and the predictions at the reference n.

    ``ratios`` maps every planned layer to ρ (float) or "exact"; ``k`` the rows kept at the
    reference n; ``var`` the predicted sketch variance per layer; ``stored`` the stored numbers
    per unit-shared layer (attributed once per unit, to its first layer).
    """

    family: str
    ratios: dict[str, float | str]
    k: dict[str, int]
    var: dict[str, float]
    stored: dict[str, float]
    meta: dict = field(default_factory=dict)

    @property
    def total_var(self) -> float:
        """Predicted sketch variance of the plan, summed over its units."""
        return float(sum(self.var.values()))

    @property
    def total_stored(self) -> float:
        """Stored numbers of the plan (bytes / itemsize), summed over its units."""
        return float(sum(self.stored.values()))

    def relative(self, layers: Sequence[LayerStats]) -> float:
        """Σ_l V_l / v_l, the relative objective."""
        return float(sum(self.var[s.name] / s.v for s in layers if s.v > 0))


# --------------------------------------------------------------------------------------------
# Units and the continuous problem
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Units:
    names: list[str]
    members: list[list[LayerStats]]
    d: np.ndarray        # D_u = (d_u + state_u) · n̄_u, stored numbers at ρ = 1
    lo: np.ndarray       # ρ_min,u
    n: np.ndarray        # reference rows n_u (m_u where given: NOTE [live rows])
    wor: bool
    rows: np.ndarray     # the layers' own token rows (= n without m)
    capped: np.ndarray   # bool: n is m (NOTE [live rows])
    first: np.ndarray    # bool: a first-token unit

    def weights(self, objective: str) -> np.ndarray:
        if objective == "absolute":
            return np.array([sum(s.c for s in m) for m in self.members])
        return np.array([sum(s.c / s.v for s in m if s.v > 0) for m in self.members])

    def variance(self, a: np.ndarray, rho: np.ndarray, exact: np.ndarray) -> np.ndarray:
        """Per-unit sketch variance (A/ρ, or A(1/ρ − 1) for rows-wor); 0 where exact."""
        v = a / rho - (a if self.wor else 0.0)
        return np.where(exact, 0.0, v)


def _units(layers: Sequence[LayerStats], family: str, min_rows: int) -> _Units:
    if family not in VARIANCE_MODELS:
        raise VarstudyError(f"no variance model to plan family {family!r} with; valid choices: "
                            f"{', '.join(VARIANCE_MODELS)}")
    if not layers:
        raise VarstudyError("no layers to plan; valid choices: a measure run with linear layers")
    groups: dict[str, list[LayerStats]] = {}
    for s in layers:
        m = s.n if s.m is None else s.m
        if not (0 <= s.c < math.inf and 0 <= s.v < math.inf and 1 <= s.n < math.inf
                and s.d >= 1 and 1 <= m <= s.n and 0 <= s.state < math.inf):
            raise VarstudyError(f"layer {s.name} has c={s.c!r}, v={s.v!r}, n={s.n!r}, "
                                f"d={s.d!r}, m={s.m!r}, state={s.state!r}; valid: finite "
                                "variances c, v >= 0, rows 1 <= m <= n, width d >= 1, state >= 0")
        groups.setdefault(s.unit, []).append(s)
    for unit, members in groups.items():
        if len({(m.d, m.n, m.m, m.first_token, m.state) for m in members}) > 1:
            raise VarstudyError(f"layers of unit {unit!r} disagree on input width or rows; "
                                "valid choices: units of layers that read one tensor")
    members = list(groups.values())
    heads = [m[0] for m in members]
    n = np.array([s.n if s.m is None else s.m for s in heads], dtype=float)
    return _Units(list(groups), members, np.array([(s.d + s.state) for s in heads]) * n,
                  np.minimum(min_rows / n, 1.0), n, VARIANCE_MODELS[family] == "wor",
                  np.array([s.n for s in heads], dtype=float),
                  np.array([s.m is not None for s in heads]),
                  np.array([s.first_token for s in heads]))


def _rho_for(a: np.ndarray, d: np.ndarray, lo: np.ndarray, lam: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.clip(np.sqrt(a / (lam * d)), lo, 1.0)


def _bracket(a: np.ndarray, d: np.ndarray, lo: np.ndarray) -> tuple[float, float]:
    """log λ below which every ρ(λ) is 1 and above which every ρ(λ) is its floor, widened by 1.

    NOTE [scale-free]: the bracket comes from the data (λ = A/D puts ρ at 1, λ = A/(D ρ_min²) at
    ρ_min), so multiplying every variance constant by any factor scales λ and nothing else."""
    pos = a > 0
    if not pos.any():
        return 0.0, 0.0
    la, ld = np.log(a[pos]), np.log(d[pos])
    return float((la - ld).min()) - 1.0, float((la - ld - 2 * np.log(lo[pos])).max()) + 1.0


def _bisect(f, target: float, increasing: bool, bracket: tuple[float, float]) -> float:
    """λ > 0 with f(λ) = target for a monotone f, by bisection on log λ within ``bracket``."""
    lo, hi = bracket
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (f(math.exp(mid)) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return math.exp(hi if increasing else lo)


def _solve_budget(u: _Units, a: np.ndarray, budget: float, exact: np.ndarray):
    """Continuous optimum for a fixed exact set: (ρ, objective), or None when infeasible."""
    free = ~exact
    left = budget - float(u.d[exact].sum())
    if left < float((u.d * u.lo)[free].sum()) - 1e-9 * budget:
        return None
    rho = np.ones_like(a)
    if free.any():
        if float(u.d[free].sum()) <= left:
            rho[free] = 1.0
        else:
            lam = _bisect(lambda x: float((u.d * _rho_for(a, u.d, u.lo, x))[free].sum()), left,
                          increasing=False, bracket=_bracket(a, u.d, u.lo))
            rho[free] = _rho_for(a, u.d, u.lo, lam)[free]
    return rho, float(u.variance(a, rho, exact).sum())


def _local_search(u: _Units, solve) -> tuple[np.ndarray, np.ndarray]:
    """Exact set by local search (NOTE [solution]); ``solve(exact) -> (ρ, cost) | None``."""
    exact = np.zeros(len(u.names), dtype=bool)
    best = solve(exact)
    if best is None:  # a variance target may need exact units from the start
        exact = ~exact
        best = solve(exact)
    if best is None:
        raise VarstudyError("the budget is below the fewest rows every layer must keep; valid "
                            "choices: a larger budget or a smaller min_rows")
    while True:
        rho, cost = best
        at_top = (rho >= 1.0 - 1e-12) & ~exact
        if at_top.any() and not u.wor:
            exact = exact | at_top
            best = solve(exact)
            continue
        moves = []
        for i in range(len(exact)):
            trial = exact.copy()
            trial[i] = not trial[i]
            got = solve(trial)
            if got is not None and got[1] < cost * (1 - 1e-12) - 1e-300:
                moves.append((got[1], i, got))
        if not moves:
            return exact, rho
        _, i, best = min(moves, key=lambda m: m[0])
        exact = exact.copy()
        exact[i] = not exact[i]


# --------------------------------------------------------------------------------------------
# Public solvers
# --------------------------------------------------------------------------------------------


def plan_budget(layers: Sequence[LayerStats], family: str, budget: float, *,
                objective: str = "absolute", min_rows: int = 1,
                uniform_ratio: float | None = None) -> Plan:
    """Fewest sketch variance (absolute or relative) within ``budget`` stored numbers.

    ``uniform_ratio``: uniform ρ's own rounding is one more candidate, returned when the solved
    plan's objective is higher (NOTE [integer rows]), so a plan at uniform's bytes is never
    worse than uniform."""
    if objective not in OBJECTIVES:
        raise VarstudyError(f"unknown objective {objective!r}; valid choices: "
                            f"{', '.join(OBJECTIVES)}")
    _check_finite("budget", budget)
    u = _units(layers, family, min_rows)
    a = u.weights(objective)
    exact, rho = _local_search(u, lambda e: _solve_budget(u, a, budget, e))
    k = _round_budget(u, a, rho, exact, budget)
    # NOTE [integer rows]: the continuous optimum at the budget less one row per unit, rounded
    # up, also fits; keeping the better of the two bounds the plan by that optimum.
    slack = budget - float((u.d / u.n).sum())
    try:
        exact2, rho2 = _local_search(u, lambda e: _solve_budget(u, a, slack, e))
    except VarstudyError:
        exact2 = None
    candidates = {"solver": (k, exact)}
    if exact2 is not None:
        candidates["slack"] = (np.where(exact2, u.n, np.minimum(np.ceil(rho2 * u.n - 1e-9), u.n)),
                               exact2)
    if uniform_ratio is not None:
        ku = _uniform_k(u, uniform_ratio, min_rows)
        fits = _plan(layers, u, family, ku, np.zeros(len(ku), dtype=bool), {}).total_stored
        if fits <= budget * (1 + 1e-12):
            candidates["uniform"] = (ku, np.zeros(len(ku), dtype=bool))
    # the first of the least objective: the solver's rounding wins ties
    best = min(candidates, key=lambda c: _objective(u, a, *candidates[c]))
    return _plan(layers, u, family, *candidates[best], dict(
        problem="budget", objective=objective, budget=budget, min_rows=min_rows,
        rounding=best))


def _check_finite(what: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < math.inf:
        raise VarstudyError(f"{what} must be > 0 and finite, got {value!r}; valid: "
                            f"0 < {what} < inf")


def plan_target(layers: Sequence[LayerStats], family: str, tau: float, *,
                per_layer: bool = False, min_rows: int = 1) -> Plan:
    """Fewest stored numbers with sketch variance ≤ τ × sampling variance (total or per layer)."""
    _check_finite("target ratio", tau)
    u = _units(layers, family, min_rows)
    if per_layer:
        k, exact = _per_layer_target(u, tau)
    else:
        a = u.weights("absolute")
        cap = tau * sum(s.v for s in layers)
        exact, rho = _local_search(u, lambda e: _solve_target(u, a, cap, e))
        k, exact = _round_target(u, a, rho, exact, cap)
    return _plan(layers, u, family, k, exact, dict(problem="target", tau=tau,
                                                   per_layer=per_layer, min_rows=min_rows))


def uniform(layers: Sequence[LayerStats], family: str, ratio: float, *,
            min_rows: int = 1, exact_units: Sequence[str] = ()) -> Plan:
    """One ρ for every layer (k = rows_for(n, ρ)), optionally with some units exact."""
    u = _units(layers, family, min_rows)
    exact = np.array([name in exact_units for name in u.names])
    return _plan(layers, u, family, _uniform_k(u, ratio, min_rows), exact,
                 dict(problem="uniform", ratio=ratio, min_rows=min_rows))


def _uniform_k(u: _Units, ratio: float, min_rows: int) -> np.ndarray:
    """k = rows_for(round(n), ρ) per unit at its own rows n, at most the (possibly fractional)
    mean rows, and at most m where given (NOTE [live rows])."""
    from varstudy.randomized.sketches import rows_for

    return np.minimum([rows_for(int(round(n)), ratio, min_rows) for n in u.rows], u.n)


def _solve_target(u: _Units, a: np.ndarray, cap: float, exact: np.ndarray):
    """Fewest stored numbers for a fixed exact set with Σ var ≤ cap: (ρ, stored) or None."""
    free = ~exact
    rho = np.ones_like(a)
    if free.any():
        floor_var = float(u.variance(a, np.ones_like(a), exact)[free].sum())
        if floor_var > cap:
            return None
        var_at = lambda lam: float(u.variance(a, _rho_for(a, u.d, u.lo, lam), exact)[free].sum())
        bracket = _bracket(a, u.d, u.lo)
        if var_at(math.exp(bracket[1])) > cap:  # the fewest rows overshoot: solve for λ
            lam = _bisect(var_at, cap, increasing=True, bracket=bracket)
            rho[free] = _rho_for(a, u.d, u.lo, lam)[free]
        else:
            rho[free] = u.lo[free]
    return rho, float((u.d * rho).sum())


def _per_layer_target(u: _Units, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Per unit the fewest rows with V_l ≤ τ v_l for each of its layers."""
    k = np.empty(len(u.names))
    for i, members in enumerate(u.members):
        need = 0.0
        for s in members:
            if s.v <= 0:
                need = math.inf
            elif u.wor:
                need = max(need, u.n[i] / (1 + tau * s.v / s.c) if s.c > 0 else 0.0)
            else:
                need = max(need, u.n[i] * s.c / (tau * s.v))
        k[i] = max(math.ceil(need - 1e-9), min(1, u.n[i]), u.lo[i] * u.n[i])
    exact = k >= u.n
    return np.minimum(k, u.n), exact


# --------------------------------------------------------------------------------------------
# Integer rows (NOTE [integer rows])
# --------------------------------------------------------------------------------------------


def _k_var(u: _Units, a: np.ndarray, k: np.ndarray) -> np.ndarray:
    return u.variance(a, np.clip(k, 1, u.n) / u.n, np.zeros(len(k), dtype=bool))


def _up(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """One row more, at most the mean rows n (NOTE [integer rows]: n may be fractional)."""
    return np.minimum(np.floor(k + 1e-9) + 1, n)


def _down(k: np.ndarray) -> np.ndarray:
    """One row fewer: the integer below k (k = n fractional steps down to floor(n))."""
    return np.ceil(k - 1e-9) - 1


def _objective(u: _Units, a: np.ndarray, k: np.ndarray, exact: np.ndarray) -> float:
    return float(np.where(exact | ((k >= u.n) & (not u.wor)), 0.0, _k_var(u, a, k)).sum())


def _round_budget(u, a, rho, exact, budget) -> np.ndarray:
    k = np.minimum(np.maximum(np.floor(rho * u.n + 1e-9), np.ceil(u.lo * u.n - 1e-9)), u.n)
    k[exact] = u.n[exact]
    width = u.d / u.n
    spent = float((k * width).sum())
    while True:
        step = (_up(k, u.n) - k) * width  # stored numbers of the next row (part of one at n)
        gain = np.where(exact | (k >= u.n), -np.inf,
                        (_k_var(u, a, k) - _k_var(u, a, _up(k, u.n))) / np.maximum(step, 1e-300))
        gain[spent + step > budget * (1 + 1e-12)] = -np.inf
        i = int(np.argmax(gain))
        if not np.isfinite(gain[i]):
            return k
        spent += step[i]
        k[i] = _up(k, u.n)[i]


def _round_target(u, a, rho, exact, cap) -> tuple[np.ndarray, np.ndarray]:
    k = np.minimum(np.ceil(rho * u.n - 1e-9), u.n)
    k[exact] = u.n[exact]
    width = u.d / u.n
    var = _k_var(u, a, k)
    # ceil keeps the variance under the cap; give back rows while it stays under
    while True:
        added = np.where(exact | (k <= np.ceil(u.lo * u.n - 1e-9)), np.inf,
                         _k_var(u, a, _down(k)) - var)
        total = float(np.where(exact, 0.0, var).sum())
        ok = total + added <= cap * (1 + 1e-12)
        saving = np.where(ok, (k - _down(k)) * width, -np.inf)
        i = int(np.argmax(saving))
        if not np.isfinite(saving[i]):
            return k, exact | ((k >= u.n) & ~np.bool_(u.wor))
        k[i] = _down(k)[i]
        var = _k_var(u, a, k)


def _plan(layers, u: _Units, family: str, k: np.ndarray, exact: np.ndarray, meta: dict) -> Plan:
    ratios, ks, var, stored = {}, {}, {}, {}
    k = np.minimum(k, u.n)  # ρ ≤ 1 also at a fractional mean n (NOTE [integer rows])
    exact = exact | (k >= u.n) if not u.wor else exact
    exact = exact | (u.capped & (k >= u.n))  # NOTE [live rows]: m rows hold the gradient
    for i, members in enumerate(u.members):
        for j, s in enumerate(members):
            kept = u.n[i] if exact[i] else k[i]
            ks[s.name] = int(round(kept))
            if exact[i] and u.capped[i] and (u.first[i] or kept < u.rows[i]):
                # the layer keeps its m rows (rows-live's path); m = n: the exact input is less
                ratios[s.name] = 1.0 if u.first[i] else float(min(1.0, kept / u.rows[i]))
                width = s.d + VARIANCE_STATE["rows-live"]
            else:
                ratios[s.name] = EXACT if exact[i] else float(kept / u.rows[i])
                width = s.d if exact[i] else s.d + s.state
            single = replace(u, members=[[s]], d=u.d[i:i + 1], lo=u.lo[i:i + 1], n=u.n[i:i + 1])
            var[s.name] = 0.0 if exact[i] else float(_k_var(single, np.array([s.c]),
                                                            k[i:i + 1])[0])
            stored[s.name] = float(kept) * width if j == 0 else 0.0
    return Plan(family, ratios, ks, var, stored, meta)
