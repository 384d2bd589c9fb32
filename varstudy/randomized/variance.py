"""Gradient-variance estimators on captured per-layer (X, Y): pure functions, float64 results.

Inputs are what :mod:`varstudy.randomized.capture` records for one ``nn.Linear`` and one minibatch of B
examples: X (B, L, d_in) the layer input, Y (B, L, d_out) = ∂(mean loss)/∂out; 2-D inputs
(B, d) (pooler, classifier) are one row per example (L = 1). The minibatch weight gradient is
g_B = YᵀX over all n = B·L token rows, and the per-example gradient is g_i = B·Y_iᵀX_i (Y is
for the *mean* loss, so the per-example loss gradient is B times it; g_B = (1/B) Σ_i g_i).

Conventions (ARCHITECTURE.md): a sample is one example; variance = E‖ĝ − Eĝ‖²_F per weight
tensor (biases are exact under every sketch and left out); model totals are sums over layers.

* :func:`per_example_sq_norms`: ‖g_i‖² = B²·⟨X_iX_iᵀ, Y_iY_iᵀ⟩ (Gram trick), no d_out × d_in.
* :func:`sampling_variance`: σ̂² = (1/(B−1)) Σ‖g_i − g_B‖² = (Σ‖g_i‖² − B‖g_B‖²)/(B−1), and
  Var[g_B] = (σ̂²/B)(1 − B/N).
  NOTE [finite-population correction]: for B examples drawn uniformly without replacement from
  N, σ̂² is unbiased for S² = (1/(N−1)) Σ_j ‖g_j − ḡ‖² and Var[g_B] = (S²/B)(1 − B/N) exactly
  (Cochran, Sampling Techniques, Thm 2.2/2.4), so (σ̂²/B)(1 − B/N) is *unbiased*. ARCHITECTURE.md
  writes (1 − (B−1)/(N−1)), which is the same correction applied to the 1/N population variance;
  used with σ̂² it is high by N/(N−1). tests/test_variance.py checks the unbiased form by
  enumerating every minibatch of a tiny population. N = inf means no correction.
* :func:`sketch_variance` / :func:`closed_form`: E‖Ĝ − G‖² given the batch, from the family's
  closed form (sketches.py); :func:`mc_sketch_variance`: the same by Monte Carlo, no model re-run.
* :func:`paper_quantities`: the seed paper's numbers, computed its way (tokens as samples).
* :func:`mean_ci`: t-interval over minibatches.

By the law of total variance, Var[ĝ] = E_batch[var_sketch] + Var_batch[g_B] (sketches
independent of the batch draw).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from varstudy.errors import VarstudyError
from varstudy.randomized.seeds import derive_seed
from varstudy.randomized.sketches import Sketch, get_sketch

GRAM_CHUNK_BYTES = 64 * 2**20  # per-example Gram blocks are computed in chunks of this size

# NOTE [never negative]: every variance here is an expected squared norm, so ≥ 0, but most are
# computed as a difference of non-negative terms (Σ‖g_i‖² − B‖g_B‖², n·p − a, s + a − 2p, ...)
# that cancels when the examples' (or rows') gradients agree. The moments are float64 sums of
# inputs that are exact in float64, except a = ‖YᵀX‖² when G comes from autograd in the
# model's dtype (Moments.a_err bounds that error; low-precision models do not pass G at all,
# NOTE [low-precision capture] in varstudy.measure.engine). A computed value below zero is
# clipped to 0 only within its rounding bound, |coef_a|·a_err + FLOAT64_SLACK × the terms'
# magnitude; that never moves it away from the true value (which is ≥ 0). A value further
# below zero cannot come from rounding, so it is refused (VarstudyError), not published.
FLOAT64_SLACK = 1e-8  # float64 sums of up to ~1e8 terms: γ_N = N·2⁻⁵³ ≈ 1e-8 relative


def nonnegative(value: float, bound: float, what: str) -> float:
    """``value`` if ≥ 0; 0.0 if within ``bound`` below 0 (rounding); else VarstudyError
    (NOTE [never negative])."""
    if value >= 0 and math.isfinite(value):
        return float(value)
    if -bound <= value < 0:
        return 0.0
    raise VarstudyError(f"{what} came out {value:.6g}, negative beyond its rounding bound "
                        f"{bound:.3g} (or not finite); valid choices: finite captured X and Y, "
                        "--dtype float32 or float64")


def as_examples(t: Tensor) -> Tensor:
    """(B, L, d) unchanged; (B, d) -> (B, 1, d) (one row per example)."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() != 3:
        raise VarstudyError(f"expected a (B, L, d) or (B, d) tensor, got shape {tuple(t.shape)}")
    return t


