"""``wta-crs``: the field's anchor sampler (WTA-CRS, Liu et al., NeurIPS 2023), unbiased.

WTA-CRS chooses a linear layer's stored token rows with probability ∝ ‖x_l‖ · c_l, where c_l is
the norm of the same example's output-gradient row at the same position *the last time that
example was trained on*: a per-example cache keyed by dataset index, one per layer, kept in host
memory (bfloat16, N examples × L positions, so it grows with the dataset). The public code
(PAPERS.md; zirui-ray-liu/WTACRS, ``seq2seq/approxlinear``) then keeps a deterministic top part
and samples the rest with replacement. This family follows it, with three changes that make the
estimator unbiased (NOTE [WTA-CRS, unbiased]); given the minibatch and the cache, with
q_l = (h_l + δ) / Σ (h + δ), h_l = ‖x_l‖ · c_l:

* top part: the c rows with the largest q, stored exactly, c ∈ {0, …, k − 1} minimizing
  (1 − P_c)/(k − c), P_c their total probability (c = 0 gives 1/k: no top part). This is the
  public code's adaptive rule;
* remainder: k − c rows with replacement from r_l = q_l / (1 − P_c) over the other rows, each
  scaled 1/√((k − c) r_l).

So Ĝ = Σ_top y_l x_lᵀ + (1/(k − c)) Σ_draws y_l x_lᵀ / r_l, unbiased for any q > 0, with
conditional variance

    V = (Σ_rest ‖x_l‖²‖y_l‖² / r_l − ‖G_rest‖²) / (k − c),      G_rest = Σ_rest y_l x_lᵀ.   (wta)

NOTE [WTA-CRS, unbiased]: what differs from the public code, and why.

1. First visit. Before an example has been seen its cache is zero; the public code then draws
   ∝ ‖x_l‖ but scales the drawn rows by (1 − P_c) only, without the 1/((k − c) r_l) importance
   weight, so its first-epoch estimate is biased. Here the first visit draws ∝ ‖x_l‖ (c_l = 1 for
   every row of a minibatch with no example seen) with the importance weight. In a minibatch that
   mixes seen and unseen examples, an unseen example's rows get c_l = the mean of the positive
   cached norms of the seen ones (the public code would give them c_l = 0, a probability of
   nearly zero).
2. No top part. With ``mix_replacement`` the public code samples without replacement when c = 0
   and keeps the rows unscaled (biased); here c = 0 is plain importance sampling with
   replacement, the (wta) form with c = 0.
3. A top part holding almost all of the probability (P_c > 1 − 10⁻³) makes the public code drop
   the remainder (biased by the rows it drops); here the remainder is always sampled.

δ = 10⁻⁸ · mean(h) keeps every row's probability positive (the public code adds 10⁻⁸ in absolute
terms), which is what unbiasedness needs where a cached norm is 0 but the current one is not. The
cache stores the norm of every row, padding included, as the public code does; padding rows
have y = 0 in an encoder classifier, so after one visit their probability is δ-small.

The minibatch's dataset indices must be known in forward: :func:`set_examples` puts them on the
model before each forward call (``finetune`` does it; a custom loop must too). The drawn indices,
their scales and the minibatch's dataset indices are kept for backward (O(k + B)); backward writes
the new norms into the cache (without indices a draw is a first visit and caches nothing). The
cache is host memory, not activation memory:
:func:`cache_bytes` reports it.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from varstudy.errors import VarstudyError
from varstudy.randomized.sketches import RowsNorm, Sketch, draw_rows, generator, register

FLOOR = 1e-8  # δ relative to the mean of h (NOTE [WTA-CRS, unbiased])
_ATTR = "_varstudy_examples"


class Examples:
    """The dataset indices (B,) of the minibatch in the model's forward call in progress."""

    def __init__(self) -> None:
        self.ids: Tensor | None = None


def install(model: nn.Module) -> Examples:
    """The model's Examples holder, created on first use (not a submodule, not in state_dict)."""
    holder = getattr(model, _ATTR, None)
    if holder is None:
        holder = Examples()
        object.__setattr__(model, _ATTR, holder)
    return holder


