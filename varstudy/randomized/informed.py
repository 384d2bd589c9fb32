"""Row samplers that know where the gradient is: ``rows-live`` and ``rows-adaptive``.

Every row family before these chooses the stored rows without regard to where the gradient
lands. The best unbiased row sampler draws q_l ∝ ‖x_l‖·‖y_l‖ (:mod:`varstudy.randomized.limit`),
which needs Y, unknown in the forward pass. Two realizable steps towards it, both using only
what the forward pass and earlier backward passes know:

* ``rows-live``: k rows without replacement, uniform among the *live* rows: real (not padding,
  NOTE [real rows] in sketches) and, in a layer that the one-time probe found to carry gradient
  on the first token only (NOTE [first-token layers] in :mod:`varstudy.randomized.support`), at
  position 0. Such a layer has m = B live rows and stores them exactly when B ≤ k (no variance,
  B rows instead of k). Variance (m·p − a)/k' · (m − k')/(m − 1), k' = min(k, m): the
  ``rows-wor-real`` form over the live rows.
* ``rows-adaptive``: k rows with replacement among the live rows with

      q_l = (1 − ε)·h_l / Σ h + ε / m,   h_l = ‖x_l‖ · ȳ(pos_l),                    (adaptive)

  where ȳ(t) is the layer's running mean of ‖y_l‖ at token position t over earlier backward
  passes (:class:`RowStats`: real rows only, an exponential average per position), each drawn
  row scaled 1/√(k q_l). Before any backward pass (no ȳ) q is uniform over the live rows. Its
  variance given the minibatch is the importance-sampling form

      V = (Σ_live ‖x_l‖²‖y_l‖² / q_l − ‖G‖²) / k,

  unbiased for any q that is positive on every row with y_l ≠ 0. NOTE [defensive mixture]: the
  ε/m share (ε = 0.2) keeps q_l ≥ ε/m on every live row, so the second moment Σ p_l/q_l is at
  most m·p/ε: V ≤ (m·p/ε − a)/k, never more than 1/ε = 5 times rows-real's second-moment term
  m·p, whatever the proxy gets wrong. A first-token layer stores its B rows exactly when B ≤ k,
  as ``rows-live`` does.

Both keep their drawn indices and scales as state (O(k), as rows-real). A layer's ``rows-adaptive``
statistics live in its own sketch instance (:meth:`RowsAdaptive.for_layer`); sibling layers that
share one stored sample (Q, K, V: NOTE [shared sketches] in layers) use the probabilities of the
layer that drew it, which is still unbiased for each of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from varstudy.randomized.sketches import (RowsNorm, RowsWorReal, Sketch, draw_rows, generator,
                                          register)

EPSILON = 0.2   # NOTE [defensive mixture]
DECAY = 0.9     # weight of the past in RowStats' per-position average


class RowStats:
    """A layer's running mean of ‖y_l‖ per token position (real rows only), on its device.

    ``mean`` (L,) and ``seen`` (L,) bool grow to the longest sequence met; no host sync.
    """

    def __init__(self, decay: float = DECAY) -> None:
        self.decay = decay
        self.mean: Tensor | None = None
        self.seen: Tensor | None = None

    def update(self, y_norms: Tensor, live: Tensor) -> None:
        """Fold in one minibatch: ``y_norms`` and ``live`` are (B, L)."""
        live = live.to(y_norms.dtype)
        count = live.sum(0)
        batch = (y_norms * live).sum(0) / count.clamp(min=1)
        length = y_norms.shape[1]
        if self.mean is None or self.mean.shape[0] < length:
            self._grow(length, y_norms.device)
        mean, seen = self.mean[:length], self.seen[:length]
        has = count > 0
        blended = torch.where(seen, self.decay * mean + (1 - self.decay) * batch, batch)
        mean.copy_(torch.where(has, blended, mean))
        seen.logical_or_(has)

    def state_dict(self) -> dict:
        """Tensors only (a checkpoint loads with weights_only=True); {} before any update."""
        return {} if self.mean is None else {"mean": self.mean, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s tensors ({} leaves the statistics empty)."""
        self.mean, self.seen = state.get("mean"), state.get("seen")

    def _grow(self, length: int, device) -> None:
        mean = torch.zeros(length, device=device)
        seen = torch.zeros(length, dtype=torch.bool, device=device)
        if self.mean is not None:
            mean[:self.mean.shape[0]] = self.mean
            seen[:self.seen.shape[0]] = self.seen
        self.mean, self.seen = mean, seen

    def profile(self, length: int, device) -> Tensor | None:
        """ȳ at positions 0..length−1 (positions never seen get the mean of the seen ones), or
        None before the first update."""
        if self.mean is None:
            return None
        mean = self.mean.to(device)
        seen = self.seen.to(device)
        fill = (mean * seen).sum() / seen.sum().clamp(min=1)
        out = torch.full((length,), 0.0, device=device) + fill
        upto = min(length, mean.shape[0])
        out[:upto] = torch.where(seen[:upto], mean[:upto], fill)
        return out


