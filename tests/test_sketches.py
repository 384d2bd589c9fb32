"""Sketch families: unbiasedness and closed-form variance by Monte Carlo with stated error rates.

Each statistical test has a false-alarm rate of at most ALPHA (Bonferroni over families and
entries, normal approximation of means of M i.i.d. draws) and a fixed seed, so it is
deterministic in CI. ``test_detects_bias`` shows the same test rejects a 3 % biased estimator.
"""

import math

import pytest
import torch
from scipy.stats import norm
from torch.utils._python_dispatch import TorchDispatchMode

from varstudy.errors import VarstudyError
from varstudy.sketches import SKETCHES, fwht, get_sketch, moments, rows_for

ALPHA = 1e-3      # family-wise false-alarm rate of each statistical test below
DRAWS = 3000


def problem(n=48, d_in=6, d_out=5, seed=0):
    """Rows of varying norm and correlated X, Y so that s, a and p all matter."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    x = x * torch.rand(n, 1, generator=gen, dtype=torch.float64).mul(3)
    y = torch.randn(n, d_out, generator=gen, dtype=torch.float64) + 0.8 * x[:, :d_out]
    return x, y


@pytest.fixture(scope="module")
def draws():
    """M draws of Ĝ per family on one problem, with k = 11 of n = 48 rows."""
    x, y = problem()
    k = 11
    out = {name: torch.stack([sk.estimate(x, y, k, seed=10_000 + i) for i in range(DRAWS)])
           for name, sk in SKETCHES.items()}
    return x, y, k, out


def z_max(samples, target):
    """Largest |z| of the per-entry means of ``samples`` (M, ...) against ``target``."""
    m = samples.shape[0]
    se = samples.std(0) / math.sqrt(m)
    return ((samples.mean(0) - target) / se).abs().max().item()


@pytest.mark.parametrize("name", list(SKETCHES))
def test_unbiased(draws, name):
    x, y, k, out = draws
    g = y.T @ x
    entries = g.numel() * len(SKETCHES)
    z_crit = norm.isf(ALPHA / (2 * entries))
    assert z_max(out[name], g) < z_crit
    # The same statement from the closed form alone: E‖mean − G‖² = V/M, Markov at level ALPHA.
    err = (out[name].mean(0) - g).square().sum()
    assert err <= SKETCHES[name].variance(x, y, k) / (DRAWS * ALPHA)


def test_detects_bias(draws):
    """The unbiasedness test has power: a 3 % scaled estimator is rejected."""
    x, y, k, out = draws
    g = y.T @ x
    z_crit = norm.isf(ALPHA / (2 * g.numel() * len(SKETCHES)))
    assert z_max(out["rows-norm"] * 1.03, g) > z_crit


@pytest.mark.parametrize("name", list(SKETCHES))
def test_variance_matches_closed_form(draws, name):
    x, y, k, out = draws
    sq = (out[name] - y.T @ x).square().sum((1, 2))
    z = (sq.mean() - SKETCHES[name].variance(x, y, k)) / (sq.std() / math.sqrt(DRAWS))
    assert abs(z.item()) < norm.isf(ALPHA / (2 * len(SKETCHES)))


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
