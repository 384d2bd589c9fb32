"""Sketch families: random n × k matrices S with E[S Sᵀ] = I_n, applied along the token axis.

A randomized linear layer stores ``SᵀX`` (k × d_in) instead of X (n × d_in) and estimates the weight
gradient as ``Ĝ = (SᵀY)ᵀ(SᵀX)``, unbiased for ``G = YᵀX`` because E[S Sᵀ] = I (ARCHITECTURE.md).

Every family implements one small protocol (:class:`Sketch`):

* ``sketch(x, k, seed) -> (SᵀX, state)``: applied in forward. ``state`` is a tuple of O(k) tensors
  that the family needs besides the seed to rebuild S (empty for every family except
  ``rows-norm``, whose row probabilities depend on X, which backward no longer has).
* ``apply(a, k, seed, state) -> SᵀA``: applied in backward to Y; it regenerates S from the seed
  (S is never stored).
* ``variance(x, y, k) -> E‖Ĝ − G‖²_F``: the closed form for one minibatch (float64 scalar), and
  ``entry_variance(x, y, k) -> E(Ĝ − G)²`` entrywise (d_out × d_in). A family states its closed
  form once, as ``form(s, a, p, n, k)``; for a family whose S does not depend on X, entry (i, j)
  of Ĝ is the estimator of the one-column problem (x_j, y_i), so the same form at the entrywise
  moments (:func:`entry_moments`) gives its variance.

Randomness comes only from a ``torch.Generator`` seeded with ``seed`` on the tensor's device, and
every family draws in the same order in ``sketch`` and ``apply``, so both see the same S.

Closed forms, with rows x_l of X and y_l of Y, s = ‖X‖²‖Y‖², a = ‖YᵀX‖², p = Σ_l ‖x_l‖²‖y_l‖²:

=============  ==========================================================  =====================
family         S                                                           E‖Ĝ − G‖²_F
=============  ==========================================================  =====================
gaussian       entries N(0, 1/k)                                           (s + a) / k
rademacher     entries ±1/√k                                               (s + a − 2p) / k
countsketch    row l -> one of k buckets, random sign                      (s + a − 2p) / k
srht           √(n'/k)·(H D)ᵀ restricted to k uniform rows, H Hadamard     (s + a − 2p) / k
rows           k uniform rows with replacement, scaled √(n/k)              (n·p − a) / k
rows-wor       k uniform rows without replacement, scaled √(n/k)           (n·p − a)/k · (n−k)/(n−1)
rows-norm      k rows with replacement, P(l) ∝ ‖x_l‖², scaled 1/√(k P(l))   (s − a) / k
=============  ==========================================================  =====================

For ``srht`` the n token rows are zero-padded to n' = 2^⌈log2 n⌉ rows; padding rows are zero in X
and Y, so s, a and p are unchanged. Derivation: E_D Σ_r ‖(HDx)_r‖²‖(HDy)_r‖² = (s + 2a − 2p)/n'
for H with entries ±1/√n', and uniform sampling with replacement adds (n'·that − a)/k. ``rows-wor``
is the finite-population version of ``rows``; at k = n it is a permutation and Ĝ = G exactly.

NOTE [low precision]: for float16/bfloat16 inputs the result SᵀA is in the input's dtype, but the
sums behind it run in float32 (matmul accumulation; countsketch's buckets and srht's transform are
summed in float32) and each result entry is rounded at most twice (dense: product, then 1/√k).
The dense matrix itself is rounded entrywise to the input's dtype; rounding to nearest is odd
(fl(−m) = −fl(m)) and the entries are independent and symmetric, so E[S Sᵀ] stays a multiple
c·I of the identity with |c − 1| ≤ 2u + u² (u the unit roundoff).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from varstudy.errors import VarstudyError

State = tuple[Tensor, ...]


def generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed`` (no host sync, no global RNG)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def draw_rows(weights: Tensor, k: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """k row indices drawn with replacement with probabilities ∝ ``weights`` (n,), by inverse
    CDF in the weights' dtype (fixed shapes, no host sync), and the weights' total (the CDF's
    last entry, which the importance scales divide by). Rows of weight 0 are never drawn."""
    cdf = weights.cumsum(0)
    u = torch.rand(k, generator=gen, device=weights.device, dtype=cdf.dtype) * cdf[-1]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=weights.shape[0] - 1)
    return idx, cdf[-1]


def moments(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three sufficient statistics of the closed forms, in float64.

    Args:
        x: (n, d_in) layer input rows.  y: (n, d_out) output-gradient rows.
    Returns:
        s = ‖X‖²_F ‖Y‖²_F,  a = ‖YᵀX‖²_F,  p = Σ_l ‖x_l‖² ‖y_l‖².
    """
    x, y = x.double(), y.double()
    xn, yn = x.square().sum(1), y.square().sum(1)
    s = xn.sum() * yn.sum()
    a = (y.T @ x).square().sum()
    p = (xn * yn).sum()
    return s, a, p