def adaptive_probabilities(x: Tensor, live: Tensor, profile: Tensor | None,
                           epsilon: float = EPSILON) -> Tensor:
    """q (n,) of (adaptive) for x (n, d) rows, ``live`` (B, L) with B·L = n, ``profile`` (L,)
    the running ȳ (None: uniform over the live rows). float64."""
    lv = live.reshape(-1).to(torch.float64)
    uniform = lv / lv.sum().clamp(min=1)
    if profile is None:
        return uniform
    pos = profile.to(torch.float64).reshape(1, -1).expand(live.shape).reshape(-1)
    h = x.detach().to(torch.float64).norm(dim=1) * pos * lv
    total = h.sum()
    proxy = torch.where(total > 0, h / total.clamp(min=1e-300), uniform)
    return (1 - epsilon) * proxy + epsilon * uniform


def first_token_live(live: Tensor) -> Tensor:
    """The live mask (B, L) of a first-token layer: ``live`` at position 0, zero elsewhere."""
    out = torch.zeros_like(live)
    out[:, 0] = live[:, 0]
    return out


class RowsLive(RowsWorReal):
    """Uniform rows without replacement among the live rows (module docstring).

    ``sketch(x, k, seed, mask)`` takes the live mask, (B, L) or (n,), as ``rows-wor-real`` takes
    the attention mask; the layer builds it (:func:`first_token_live` for a first-token layer)
    and lowers k to B there."""

    name = "rows-live"
    uses_structure = True


class RowsAdaptive(Sketch):
    """Importance rows with replacement, q from ‖x_l‖ and the running ȳ (module docstring)."""

    name = "rows-adaptive"
    uses_mask = True
    uses_structure = True

    def __init__(self, epsilon: float = EPSILON, stats: RowStats | None = None) -> None:
        self.epsilon = epsilon
        self.stats = stats if stats is not None else RowStats()

    def for_layer(self) -> "RowsAdaptive":
        """A fresh instance with its own statistics, for one layer."""
        return RowsAdaptive(self.epsilon)

    def probabilities(self, x: Tensor, live: Tensor) -> Tensor:
        """q (n,) of (adaptive) for rows ``x`` and the live mask ``live`` (B, L)."""
        return adaptive_probabilities(x, live, self.stats.profile(live.shape[-1], x.device),
                                      self.epsilon)

    def sketch(self, x, k, seed, mask=None):
        live = _live2d(x, mask)
        q = self.probabilities(x, live)
        idx, _ = draw_rows(q, k, generator(seed, x.device))
        scale = (1.0 / (k * q[idx])).sqrt().to(torch.float32)
        state = (idx, scale, live > 0)  # the live mask as bool: B·L bytes kept for backward
        return self.apply(x, k, seed, state), state

    def apply(self, a, k, seed, state):
        return RowsNorm.apply(self, a, k, seed, state[:2])

    def apply_in_backward(self, a, k, seed, state):
        live = state[2]
        norms = a.detach().float().reshape(*live.shape, -1).norm(dim=-1)
        self.stats.update(norms, live)
        return self.apply(a, k, seed, state)

    def form(self, s, a, p, n, k):  # p here is Σ p_l/(n q_l): rows' form at the drawn q
        return (n * p - a) / k

    def variance(self, x, y, k, mask=None):
        """(Σ_live ‖x_l‖²‖y_l‖²/q_l − ‖G‖²)/k at the current statistics (float64)."""
        live = _live2d(x, mask)
        q = self.probabilities(x, live)
        xd, yd = x.double(), y.double()
        pl = xd.square().sum(1) * yd.square().sum(1)
        on = q > 0
        second = (pl[on] / q[on]).sum()
        return (second - (yd.T @ xd).square().sum()) / k

    def estimate(self, x, y, k, seed, mask=None):
        sx, state = self.sketch(x, k, seed, mask)
        return self.apply(y, k, seed, state).T @ sx


for _cls in (RowsLive, RowsAdaptive):  # the registry of varstudy.randomized.sketches
    register(_cls())


def _live2d(x: Tensor, mask: Tensor | None) -> Tensor:
    """The live mask as (B, L); without one every row is live, as one sequence (1, n)."""
    if mask is None:
        return torch.ones(1, x.shape[0], device=x.device)
    mask = mask.to(device=x.device, dtype=torch.float32)
    return mask if mask.dim() == 2 else mask.reshape(1, -1)
