"""The limit of row sampling: the least variance an unbiased row sampler can have given Y.

A row sampler stores k of the n token rows of X (scaled) in the forward pass and estimates
G = YᵀX = Σ_l y_l x_lᵀ from them in backward. With k rows drawn with replacement with
probabilities q_l (each scaled 1/√(k q_l)) its variance is (ARCHITECTURE.md, "Importance row
sampling and its limit")

    E‖Ĝ − G‖²_F = (1/k) (Σ_l ‖x_l‖²‖y_l‖² / q_l − ‖G‖²),

smallest at q_l ∝ w_l = ‖x_l‖·‖y_l‖ (Cauchy–Schwarz), where it is

    V_opt(k) = ((Σ_l w_l)² − ‖G‖²) / k.                                        (limit)

A sampler may also keep some rows exactly and sample the rest. Keeping the t rows of largest
w_l exactly (set T) and drawing k − t rows with replacement from the remainder R with q ∝ w
(optimal there) gives, with G_R = Σ_{l∈R} y_l x_lᵀ,

    V_split(k, t) = ((Σ_{l∈R} w_l)² − ‖G_R‖²) / (k − t),   t = 0 .. k − 1,        (split)

and 0 when at most k rows have w_l > 0 (they are all kept). ``split`` reports min_t V_split,
which is never above V_opt (t = 0). ‖G_R‖² = ‖G‖² − 2⟨G, P_t⟩ + ‖P_t‖² with P_t the kept rows'
gradient, ⟨G, y_l x_lᵀ⟩ = y_lᵀ G x_l and ‖P_t‖² the sum of the leading t × t block of
(X_T X_Tᵀ)∘(Y_T Y_Tᵀ), so every t costs one cumulative sum.

NOTE [a bound, not a sampler]: both need Y, which the forward pass, where the rows are chosen,
does not have; they are the floor that any realizable row sampler (uniform, rows-real,
rows-norm, a gradient-norm proxy) can be measured against, never a family of its own. Rows with
y_l = 0 (padding, or positions whose output no loss term reads) have w_l = 0: the limit never
stores them, and :func:`zero_gradient_rows` counts them.

Everything is computed in float64 whatever the dtype of X and Y. Tests: enumeration of every
draw on small n and Monte Carlo of :func:`draw_estimate` (tests/test_limit.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from varstudy.errors import VarstudyError


@dataclass(frozen=True)
class Limit:
    """The limit of one layer and one k (float64 scalars; ``kept``: the best split's t)."""

    opt: float     # V_opt(k), optimal importance sampling with replacement
    split: float   # min_t V_split(k, t), the t largest-w rows exact, the rest sampled
    kept: int      # the t of the best split


def _rows(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    if x.shape[0] != y.shape[0]:
        raise VarstudyError(f"X has {x.shape[0]} rows and Y {y.shape[0]}; valid choices: the "
                            "input and output gradient of one layer, (n, d_in) and (n, d_out)")
    return x, y


def row_weights(x: Tensor, y: Tensor) -> Tensor:
    """w_l = ‖x_l‖·‖y_l‖ for X (n, d_in) and Y (n, d_out) (or (B, L, d)); (n,) float64."""
    x, y = _rows(x, y)
    return x.norm(dim=1) * y.norm(dim=1)


def zero_gradient_rows(y: Tensor) -> int:
    """Rows l of Y (n, d_out) with y_l = 0 exactly: they carry nothing into G."""
    y = y.reshape(-1, y.shape[-1])
    return int((y == 0).all(dim=1).sum().item())


def limits(x: Tensor, y: Tensor, ks, grad: Tensor | None = None) -> list[Limit]:
    """:class:`Limit` for each k in ``ks`` (every k in 1..n), one pass over the rows.

    Args:
        x: (n, d_in) rows of the layer input (or (B, L, d_in)).  y: (n, d_out) likewise.
        ks: the sketch sizes.  grad: G = YᵀX (d_out, d_in) when already known.
    """
    x, y = _rows(x, y)
    n = x.shape[0]
    ks = [int(k) for k in ks]
    if any(not 1 <= k <= n for k in ks):
        raise VarstudyError(f"sketch sizes {ks} must lie in 1..{n} (the rows of X)")
    g = y.T @ x if grad is None else grad.double()
    a = float(g.square().sum())
    w = x.norm(dim=1) * y.norm(dim=1)
    total = float(w.sum())
    order = torch.argsort(w, descending=True, stable=True)
    top = order[:max(ks, default=0)]
    wt = w[top]
    # ‖G_R(t)‖² for t = 0 .. max k: a − 2·Σ_{i<t} c_i + Σ_{i,j<t} H_ij (module docstring)
    c = ((y[top] @ g) * x[top]).sum(1)
    h = (x[top] @ x[top].T) * (y[top] @ y[top].T)
    block = h.cumsum(0).cumsum(1).diagonal()
    zero = torch.zeros(1, dtype=torch.float64, device=x.device)
    a_rest = a - 2 * torch.cat((zero, c.cumsum(0))) + torch.cat((zero, block))
    w_rest = total - torch.cat((zero, wt.cumsum(0)))
    nonzero = int((w > 0).sum())
    out = []
    for k in ks:
        opt = max(total * total - a, 0.0) / k
        if nonzero <= k:
            out.append(Limit(opt, 0.0, nonzero))
            continue
        t = torch.arange(k, device=x.device)
        v = (w_rest[:k].square() - a_rest[:k]).clamp(min=0) / (k - t)
        best = int(torch.argmin(v))
        out.append(Limit(opt, float(v[best]), best))
    return out


def draw_estimate(x: Tensor, y: Tensor, k: int, kept: int, gen: torch.Generator) -> Tensor:
    """One draw of the (oracle) split estimator: the ``kept`` largest-w rows exact, k − kept
    rows from the rest with replacement, q ∝ w, each scaled 1/((k − kept)·q). (d_out, d_in).

    A reference for tests (it needs Y, NOTE [a bound, not a sampler]); ``kept`` = 0 is the
    optimal importance sampler.
    """
    x, y = _rows(x, y)
    w = x.norm(dim=1) * y.norm(dim=1)
    order = torch.argsort(w, descending=True, stable=True)
    top, rest = order[:kept], order[kept:]
    est = y[top].T @ x[top]
    wr = w[rest]
    if k > kept and float(wr.sum()) > 0:
        q = wr / wr.sum()
        idx = torch.multinomial(q, k - kept, replacement=True, generator=gen)
        scale = 1.0 / ((k - kept) * q[idx])
        rows = rest[idx]
        est = est + (y[rows] * scale[:, None]).T @ x[rows]
    return est
