"""The measurement engine end to end on a tiny budget (tiny-bert, synthetic data, CPU)."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from scipy.stats import t as student_t

from varstudy import measure as M
from varstudy.errors import VarstudyError

SMALL = ["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
         "--max-length", "16", "--num-batches", "2", "--families", "gaussian,rows",
         "--ratios", "0.25", "--mc-layers", "classifier", "--mc-draws", "3", "--level", "0.9",
         "--no-progress"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"run{i}")
        assert M.main(SMALL + ["--out", str(out)]) == 0
        outs.append(out)
    return outs


def test_writes_tables_with_exact_schema(two_runs):
    out = two_runs[0]
    layers, summary = pd.read_csv(out / "layers.csv"), pd.read_csv(out / "summary.csv")
    assert tuple(layers.columns) == M.LAYER_COLUMNS
    assert tuple(summary.columns) == M.SUMMARY_COLUMNS
    n_layers = 14  # tiny-bert: 2 × 6 encoder linears + pooler + classifier
    assert len(layers) == 2 * (n_layers + 1) * 2 * 1
    assert len(summary) == (n_layers + 1) * 2
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "tiny-bert" and config["device"] == "cpu"
    assert config["measure_at"] == [0] and config["population"] == 400.0
    env = json.loads((out / "env.json").read_text())
    assert {"python", "torch", "transformers", "device_name", "torch_threads"} <= set(env)
    assert "hostname" not in json.dumps(env).lower()


def test_same_seed_gives_identical_tables(two_runs):
    for name in ("layers.csv", "summary.csv"):
        assert (two_runs[0] / name).read_bytes() == (two_runs[1] / name).read_bytes()


def _t_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student t-interval (m − 1 dof), from scratch."""
    m = len(values)
    return values.mean(), student_t.ppf((1 + level) / 2, m - 1) * values.std(ddof=1) / m ** 0.5


def test_model_rows_and_summary_add_up(two_runs):
    """Model rows are sums of layer rows; summary.csv equals a recomputation from layers.csv
    (means, t-intervals at the configured level, var_total, Monte Carlo mean and SE)."""
    layers = pd.read_csv(two_runs[0] / "layers.csv")
    per = layers[layers.layer != "model"].groupby(["batch", "family", "ratio"])
    model = layers[layers.layer == "model"].set_index(["batch", "family", "ratio"])
    for col in ("var_sketch", "var_sampling", "grad_sq_norm"):
        assert np.allclose(per[col].sum().sort_index(), model[col].sort_index(), rtol=1e-12)
    assert np.allclose(layers.ratio_sketch_sampling, layers.var_sketch / layers.var_sampling)
    mc = layers[layers.mc_draws > 0]
    assert set(mc.layer) == {"classifier"} and set(mc.batch) == {0}
    assert layers[layers.mc_draws == 0].var_sketch_mc.isna().all()

    level = json.loads((two_runs[0] / "config.json").read_text())["level"]
    assert level == 0.9  # not the default, so a summary that ignores the level fails below
    keys = ["train_step", "layer", "family", "ratio"]
    summary = pd.read_csv(two_runs[0] / "summary.csv").set_index(keys)
    groups = layers.groupby(keys)
    assert len(summary) == groups.ngroups and set(summary.index) == set(groups.groups)
    for key, g in groups:
        row = summary.loc[key]
        assert row.n_batches == len(g) == 2 and row.layer_kind == g.layer_kind.iloc[0]
        assert row.k == g.k.iloc[0] or (np.isnan(row.k) and g.k.isna().all())
        for col, name in (("var_sketch", "var_sketch"), ("var_sampling", "var_sampling"),
                          ("ratio_sketch_sampling", "ratio")):
            mean, half = _t_interval(g[col].to_numpy(), level)
            low, high = row[f"{name}_ci_low"], row[f"{name}_ci_high"]
            assert row[f"{name}_mean"] == pytest.approx(mean, rel=1e-12), (key, name)
            assert (high - low) / 2 == pytest.approx(half, rel=1e-9), (key, name)
            assert (high + low) / 2 == pytest.approx(mean, rel=1e-9), (key, name)
        total = g.var_sketch.mean() + g.var_sampling.mean()
        assert row.var_total == pytest.approx(total, rel=1e-12), key
        drawn = g[g.mc_draws > 0]
        if len(drawn):
            assert row.var_sketch_mc_mean == pytest.approx(drawn.var_sketch_mc.mean(), rel=1e-12)
            se = np.sqrt((drawn.var_sketch_mc_se ** 2).sum()) / len(drawn)
            assert row.var_sketch_mc_se == pytest.approx(se, rel=1e-12)
        else:
            assert np.isnan(row.var_sketch_mc_mean) and np.isnan(row.var_sketch_mc_se)


