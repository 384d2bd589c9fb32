"""The engine's side of the samplers that know where the gradient is (issue "Samplers that know
where the gradient is"): the limit columns, and the variance of ``rows-live`` and ``rows-adaptive``.

* The limit (:mod:`varstudy.randomized.limit`), per layer and k, beside every family:
  ``var_limit`` (optimal importance sampling with replacement, q ∝ ‖x_l‖‖y_l‖),
  ``var_limit_split`` (the best "largest rows exact + the rest sampled" split) and
  ``rows_y_zero`` (rows whose output gradient is exactly 0). NOTE [a bound, not a sampler]: they
  need Y, which no sampler has when it chooses the rows.
* ``rows-live`` / ``rows-adaptive`` (:mod:`varstudy.randomized.informed`) need the layer's live
  rows (the attention mask, and the first-token layers the one-time probe finds: NOTE
  [first-token layers] in :mod:`varstudy.randomized.support`) and, for ``rows-adaptive``, the
  per-position profile ȳ of ‖y_l‖ that a training run's layer would hold.

NOTE [adaptive profile in a measurement]: a measurement holds the weights fixed, so the profile a
training run accumulates over earlier steps is taken from minibatches other than the one
measured: ``measure`` draws :data:`WARM_BATCHES` extra minibatches per measured step (their own
seeds, never measured) and uses the per-position mean of ‖y_l‖ over their real rows;
``measure_now`` (the Trainer callback) uses the other held minibatches (leave one out). Either way
the probabilities never see the Y they are scored on, as in training.

NOTE [wta-crs in a measurement]: ``wta-crs`` (:mod:`varstudy.randomized.wtacrs`) draws from a
per-example cache of earlier visits; ``--wtacrs-cache`` says what that cache holds for the
measured minibatch. ``first-visit``: nothing (step 0 and every step of the first epoch: q ∝
‖x_l‖). ``previous-visit``: each example's row norms of Y at the measured weights, rounded to
bfloat16 as the cache stores them: a later epoch when the model has moved little since the
example's last visit, the cache's best case. With ``--wtacrs-cache-model M`` the cache holds
the row norms of Y that model M (an earlier checkpoint of the measured model) gives on the same
minibatch, with the same dropout masks: a *stale* cache, as in a later epoch of a model that
has moved since the example's last visit. Its variance is the conditional closed form (wta)
given that cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from varstudy.errors import VarstudyError
from varstudy.randomized.informed import RowsAdaptive, RowStats, first_token_live
from varstudy.randomized.limit import limits, zero_gradient_rows
from varstudy.randomized.sketches import SKETCHES

WARM_BATCHES = 4
STRUCTURE_FAMILIES = tuple(n for n, s in SKETCHES.items() if getattr(s, "uses_structure", False))


@dataclass
class Informed:
    """What the structure-aware families need beyond one layer's (X, Y).

    first_token: the first-token layers (probe).  profiles: layer -> (L,) ȳ for rows-adaptive,
    or None for a layer without one (uniform over its live rows).
    """

    first_token: frozenset = frozenset()
    profiles: dict = field(default_factory=dict)
    cache_norms: dict = field(default_factory=dict)  # layer -> (n,) ‖y_l‖ of --wtacrs-cache-model


def wanted(families) -> bool:
    """Whether ``families`` holds a structure-aware family (rows-live, rows-adaptive)."""
    return any(f in STRUCTURE_FAMILIES for f in families)


def live_rows(name: str, x: Tensor, y: Tensor, mask, informed: Informed) -> Tensor:
    """(B, L) live mask of a token layer (real, and position 0 in a first-token layer), (1, n)
    for a layer whose rows are examples. A first-token layer's Y must be exactly 0 past position
    0, or the structure-aware families would be biased: checked here."""
    if x.dim() != 3:
        return torch.ones(1, x.shape[0], device=x.device)
    live = (mask.to(x.device, torch.float32) if mask is not None
            and tuple(mask.shape) == tuple(x.shape[:2]) else torch.ones(x.shape[:2],
                                                                          device=x.device))
    if name in informed.first_token:
        if bool((y[:, 1:] != 0).any()):
            raise VarstudyError(f"layer {name} was probed as first-token only but has a non-zero "
                                "output gradient past the first token; valid choices: the other "
                                "families, or a model whose loss reads the first token only")
        live = first_token_live(live)
    return live


def limit_columns(x: Tensor, y: Tensor, grad, ks) -> dict[int, dict]:
    """{k: {var_limit, var_limit_split, rows_y_zero}} for one layer (x, y as captured)."""
    zeros = zero_gradient_rows(y)
    xf, yf = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    ks = sorted(set(ks))
    return {k: dict(var_limit=lim.opt, var_limit_split=lim.split, rows_y_zero=zeros)
            for k, lim in zip(ks, limits(xf, yf, ks, grad))}


def wtacrs_sketch(cache: str, x: Tensor, y: Tensor, norms: Tensor | None = None):
    """The ``wta-crs`` sampler a minibatch (x, y) meets under ``cache`` (NOTE [wta-crs in a
    measurement]), with its prior fixed: under ``previous-visit`` the row norms of ``y``, or
    ``norms`` (n,) where the cache came from another model."""
    from varstudy.randomized.wtacrs import WtaCrs

    if cache == "first-visit":
        prior = torch.ones(x.reshape(-1, x.shape[-1]).shape[0], device=x.device)
    else:
        if norms is None:
            norms = _row_norms(y)
        prior = norms.to(x.device, torch.float32).bfloat16().float()
    return WtaCrs(prior=prior)


def cache_norms(cap, names) -> dict:
    """layer -> (n,) float32 row norms of the output gradient in a capture of the cache model
    (NOTE [wta-crs in a measurement])."""
    return {n: _row_norms(cap.layers[n][1]) for n in names}


def _row_norms(y: Tensor) -> Tensor:
    """(n,) float32 norms of the rows of y (..., d_out)."""
    return y.reshape(-1, y.shape[-1]).float().norm(dim=1)


def structured(fam: str, name: str, m, k: int, x: Tensor, y: Tensor, live: Tensor,
               informed: Informed):
    """(variance, stored rows, sketch instance for Monte Carlo, variance with one sampled row)
    of a structure-aware family at nominal k: a first-token layer with B <= k stores its B live
    rows exactly. The last is the family's constant c of the batch (rows-live: V = c·(m/k' −
    1)/(m − 1); rows-adaptive: V = c/k), also where the layer stores its rows exactly: what
    ``python -m varstudy.plan`` models V(k) from (column ``var_sketch_one_row``)."""
    import dataclasses

    from varstudy.randomized import variance as V

    exact = name in informed.first_token and x.dim() == 3 and x.shape[0] <= k
    xf, yf = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if fam == "rows-live":
        mm = dataclasses.replace(m, real=int(live.sum()))
        one = V.closed_form("rows-live", mm, 1)
        if exact:
            return 0.0, x.shape[0], SKETCHES["rows-live"], one
        return V.closed_form("rows-live", mm, k), k, SKETCHES["rows-live"], one
    sketch = RowsAdaptive(stats=profile_stats(informed.profiles.get(name)))
    one = float(sketch.variance(xf, yf, 1, live))
    if exact:
        return 0.0, x.shape[0], SKETCHES["rows-live"], one
    return float(sketch.variance(xf, yf, k, live)), k, sketch, one


def profile_stats(profile: Tensor | None) -> RowStats:
    """A RowStats that holds ``profile`` (L,) as its per-position mean (None: empty)."""
    stats = RowStats()
    if profile is not None:
        stats.mean = profile.float().clone()
        stats.seen = torch.ones_like(stats.mean, dtype=torch.bool)
    return stats


def profiles(captures: list, names: list[str], masks: list, informed: Informed) -> dict:
    """layer -> (L_max,) mean ‖y_l‖ per position over the real (live) rows of ``captures``
    (a list of varstudy.randomized.capture.Captured) with their attention ``masks``."""
    out = {}
    for name in names:
        total = count = None
        for cap, mask in zip(captures, masks):
            x, y = cap.layers[name]
            if x.dim() != 3:
                break
            live = live_rows(name, x, y, mask, informed)
            norms = y.float().norm(dim=-1) * live
            total, count = _grow_add(total, norms.sum(0)), _grow_add(count, live.sum(0))
        if total is not None:
            out[name] = torch.where(count > 0, total / count.clamp(min=1),
                                    (total.sum() / count.sum().clamp(min=1)).expand_as(total))
    return out


def _grow_add(acc: Tensor | None, v: Tensor) -> Tensor:
    if acc is None:
        return v.clone()
    if acc.shape[0] < v.shape[0]:
        acc, v = v.clone(), acc
    acc[:v.shape[0]] += v
    return acc
