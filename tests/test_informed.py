"""rows-live and rows-adaptive (varstudy.randomized.informed): unbiased, with the closed-form
variance, by Monte Carlo with tolerances from the statistics; the running ȳ; the defensive bound."""

from __future__ import annotations

import math

import pytest
import torch

from varstudy.randomized.informed import (EPSILON, RowsAdaptive, RowsLive, RowStats,
                                          adaptive_probabilities, first_token_live)
from varstudy.randomized.limit import limits
from varstudy.randomized.sketches import SKETCHES
from varstudy.randomized.variance import CLOSED_FORMS, Moments, moments

B, L, D_IN, D_OUT = 3, 5, 4, 3


def _batch(seed=0, pad=(0, 1, 2)):
    """x (B·L, d_in), y (B·L, d_out), the attention mask (B, L) with ``pad`` padding rows per
    example at the end, and y = 0 on padding (as under masked attention)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B * L, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(B * L, D_OUT, generator=gen, dtype=torch.float64)
    y[::L] *= 4  # a heavy first token, as in a [CLS] classifier
    mask = torch.ones(B, L)
    for i, p in enumerate(pad):
        if p:
            mask[i, L - p:] = 0
    y = y * mask.reshape(-1, 1).double()
    return x, y, mask


def _monte_carlo(sketch, x, y, k, mask, draws, seed=1):
    est = torch.stack([sketch.estimate(x, y, k, seed * 100003 + d, mask) for d in range(draws)])
    return est, y.T @ x


def _check_unbiased_with_variance(est, g, expected, z=4.5):
    """Each entry's mean within z SE of G, the mean squared error within z SE of the closed
    form: z = 4.5 gives < 1e-4 false alarms over the 13 checks (two-sided, Bonferroni)."""
    draws = est.shape[0]
    se = est.std(0) / math.sqrt(draws)
    assert ((est.mean(0) - g).abs() <= z * se + 1e-12).all()
    err = (est - g).square().sum((1, 2))
    assert abs(float(err.mean()) - float(expected)) <= z * float(err.std()) / math.sqrt(draws)


def test_rows_adaptive_is_unbiased_with_its_closed_form_before_and_after_statistics():
    x, y, mask = _batch()
    sketch = RowsAdaptive().for_layer()
    k = 4
    before = sketch.variance(x, y, k, mask)
    # no statistics yet: uniform over the real rows, i.e. rows-real's (m·p − a)/k
    m = int(mask.sum())
    mom = moments(x, y)
    assert float(before) == pytest.approx(CLOSED_FORMS["rows-real"](
        Moments(mom.s, mom.a, mom.p, mom.n, m), k), rel=1e-10)
    sketch.stats.update(y.float().norm(dim=1).reshape(B, L), mask)
    after = sketch.variance(x, y, k, mask)
    assert float(after) < float(before)  # the heavy first token is now drawn more often
    est, g = _monte_carlo(sketch, x.float(), y.float(), k, mask, 4000)
    _check_unbiased_with_variance(est.double(), g.double(), after)


def test_rows_live_first_token_layer_is_exact_when_b_fits_and_unbiased_otherwise():
    x, y, mask = _batch(pad=(0, 0, 0))
    y = y * first_token_live(mask).reshape(-1, 1).double()  # a first-token layer's gradient
    live = first_token_live(mask)
    sketch = SKETCHES["rows-live"] if "rows-live" in SKETCHES else RowsLive()
    exact = sketch.estimate(x, y, B, seed=3, mask=live)
    assert torch.allclose(exact, y.T @ x)
    assert float(sketch.variance(x, y, B, mask=live)) == 0.0
    est, g = _monte_carlo(sketch, x, y, 2, live, 4000)
    m = int(live.sum())
    mom = moments(x, y)
    expected = (m * mom.p - mom.a) / 2 * (m - 2) / (m - 1)
    assert float(sketch.variance(x, y, 2, mask=live)) == pytest.approx(expected, rel=1e-10)
    _check_unbiased_with_variance(est, g, expected)


def test_row_stats_track_the_per_position_mean_of_real_rows():
    stats = RowStats(decay=0.5)
    assert stats.profile(3, "cpu") is None
    norms = torch.tensor([[4.0, 1.0, 7.0], [2.0, 3.0, 9.0]])
    live = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    stats.update(norms, live)
    assert stats.profile(3, "cpu").tolist() == pytest.approx([3.0, 2.0, 2.5])  # pos 2 unseen
    stats.update(torch.tensor([[1.0, 2.0, 6.0, 8.0]]), torch.ones(1, 4))
    assert stats.profile(4, "cpu").tolist() == pytest.approx([2.0, 2.0, 6.0, 8.0])


def test_defensive_mixture_bounds_the_second_moment_whatever_the_proxy():
    x, y, mask = _batch(seed=5)
    wrong = torch.tensor([1e6, 1e-6, 1e-6, 1e-6, 1e-6])  # a proxy pointing at the wrong rows
    q = adaptive_probabilities(x, mask, wrong)
    live = mask.reshape(-1) > 0
    assert float(q[live].min()) >= EPSILON / int(live.sum()) - 1e-15
    assert float(q.sum()) == pytest.approx(1.0)
    pl = x.square().sum(1) * y.square().sum(1)
    m, p = int(live.sum()), float(pl.sum())
    assert float((pl[live] / q[live]).sum()) <= m * p / EPSILON * (1 + 1e-12)


def test_no_realizable_sampler_beats_the_limit():
    x, y, mask = _batch(seed=7)
    sketch = RowsAdaptive().for_layer()
    sketch.stats.update(y.float().norm(dim=1).reshape(B, L), mask)
    for k in (1, 3, 6):
        assert float(sketch.variance(x, y, k, mask)) >= limits(x, y, [k])[0].opt * (1 - 1e-12)


def _tiny_batch(seed=0, b=4, length=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (b, length), generator=gen)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 8:] = 0
    mask[3, 5:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask,
            "labels": torch.randint(0, 2, (b,), generator=gen)}


@pytest.mark.parametrize("family", ["rows-live", "rows-adaptive"])
def test_randomized_tiny_bert_stores_first_token_layers_exactly(family):
    """randomize probes the first-token layers; there (B = 4 <= k) the weight gradient is exact,
    and a rows-adaptive layer learns its per-position statistics in backward."""
    from varstudy.models import load_model
    from varstudy.randomized.capture import mean_loss
    from varstudy.randomized.layers import RandomizedLinear, randomize
    from varstudy.randomized.support import first_token_layers

    model, _ = load_model("tiny-bert", num_labels=2, seed=0)
    model.eval()
    batch = _tiny_batch()
    first = set(first_token_layers(model))
    exact = dict(zip([n for n, _ in model.named_parameters()],
                     torch.autograd.grad(mean_loss(model, batch), list(model.parameters()))))
    randomize(model, 0.5, family, include=r"encoder", seed=1)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RandomizedLinear)}
    assert {n for n, m in layers.items() if m.first_token} == first and len(first) == 4
    got = dict(zip([n for n, _ in model.named_parameters()],
                   torch.autograd.grad(mean_loss(model, batch), list(model.parameters()))))
    for name in first:
        assert torch.allclose(got[f"{name}.weight"], exact[f"{name}.weight"], atol=1e-6)
    sampled = next(n for n in layers if n not in first)
    assert not torch.allclose(got[f"{sampled}.weight"], exact[f"{sampled}.weight"])
    if family == "rows-adaptive":
        stats = layers[sampled].sketch.stats
        assert stats.mean is not None and bool(stats.seen[:12].all())
        assert layers[sampled].sketch is not layers[next(iter(first))].sketch  # per layer