def test_batch_rows_depend_only_on_step_and_index(tmp_path, two_runs):
    """Batch 0 of a 1-batch run equals batch 0 of the 2-batch run (distribution/resume)."""
    argv = [a if a != "2" else "1" for a in SMALL]  # --num-batches 1
    assert M.main(argv + ["--out", str(tmp_path)]) == 0
    one = pd.read_csv(tmp_path / "layers.csv")
    two = pd.read_csv(two_runs[0] / "layers.csv")
    pd.testing.assert_frame_equal(one, two[two.batch == 0].reset_index(drop=True))


def test_over_training_with_randomized_steps(tmp_path):
    cfg = M.MeasureConfig(model="tiny-bert", dataset="synthetic", batch_size=4, max_length=16,
                          num_batches=2, families=("rows-norm",), ratios=(0.5,), mc_draws=0,
                          train_steps=2, measure_at=(0, 2), train_sketch="gaussian",
                          train_ratio=0.3, lr=1e-3, out=str(tmp_path), progress=False)
    layers = M.run(cfg)
    assert sorted(layers.train_step.unique()) == [0, 2]
    g = layers[layers.layer == "classifier"].set_index(["train_step", "batch"]).grad_sq_norm
    assert not np.allclose(g.loc[0].values, g.loc[2].values)
    assert (tmp_path / "chunks" / "step_000002.csv").is_file()


@pytest.mark.parametrize("argv, words", [
    (["--families", "gaussian,nope"], "valid choices"),
    (["--ratios", "0.1,abc"], "comma list of float"),
    (["--ratios", "1.5"], "(0, 1]"),
    (["--dataset", "mnist"], "valid choices"),
    (["--batch-size", "1"], ">= 2"),
    (["--measure-at", "5"], "measure_at"),
    (["--device", "tpu"], "valid choices"),
])
def test_bad_cli_values_exit_2_with_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        code = M.main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and words in err


def test_cli_subprocess_exit_code_and_help():
    bad = subprocess.run([sys.executable, "-m", "varstudy.measure", "--families", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "varstudy.measure", "--help"],
                            capture_output=True, text=True)
    for f in M.MeasureConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in helped.stdout


def test_config_validation_is_the_package_error():
    with pytest.raises(VarstudyError, match="valid choices"):
        M.MeasureConfig(families=("gaussian", "x"))
    assert M.MeasureConfig(train_steps=10).resolved().measure_at == (0, 10)


def test_bench_measure_smoke(tmp_path):
    """The benchmark's derived quantities follow from its measured ones (bench_measure docs):
    ratios of times, n = ⌈(z_ℓ · cv / h)²⌉ naive draws, naive cost t_exact + grid · n · t_draw."""
    from varstudy import bench


    argv = ["measure", "--model", "tiny-bert", "--dataset", "synthetic", "--max-length", "16",
            "--batch-size", "4", "--repeats", "1", "--naive-draws", "3", "--half-width", "0.2",
            "--level", "0.9", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    table = pd.read_csv(tmp_path / "measure.csv").set_index("quantity")
    v = table["value"]
    config = json.loads((tmp_path / "measure.json").read_text())["config"]
    assert config["half_width"] == 0.2 and config["level"] == 0.9
    assert np.isfinite(v).all()
    for name in ("step", "decomposition", "exact_grad", "naive_draw"):
        assert v[f"{name}_time"] > 0 and table.loc[f"{name}_time", "unit"] == "s"
    assert v.naive_cv > 0 and v.naive_var_sketch_mc > 0
    assert v.decomposition_over_step == pytest.approx(v.decomposition_time / v.step_time,
                                                      rel=1e-12)
    z = norm.isf((1 - config["level"]) / 2)
    assert v.naive_draws_needed == math.ceil((z * v.naive_cv / config["half_width"]) ** 2) >= 1
    grid = len(M.MeasureConfig().families) * len(M.MeasureConfig().ratios)
    assert v.grid_configs == grid
    one = v.exact_grad_time + v.naive_draws_needed * v.naive_draw_time
    all_configs = v.exact_grad_time + grid * v.naive_draws_needed * v.naive_draw_time
    assert v.naive_time_one_config == pytest.approx(one, rel=1e-12)
    assert v.naive_time_grid == pytest.approx(all_configs, rel=1e-12)
    assert v.speedup_vs_naive_one_config == pytest.approx(one / v.decomposition_time, rel=1e-12)
    assert v.speedup_vs_naive_grid == pytest.approx(all_configs / v.decomposition_time,
                                                    rel=1e-12)
    assert not (tmp_path / "measure.parts.csv").exists()