def flat_rows(t: Tensor) -> Tensor:
    """All token rows: (..., d) -> (n, d)."""
    return t.reshape(-1, t.shape[-1])


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = as_examples(x), as_examples(y)
    if x.shape[:2] != y.shape[:2]:
        raise VarstudyError(f"X {tuple(x.shape)} and Y {tuple(y.shape)} disagree on (B, L)")
    return x, y


def per_example_sq_norms(x: Tensor, y: Tensor) -> Tensor:
    """‖g_i‖²_F for g_i = B·Y_iᵀX_i, via ‖Y_iᵀX_i‖² = ⟨X_iX_iᵀ, Y_iY_iᵀ⟩ in float64.

    Args:
        x: (B, L, d_in) or (B, d_in).  y: (B, L, d_out) or (B, d_out), for the mean loss.
    Returns:
        (B,) float64. Cost O(B·L²·(d_in + d_out)); examples are chunked to bound memory.
    """
    x, y = _check_pair(x, y)
    b, length = x.shape[:2]
    chunk = max(1, GRAM_CHUNK_BYTES // max(1, 8 * length * length))
    out = []
    for i in range(0, b, chunk):
        xi, yi = x[i:i + chunk].double(), y[i:i + chunk].double()
        gx, gy = xi @ xi.transpose(1, 2), yi @ yi.transpose(1, 2)
        out.append((gx * gy).sum((1, 2)))
    return torch.cat(out) * float(b) ** 2


@dataclass(frozen=True)
class Sampling:
    """Within-batch sampling statistics of one weight tensor (float64 scalars)."""

    sigma2: float      # σ̂² = (1/(B−1)) Σ ‖g_i − g_B‖²
    var_batch: float   # Var[g_B] estimate with the finite-population correction
    grad_sq_norm: float  # ‖g_B‖²


def fpc(batch_size: int, population: float) -> float:
    """1 − B/N (NOTE [finite-population correction]); 1 for N = inf."""
    if math.isinf(population):
        return 1.0
    if population < batch_size:
        raise VarstudyError(f"population N={population} is smaller than the batch B={batch_size}")
    return 1.0 - batch_size / population


def sampling_from_norms(sq_norms: Tensor, grad_sq_norm: float, population: float,
                        a_err: float = 0.0) -> Sampling:
    """:func:`sampling_variance` from (B,) per-example ‖g_i‖² and ‖g_B‖² (the latter known to
    within ``a_err``, :attr:`Moments.a_err`); NOTE [never negative]."""
    b = int(sq_norms.shape[0])
    if b < 2:
        raise VarstudyError(f"sampling variance needs a batch of B >= 2 examples, got {b}")
    total = float(sq_norms.sum())
    spread = nonnegative(total - b * grad_sq_norm,
                         b * a_err + FLOAT64_SLACK * (total + b * grad_sq_norm),
                         "the sampling variance")
    sigma2 = spread / (b - 1)
    return Sampling(sigma2, sigma2 / b * fpc(b, population), grad_sq_norm)



def sampling_variance(x: Tensor, y: Tensor, population: float = math.inf) -> Sampling:
    """Unbiased σ̂² and Var[g_B] ≈ (σ̂²/B)(1 − B/N) for one layer's weight gradient.

    Args: x (B, L, d_in) or (B, d_in); y likewise with d_out; population N (inf: no FPC).
    """
    sq = per_example_sq_norms(x, y)
    return sampling_from_norms(sq, moments(x, y).a, population)


@dataclass(frozen=True)
class Moments:
    """s = ‖X‖²‖Y‖², a = ‖YᵀX‖², p = Σ_l ‖x_l‖²‖y_l‖² over n token rows (sketches.moments);
    ``real``: the rows that are not padding (NOTE [real rows] in sketches; n when unknown);
    ``a_err``: a bound on the rounding error of a (NOTE [never negative]; 0: float64)."""

    s: float
    a: float
    p: float
    n: int
    real: int | None = None
    a_err: float = 0.0

    @property
    def m(self) -> int:
        """The rows a ``-real`` family draws from: the real (non-padding) rows, else all n."""
        return self.n if self.real is None else self.real


def moments(x: Tensor, y: Tensor, grad: Tensor | None = None) -> Moments:
    """Moments of the flattened rows X (n, d_in), Y (n, d_out), in float64.

    ``grad`` (d_out, d_in), the exact YᵀX when already known (e.g. from autograd in
    :mod:`varstudy.randomized.capture`), saves the n·d_in·d_out product; a is then ‖grad‖² in
    float64, and ``a_err`` bounds what computing grad in its own dtype cost (:func:`grad_error`).
    A float16/bfloat16 grad (8 or 11 significant bits, summed over n rows) is not used: G is
    recomputed from X and Y in float64 (NOTE [never negative]).
    """
    if grad is not None and grad.dtype.itemsize < 4:
        grad = None
    xf, yf = flat_rows(x).double(), flat_rows(y).double()
    xn, yn = xf.square().sum(1), yf.square().sum(1)
    g = (yf.T @ xf) if grad is None else grad.double()
    s, a, n = float(xn.sum() * yn.sum()), float(g.square().sum()), int(xf.shape[0])
    a_err = 0.0 if grad is None else grad_error(grad, n, s, a)
    return Moments(s, a, float((xn * yn).sum()), n, a_err=a_err)


def grad_error(grad: Tensor, n: int, s: float, a: float) -> float:
    """Bound on |‖fl(YᵀX)‖² − ‖YᵀX‖²| for a gradient computed in ``grad.dtype``: each entry is
    a sum of n products, so ‖δG‖ ≤ γ_n‖|Y|ᵀ|X|‖ + u‖G‖ ≤ γ_n√s + u√a =: e with γ_n = n·u/(1 − n·u)
    (Higham, Accuracy and Stability, §3.1), and |δa| ≤ 2√a·e + e². TF32 matmuls (CUDA,
    allow_tf32) round to 10 bits."""
    u = torch.finfo(grad.dtype).eps / 2
    if grad.is_cuda and grad.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        u = 2.0 ** -11
    if n * u >= 0.5:
        return math.inf
    e = n * u / (1 - n * u) * math.sqrt(s) + u * math.sqrt(a)
    return 2 * math.sqrt(a) * e + e * e


# Closed forms in terms of the moments, one per registered family (sketches.py's table).
# tests/test_variance.py checks each against SKETCHES[name].variance(x, y, k).
CLOSED_FORMS = {
    "gaussian": lambda m, k: (m.s + m.a) / k,
    "rademacher": lambda m, k: (m.s + m.a - 2 * m.p) / k,
    "countsketch": lambda m, k: (m.s + m.a - 2 * m.p) / k,
    "srht": lambda m, k: (m.s + m.a - 2 * m.p) / k,
    "rows": lambda m, k: (m.n * m.p - m.a) / k,
    "rows-wor": lambda m, k: ((m.n * m.p - m.a) / k * (m.n - k) / (m.n - 1) if m.n > 1 else 0.0),
    "rows-norm": lambda m, k: (m.s - m.a) / k,
    "rows-real": lambda m, k: (m.m * m.p - m.a) / k,
    "rows-wor-real": lambda m, k: ((m.m * m.p - m.a) / min(k, m.m) * (m.m - min(k, m.m))
                                   / (m.m - 1) if m.m > 1 else 0.0),
}
# rows-live is rows-wor-real over the live rows (m = real rows at the live positions; the engine
# sets Moments.real to that count). rows-adaptive's variance needs each row's probability, so it
# has no moment form: the engine evaluates RowsAdaptive.variance on the rows (informed).
CLOSED_FORMS["rows-live"] = CLOSED_FORMS["rows-wor-real"]
ROW_FORMS = ("rows-adaptive", "wta-crs")  # wta-crs: (wta) in varstudy.randomized.wtacrs


def closed_form(family: str | Sketch, m: Moments, k: int) -> float:
    """E‖Ĝ − G‖²_F given the batch, from precomputed moments (shared across families); never
    negative (NOTE [never negative])."""
    name = get_sketch(family).name
    if name not in CLOSED_FORMS:
        raise VarstudyError(f"no moment closed form for sketch {name!r}; use sketch_variance; "
                            f"valid choices: {', '.join(CLOSED_FORMS)}")
    form = CLOSED_FORMS[name]
    zero = Moments(0.0, 0.0, 0.0, m.n, m.real)
    coef_a = float(form(Moments(0.0, 1.0, 0.0, m.n, m.real), k)) - float(form(zero, k))
    scale = (m.s + m.a + m.n * m.p) / k  # every term of every closed form is at most this
    return nonnegative(float(form(m, k)), abs(coef_a) * m.a_err + FLOAT64_SLACK * scale,
                       f"the {name} sketch variance at k={k}")


def sketch_variance(family: str | Sketch, x: Tensor, y: Tensor, k: int) -> float:
    """E‖Ĝ − G‖²_F given the batch, from the family's own closed form (sketches.py)."""
    return float(get_sketch(family).variance(flat_rows(x), flat_rows(y), k))


def family_key(family: str | Sketch) -> int:
    """A stable integer for a family name, for seed derivation."""
    return zlib.crc32(get_sketch(family).name.encode())


def mc_sketch_variance(family: str | Sketch, x: Tensor, y: Tensor, k: int, draws: int,
                       seed: int, mask: Tensor | None = None) -> tuple[float, float]:
    """Mean and standard error of ‖Ĝ − G‖²_F over ``draws`` sketch draws on captured rows.

    Draw d uses seed ``derive_seed(seed, d)`` and the family's own ``sketch``/``apply`` (the
    layer's backward), so no model is re-run. Computed in the dtype of x, y (float64 in tests),
    errors accumulated in float64. A single draw gives SE NaN.

    NOTE [MC in token space]: when n² < d_in·d_out the error is evaluated without forming
    d_out × d_in matrices: with Sᵀ = apply(I_n) (k, n) and M = S Sᵀ,
    ‖Ĝ − G‖² = ⟨(M − I)ᵀ Gy (M − I), Gx⟩ with Gx = XXᵀ, Gy = YYᵀ (n × n), since
    Ĝ − G = Yᵀ(M − I)X. Same draws, same numbers up to rounding (tests/test_variance.py).
    """
    if draws < 1:
        raise VarstudyError(f"mc draws must be >= 1, got {draws}")
    sketch = get_sketch(family)
    xf, yf = flat_rows(x), flat_rows(y)
    if not getattr(sketch, "uses_mask", False):
        mask = None
    errs = np.array([float(e) for e in _mc_errors(sketch, xf, yf, k, draws, seed, mask=mask)])
    se = errs.std(ddof=1) / math.sqrt(draws) if draws > 1 else math.nan
    return float(errs.mean()), float(se)


def _mc_errors(sketch: Sketch, xf: Tensor, yf: Tensor, k: int, draws: int, seed: int,
               token_space: bool | None = None, mask: Tensor | None = None):
    """Yield ‖Ĝ_d − G‖² (float64 scalars) for d = 0..draws−1 (NOTE [MC in token space])."""
    n = xf.shape[0]
    if token_space is None:
        token_space = n * n < xf.shape[1] * yf.shape[1]
    if not token_space:
        g = yf.double().T @ xf.double()
        extra = {} if mask is None else {"mask": mask}
        for d in range(draws):
            yield (sketch.estimate(xf, yf, k, derive_seed(seed, d), **extra).double()
                   - g).square().sum()
        return
    gx, gy = xf.double() @ xf.double().T, yf.double() @ yf.double().T
    eye = torch.eye(n, dtype=xf.dtype, device=xf.device)
    stateful = type(sketch).sketch is not Sketch.sketch  # only then does sketch() make state
    for d in range(draws):
        state = (sketch.sketch(xf, k, derive_seed(seed, d), *([] if mask is None else [mask]))[1]
                 if stateful else ())
        st = sketch.apply(eye, k, derive_seed(seed, d), state).double()  # Sᵀ (k, n)
        e = st.T @ st - torch.eye(n, dtype=torch.float64, device=xf.device)  # M − I
        yield ((e.T @ gy @ e) * gx).sum()


def paper_quantities(m: Moments, k: int) -> dict[str, float]:
    """The seed paper's variance-ratio figure, computed its way (PAPERS.md, paper 1).

    Tokens are the samples, so the paper's "B" is the n token rows:
    α = a/s; D²_RMM = (s − a)/k (the seed code's RMM variance, the rows-norm formula, used for
    a Gaussian sketch); D²_SGD = (n·p − a)/(n − 1);
    ratio = k·D²_RMM / ((n − 1)·D²_SGD) = (s − a)/(n·p − a); bound = (α + 1)/α.
    The figure inverted α, so the plotted bound is (1/α + 1)/(1/α) = 1 + α; the plotted ratio
    did not involve α and equals the computed one.
    """
    alpha = m.a / m.s if m.s > 0 else math.nan
    d2_rmm = (m.s - m.a) / k
    d2_sgd = (m.n * m.p - m.a) / (m.n - 1) if m.n > 1 else math.nan
    denom = (m.n - 1) * d2_sgd
    ratio = k * d2_rmm / denom if denom and not math.isnan(denom) else math.nan
    bound = (alpha + 1) / alpha if alpha and not math.isnan(alpha) else math.nan
    return {"alpha": alpha, "paper_ratio": ratio, "paper_bound": bound,
            "paper_ratio_plotted": ratio, "paper_bound_plotted": 1 + alpha}


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval (Student, m − 1 dof) of i.i.d. per-minibatch values.

    NaNs are dropped; a single value gives NaN bounds; no values give all NaN.
    """
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size == 1:
        return mean, math.nan, math.nan
    half = float(student_t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half
