"""The limit of row sampling (varstudy.randomized.limit): closed forms against enumeration of
every draw on small n, and against Monte Carlo of the oracle estimator."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from varstudy.randomized.limit import draw_estimate, limits, row_weights, zero_gradient_rows
from varstudy.randomized.variance import CLOSED_FORMS, moments


def _problem(n=5, d_in=3, d_out=2, seed=0, zero_rows=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=gen, dtype=torch.float64) * torch.rand(n, 1, generator=gen,
                                                                                dtype=torch.float64)
    y[list(zero_rows)] = 0
    return x, y


def _enumerated(x, y, k, q, kept=()):
    """E‖Ĝ − G‖² of k draws with replacement with probabilities q (over the rows not kept),
    summing over every ordered draw: the definition, no closed form."""
    g = y.T @ x
    kept = list(kept)
    base = y[kept].T @ x[kept] if kept else torch.zeros_like(g)
    rest = [l for l in range(x.shape[0]) if l not in kept and q[l] > 0]
    m = k - len(kept)
    total = 0.0
    for draw in itertools.product(rest, repeat=m):
        prob = math.prod(float(q[l]) for l in draw)
        est = base + sum((y[l][:, None] * x[l][None, :] / (m * float(q[l])) for l in draw),
                         torch.zeros_like(g))
        total += prob * float((est - g).square().sum())
    return total


@pytest.mark.parametrize("k", [1, 2, 3])
def test_optimal_sampler_matches_enumeration_and_beats_uniform(k):
    x, y = _problem()
    w = row_weights(x, y)
    got = limits(x, y, [k])[0]
    assert got.opt == pytest.approx(_enumerated(x, y, k, w / w.sum()), rel=1e-10)
    uniform = torch.full((5,), 0.2, dtype=torch.float64)
    # the general formula at uniform q is the rows closed form, and the optimum is below it
    assert _enumerated(x, y, k, uniform) == pytest.approx(CLOSED_FORMS["rows"](moments(x, y), k))
    assert got.opt <= _enumerated(x, y, k, uniform) + 1e-12


@pytest.mark.parametrize("k", [2, 3, 4])
def test_split_is_the_best_top_t_split_by_enumeration(k):
    x, y = _problem(seed=1)
    w = row_weights(x, y)
    order = torch.argsort(w, descending=True).tolist()
    each = []
    for t in range(k):
        kept = order[:t]
        q = w.clone()
        q[kept] = 0
        each.append(_enumerated(x, y, k, q / q.sum(), kept))
    got = limits(x, y, [k])[0]
    assert got.split == pytest.approx(min(each), rel=1e-9, abs=1e-12)
    assert got.kept == min(range(k), key=each.__getitem__)
    assert got.split <= got.opt + 1e-12


def test_zero_rows_are_counted_never_stored_and_all_nonzero_kept_is_exact():
    x, y = _problem(n=6, zero_rows=(1, 3, 4))
    assert zero_gradient_rows(y) == 3
    assert zero_gradient_rows(y.reshape(2, 3, 2)) == 3
    three = limits(x, y, [3, 2])
    assert three[0].split == 0.0 and three[0].kept == 3  # the 3 rows that carry G, kept whole
    assert three[1].split > 0
    # the optimal sampler never draws a zero row: same variance as on the 3 nonzero rows alone
    live = [0, 2, 5]
    assert three[1].opt == pytest.approx(limits(x[live], y[live], [2])[0].opt, rel=1e-12)


def test_several_k_in_one_pass_equal_one_at_a_time():
    x, y = _problem(n=12, d_in=4, d_out=3, seed=3)
    ks = [1, 3, 6, 11]
    together = limits(x, y, ks)
    assert together == [limits(x, y, [k])[0] for k in ks]


@pytest.mark.parametrize("kept", [0, 2])
def test_oracle_estimator_is_unbiased_with_the_closed_form_variance(kept):
    """Monte Carlo, fixed seed: each entry's mean within 4.5 SE of G and the mean squared error
    within 4.5 SE of the closed form (two-sided, < 1e-4 false alarms for the 7 checks)."""
    x, y = _problem(n=8, seed=4)
    k, draws = 4, 3000
    w = row_weights(x, y)
    order = torch.argsort(w, descending=True).tolist()
    q = w.clone()
    q[order[:kept]] = 0
    expected = _enumerated(x, y, k, q / q.sum(), order[:kept])
    gen = torch.Generator().manual_seed(5)
    est = torch.stack([draw_estimate(x, y, k, kept, gen) for _ in range(draws)])
    g = y.T @ x
    se = est.std(0) / math.sqrt(draws)
    assert ((est.mean(0) - g).abs() <= 4.5 * se).all()
    err = (est - g).square().sum((1, 2))
    assert abs(float(err.mean()) - expected) <= 4.5 * float(err.std()) / math.sqrt(draws)


def test_low_precision_inputs_are_computed_in_float64():
    x, y = _problem(n=10, seed=6)
    lo = limits(x.to(torch.bfloat16), y.to(torch.bfloat16), [3])[0]
    hi = limits(x.to(torch.bfloat16).double(), y.to(torch.bfloat16).double(), [3])[0]
    assert lo == hi


def test_k_outside_one_to_n_is_refused():
    x, y = _problem()
    with pytest.raises(Exception, match="must lie in 1..5"):
        limits(x, y, [0])