def entry_moments(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The moments of each one-column problem (x_j, y_i), as (d_out, d_in) float64 matrices.

    s_ij = ‖y_i‖² ‖x_j‖²,  a_ij = G_ij²,  p_ij = Σ_l y_li² x_lj²  (columns x_j of X, y_i of Y).
    """
    x, y = x.double(), y.double()
    s = y.square().sum(0)[:, None] * x.square().sum(0)[None, :]
    a = (y.T @ x).square()
    p = y.square().T @ x.square()
    return s, a, p


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16 (NOTE [low precision]), else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Sketch:
    """Protocol of a sketch family; subclasses set ``name``, ``apply`` and ``form``."""

    name: str = ""
    dense: bool = False  # True when the family materializes an n × k matrix

    def sketch(self, x: Tensor, k: int, seed: int) -> tuple[Tensor, State]:
        """Return ``SᵀX`` of shape (k, d) for x of shape (n, d), and the O(k) state for apply."""
        return self.apply(x, k, seed, ()), ()

    def apply(self, a: Tensor, k: int, seed: int, state: State) -> Tensor:
        """Return ``SᵀA`` (k, d) for a of shape (n, d), with the same S as ``sketch``."""
        raise NotImplementedError

    def form(self, s: Tensor, a: Tensor, p: Tensor, n: int, k: int) -> Tensor:
        """The closed form E‖Ĝ − G‖²_F from the moments s, a, p (see :func:`moments`)."""
        raise NotImplementedError

    def variance(self, x: Tensor, y: Tensor, k: int) -> Tensor:
        """Closed-form E‖Ĝ − G‖²_F for X (n, d_in), Y (n, d_out) and k rows; float64 scalar."""
        return self.form(*moments(x, y), x.shape[0], k)

    def entry_variance(self, x: Tensor, y: Tensor, k: int) -> Tensor:
        """Closed-form E(Ĝ_ij − G_ij)², (d_out, d_in) float64; sums to ``variance``."""
        return self.form(*entry_moments(x, y), x.shape[0], k)

    def apply_in_backward(self, a: Tensor, k: int, seed: int, state: State) -> Tensor:
        """``apply`` as called from a layer's backward (may reuse work within one pass)."""
        return self.apply(a, k, seed, state)

    def release(self) -> None:
        """Drop anything kept by ``apply_in_backward`` (called when a backward pass ends)."""

    def estimate(self, x: Tensor, y: Tensor, k: int, seed: int) -> Tensor:
        """One draw of Ĝ = (SᵀY)ᵀ(SᵀX), shape (d_out, d_in): what the layer's backward returns."""
        sx, state = self.sketch(x, k, seed)
        return self.apply(y, k, seed, state).T @ sx

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Dense(Sketch):
    """Families with a dense n × k matrix S = M / √k, M drawn entrywise from the seed.

    NOTE [reuse in backward]: Q, K and V share one seed, so their backward passes ask for the
    same M one after another. ``apply_in_backward`` keeps the last M (one entry) and reuses it
    for the same (seed, n, k, device, dtype); ``release`` drops it, and RandomizedLinear queues a
    release at the end of every backward pass, so no matrix outlives the pass.
    """

    dense = True

    def __init__(self) -> None:
        self._last = None

    def draw(self, n: int, k: int, gen: torch.Generator, device) -> Tensor:
        raise NotImplementedError

    def _matrix(self, a: Tensor, k: int, seed: int) -> Tensor:
        gen = generator(seed, a.device)
        return self.draw(a.shape[0], k, gen, a.device).to(a.dtype)

    def apply(self, a, k, seed, state):
        return (self._matrix(a, k, seed).T @ a) * (1.0 / math.sqrt(k))

    def apply_in_backward(self, a, k, seed, state):
        key = (seed, a.shape[0], k, a.device, a.dtype)
        last = self._last
        if last is None or last[0] != key:
            last = self._last = (key, self._matrix(a, k, seed))
        return (last[1].T @ a) * (1.0 / math.sqrt(k))

    def release(self) -> None:
        self._last = None


class Gaussian(_Dense):
    """Dense S with N(0, 1/k) entries (``gaussian``)."""
    name = "gaussian"

    def draw(self, n, k, gen, device):
        """The n × k matrix S from ``gen`` on ``device``."""
        return torch.randn(n, k, generator=gen, device=device)

    def form(self, s, a, p, n, k):
        return (s + a) / k


class Rademacher(_Dense):
    """Dense S with ±1/√k entries (``rademacher``)."""
    name = "rademacher"

    def draw(self, n, k, gen, device):
        """The n × k matrix S from ``gen`` on ``device``."""
        bits = torch.randint(0, 2, (n, k), generator=gen, device=device, dtype=torch.int8)
        return bits * 2 - 1

    def form(self, s, a, p, n, k):
        return (s + a - 2 * p) / k


class CountSketch(Sketch):
    """Each row to one of k buckets with a random sign (``countsketch``)."""
    name = "countsketch"

    def apply(self, a, k, seed, state):
        gen = generator(seed, a.device)
        bucket = torch.randint(0, k, (a.shape[0],), generator=gen, device=a.device)
        sign = torch.randint(0, 2, (a.shape[0], 1), generator=gen, device=a.device)
        acc = _acc_dtype(a.dtype)
        signed = a.to(acc) * (sign.to(acc) * 2 - 1)
        return a.new_zeros(k, a.shape[1], dtype=acc).index_add_(0, bucket, signed).to(a.dtype)

    def form(self, s, a, p, n, k):
        return (s + a - 2 * p) / k


class Rows(Sketch):
    """k uniform rows with replacement, scaled √(n/k) (``rows``)."""
    name = "rows"

    def apply(self, a, k, seed, state):
        n = a.shape[0]
        idx = torch.randint(0, n, (k,), generator=generator(seed, a.device), device=a.device)
        return a[idx] * math.sqrt(n / k)

    def form(self, s, a, p, n, k):
        return (n * p - a) / k


class RowsWithoutReplacement(Sketch):
    """k uniform rows without replacement, scaled √(n/k) (``rows-wor``)."""
    name = "rows-wor"

    def apply(self, a, k, seed, state):
        n = a.shape[0]
        idx = torch.randperm(n, generator=generator(seed, a.device), device=a.device)[:k]
        return a[idx] * math.sqrt(n / k)

    def form(self, s, a, p, n, k):
        fpc = (n - k) / (n - 1) if n > 1 else 0.0
        return (n * p - a) / k * fpc


class RowsNorm(Sketch):
    """Rows drawn with probability ∝ ‖x_l‖², from X alone, so it is usable in forward.

    X is gone in backward, so the k drawn indices and their scales (O(k)) are kept as state.
    An all-zero X falls back to uniform probabilities (its gradient is zero either way).
    """

    name = "rows-norm"

    def sketch(self, x, k, seed):
        w = x.detach().float().square().sum(1)
        w = w + (w.sum() == 0).float()  # uniform fallback without a host sync
        idx, total = draw_rows(w, k, generator(seed, x.device))
        scale = (k * w[idx] / total).rsqrt()
        state = (idx, scale)
        return self.apply(x, k, seed, state), state

    def apply(self, a, k, seed, state):
        idx, scale = state
        acc = _acc_dtype(a.dtype)
        return (a[idx].to(acc) * scale.to(acc)[:, None]).to(a.dtype)

    def form(self, s, a, p, n, k):
        return (s - a) / k

    def entry_variance(self, x, y, k):
        """S depends on X: (Σ_l (y_li x_lj)² / P(l) − G_ij²) / k with P(l) = ‖x_l‖² / ‖X‖²."""
        x, y = x.double(), y.double()
        w = x.square().sum(1)
        inv = torch.where(w > 0, w.sum() / w, torch.zeros_like(w))  # 1/P(l); zero rows add 0
        second = (y.square() * inv[:, None]).T @ x.square()
        return (second - (y.T @ x).square()) / k


def fwht(a: Tensor) -> Tensor:
    """Orthonormal fast Walsh–Hadamard transform along dim 0 of a (m, d), m a power of two."""
    m, d = a.shape
    h = 1
    while h < m:
        pairs = a.reshape(m // (2 * h), 2, h, d)
        a = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1)
        h *= 2
    return a.reshape(m, d) * (1.0 / math.sqrt(m))


class SRHT(Sketch):
    """Subsampled randomized Hadamard transform: signs D, orthonormal Hadamard H, k rows."""

    name = "srht"

    def apply(self, a, k, seed, state):
        n = a.shape[0]
        m = 1 << max(n - 1, 0).bit_length()
        gen = generator(seed, a.device)
        sign = torch.randint(0, 2, (n, 1), generator=gen, device=a.device)
        idx = torch.randint(0, m, (k,), generator=gen, device=a.device)
        acc = _acc_dtype(a.dtype)
        signed = a.to(acc) * (sign.to(acc) * 2 - 1)
        if m > n:
            signed = torch.cat((signed, signed.new_zeros(m - n, a.shape[1])))
        return (fwht(signed)[idx] * math.sqrt(m / k)).to(a.dtype)

    def form(self, s, a, p, n, k):
        return (s + a - 2 * p) / k


class RowsReal(Sketch):
    """Uniform rows with replacement among the real (non-padding) token rows only.

    NOTE [real rows]: in an encoder classifier with masked attention the padding rows of every
    encoder linear have Y = 0 exactly (no path from a padding position to the loss), so
    G = Σ_{real l} y_l x_lᵀ and drawing the k rows among the m real ones only is unbiased:
    Ĝ = (m/k) Σ_{drawn} y_l x_lᵀ with variance (m·p − a)/k (p, a as for ``rows``, which sums over
    all n rows). At equal k this spends the stored rows where the gradient is, a factor
    ≈ m/n less variance than ``rows``. The mask comes from the model's ``attention_mask``
    (:class:`varstudy.randomized.layers.RowMask`); without a mask (or for layers whose rows are
    not tokens, the pooler and the classifier) every row is real and the family is ``rows``.
    The drawn indices and scales (O(k)) are kept as state, as for rows-norm.
    """

    name = "rows-real"
    uses_mask = True
    replace = True

    def sketch(self, x, k, seed, mask=None):
        w = _row_weights(x, mask)
        gen = generator(seed, x.device)
        if self.replace:
            idx, total = draw_rows(w, k, gen)
            scale = (total / k).sqrt().expand(k)
        else:  # Gumbel top-k: k rows without replacement, real rows first (NOTE [real rows])
            g = -torch.empty(x.shape[0], device=x.device).exponential_(generator=gen).log()
            idx = torch.topk(w.log() + g, k).indices
            scale = (w.sum() / w.sum().clamp(max=k)).sqrt().expand(k)
        state = (idx, scale)
        return self.apply(x, k, seed, state), state

    apply = RowsNorm.apply

    def form(self, s, a, p, n, k):
        return (n * p - a) / k

    def variance(self, x, y, k, mask=None):
        return self.form(*moments(x, y), real_rows(x, mask), k)

    def entry_variance(self, x, y, k, mask=None):
        return self.form(*entry_moments(x, y), real_rows(x, mask), k)

    def estimate(self, x, y, k, seed, mask=None):
        sx, state = self.sketch(x, k, seed, mask)
        return self.apply(y, k, seed, state).T @ sx


class RowsWorReal(RowsReal):
    """``rows-real`` without replacement: k' = min(k, m) distinct real rows, scaled √(m/k');
    variance (m·p − a)/k' · (m − k')/(m − 1) (NOTE [real rows])."""

    name = "rows-wor-real"
    replace = False

    def form(self, s, a, p, n, k):
        k = min(k, n)
        fpc = (n - k) / (n - 1) if n > 1 else 0.0
        return (n * p - a) / k * fpc


def _row_weights(x: Tensor, mask: Tensor | None) -> Tensor:
    """1 for a real row, 0 for padding (all ones without a mask), float32 on x's device."""
    if mask is None or mask.numel() != x.shape[0]:
        return torch.ones(x.shape[0], device=x.device)
    return mask.reshape(-1).to(device=x.device, dtype=torch.float32)


def real_rows(x: Tensor, mask: Tensor | None) -> int:
    """m, the real rows of x (n, d) under ``mask`` (n of them without one)."""
    return int(_row_weights(x, mask).sum().item()) if mask is not None else int(x.shape[0])


SKETCHES: dict[str, Sketch] = {
    cls.name: cls()
    for cls in (Gaussian, Rademacher, CountSketch, SRHT, Rows, RowsWithoutReplacement, RowsNorm,
                RowsReal, RowsWorReal)
}




def register(sketch: Sketch) -> None:
    """Add a family defined in another module to SKETCHES, keeping the registry in the order of
    ``varstudy.names.SKETCH_NAMES`` whatever order the modules are imported in."""
    from varstudy.names import SKETCH_NAMES

    SKETCHES[sketch.name] = sketch
    rank = {name: i for i, name in enumerate(SKETCH_NAMES)}
    ordered = sorted(SKETCHES.items(), key=lambda item: rank.get(item[0], len(rank)))
    SKETCHES.clear()
    SKETCHES.update(ordered)


# rows-live, rows-adaptive and wta-crs build on the classes above and register themselves.
import varstudy.randomized.informed  # noqa: E402,F401
import varstudy.randomized.wtacrs  # noqa: E402,F401


def get_sketch(name: str | Sketch) -> Sketch:
    """The registered family called ``name`` (a Sketch instance passes through)."""
    if isinstance(name, Sketch):
        return name
    try:
        return SKETCHES[name]
    except (KeyError, TypeError):
        raise VarstudyError(
            f"unknown sketch {name!r}; valid choices: {', '.join(SKETCHES)}") from None


def rows_for(n: int, ratio: float, min_rows: int = 1) -> int:
    """k = clamp(round(ratio · n), min_rows, n): the number of sketch rows for n token rows."""
    return max(min(int(round(ratio * n)), n), min(min_rows, n), 1)
