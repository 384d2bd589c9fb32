"""wta-crs (varstudy.randomized.wtacrs): unbiased at every cache state, with the conditional
closed form (wta), by Monte Carlo with tolerances from the statistics; the adaptive top-part rule
against brute force; the per-example cache in a randomized model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from varstudy.errors import VarstudyError
from varstudy.randomized import wtacrs as W

N_ROWS, D_IN, D_OUT = 12, 4, 3


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_ROWS, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(N_ROWS, D_OUT, generator=gen, dtype=torch.float64)
    y[:3] *= 6  # a few heavy rows: the adaptive rule keeps some of them exactly
    y[8:] = 0   # rows without gradient (padding, structural zeros)
    return x, y


def _check(sketch, x, y, k, draws, z=4.5):
    """Each entry's mean within z SE of G and the mean squared error within z SE of (wta):
    z = 4.5 gives < 1e-4 false alarms over the 13 checks of a call (two-sided, Bonferroni)."""
    g = y.T @ x
    est = torch.stack([sketch.estimate(x, y, k, 7919 * d + 1) for d in range(draws)])
    se = est.std(0) / math.sqrt(draws)
    assert ((est.mean(0) - g).abs() <= z * se + 1e-12).all()
    err = (est - g).square().sum((1, 2))
    expected = sketch.variance(x, y, k)
    assert abs(float(err.mean()) - expected) <= z * float(err.std()) / math.sqrt(draws) + 1e-12
    return expected


@pytest.mark.parametrize("state", ["first-visit", "stale", "previous-visit"])
def test_unbiased_with_its_closed_form_at_every_cache_state(state):
    """First visit (q ∝ ‖x‖), a stale cache (another minibatch's norms) and the exact previous
    visit: unbiased, and the closed form is the Monte Carlo variance. The public code's first
    visit drops the importance weight: its estimate is measured biased here."""
    x, y = _batch()
    prior = {"first-visit": torch.ones(N_ROWS),
             "stale": _batch(5)[1].norm(dim=1) + 0.1,
             "previous-visit": y.norm(dim=1)}[state]
    sketch = W.WtaCrs(prior=prior)
    k = 5
    _check(sketch, x, y, k, 6000)
    if state == "first-visit":  # the public first-epoch scaling (1 − P_c) only, measured
        q = W.probabilities(x, prior)
        _, c, in_top, r = W.split(q, k)
        top = y[in_top].T @ x[in_top]
        rest = ~in_top
        mean_public = top + (k - int(c)) * (1 - q[in_top].sum()) * (
            (r[rest, None, None] * (y[rest, :, None] * x[rest, None, :])).sum(0))
        assert (mean_public - y.T @ x).abs().max() > 1e-2 * (y.T @ x).abs().max()


def test_previous_visit_is_at_most_the_best_split_limit_and_below_first_visit():
    """With the exact norms cached, q is the limit's q (up to δ) and the top part is the public
    rule's: never below the best split (limit), well below the first visit here."""
    from varstudy.randomized.limit import limits

    x, y = _batch()
    k = 5
    lim = limits(x, y, [k])[0]
    fresh = W.WtaCrs(prior=y.norm(dim=1)).variance(x, y, k)
    first = W.WtaCrs(prior=torch.ones(N_ROWS)).variance(x, y, k)
    assert lim.split - 1e-9 * lim.opt <= fresh <= lim.opt * (1 + 1e-6)
    assert fresh < first


def test_top_count_is_the_argmin_of_the_public_rule():
    gen = torch.Generator().manual_seed(3)
    for trial in range(50):
        q = torch.rand(9, generator=gen, dtype=torch.float64) ** 4
        q /= q.sum()
        k = 1 + trial % 8
        top = sorted(q.tolist(), reverse=True)
        scores = [(1 - sum(top[:c])) / (k - c) for c in range(k)]
        assert int(W.top_count(q, k)) == min(range(k), key=scores.__getitem__)


def test_zero_variance_when_the_top_part_holds_every_row_with_gradient():
    """Rows with y = 0 past the top part: the estimate is exact, every draw."""
    x, y = _batch()
    y[2:] = 0
    sketch = W.WtaCrs(prior=y.norm(dim=1))
    assert sketch.variance(x, y, 4) == pytest.approx(0.0, abs=1e-20)
    for seed in range(5):
        assert torch.allclose(sketch.estimate(x, y, 4, seed), y.T @ x, atol=1e-12)


def test_enumeration_matches_the_closed_form_on_tiny_n():
    """Exact expectation over every with-replacement draw sequence (n = 4, k − c ≤ 2)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    prior = torch.tensor([3.0, 0.5, 1.0, 0.2])
    for k in (1, 2, 3):
        q = W.probabilities(x, prior)
        _, c, in_top, r = W.split(q, k)
        rest = [i for i in range(4) if not in_top[i]]
        draws = k - int(c)
        g = y.T @ x
        fixed = y[in_top].T @ x[in_top]
        mean = torch.zeros_like(g)
        second = 0.0
        for seq in itertools.product(rest, repeat=draws):
            prob = math.prod(float(r[i]) for i in seq)
            est = fixed + sum(torch.outer(y[i], x[i]) / (draws * r[i]) for i in seq)
            mean += prob * est
            second += prob * float((est - g).square().sum())
        assert torch.allclose(mean, g, atol=1e-12)
        assert second == pytest.approx(W.conditional_variance(x, y, q, k), rel=1e-9)


def test_mixed_batch_fills_unseen_examples_with_the_seen_mean():
    cached = torch.tensor([[2.0, 0.0], [0.0, 0.0], [4.0, 1.0]])
    seen = torch.tensor([True, False, True])
    c = W.prior_norms(cached, seen)
    assert c[1].tolist() == [pytest.approx(7 / 3)] * 2 and c[0].tolist() == [2.0, 0.0]
    assert W.prior_norms(cached, torch.zeros(3, dtype=torch.bool)).eq(1).all()


def _tiny():
    from varstudy.models import load_model

    model, _ = load_model("tiny-bert", num_labels=2, seed=0)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, 100, (4, 6), generator=gen),
             "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,), generator=gen)}
    return model, batch


def test_randomized_model_caches_each_examples_norms_by_dataset_index():
    from varstudy.randomized.layers import RandomizedLinear, randomize

    model, batch = _tiny()
    randomize(model, 0.5, "wta-crs", include=r"encoder", seed=1)
    layer = next(m for m in model.modules() if isinstance(m, RandomizedLinear))
    with pytest.warns(UserWarning, match="set_examples"):  # a first visit, nothing cached
        model(**batch).loss.backward()
    assert int(layer.sketch.stats.seen.sum()) == 0
    model.zero_grad()
    ids = torch.tensor([7, 2, 11, 0])
    W.set_examples(model, ids)
    model(**batch).loss.backward()
    stats = layer.sketch.stats
    assert stats.seen[ids].all() and int(stats.seen.sum()) == 4 and stats.norms.shape == (12, 6)
    assert (stats.norms[ids] > 0).any() and stats.norms[1].eq(0).all()
    assert W.cache_bytes(model) == sum(m.sketch.stats.bytes for m in model.modules()
                                       if isinstance(m, RandomizedLinear)) > 0
    siblings = [m.sketch for m in model.modules() if isinstance(m, RandomizedLinear)]
    assert len({id(s) for s in siblings}) == len(siblings)  # one cache per layer


@pytest.mark.parametrize("ids", [torch.tensor([[1, 2]]), torch.tensor([1.0, 2.0]),
                                 torch.tensor([-1, 2])])
def test_bad_example_ids_are_refused(ids):
    model, _ = _tiny()
    with pytest.raises(VarstudyError, match="non-negative integer"):
        W.set_examples(model, ids)


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """measure on tiny-bert, wta-crs beside rows, at both cache states (one batch, MC on all)."""
    import pandas as pd

    from varstudy.measure.command import main

    out = {}
    for cache in ("first-visit", "previous-visit"):
        folder = tmp_path_factory.mktemp(cache)
        assert main(["--model", "tiny-bert", "--dataset", "synthetic", "--families",
                     "rows,wta-crs", "--ratios", "0.2", "--num-batches", "2", "--batch-size",
                     "4", "--max-length", "16", "--mc-draws", "400", "--mc-layers", ".*",
                     "--wtacrs-cache", cache, "--out", str(folder), "--no-progress"]) in (0, None)
        out[cache] = pd.read_csv(folder / "layers.csv")
    return out


def test_engine_closed_form_matches_its_monte_carlo(engine_runs):
    """Every layer's wta-crs closed form within z SE of its 400-draw Monte Carlo mean, z from a
    family-wise false-alarm rate of 1e-3 (two-sided, Bonferroni over the checked layers)."""
    assert _check_engine_mc(engine_runs.values()) >= 20


def _check_engine_mc(frames) -> int:
    """Check every Monte Carlo'd wta-crs row of ``frames``; returns how many there were."""
    from scipy.stats import norm

    rows = []
    for f in frames:
        uniform = f[f.family == "rows"].set_index(["batch", "layer"]).var_sketch
        r = f[(f.family == "wta-crs") & (f.layer != "model") & (f.mc_draws > 0)]
        rows.append(r.assign(scale=uniform.loc[list(zip(r.batch, r.layer))].to_numpy()))
    checked = sum(len(r) for r in rows)
    z = norm.isf(1e-3 / (2 * checked))
    for r in rows:
        # an exact layer (every row with gradient in the top part: closed form 0) shows only
        # float32 rounding in its draws: below 1e-9 of the size of its terms (uniform rows'
        # variance), n²u² ≈ 1e-11 here with u = 2⁻²⁴
        exact = r.var_sketch == 0
        assert (r.var_sketch_mc[exact] <= 1e-9 * r.scale[exact]).all()
        r = r[~exact]
        dev = (r.var_sketch_mc - r.var_sketch).abs() / r.var_sketch_mc_se
        assert (dev <= z).all(), r.loc[dev > z, ["layer", "var_sketch", "var_sketch_mc"]]
    return checked


@pytest.fixture(scope="module")
def stale_runs(tmp_path_factory):
    """measure on a saved tiny-bert A with previous-visit's cache from A itself (own weights,
    and A loaded again as --wtacrs-cache-model) and from another tiny-bert B (a stale cache)."""
    import pandas as pd

    from varstudy.measure.command import main
    from varstudy.models import load_model

    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        models[name] = tmp_path_factory.mktemp(f"model_{name}")
        load_model("tiny-bert", num_labels=2, seed=seed)[0].save_pretrained(models[name])
    out = {}
    for case, extra, draws in (("own", [], "0"),
                               ("a", ["--wtacrs-cache-model", str(models["a"])], "0"),
                               ("b", ["--wtacrs-cache-model", str(models["b"])], "400")):
        folder = tmp_path_factory.mktemp(f"stale_{case}")
        assert main(["--model", str(models["a"]), "--dataset", "synthetic", "--families",
                     "rows,wta-crs", "--ratios", "0.2", "--num-batches", "1", "--batch-size",
                     "4", "--max-length", "16", "--mc-draws", draws, "--mc-layers", ".*",
                     "--wtacrs-cache", "previous-visit", "--out", str(folder),
                     "--no-progress", *extra]) in (0, None)
        out[case] = pd.read_csv(folder / "layers.csv")
    return out


def test_a_cache_model_with_the_measured_weights_is_the_measured_cache(stale_runs):
    own, same, other = (stale_runs[c][stale_runs[c].family == "wta-crs"]
                        .set_index(["batch", "layer"]).var_sketch for c in ("own", "a", "b"))
    assert own.to_numpy().tolist() == same.to_numpy().tolist()
    assert not own.equals(other)  # another model's norms: another sampler


def test_a_stale_cache_keeps_the_closed_form_and_stays_above_the_split_limit(stale_runs):
    """Given another model's norms the closed form still matches its Monte Carlo (the sampler
    is unbiased with any prior), costs more than the measured weights' own cache in the model
    total, and no sampler of its kind beats the split limit."""
    own, stale = (stale_runs[c] for c in ("own", "b"))
    layers = stale[(stale.family == "wta-crs") & (stale.layer != "model")].layer.nunique()
    assert _check_engine_mc([stale]) == layers  # every layer of the Monte Carlo'd batch
    total = [float(f[(f.family == "wta-crs") & (f.layer == "model")].var_sketch.sum())
             for f in (own, stale)]
    assert total[1] > total[0]
    s = stale[(stale.family == "wta-crs") & (stale.layer != "model")]
    slack = 1e-5 * (s.k * s.var_limit + s.grad_sq_norm)
    assert (s.var_sketch >= s.var_limit_split - slack).all()


def test_a_cache_model_needs_wta_crs_under_previous_visit():
    from varstudy.measure.config import MeasureConfig

    for kwargs in (dict(families=("rows", "wta-crs")), dict(families=("rows",),
                                                            wtacrs_cache="previous-visit")):
        with pytest.raises(VarstudyError, match="valid choices: --wtacrs-cache previous-visit "
                                                "with wta-crs among the families"):
            MeasureConfig(wtacrs_cache_model="somewhere", **kwargs)


def test_engine_previous_visit_beats_first_visit_and_stays_above_the_split_limit(engine_runs):
    first, prev = (f[(f.family == "wta-crs") & (f.layer != "model")].set_index(["batch", "layer"])
                   for f in (engine_runs["first-visit"], engine_runs["previous-visit"]))
    assert prev.var_sketch.sum() < first.var_sketch.sum()
    # q is the limit's up to the bfloat16 cache and the floor δ, so wta-crs is the limit's
    # top-by-‖x‖‖y‖ split up to rounding. Both subtract a = ‖G‖² from (Σ‖x‖‖y‖)² = k·limit + a,
    # the engine's limit with the model's float32 gradient: slack 1e-5 of that sum.
    slack = 1e-5 * (prev.k * prev.var_limit + prev.grad_sq_norm)
    assert (prev.var_sketch >= prev.var_limit_split - slack).all()