def set_examples(model: nn.Module, ids) -> None:
    """Tell the ``wta-crs`` layers of ``model`` which dataset examples the next forward call
    holds: ``ids`` (B,) integer indices into the training set, in the minibatch's order."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or bool((ids < 0).any()):
        raise VarstudyError(f"example ids must be a 1-D tensor of non-negative integer dataset "
                            f"indices, got shape {tuple(ids.shape)} dtype {ids.dtype}")
    install(model).ids = ids.detach().to("cpu", torch.int64)


class NormCache:
    """One layer's cached output-gradient row norms: (N, L) bfloat16 on the host, and which
    examples have been seen; both grow to the largest index and length met."""

    def __init__(self) -> None:
        self.norms = torch.zeros(0, 0, dtype=torch.bfloat16)
        self.seen = torch.zeros(0, dtype=torch.bool)

    def fetch(self, ids: Tensor, length: int, device) -> tuple[Tensor, Tensor]:
        """(cached (B, length) float32, seen (B,) bool) on ``device``; unknown entries 0/False."""
        cached = torch.zeros(len(ids), length)
        seen = torch.zeros(len(ids), dtype=torch.bool)
        known = ids < self.norms.shape[0]
        if bool(known.any()):
            width = min(length, self.norms.shape[1])
            cached[known, :width] = self.norms[ids[known], :width].float()
            seen[known] = self.seen[ids[known]]
        return cached.to(device), seen.to(device)

    def update(self, ids: Tensor, norms: Tensor) -> None:
        """Store ``norms`` (B, L) as the examples ``ids``' latest visit."""
        rows, length = int(ids.max()) + 1, norms.shape[1]
        if rows > self.norms.shape[0] or length > self.norms.shape[1]:
            grown = torch.zeros(max(rows, self.norms.shape[0]), max(length, self.norms.shape[1]),
                                dtype=torch.bfloat16)
            grown[:self.norms.shape[0], :self.norms.shape[1]] = self.norms
            seen = torch.zeros(grown.shape[0], dtype=torch.bool)
            seen[:self.seen.shape[0]] = self.seen
            self.norms, self.seen = grown, seen
        self.norms[ids, :length] = norms.detach().to("cpu", torch.bfloat16)
        self.norms[ids, length:] = 0
        self.seen[ids] = True

    @property
    def bytes(self) -> int:
        """Host bytes held by the norms and the seen flags."""
        return self.norms.numel() * self.norms.element_size() + self.seen.numel()

    def state_dict(self) -> dict:
        """The norms and the seen flags (tensors only: a checkpoint loads with weights_only=True)."""
        return {"norms": self.norms, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s tensors (anything else leaves the cache as it is)."""
        norms, seen = state.get("norms"), state.get("seen")
        if isinstance(norms, Tensor) and isinstance(seen, Tensor) and norms.dim() == 2 \
                and seen.shape == norms.shape[:1]:
            self.norms, self.seen = norms.to(torch.bfloat16), seen.to(torch.bool)


def prior_norms(cached: Tensor, seen: Tensor) -> Tensor:
    """c (B, L) of the module docstring from the cached norms and the seen flags: the cache for
    seen examples; for unseen ones the mean positive cached norm of the seen ones, or 1 for every
    row when none is seen (a first visit draws ∝ ‖x_l‖)."""
    cached = cached.to(torch.float64)
    seen_rows = seen[:, None].expand_as(cached)
    positive = seen_rows & (cached > 0)
    fill = (cached * positive).sum() / positive.sum().clamp(min=1)
    fill = torch.where(positive.any(), fill, torch.ones_like(fill))
    return torch.where(seen_rows, cached, fill)


def probabilities(x: Tensor, prior: Tensor) -> Tensor:
    """q (n,) float64 from rows x (n, d) and the prior c (n,) (module docstring)."""
    h = x.detach().to(torch.float64).norm(dim=1) * prior.reshape(-1).to(torch.float64)
    h = h + FLOOR * h.mean() + 1e-300
    return h / h.sum()


def top_count(q: Tensor, k: int) -> Tensor:
    """c ∈ {0, …, k − 1} minimizing (1 − P_c)/(k − c) (the public code's adaptive rule), as a
    0-d tensor on q's device (no host sync)."""
    k = min(k, q.shape[0])
    top = q.topk(k).values
    mass = torch.cat((top.new_zeros(1), top.cumsum(0)[:-1]))  # P_0 .. P_{k-1}
    score = (1 - mass).clamp(min=0) / (k - torch.arange(k, device=q.device, dtype=q.dtype))
    return score.argmin()


def split(q: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(order: the k largest q's indices, largest first; c; in_top (n,) bool; the residual
    r (n,) = q/(1 − P_c) off the top part, 0 on it), k ≤ n."""
    c = top_count(q, k)
    order = q.topk(k).indices
    in_top = torch.zeros_like(q, dtype=torch.bool)
    in_top[order] = torch.arange(k, device=q.device) < c
    rest = torch.where(in_top, torch.zeros_like(q), q)
    return order, c, in_top, rest / rest.sum()


def draw(q: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """(indices (k,), scales (k,) float32): the top c rows with scale 1, then k − c draws from
    the residual with scale 1/√((k − c) r_l). Fixed shapes, no host sync."""
    k = min(k, q.shape[0])
    top_idx, c, _, r = split(q, k)
    drawn, _ = draw_rows(r, k, generator(seed, q.device))
    slot = torch.arange(k, device=q.device)
    is_top = slot < c
    idx = torch.where(is_top, top_idx, drawn)
    remaining = (k - c).clamp(min=1).to(torch.float64)
    scale = torch.where(is_top, torch.ones_like(r[idx]), (1.0 / (remaining * r[idx])).sqrt())
    return idx, scale.to(torch.float32)


def conditional_variance(x: Tensor, y: Tensor, q: Tensor, k: int, entrywise: bool = False
                         ) -> Tensor:
    """(wta): E‖Ĝ − G‖²_F given the minibatch and q (float64 scalar), or entrywise
    E(Ĝ_ij − G_ij)² (d_out, d_in), which sums to it."""
    k = min(k, q.shape[0])
    _, c, in_top, r = split(q, k)
    rest = ~in_top
    xd, yd = x.detach().double()[rest], y.detach().double()[rest]
    if entrywise:
        second = (yd.square() / r[rest, None]).T @ xd.square()
        return (second - (yd.T @ xd).square()) / (k - c).clamp(min=1)
    second = (xd.square().sum(1) * yd.square().sum(1) / r[rest]).sum()
    return (second - (yd.T @ xd).square().sum()) / (k - c).clamp(min=1)


class WtaCrs(Sketch):
    """WTA-CRS rows (module docstring). A layer's instance (:meth:`for_layer`) owns its cache and
    reads the minibatch's dataset indices from the model (:func:`set_examples`); an instance
    built with ``prior`` (c, (n,)) uses that instead (the measure engine, tests). Without either
    (the registry's instance, a layer built by hand, a loop that never calls set_examples: it
    warns once) every draw is a first visit, q ∝ ‖x_l‖, and nothing is cached."""

    name = "wta-crs"
    uses_examples = True

    def __init__(self, prior: Tensor | None = None) -> None:
        self.stats = NormCache()  # named as rows-adaptive's: checkpoints save it
        self.examples: Examples | None = None
        self.prior, self.warned = prior, False

    def for_layer(self) -> "WtaCrs":
        """A fresh instance with its own cache, for one layer."""
        return WtaCrs()

    def _ids(self, n: int) -> Tensor | None:
        """The minibatch's dataset indices, or None (then the draw is a first visit)."""
        ids = None if self.examples is None else self.examples.ids
        if ids is None:
            if self.examples is not None and not self.warned:
                self.warned = True
                warnings.warn("a wta-crs layer got no example ids: it draws as on a first visit "
                              "(q ∝ ‖x_l‖) and caches nothing; call "
                              "varstudy.randomized.wtacrs.set_examples(model, ids) before every "
                              "forward call (finetune does)", stacklevel=4)
            return None
        if n % len(ids):
            raise VarstudyError(f"a wta-crs layer got {n} rows for {len(ids)} example ids; valid "
                                "choices: inputs (B, L, d) or (B, d) with B the minibatch size")
        return ids

    def _prior(self, x: Tensor) -> Tensor:
        """c (n,): the fixed prior, else ones (a first visit, NOTE [WTA-CRS, unbiased])."""
        if self.prior is not None:
            return self.prior
        return torch.ones(x.shape[0], device=x.device)

    def sketch(self, x, k, seed):
        ids = None if self.prior is not None else self._ids(x.shape[0])
        if ids is None:
            q, state = probabilities(x, self._prior(x)), ()
        else:
            cached, seen = self.stats.fetch(ids, x.shape[0] // len(ids), x.device)
            q, state = probabilities(x, prior_norms(cached, seen)), (ids,)
        idx, scale = draw(q, k, seed)
        state = (idx, scale, *state)
        return self.apply(x, k, seed, state), state

    def apply(self, a, k, seed, state):
        return RowsNorm.apply(self, a, k, seed, state[:2])

    def apply_in_backward(self, a, k, seed, state):
        if len(state) > 2:  # a layer's instance: this visit's norms become the cache
            ids = state[2]
            self.stats.update(ids, a.detach().float().norm(dim=1).reshape(len(ids), -1))
        return self.apply(a, k, seed, state)

    def variance(self, x, y, k):
        """(wta) at this instance's prior (none: a first visit), float64."""
        return conditional_variance(x, y, probabilities(x, self._prior(x)), k)

    def entry_variance(self, x, y, k):
        return conditional_variance(x, y, probabilities(x, self._prior(x)), k, entrywise=True)

    def estimate(self, x, y, k, seed):
        sx, state = self.sketch(x, k, seed)
        return self.apply(y, k, seed, state).T @ sx


def cache_bytes(model: nn.Module) -> int:
    """Host bytes held by the ``wta-crs`` caches of ``model``'s layers."""
    return sum(m.sketch.stats.bytes for m in model.modules()
               if isinstance(getattr(m, "sketch", None), WtaCrs))


register(WtaCrs())
