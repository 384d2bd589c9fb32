"""End to end: the engine's variance decomposition against a brute force of the randomized model.

Population: N = 8 examples (synthetic sentences written as a GLUE SST-2 ``train.tsv`` in a
temporary ``data_dir``, so the engine sees exactly N examples and uses N in its
finite-population correction), tiny-bert in float64 without dropout, L = 14 tokens (some
examples padded, some truncated), B = 4, ratio 0.5, families gaussian and rows, three layers:
an encoder linear (X of shape (B, L, d)), the pooler and the classifier ((B, d)).

The engine (``measure.run``) is run over ALL C(N, B) = 70 minibatches, one each (its batch
sampler is replaced by an enumeration), so its summary means are exact expectations over the
uniform without-replacement batch draw: ``var_sampling_mean`` = E_B[(σ̂²/B)(1 − B/N)] and
``var_sketch_mean`` = E_B[closed form given B]. The brute force never uses those formulas:

* exact part: g_B of every minibatch from autograd (``capture``), ḡ their mean, and
  Var_B[g_B] = mean_B ‖g_B − ḡ‖² directly (also ḡ = the full-population gradient);
* randomized part: the model converted by ``randomize`` (real RandomizedLinear forward and
  backward), R sketch draws per minibatch, ĝ read off autograd.

Comparisons, per (family, layer):

1. sampling: var_sampling_mean = Var_B[g_B] is an identity (Cochran, Thm 2.2), so the
   tolerance is rounding only (rtol 1e-9 in float64).
2. sketch: T = mean over batches and draws of ‖ĝ − g_B‖² estimates E_B Var_S(ĝ | B) with
   standard error SE² = Σ_B s²_B / (R·C²) (s²_B: variance over the draws of batch B; batches
   are enumerated, not sampled, so they add no error); |T − var_sketch_mean| ≤ z·SE.
3. total: T = mean of ‖ĝ − ḡ‖² estimates Var[ĝ] (law of total variance not assumed), same SE
   construction; |T − var_total| ≤ z·SE.
4. unbiasedness: d = mean of ĝ − ḡ; under E[ĝ] = ḡ, ‖d‖² is (CLT) a Gaussian quadratic form
   with mean E‖d‖² = Σ_B Var_S(ĝ | B) / (R·C²), estimated from the draws; for such forms
   P(‖d‖² ≥ t·E‖d‖²) ≤ P(χ²₁ ≥ t) for t ≥ 1.54 (Székely & Bakirov 2003), so the threshold
   t = χ²₁ quantile is conservative.
False alarms: z and t come from a family-wise rate ALPHA = 1e-3, Bonferroni over the
2 × 3 × 3 statistical comparisons (normal approximation of means of 70·R draws). Seeds are
fixed, so the test is deterministic. Power (checked below): an engine whose sampling part
lacks the FPC, or has the ARCHITECTURE.md correction (1 − (B−1)/(N−1)) with σ̂², or whose
sketch variance is 20 % off for a family, fails these comparisons.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chi2, norm

from varstudy import measure as M
from varstudy.capture import capture, mean_loss
from varstudy.data import load_dataset
from varstudy.layers import derandomize, derive_seed, randomize, reseed

N, B, L, RATIO, DRAWS = 8, 4, 14, 0.5, 16
FAMILIES = ("gaussian", "rows")
LAYERS = ("bert.encoder.layer.0.intermediate.dense", "bert.pooler.dense", "classifier")
ALPHA = 1e-3
TESTS = 3 * len(FAMILIES) * len(LAYERS)
Z_CRIT = norm.isf(ALPHA / (2 * TESTS))          # two-sided, per comparison
T_CRIT = chi2.isf(ALPHA / TESTS, df=1)          # one-sided, per comparison
COMBOS = list(itertools.combinations(range(N), B))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (2-5x slower on a busy 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pattern(names) -> str:
    return "|".join(n.replace(".", r"\.") + "$" for n in names)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """summary.csv of the engine over every minibatch, and the resolved config."""
    root = tmp_path_factory.mktemp("decomposition")
    data = load_dataset("synthetic", "train", seed=0).subset(range(N))
    (root / "SST-2").mkdir()
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "".join(
        f"{t}\t{y}\n" for t, y in zip(data.texts, data.labels)))
    cfg = M.MeasureConfig(model="tiny-bert", dataset="glue:sst2", data_dir=str(root),
                          batch_size=B, max_length=L, families=FAMILIES, ratios=(RATIO,),
                          num_batches=len(COMBOS), layers=_pattern(LAYERS), mc_draws=0,
                          dtype="float64", seed=0, out=str(root / "out"), progress=False)
    with pytest.MonkeyPatch.context() as mp:  # batch b = the b-th of all C(N, B) minibatches
        mp.setattr(M, "batch_indices", lambda num, c, step, b: torch.tensor(COMBOS[b]))
        layers = M.run(cfg)
    assert len(layers) == len(COMBOS) * (len(LAYERS) + 1) * len(FAMILIES)
    summary = pd.read_csv(root / "out" / "summary.csv").set_index(["layer", "family"])
    return summary, cfg.resolved()


@pytest.fixture(scope="module")
def brute(engine):
    """Exact per-batch gradients and, per family, R draws of the randomized model per batch."""
    _, cfg = engine
    model, encoded, population = M.prepare(cfg)
    assert population == N
    batches = [{k: v[list(c)] for k, v in encoded.items()} for c in COMBOS]
    exact = {n: torch.stack([capture(model, b, names=list(LAYERS)).grads[n] for b in batches])
             for n in LAYERS}  # (C, d_out, d_in)
    full = capture(model, encoded, names=list(LAYERS)).grads
    out = dict(exact=exact, full=full, draws={})
    for f, fam in enumerate(FAMILIES):
        randomize(model, RATIO, fam, include=_pattern(LAYERS), seed=derive_seed(1, f))
        weights = [model.get_submodule(n).weight for n in LAYERS]
        draws = {n: torch.empty((len(COMBOS), DRAWS) + exact[n].shape[1:],
                                dtype=torch.float64) for n in LAYERS}
        for i, batch in enumerate(batches):
            for r in range(DRAWS):
                reseed(model, derive_seed(2, f, i, r))
                for n, g in zip(LAYERS, torch.autograd.grad(mean_loss(model, batch), weights)):
                    draws[n][i, r] = g
        derandomize(model)
        out["draws"][fam] = draws
    return out


def _stats(brute, fam: str, name: str) -> dict:
    """Brute-force estimates and their standard errors for one (family, layer)."""
    g_b = brute["exact"][name]                     # (C, d_out, d_in)
    g_bar = g_b.mean(0)
    hat = brute["draws"][fam][name]                # (C, R, d_out, d_in)
    c, r = hat.shape[:2]

    def mean_se(values):                           # values (C, R): stratified by batch
        return float(values.mean()), float(values.var(1).sum().sqrt()) / (math.sqrt(r) * c)

    sketch, sketch_se = mean_se((hat - g_b[:, None]).square().sum((2, 3)))
    total, total_se = mean_se((hat - g_bar).square().sum((2, 3)))
    dev = hat.mean((0, 1)) - g_bar
    within = (hat - hat.mean(1, keepdim=True)).square().sum((2, 3))  # (C, R)
    bias_scale = float(within.sum(1).sum()) / (r - 1) / (r * c * c)  # estimate of E‖d‖²
    return dict(sampling=float((g_b - g_bar).square().sum((1, 2)).mean()),
                sketch=sketch, sketch_se=sketch_se, total=total, total_se=total_se,
                bias_ratio=float(dev.square().sum()) / bias_scale)


@pytest.fixture(scope="module")
def stats(brute) -> dict:
    return {(name, fam): _stats(brute, fam, name) for name in LAYERS for fam in FAMILIES}


def _failures(stats: dict, var_sketch: dict, var_sampling: dict) -> list[str]:
    """Comparisons (module docstring) that fail for the given engine values per (layer, fam)."""
    bad = []
    for key, s in stats.items():
        if not math.isclose(var_sampling[key], s["sampling"], rel_tol=1e-9):
            bad.append(f"sampling {key}: engine {var_sampling[key]:.6g}, "
                       f"exact {s['sampling']:.6g}")
        z_sketch = (s["sketch"] - var_sketch[key]) / s["sketch_se"]
        if abs(z_sketch) > Z_CRIT:
            bad.append(f"sketch {key}: z = {z_sketch:.2f}")
        z_total = (s["total"] - var_sketch[key] - var_sampling[key]) / s["total_se"]
        if abs(z_total) > Z_CRIT:
            bad.append(f"total {key}: z = {z_total:.2f}")
        if s["bias_ratio"] > T_CRIT:
            bad.append(f"bias {key}: ‖d‖²/E‖d‖² = {s['bias_ratio']:.2f}")
    return bad


def _engine_values(summary):
    sk = {key: float(summary.loc[key, "var_sketch_mean"]) for key in
          itertools.product(LAYERS, FAMILIES)}
    sa = {key: float(summary.loc[key, "var_sampling_mean"]) for key in sk}
    return sk, sa


def test_population_mean_gradient_is_the_mean_over_minibatches(brute):
    """E_B[g_B] = ḡ of all N examples: batch gradients do not depend on the other examples."""
    for name in LAYERS:
        torch.testing.assert_close(brute["exact"][name].mean(0), brute["full"][name],
                                   rtol=1e-10, atol=1e-14)


def test_engine_decomposition_matches_brute_force(engine, stats):
    summary, _ = engine
    sk, sa = _engine_values(summary)
    for key in sk:
        assert summary.loc[key, "n_batches"] == len(COMBOS)
        assert summary.loc[key, "var_total"] == pytest.approx(sk[key] + sa[key], rel=1e-12)
    assert _failures(stats, sk, sa) == []


def test_brute_force_comparison_has_power(engine, stats):
    """Wrong engines fail: no FPC, the (1 − (B−1)/(N−1)) FPC with σ̂², sketch variance ±20 %."""
    summary, _ = engine
    sk, sa = _engine_values(summary)
    fpc = 1 - B / N
    no_fpc = {k: v / fpc for k, v in sa.items()}
    cochran_pop = {k: v / fpc * (1 - (B - 1) / (N - 1)) for k, v in sa.items()}
    assert any(m.startswith("total") for m in _failures(stats, sk, no_fpc))
    assert _failures(stats, sk, cochran_pop)
    for fam in FAMILIES:
        for factor in (0.8, 1.2):
            wrong = {k: v * factor if k[1] == fam else v for k, v in sk.items()}
            assert any(m.startswith(("sketch", "total")) for m in _failures(stats, wrong, sa))
