"""The frontier study's added gradient variance by scope (:mod:`varstudy.study.frontier_study`):
the engine's closed forms for uniform sketches and plans, a Monte Carlo measurement for
checkpointing + sketch.

NOTE [combined variance]: the engine's closed forms need one captured (X, Y) per layer, which a
checkpointed step (each layer called again in backward) does not give. So a combined setup's
sketch variance is a Monte Carlo estimate over the randomized, checkpointed model's real weight
gradients: per held minibatch b, ``MC_DRAWS`` steps in eval mode (no dropout; each step draws
fresh sketches, the call counters advancing from ``randomize(seed=MC_SEED)``) give
mean_j ‖ĝ_bj − g_b‖² per layer, g_b the exact gradient of the same minibatch; summed over a
scope's layers and averaged over minibatches (``var_sketch_<scope>``, its Monte Carlo standard
error ``var_sketch_se_<scope>``), over the closed-form sampling variance of the same minibatches.
It estimates what the sketch-only row computes in closed form (equal in expectation if
checkpointing is exact) and, with the same seed, gives bit for bit the sketch-only model's
estimate when recomputation is exact (NOTE [sketch seeds] in :mod:`varstudy.checkpointing.encoder`):
a checkpoint that changed the gradient would show in both. An accumulated setup's Monte Carlo
gradient is the weighted sum over its micro-batches (:func:`varstudy.accumulation.split`).

NOTE [accumulated variance]: accumulation in m micro-batches draws an independent sketch per
micro-batch, and micro-batch j's weight-gradient estimate is w_j times the sketch estimate of its
own mean loss L_j (NOTE [accumulation weights] in :mod:`varstudy.accumulation`). Independent
draws add variances, so per held minibatch Var = Σ_j w_j² V_j, V_j the engine's closed form on
micro-batch j alone (``measure_now`` on the micro-batches, each layer's rows from micro-batch
j's n_j = n/m token rows, ρ per micro-batch). For uniform rows this is stratified sampling:
Σ_j (n_j p_j − a_j)/k_j = (p − Σ_j a_j/n_j)/ρ in the minibatch's scaling (a_j = ‖G_j‖², the
micro-batch's share of G), never above the minibatch sketch's (p − a/n)/ρ, since Σ_j a_j/n_j ≥
‖Σ_j G_j‖²/n (Cauchy–Schwarz); for other families it may go either way. The sampling variance
is the minibatch's (the
accumulated gradient is the minibatch gradient). ``var_source``: "closed form, ... per
micro-batch"; tests/test_frontier.py checks it against the Monte Carlo of the accumulated
gradient.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from varstudy.study.config import StudyConfig

SCOPES = ("encoder", "head", "all")
MC_DRAWS = 8  # NOTE [combined variance]: sketch draws per held minibatch
MC_SEED = 1


def variance(config: StudyConfig, model, batches, population: float, configs: list,
             folder: Path, *, plan_family: str, checkpointed: Callable) -> dict:
    """{(family, ratio, objective): {column: value}} of the added variance by scope on the held
    minibatches; (``exact``, 1.0, None): zero sketch variance and the sampling variance; a
    combined setup's name: its Monte Carlo measurement (NOTE [combined variance]). ``configs``:
    the study's Setups; the plans are read from ``folder``/plan_<plan_family>_<objective>.json;
    ``checkpointed(model, setup)``: the block that runs a step of ``setup``'s checkpointing."""
    from varstudy.measure.engine import measure_now
    from varstudy.measure.tables import scope_summary

    uniform = sorted({(c.family, c.ratio) for c in configs
                      if c.family != "exact" and c.objective is None})
    families = tuple(dict.fromkeys(f for f, _ in uniform))
    ratios = tuple(sorted({r for _, r in uniform}))
    out = {}
    if uniform:
        scopes = scope_summary(measure_now(model, batches, families, ratios,
                                           population=population))
        for f, r in uniform:
            out[(f, r, None)] = scope_columns(scopes[(scopes.family == f)
                                                      & np.isclose(scopes.ratio, r)],
                                               "closed form, uniform")
    for objective in sorted({c.objective for c in configs if c.objective}):
        path = folder / f"plan_{plan_family}_{objective}.json"
        scopes = scope_summary(measure_now(model, batches, population=population,
                                           plan=str(path)))
        out[(plan_family, float(config.frontier_ratio), objective)] = scope_columns(
            scopes, "closed form, planned rows")
    if not out:  # no sketch at all: the sampling variance from any family
        scopes = scope_summary(measure_now(model, batches, ("rows",), (1.0,),
                                           population=population))
        out[("rows", 1.0, None)] = scope_columns(scopes, "closed form, uniform")
    anyone = next(iter(out.values()))
    out[("exact", 1.0, None)] = {**anyone, **{f"var_{w}_{s}": 0.0 for s in SCOPES
                                              for w in ("sketch", "ratio", "sketch_se")},
                                 "var_source": "none (exact)"}
    for c in configs:
        if c.kind == "combined":
            out[c.name] = monte_carlo(model, c, batches, anyone, checkpointed)
        elif c.micro_batches > 1 and c.family != "exact":
            plan = None if c.objective is None else \
                folder / f"plan_{plan_family}_{c.objective}.json"
            out[c.name] = accumulated(model, c, batches, population, anyone, plan)
    return out


