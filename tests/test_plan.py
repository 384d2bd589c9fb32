"""Variance-budgeted plans: optimality against brute force, budgets, the exact option, units."""

import itertools
import math

import numpy as np
import pytest
from scipy import optimize

from varstudy.errors import VarstudyError
from varstudy.randomized import plan as P


def _instance(rng, family, units=3, n=(3, 9)):
    layers = []
    for u in range(units):
        rows, d = int(rng.integers(*n)), int(rng.choice([2, 3, 5]))
        for j in range(int(rng.integers(1, 3))):
            layers.append(P.LayerStats(f"l{u}.{j}", f"u{u}", d, rows,
                                       float(rng.lognormal(0, 2)), float(rng.lognormal(0, 1))))
    return layers


def _options(layers, family, objective):
    """Every (stored numbers, objective) choice of every unit: k = 1..n rows, or exact."""
    units = {}
    for s in layers:
        units.setdefault(s.unit, []).append(s)
    out = []
    for members in units.values():
        n, d = int(members[0].n), members[0].d
        a = sum(s.c if objective == "absolute" else s.c / s.v for s in members)
        var = [a * n / k - (a if family == "rows-wor" else 0.0) for k in range(1, n + 1)]
        out.append([(k * d, v) for k, v in zip(range(1, n + 1), var)] + [(n * d, 0.0)])
    return out


def _continuous_optimum(layers, family, objective, budget):
    """Brute force over every exact set; scipy's SLSQP for the rest (independent of the KKT)."""
    units = {}
    for s in layers:
        units.setdefault(s.unit, []).append(s)
    a = np.array([sum(s.c if objective == "absolute" else s.c / s.v for s in m)
                  for m in units.values()])
    d = np.array([m[0].d * m[0].n for m in units.values()], dtype=float)
    lo = np.array([1 / m[0].n for m in units.values()])
    best = math.inf
    for exact in itertools.product([False, True], repeat=len(a)):
        free = ~np.array(exact)
        left = budget - d[~free].sum()
        if left < (d * lo)[free].sum() - 1e-12:
            continue
        if not free.any():
            best = min(best, 0.0)
            continue
        af, df, lf = a[free], d[free], lo[free]

        def f(r):
            return float((af / r - (af if family == "rows-wor" else 0)).sum())
        start = np.clip(left / df.sum() * np.ones_like(af), lf, 1)
        res = optimize.minimize(f, start, method="SLSQP", bounds=list(zip(lf, np.ones_like(lf))),
                                constraints=[{"type": "ineq", "fun": lambda r: left - df @ r}],
                                options=dict(ftol=1e-14, maxiter=500))
        best = min(best, res.fun)
    return best


@pytest.mark.parametrize("family", ["gaussian", "rows-wor"])
@pytest.mark.parametrize("objective", ["absolute", "relative"])
def test_budget_plan_against_brute_force(family, objective):
    """Over random small instances: within budget; never better than the best integer choice
    (enumerated); at most the continuous optimum at the budget less one row per unit (the
    stated rounding bound, NOTE [integer rows]); and the continuous solver equals brute force
    over exact sets + SLSQP."""
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(25):
        layers = _instance(rng, family)
        total = sum(s.d * s.n for s in {s.unit: s for s in layers}.values())
        budget = float(rng.uniform(0.3, 0.9)) * total
        options = _options(layers, family, objective)
        best = min((sum(v for _, v in c) for c in itertools.product(*options)
                    if sum(b for b, _ in c) <= budget), default=math.inf)
        plan = P.plan_budget(layers, family, budget, objective=objective)
        got = plan.total_var if objective == "absolute" else plan.relative(layers)
        assert plan.total_stored <= budget
        assert got >= best * (1 - 1e-9)
        slack = budget - sum(s.d for s in {s.unit: s for s in layers}.values())
        bound = _continuous_optimum(layers, family, objective, slack)
        if math.isfinite(bound):
            assert got <= bound * (1 + 1e-6) + 1e-12
            checked += 1
        u = P._units(layers, family, 1)
        a = u.weights(objective)
        exact, rho = P._local_search(u, lambda e: P._solve_budget(u, a, budget, e))
        kkt = P._solve_budget(u, a, budget, exact)[1]
        assert kkt == pytest.approx(_continuous_optimum(layers, family, objective, budget),
                                    rel=1e-5, abs=1e-12)
    assert checked >= 15


def test_target_plan_against_brute_force():
    rng = np.random.default_rng(3)
    for family in ("gaussian", "rows-wor"):
        for _ in range(20):
            layers = _instance(rng, family)
            tau = float(rng.lognormal(0, 1.5))
            cap = tau * sum(s.v for s in layers)
            options = _options(layers, family, "absolute")
            fewest = min(sum(b for b, _ in c) for c in itertools.product(*options)
                         if sum(v for _, v in c) <= cap * (1 + 1e-12))
            plan = P.plan_target(layers, family, tau)
            assert plan.total_var <= cap * (1 + 1e-9)
            widths = sum(s.d for s in {s.unit: s for s in layers}.values())
            assert fewest <= plan.total_stored <= fewest + widths  # NOTE [integer rows]


def test_per_layer_target_is_the_fewest_rows_per_unit():
    rng = np.random.default_rng(5)
    for family in ("rows", "rows-wor"):
        layers = _instance(rng, family, units=4, n=(20, 60))
        tau = 2.0
        plan = P.plan_target(layers, family, tau, per_layer=True)
        for s in layers:
            assert plan.var[s.name] <= tau * s.v * (1 + 1e-12)
        for unit in {s.unit for s in layers}:
            members = [s for s in layers if s.unit == unit]
            k = plan.k[members[0].name]
            if plan.ratios[members[0].name] == P.EXACT or k <= 1:
                continue
            fewer = P.uniform(members, family, (k - 1) / members[0].n)  # one row less
            assert any(fewer.var[s.name] > tau * s.v for s in members)


def test_exact_option_and_shared_units():
    """A head with huge variance and few rows goes exact; Q/K/V keep one ratio."""
    layers = [P.LayerStats(f"enc.{i}.{q}", f"enc.{i}.qkv", 8, 1000, 1.0, 1.0)
              for i in range(2) for q in ("query", "key", "value")]
    layers += [P.LayerStats("enc.0.ffn", "enc.0.ffn", 8, 1000, 1.0, 1.0),
               P.LayerStats("head", "head", 8, 16, 1e4, 1.0)]
    uniform = P.uniform(layers, "rows", 0.1)
    plan = P.plan_budget(layers, "rows", uniform.total_stored)
    assert plan.ratios["head"] == P.EXACT and plan.var["head"] == 0.0
    for i in range(2):
        assert len({plan.ratios[f"enc.{i}.{q}"] for q in ("query", "key", "value")}) == 1
    # the shared unit is stored once: three layers, one k·d
    assert plan.stored["enc.0.key"] == plan.stored["enc.0.value"] == 0.0
    assert plan.stored["enc.0.query"] == plan.k["enc.0.query"] * 8
    assert plan.total_stored <= uniform.total_stored
    assert plan.total_var < uniform.total_var / 10


def test_bad_inputs():
    layers = [P.LayerStats("a", "a", 4, 10, 1.0, 1.0)]
    with pytest.raises(VarstudyError, match="valid choices: absolute, relative"):
        P.plan_budget(layers, "rows", 20, objective="sgd")
    with pytest.raises(VarstudyError, match="budget is below"):
        P.plan_budget(layers, "rows", 1)
    with pytest.raises(VarstudyError, match="must be > 0"):
        P.plan_target(layers, "rows", 0)
