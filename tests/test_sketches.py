"""Sketch families: unbiasedness and closed-form variance by Monte Carlo with stated error rates.

Each statistical test has a false-alarm rate of at most ALPHA (Bonferroni over families and
entries, normal approximation of means of M i.i.d. draws) and a fixed seed, so it is
deterministic in CI. The unbiasedness test takes its standard errors from the closed forms, not
from the draws; ``test_detects_bias`` shows that the same test function rejects estimators biased
by a few percent (with a power computation showing the rejection is no lucky draw).
"""

import math

import pytest
import torch
from scipy.stats import norm
from torch.utils._python_dispatch import TorchDispatchMode

from varstudy.errors import VarstudyError
from varstudy.randomized.sketches import SKETCHES, entry_moments, fwht, get_sketch, moments, rows_for

ALPHA = 1e-3      # family-wise false-alarm rate of each statistical test below
DRAWS = 3000
K = 24            # sketch rows of the n = 48 rows of problem()


def problem(n=48, d_in=6, d_out=5, seed=0):
    """Rows of varying norm and correlated X, Y so that s, a and p all matter."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    x = x * torch.rand(n, 1, generator=gen, dtype=torch.float64).mul(3)
    y = torch.randn(n, d_out, generator=gen, dtype=torch.float64) + 0.8 * x[:, :d_out]
    return x, y


@pytest.fixture(scope="module")
def draws():
    """M draws of Ĝ per family on one problem, with k = K of n = 48 rows."""
    x, y = problem()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster than two on a shared runner
    try:
        out = {name: torch.stack([sk.estimate(x, y, K, seed=10_000 + i) for i in range(DRAWS)])
               for name, sk in SKETCHES.items()}
    finally:
        torch.set_num_threads(threads)
    return x, y, K, out


def unbiasedness(samples, x, y, k, sketch, alpha):
    """Test E[Ĝ] = G = YᵀX from draws ``samples`` (M, d_out, d_in) at false-alarm rate ``alpha``.

    Two checks at alpha/2 each (union bound), normal approximation of the mean of M draws, whose
    error e = mean − G has covariance C/M with C the covariance of one draw:

    * per entry, z_ij = e_ij / √(V_ij/M) with V_ij = ``entry_variance`` (closed form), against
      the Bonferroni level z* = Φ⁻¹(1 − alpha/(4D)) over the D entries;
    * in norm, tr C = V = ``variance`` (closed form). For Gaussian e, P(‖e‖² > (tr C + 2√(tr(C²)
      t) + 2‖C‖ t)/M) ≤ e^{−t} (Laurent & Massart 2000, Lemma 1), and tr(C²) ≤ V², ‖C‖ ≤ V, so
      ‖e‖² ≤ (V/M)(1 + 2√t + 2t) with t = ln(2/alpha): a factor 1 + 2√t + 2t ≈ 25 at 1e-3/7
      where Markov's inequality needs 2/alpha = 14000.

    Returns a dict with ``ok`` (both checks pass), ``z_max``, ``z_crit``, ``norm2``, ``norm2_crit``
    and ``z_expected(delta)``: the largest |z| a relative bias delta·G would produce on average.
    """
    m, g = samples.shape[0], y.T @ x
    se = (sketch.entry_variance(x, y, k) / m).sqrt()
    err = samples.mean(0) - g
    z_crit = norm.isf(alpha / (4 * g.numel()))
    t = math.log(2 / alpha)
    norm2_crit = float(sketch.variance(x, y, k)) / m * (1 + 2 * math.sqrt(t) + 2 * t)
    z_max = (err / se).abs().max().item()
    norm2 = err.square().sum().item()
    return dict(ok=z_max <= z_crit and norm2 <= norm2_crit, z_max=z_max, z_crit=z_crit,
                norm2=norm2, norm2_crit=norm2_crit,
                z_expected=lambda delta: (delta * g.abs() / se).max().item())


@pytest.mark.parametrize("name", list(SKETCHES))
def test_unbiased(draws, name):
    x, y, k, out = draws
    result = unbiasedness(out[name], x, y, k, SKETCHES[name], ALPHA / len(SKETCHES))
    assert result["ok"], result


@pytest.mark.parametrize("name", list(SKETCHES))
def test_detects_bias(draws, name):
    """Power: the same test rejects Ĝ scaled by 1.05 and Ĝ normalised by k − 1 instead of k
    (+4.3 % at k = 24). Each case is first shown to shift the largest |z| by at least z* + 2 on
    average (power ≥ 97.7 %), so no rejection is luck; a 3 % bias is at the edge at this size
    (expected largest |z| 4.8 to 6.8 against z* = 4.7). The norm check alone rejects 10 %."""
    x, y, k, out = draws
    alpha = ALPHA / len(SKETCHES)
    for factor in (1.05, k / (k - 1)):
        result = unbiasedness(out[name] * factor, x, y, k, SKETCHES[name], alpha)
        assert result["z_expected"](factor - 1) >= result["z_crit"] + 2
        assert not result["ok"], (factor, result)
    biased = unbiasedness(out[name] * 1.10, x, y, k, SKETCHES[name], alpha)
    assert biased["norm2"] > biased["norm2_crit"]


@pytest.mark.parametrize("name", list(SKETCHES))
def test_variance_matches_closed_form(draws, name):
    x, y, k, out = draws
    sq = (out[name] - y.T @ x).square().sum((1, 2))
    z = (sq.mean() - SKETCHES[name].variance(x, y, k)) / (sq.std() / math.sqrt(DRAWS))
    assert abs(z.item()) < norm.isf(ALPHA / (2 * len(SKETCHES)))


@pytest.mark.parametrize("name", list(SKETCHES))
def test_entry_variance_matches_draws(draws, name):
    """The per-entry closed forms sum to the total one and match E(Ĝ_ij − G_ij)² by MC."""
    x, y, k, out = draws
    sk = SKETCHES[name]
    v = sk.entry_variance(x, y, k)
    assert v.shape == (5, 6) and torch.isclose(v.sum(), sk.variance(x, y, k), rtol=1e-12)
    sq = (out[name] - y.T @ x).square()
    z = (sq.mean(0) - v) / (sq.std(0) / math.sqrt(DRAWS))
    assert z.abs().max().item() < norm.isf(ALPHA / (2 * v.numel() * len(SKETCHES)))


def test_entry_moments_are_one_column_moments():
    x, y = problem()
    s, a, p = entry_moments(x, y)
    for i, j in ((0, 0), (4, 5), (2, 3)):
        one = moments(x[:, j:j + 1], y[:, i:i + 1])
        assert all(torch.isclose(m[i, j], o) for m, o in zip((s, a, p), one))


def test_closed_forms_order():
    """Sanity of the formulas themselves: rows-wor never exceeds rows, zero at k = n."""
    x, y = problem()
    n = x.shape[0]
    assert SKETCHES["rows-wor"].variance(x, y, 11) < SKETCHES["rows"].variance(x, y, 11)
    assert SKETCHES["rows-wor"].variance(x, y, n).abs() < 1e-9
    s, a, p = moments(x, y)
    assert torch.isclose(SKETCHES["gaussian"].variance(x, y, 4), (s + a) / 4)


@pytest.mark.parametrize("name", list(SKETCHES))
def test_apply_regenerates_sketch(name):
    """Backward's apply(., seed) uses the same S as forward's sketch(., seed)."""
    x, _ = problem()
    sk = get_sketch(name)
    sx, state = sk.sketch(x, 7, seed=3)
    assert torch.equal(sx, sk.apply(x, 7, 3, state))
    other, _ = sk.sketch(x, 7, seed=4)
    assert not torch.equal(sx, other)


def test_fwht_is_orthonormal_hadamard():
    m = 16
    h = fwht(torch.eye(m, dtype=torch.float64))
    assert torch.allclose(h @ h.T, torch.eye(m, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((m, m), m ** -0.5, dtype=torch.float64))


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["countsketch", "srht", "rows", "rows-wor", "rows-norm"])
def test_cheap_families_never_materialize_dense(name):
    n, d, k = 3000, 4, 1500
    x = torch.randn(n, d)
    with _LargestTensor() as mode:
        sk = get_sketch(name)
        sx, state = sk.sketch(x, k, seed=0)
        sk.apply(x, k, 0, state)
    assert mode.largest <= 2 * 4096 * d  # O(n·d) work buffers, never n·k = 4.5M entries


def test_unknown_sketch_lists_choices():
    with pytest.raises(VarstudyError, match="unknown sketch 'gauss'.*gaussian.*rows-norm"):
        get_sketch("gauss")


@pytest.mark.parametrize("n,ratio,min_rows,k", [(100, 0.1, 1, 10), (8, 0.01, 1, 1),
                                                (8, 0.01, 3, 3), (5, 1.0, 1, 5), (4, 0.5, 9, 4)])
def test_rows_for(n, ratio, min_rows, k):
    assert rows_for(n, ratio, min_rows) == k
