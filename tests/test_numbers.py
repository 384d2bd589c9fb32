"""Numbers are valid or refused: every case here once published a wrong number with exit 0.

* low-precision models: statistics in float32/float64, never a negative variance, and bf16 /
  fp16 measurements agree with float32 within their standard errors;
* plans: one shared check that a plan names exactly the model's selected layers, finite
  targets only, ρ ≤ 1 at a fractional mean n, a scale-free solver, never worse than uniform
  at uniform's bytes; ``plan`` refuses a run with negative or non-finite variances;
* ``study throughput --memory-from`` refuses another model's, length's or grid's table.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from varstudy.errors import VarstudyError
from varstudy.measure.engine import measure_now
from varstudy.models import load_model
from varstudy.randomized import plan as P
from varstudy.randomized import variance as V
from varstudy.randomized.capture import capture, select_layers

ALPHA = 1e-3  # family-wise false-alarm rate of the statistical comparisons


def _batches(count, b=8, length=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(1000, 2000, (b, length), generator=gen),
                 labels=torch.randint(0, 2, (b,), generator=gen)) for _ in range(count)]


def _duplicates(b=8, length=16):
    """B copies of one example: every per-example gradient equals the mean, so the sampling
    variance is exactly 0 and Σ‖g_i‖² − B‖g_B‖² cancels completely."""
    one = torch.randint(1000, 2000, (1, length), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=one.repeat(b, 1), labels=torch.zeros(b, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Low precision (NOTE [low-precision capture], NOTE [never negative])
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_identical_examples_give_zero_sampling_variance_not_negative(dtype):
    """BAD: `measure --dtype bfloat16` published negative variances. With the model's own
    low-precision gradient, Σ‖g_i‖² − B‖g_B‖² comes out negative for several layers (the trap
    is real); the measured table has none and its sampling variance is 0 up to float64
    rounding (float32 models: up to the float32 gradient's rounding)."""
    model = load_model("tiny-bert", seed=0)[0].to(dtype).eval()
    batch = _duplicates()
    cap = capture(model, batch, names=select_layers(model))
    spreads = [float(V.per_example_sq_norms(x, y).sum()) - 8 * float(
        cap.grads[n].double().square().sum()) for n, (x, y) in cap.layers.items()]
    if dtype != torch.float32:
        assert sum(s < 0 for s in spreads) >= 3
    table = measure_now(model, [batch], ("gaussian", "rows", "rows-wor", "rows-norm"), (0.25,))
    assert (table.var_sampling >= 0).all() and (table.var_sketch >= 0).all()
    rel = (table.var_sampling / table.grad_sq_norm).max()
    assert rel < (1e-12 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_measurements_agree_with_float32(dtype):
    """Same weights, same 12 minibatches: per layer and family, the mean sketch and sampling
    variance of the low-precision model lies within z·√(se₃₂² + se_lp²) of float32's, with
    Bonferroni's z over all comparisons at family-wise ALPHA. The two runs see the same
    batches, so their errors are positively correlated and the true false-alarm rate is below
    ALPHA; the remaining difference is the model's own rounding, far below the batch-to-batch
    spread at this size."""
    batches = _batches(12)
    means = {}
    for dt in (torch.float32, dtype):
        model = load_model("tiny-bert", seed=0)[0].to(dt)
        rows = measure_now(model, batches, ("gaussian", "rows"), (0.25,))
        rows = rows[rows.layer != "model"].melt(["layer", "family", "batch"],
                                                ["var_sketch", "var_sampling"])
        g = rows.groupby(["layer", "family", "variable"]).value
        means[dt] = pd.DataFrame({"mean": g.mean(), "se": g.std(ddof=1) / np.sqrt(g.size())})
    ref, low = means[torch.float32], means[dtype]
    assert len(ref) == 14 * 2 * 2 and (low["mean"] >= 0).all()
    z = norm.ppf(1 - ALPHA / (2 * len(ref)))
    score = (low["mean"] - ref["mean"]).abs() / np.hypot(ref["se"], low["se"])
    assert score.max() < z, score.idxmax()


def test_measure_dtype_bfloat16_then_plan(tmp_path):
    """The issue's path, end to end: measure --dtype bfloat16 publishes no negative variance
    in any table, and plan accepts the run."""
    from varstudy import measure as M
    from varstudy import plan as command

    out = tmp_path / "bf16"
    assert M.main(["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
                   "--max-length", "8", "--num-batches", "3", "--families", "rows,rows-wor",
                   "--ratios", "0.25", "--mc-layers", "classifier", "--mc-draws", "2",
                   "--dtype", "bfloat16", "--no-progress", "--out", str(out)]) == 0
    layers = pd.read_csv(out / "layers.csv")
    assert (layers.var_sketch >= 0).all() and (layers.var_sampling >= 0).all()
    for name in ("summary.csv", "scopes.csv"):
        table = pd.read_csv(out / name)
        assert (table[["var_sketch_mean", "var_sampling_mean"]] >= 0).all(axis=None), name
    assert command.main(["--from", str(out), "--family", "rows-wor", "--budget", "0.25",
                         "--out", str(tmp_path / "plan.json")]) == 0


def test_rounding_guard_clips_within_its_bound_and_refuses_beyond():
    """NOTE [never negative]: a negative closed form is 0 within its rounding bound and an
    error beyond it; a float32 gradient carries its own bound (a_err)."""
    m = V.Moments(s=10.0, a=10.0 * (1 + 1e-10), p=1.0, n=10)  # rows-norm: s − a = −1e-9
    assert V.closed_form("rows-norm", m, 2) == 0.0
    with pytest.raises(VarstudyError, match="negative beyond its rounding bound"):
        V.closed_form("rows-norm", V.Moments(s=10.0, a=11.0, p=1.0, n=10), 2)
    assert V.closed_form("rows-norm", V.Moments(s=10.0, a=11.0, p=1.0, n=10, a_err=2.0), 2) == 0
    x, y = torch.randn(4, 6, 5), torch.randn(4, 6, 3)
    g32 = (y.reshape(-1, 3).T @ x.reshape(-1, 5)).float()
    m32 = V.moments(x, y, g32)
    assert 0 < m32.a_err < 1e-4 * m32.s and V.moments(x, y).a_err == 0.0
    assert V.moments(x, y, g32.bfloat16()).a_err == 0.0  # recomputed from X, Y in float64
    sq = V.per_example_sq_norms(x, y)
    with pytest.raises(VarstudyError, match="sampling variance came out"):
        V.sampling_from_norms(sq, float(sq.sum()) / 4 * 1.5, math.inf)


# --------------------------------------------------------------------------------------------
# A plan names exactly the model's selected layers (NOTE [a plan names exactly its layers])
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """A rows plan of tiny-bert from measure_now statistics, and the model."""
    import json

    from varstudy.plan import stats_from_layers, to_json

    model, _ = load_model("tiny-bert", seed=0)
    batches = _batches(2, b=4, length=8)
    stats = stats_from_layers(measure_now(model, batches, ("rows",), (0.25,)), "rows")
    plan = to_json(P.plan_budget(stats, "rows", P.uniform(stats, "rows", 0.25).total_stored),
                   stats, nominal_ratio=0.25)
    root = tmp_path_factory.mktemp("plans")

    def write(name, layers):
        path = root / f"{name}.json"
        path.write_text(json.dumps(dict(plan, layers=layers)))
        return str(path)
    return model, batches, plan, write


def test_plan_of_another_model_is_refused_by_measure_now_and_randomize(tiny_plan):
    """BAD: measure --plan with another model's plan reported zero sketch variance everywhere
    as a normal result. One check, one message, naming the extra and the missing layers."""
    from varstudy.randomized.layers import randomize

    model, batches, plan, write = tiny_plan
    layers = dict(plan["layers"])
    layers["other.dense"] = layers.pop("classifier")
    path = write("other", layers)
    errors = []
    for use in (lambda: measure_now(model, batches, plan=path),
                lambda: randomize(load_model("tiny-bert", seed=0)[0], plan=path)):
        with pytest.raises(VarstudyError) as err:
            use()
        errors.append(str(err.value))
    assert errors[0].replace("measured model", "model") == errors[1]
    msg = errors[1]
    assert "lacks 1 it names (other.dense)" in msg and "leaves out 1" in msg
    assert "(classifier)" in msg and "valid choices:" in msg and "\n" not in msg
    assert set(measure_now(model, batches, plan=write("same", plan["layers"])).family) == {"rows"}


def test_partial_and_empty_plans_are_refused(tiny_plan):
    from varstudy.randomized.layers import randomize

    model, batches, plan, write = tiny_plan
    partial = {k: v for k, v in plan["layers"].items() if "encoder" in k}
    with pytest.raises(VarstudyError, match=r"leaves out 2 .*bert\.pooler\.dense, classifier"):
        measure_now(model, batches, plan=write("partial", partial))
    # the same plan fits the layers it was made for, when exactly those are selected
    assert len(measure_now(model, batches, layers="encoder", plan=write("partial2", partial)))
    fresh = load_model("tiny-bert", seed=0)[0]
    assert len(randomize(fresh, plan=write("partial3", partial), include="encoder")) > 0
    for use in (lambda p: measure_now(model, batches, plan=p),
                lambda p: randomize(load_model("tiny-bert", seed=0)[0], plan=p)):
        with pytest.raises(VarstudyError, match="plan names no layers"):
            use(write("empty", {}))


def test_measure_and_finetune_commands_refuse_another_models_plan(tiny_plan, tmp_path, capsys):
    from varstudy import finetune
    from varstudy import measure as M

    _, _, plan, write = tiny_plan
    layers = dict(plan["layers"])
    layers["other.dense"] = layers.pop("classifier")
    path = write("other_cli", layers)
    assert M.main(["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
                   "--max-length", "8", "--num-batches", "1", "--mc-draws", "0",
                   "--no-progress", "--plan", path, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "lacks 1 it names (other.dense)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m" / "layers.csv").exists()
    assert finetune.main(["--model", "tiny-bert", "--task", "synthetic", "--max-steps", "1",
                          "--out", "none", "--plan", path]) == 2
    err = capsys.readouterr().err.strip()
    assert "lacks 1 it names (other.dense)" in err and len(err.splitlines()) == 1


def test_bench_layers_refuses_another_models_plan_before_timing(tiny_plan, monkeypatch):
    """bench layers: the same shared check, before the first configuration is timed."""
    from varstudy.bench import layers_run
    from varstudy.bench.layers import LayerBenchConfig

    _, _, plan, write = tiny_plan
    layers = dict(plan["layers"])
    layers["other.dense"] = layers.pop("classifier")
    steps = []
    monkeypatch.setattr(layers_run, "_step", lambda *a: steps.append(a) or 0.0)
    cfg = LayerBenchConfig(model="tiny-bert", batch_size=2, seq_len=8, families=("rows",),
                           ratios=(0.5,), plans=(write("other_bench", layers),), repeats=1,
                           device="cpu", progress=False)
    with pytest.raises(VarstudyError, match=r"benchmarked model lacks 1 it names \(other"):
        layers_run.run(cfg)
    assert steps == []


# --------------------------------------------------------------------------------------------
# The plan solver
# --------------------------------------------------------------------------------------------


def _layers(rng, units=6, n=(64, 512), frac=False, scale=1.0):
    """Realistic magnitudes: C ~ 1e-6 (lognormal), D = d·n ~ 1e4..1e5 numbers."""
    out = []
    for u in range(units):
        rows = float(rng.integers(*n)) + (float(rng.uniform(0.1, 0.9)) if frac else 0.0)
        d = int(rng.choice([32, 64, 128]))
        for j in range(int(rng.integers(1, 3))):
            out.append(P.LayerStats(f"l{u}.{j}", f"u{u}", d, rows,
                                    scale * float(rng.lognormal(-14, 2)),
                                    scale * float(rng.lognormal(-12, 1))))
    return out


def _scaled(layers, factor):
    return [P.LayerStats(s.name, s.unit, s.d, s.n, s.c * factor, s.v * factor) for s in layers]


@pytest.mark.parametrize("factor", [1e-20, 1e26])
def test_solver_is_scale_free(factor):
    """BAD: the bisection bracket was fixed (λ in e^±60): constants ×1e-20 changed the plan,
    ×1e26 crashed it. All variance constants times any factor: the same plan."""
    rng = np.random.default_rng(11)
    for family in ("rows", "gaussian", "rows-wor"):
        layers = _layers(rng)
        big = _scaled(layers, factor)
        budget = P.uniform(layers, family, 0.1).total_stored
        for objective in ("absolute", "relative"):
            a = P.plan_budget(layers, family, budget, objective=objective)
            b = P.plan_budget(big, family, budget, objective=objective)
            assert a.ratios == b.ratios, (family, objective)
            assert b.total_var == pytest.approx(a.total_var * factor, rel=1e-9)
        for per_layer in (False, True):
            a = P.plan_target(layers, family, 0.5, per_layer=per_layer)
            b = P.plan_target(big, family, 0.5, per_layer=per_layer)
            assert a.ratios == b.ratios, (family, per_layer)


def test_rows_wor_plans_keep_rho_at_most_one_at_fractional_n():
    """BAD: rows-wor plans from a fractional mean n (dynamic padding) got ρ > 1 and a negative
    predicted variance."""
    rng = np.random.default_rng(4)
    for _ in range(20):
        layers = _layers(rng, units=4, n=(3, 9), frac=True)
        total = sum(s.d * s.n for s in {s.unit: s for s in layers}.values())
        plans = [P.uniform(layers, "rows-wor", r) for r in (0.5, 0.9, 1.0)]
        plans += [P.plan_budget(layers, "rows-wor", f * total) for f in (0.5, 0.95, 1.0)]
        plans += [P.plan_target(layers, "rows-wor", t, per_layer=pl)
                  for t in (0.01, 1.0) for pl in (False, True)]
        for plan in plans:
            rhos = [r for r in plan.ratios.values() if r != P.EXACT]
            assert all(0 < r <= 1 for r in rhos), plan.ratios
            assert min(plan.var.values()) >= 0
            assert all(plan.k[s.name] <= round(s.n) for s in layers)


def test_plan_at_uniform_bytes_is_never_worse_than_uniform():
    """BAD: at small n the rounded plan could be worse than uniform ρ at uniform's own bytes.
    Uniform's rounding is a candidate: over random small instances the plan is never worse,
    and some instances need it (the candidate is not dead code)."""
    used = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        layers = [P.LayerStats(f"l{u}", f"u{u}", int(rng.choice([2, 3, 5])),
                               float(rng.integers(2, 6)), float(rng.lognormal(0, 2)),
                               float(rng.lognormal(0, 1))) for u in range(3)]
        for family in ("rows", "rows-wor", "gaussian"):
            for ratio in (0.2, 0.5):
                uniform = P.uniform(layers, family, ratio)
                for objective in ("absolute", "relative"):
                    plan = P.plan_budget(layers, family, uniform.total_stored,
                                         objective=objective, uniform_ratio=ratio)
                    got, base = ((plan.total_var, uniform.total_var) if objective == "absolute"
                                 else (plan.relative(layers), uniform.relative(layers)))
                    assert got <= base * (1 + 1e-12), (seed, family, ratio, objective)
                    assert plan.total_stored <= uniform.total_stored * (1 + 1e-12)
                    used += plan.meta["rounding"] == "uniform"
    assert used > 0


@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0, 0.0])
def test_non_finite_targets_and_budgets_are_refused(bad):
    """BAD: plan --target-ratio inf hung (the rounding gave back rows forever)."""
    layers = [P.LayerStats("a", "a", 4, 10, 1.0, 1.0), P.LayerStats("b", "b", 4, 10, 2.0, 1.0)]
    with pytest.raises(VarstudyError, match="must be > 0 and finite"):
        P.plan_target(layers, "rows", bad)
    with pytest.raises(VarstudyError, match="must be > 0 and finite"):
        P.plan_budget(layers, "rows", bad)
    with pytest.raises(VarstudyError, match="valid: finite variances"):
        P.plan_budget([P.LayerStats("a", "a", 4, 10, bad if bad != 0 else -1.0, 1.0)],
                      "rows", 20.0)


@pytest.mark.parametrize("argv,words", [
    (["--target-ratio", "inf"], "--target-ratio must be > 0 and finite"),
    (["--target-ratio", "nan"], "--target-ratio must be > 0 and finite"),
    (["--budget", "inf"], "(0, 1]"),
    (["--budgets", "0.1,nan"], "(0, 1]"),
    (["--budget", "0.1", "--min-rows", "0"], "--min-rows must be an integer >= 1"),
])
def test_plan_command_refuses_non_finite_targets(argv, words, tmp_path, capsys):
    from varstudy import plan as command

    assert command.main(["--from", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def _layers_csv(tmp_path, layer, column, value):
    model, _ = load_model("tiny-bert", seed=0)
    table = measure_now(model, _batches(2, b=4, length=8), ("rows",), (0.25,))
    table[column] = table[column].astype(float)
    table.loc[table.layer == layer, column] = value
    (tmp_path / "run").mkdir()
    table.to_csv(tmp_path / "run" / "layers.csv", index=False)
    return tmp_path / "run"


@pytest.mark.parametrize("column,value", [("var_sampling", -1e-9), ("var_sketch", math.nan),
                                          ("var_sketch", math.inf)])
def test_plan_refuses_a_run_with_negative_or_non_finite_variances(column, value, tmp_path,
                                                                  capsys):
    """BAD: plan accepted the bf16 run's negative variances and planned from them."""
    from varstudy import plan as command

    run = _layers_csv(tmp_path, "classifier", column, value)
    assert command.main(["--from", str(run), "--budget", "0.25",
                         "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"negative or non-finite {column}" in err and "layer classifier" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "p.json").exists()


# --------------------------------------------------------------------------------------------
# study throughput --memory-from
# --------------------------------------------------------------------------------------------


def _memory_csv(path, model="tiny-bert", task="synthetic", seq_len=16,
                grid=(("exact", 1.0), ("rows", 0.1)), sizes=(2, 4)):
    rows = [dict(task=task, model=model, family=f, ratio=r, batch_size=b, seq_len=seq_len,
                 saved_mib=1.0 + b, saved_linear_mib=0.5 * b, peak_cuda_mib=math.nan,
                 device="cpu") for f, r in grid for b in sizes]
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("change,words", [
    (dict(model="minilm"), "another model: ['minilm'] where this study has ['tiny-bert']"),
    (dict(task="rotten_tomatoes"), "another task"),
    (dict(seq_len=64), "another seq_len (max_length): [64] where this study has [16]"),
    (dict(grid=(("exact", 1.0),)), "lacks 2 configuration(s) of this study's grid: rows 0.1 "
                                    "at B=2, rows 0.1 at B=4"),
    (dict(grid=(("exact", 1.0), ("rows", 0.2))), "lacks 2 configuration(s)"),
    (dict(sizes=(2, 8)), "lacks 2 configuration(s) of this study's grid: exact 1 at B=4"),
])
def test_throughput_refuses_another_studys_memory_table(change, words, tmp_path):
    """BAD: study throughput --memory-from silently fitted another model's or grid's memory.
    Another model, task or length is refused; so is a table lacking a configuration."""
    from varstudy.study import StudyConfig
    from varstudy.study.config import check_memory_from
    from varstudy.study.throughput_study import throughput

    config = StudyConfig(model="tiny-bert", task="synthetic", families=("rows",),
                         ratios=(0.1,), batch_sizes=(2, 4), batch_size=2, max_length=16,
                         repeats=1, warmup_steps=0, out=str(tmp_path), progress=False,
                         memory_from=_memory_csv(tmp_path / "m.csv"))
    check_memory_from(config)  # the matching table passes
    from dataclasses import replace

    bad = replace(config, memory_from=_memory_csv(tmp_path / "bad.csv", **change))
    with pytest.raises(VarstudyError) as err:
        throughput(bad)  # refused before the timing starts
    msg = str(err.value)
    assert words in msg and "valid choices:" in msg and "\n" not in msg
    assert not (tmp_path / "throughput").exists()


def test_a_wider_memory_table_is_fitted_on_this_studys_rows_only(tmp_path):
    """A memory.csv of a larger grid (more families, ratios and batch sizes) is accepted, and
    only this study's configurations at its batch sizes enter the max-batch fit."""
    from varstudy.study import StudyConfig
    from varstudy.study.config import check_memory_from, memory_rows
    from varstudy.study.throughput_study import max_batch

    path = _memory_csv(tmp_path / "m.csv", grid=(("exact", 1.0), ("rows", 0.1), ("rows", 0.5),
                                                 ("gaussian", 0.1)), sizes=(2, 4, 8))
    config = StudyConfig(model="tiny-bert", task="synthetic", families=("rows",),
                         ratios=(0.1,), batch_sizes=(2, 4), max_length=16, memory_from=path)
    check_memory_from(config)
    rows = memory_rows(config, pd.read_csv(path))
    assert sorted(zip(rows.family, rows.ratio, rows.batch_size)) == [
        ("exact", 1.0, 2), ("exact", 1.0, 4), ("rows", 0.1, 2), ("rows", 0.1, 4)]
    assert set(max_batch(rows, 100.0).family) == {"exact", "rows"}
