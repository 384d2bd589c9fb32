"""Row sketches that draw real (non-padding) token rows only (NOTE [real rows] in sketches):
unbiased with their closed forms under a mask, wired to the model's attention mask, measured by
the engine."""

import math

import pandas as pd
import pytest
import torch
from scipy.stats import norm

from varstudy.batching import encode
from varstudy.data import load_dataset
from varstudy.measure import MeasureConfig, measure_now
from varstudy.models import load_model
from varstudy.randomized.layers import RandomizedLinear, derandomize, randomize
from varstudy.randomized.sketches import SKETCHES

ALPHA = 1e-3  # family-wise false-alarm rate of the Monte Carlo checks below


def _padded(n=40, real=24, d_in=6, d_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    mask = torch.zeros(n, dtype=torch.long)
    mask[torch.randperm(n, generator=g)[:real]] = 1
    y[mask == 0] = 0.0  # padding rows carry no gradient
    return x, y, mask


@pytest.mark.parametrize("name", ["rows-real", "rows-wor-real"])
def test_unbiased_with_the_closed_form_under_a_mask(name):
    """Per entry, mean of K draws of Ĝ vs G: z-scores with the closed-form entry variances
    (Bonferroni over entries at ALPHA/2); and the mean squared error vs the closed form with a
    CLT interval from the draws themselves (ALPHA/2)."""
    sketch, (x, y, mask), k, draws = SKETCHES[name], _padded(), 12, 4000
    g = y.T @ x
    est = torch.stack([sketch.estimate(x, y, k, s, mask) for s in range(draws)])
    ev = sketch.entry_variance(x, y, k, mask)
    z = (est.mean(0) - g) / (ev / draws).sqrt().clamp_min(1e-300)
    assert z.abs().max() < norm.isf(ALPHA / (4 * z.numel()))
    err = (est - g).square().sum((1, 2))
    zt = (err.mean() - sketch.variance(x, y, k, mask)) / (err.std() / math.sqrt(draws))
    assert abs(zt) < norm.isf(ALPHA / 4)
    plain = SKETCHES["rows" if name == "rows-real" else "rows-wor"]
    assert sketch.variance(x, y, k, mask) < plain.variance(x, y, k)  # k spent on real rows


def test_without_a_mask_it_is_the_plain_row_family():
    x, y, _ = _padded()
    for real, plain in (("rows-real", "rows"), ("rows-wor-real", "rows-wor")):
        assert SKETCHES[real].variance(x, y, 10) == pytest.approx(
            float(SKETCHES[plain].variance(x, y, 10)))


def _batch(length=24):
    _, tok = load_model("tiny-bert")
    enc = encode(load_dataset("synthetic", "train"), tok, length)
    batch = {k: v[:6] for k, v in enc.items()}
    assert (batch["attention_mask"] == 0).float().mean() > 0.3  # mostly padding
    return batch


def test_layers_read_the_attention_mask():
    """At ρ = 0.75 > m/n, rows-wor-real keeps every real row of the token layers: their weight
    gradients equal the exact ones, which a mask-blind sketch would not give."""
    batch = _batch()
    exact, _ = load_model("tiny-bert", dropout=False, seed=0)
    exact(**batch).loss.backward()
    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    randomize(model, 0.75, "rows-wor-real", include=r"encoder", seed=5)
    model(**batch).loss.backward()
    for (name, p), q in zip(model.named_parameters(), exact.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    blind, _ = load_model("tiny-bert", dropout=False, seed=0)
    randomize(blind, 0.75, "rows-wor", include=r"encoder", seed=5)
    blind(**batch).loss.backward()
    w = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.allclose(dict(blind.named_parameters())[w].grad,
                              dict(exact.named_parameters())[w].grad)
    assert hasattr(model, "_varstudy_row_mask")
    derandomize(model)
    assert not hasattr(model, "_varstudy_row_mask")
    assert not any(isinstance(m, RandomizedLinear) for m in model.modules())


def test_engine_measures_the_real_row_families():
    """Closed forms with m real rows: (m·p − a)/k against rows' (n·p − a)/k, on tiny-bert,
    whose padding rows carry exactly no gradient (checked by the engine)."""
    batch = _batch()
    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    rows = measure_now(model, [batch], ("rows", "rows-real"), (0.25,))
    enc = rows[rows.layer == "bert.encoder.layer.1.output.dense"].set_index("family")
    m = int(batch["attention_mask"].sum())
    n = int(enc.loc["rows", "n_rows"])
    k = int(enc.loc["rows", "k"])
    # from rows: n·p − a = var·k; a = grad_sq_norm; so p = (var·k + a)/n
    a = enc.loc["rows", "grad_sq_norm"]
    p = (enc.loc["rows", "var_sketch"] * k + a) / n
    assert enc.loc["rows-real", "var_sketch"] == pytest.approx((m * p - a) / k, rel=1e-9)
    head = rows[rows.layer == "classifier"].set_index("family")
    assert head.loc["rows-real", "var_sketch"] == head.loc["rows", "var_sketch"]  # B rows, all real
    assert MeasureConfig(families=("rows-real",)).families == ("rows-real",)
    assert isinstance(rows, pd.DataFrame)