def accumulated(model, setup, batches, population: float, sampling: dict,
                plan: Path | None = None) -> dict:
    """NOTE [accumulated variance]: ``setup``'s sketch variance by scope in ``micro_batches``
    micro-batches of each held minibatch (``plan``: the plan.json of a planned setup), over the
    minibatches' sampling variance (``sampling``: closed-form columns of the same minibatches)."""
    from varstudy.accumulation import split
    from varstudy.measure.engine import measure_now
    from varstudy.measure.tables import scope_summary

    micro, held, weights = [], [], []
    for h, batch in enumerate(batches):
        for piece, w in split(batch, setup.micro_batches):
            micro.append(piece)
            held.append(h)
            weights.append(w)
    if plan is None:
        layers = measure_now(model, micro, (setup.family,), (setup.ratio,),
                             population=population)
    else:
        layers = measure_now(model, micro, population=population, plan=str(plan))
    at = layers.batch.to_numpy()
    layers = layers.assign(var_sketch=layers.var_sketch * np.square(weights)[at],
                           batch=np.asarray(held)[at])  # Σ_j w_j² V_j per held minibatch
    by = scope_summary(layers).set_index("scope")
    cols = {}
    for s in SCOPES:
        sk, sa = float(by.loc[s, "var_sketch_mean"]), sampling[f"var_sampling_{s}"]
        cols.update({f"var_sketch_{s}": sk, f"var_sampling_{s}": sa,
                     f"var_ratio_{s}": sk / sa if sa > 0 else math.nan,
                     f"var_sketch_se_{s}": math.nan})
    kind = "uniform" if plan is None else "planned rows"
    return {**cols, "var_source": f"closed form, {kind}, per micro-batch "
                                  f"(m = {setup.micro_batches})"}


def monte_carlo(model, setup, batches, sampling: dict, checkpointed: Callable) -> dict:
    """NOTE [combined variance]: ``setup``'s sketch variance by scope as it runs, by Monte Carlo
    (``sampling``: closed-form columns of the same minibatches, for the sampling variance;
    ``checkpointed(model, setup)``: the block each step runs in)."""
    from varstudy.randomized.capture import mean_loss, select_layers
    from varstudy.randomized.layers import derandomize, randomize
    from varstudy.roles import in_scope

    derandomize(model)
    names = select_layers(model)
    weights = [model.get_submodule(n).weight for n in names]
    was = model.training
    model.eval()
    draws = []  # per minibatch: (MC_DRAWS, layers) squared errors of the weight gradients
    try:
        exact = [torch.autograd.grad(mean_loss(model, b), weights) for b in batches]
        randomize(model, setup.ratio, setup.family, seed=MC_SEED)
        for batch, g in zip(batches, exact):
            errors = []
            for _ in range(MC_DRAWS):
                noisy = _gradient(model, setup, batch, weights, checkpointed)
                errors.append([float((a - b).pow(2).sum()) for a, b in zip(noisy, g)])
            draws.append(np.asarray(errors, dtype=float))
    finally:
        derandomize(model)
        model.train(was)
    cols = {}
    for s in SCOPES:
        sums = np.stack([d[:, [in_scope(n, s) for n in names]].sum(axis=1) for d in draws])
        sk, sa = float(sums.mean()), sampling[f"var_sampling_{s}"]
        cols.update({f"var_sketch_{s}": sk, f"var_sampling_{s}": sa,
                     f"var_ratio_{s}": sk / sa if sa > 0 else math.nan,
                     f"var_sketch_se_{s}": float(np.sqrt(sums.var(axis=1, ddof=1).sum()
                                                         / MC_DRAWS) / len(draws))})
    return {**cols, "var_source": f"monte carlo under {setup.strategy} checkpointing, "
                                  f"{MC_DRAWS} draws per minibatch"}


def _gradient(model, setup, batch, weights, checkpointed: Callable) -> list:
    """∇ of ``batch``'s mean loss w.r.t. ``weights`` as ``setup`` computes it: in its
    checkpointing block, accumulated over its micro-batches (one when it has none)."""
    from varstudy.accumulation import split
    from varstudy.randomized.capture import mean_loss

    total = None
    for micro, w in split(batch, getattr(setup, "micro_batches", 1)):
        with checkpointed(model, setup):
            loss = mean_loss(model, micro)
            grads = torch.autograd.grad(loss if w == 1.0 else loss * w, weights)
        total = list(grads) if total is None else [a + g for a, g in zip(total, grads)]
    return total


def scope_columns(scopes: pd.DataFrame, source: str) -> dict:
    """``var_sketch_``/``var_sampling_``/``var_ratio_<scope>`` from scope_summary rows of one
    sketch."""
    by = scopes.set_index("scope")
    cols = {}
    for s in SCOPES:
        sk, sa = float(by.loc[s, "var_sketch_mean"]), float(by.loc[s, "var_sampling_mean"])
        cols.update({f"var_sketch_{s}": sk, f"var_sampling_{s}": sa,
                     f"var_ratio_{s}": sk / sa if sa > 0 else math.nan,
                     f"var_sketch_se_{s}": math.nan})  # closed form: no Monte Carlo error
    return {**cols, "var_source": source}
