"""Study drivers on tiny-bert + synthetic data: table shapes, carried config, memory trends."""

import json

import numpy as np
import pandas as pd
import pytest

from varstudy import study
from varstudy.study import StudyConfig

TINY = dict(model="tiny-bert", task="synthetic", families=("gaussian", "rows"),
            ratios=(0.5,), seeds=(0, 1), batch_size=8, batch_sizes=(2, 4, 8),
            max_length=16, max_steps=2, eval_examples=20, repeats=2, warmup_steps=1,
            progress=False)


def test_accuracy_one_row_per_config_and_seed(tmp_path):
    config = StudyConfig(out=str(tmp_path), **TINY)
    runs, summary = study.accuracy(config)
    keys = ["task", "family", "ratio", "seed"]
    assert len(runs) == 3 * 2 and not runs.duplicated(keys).any()
    assert set(zip(runs.family, runs.ratio)) == set(study.grid(config))
    assert (runs.loc[runs.family == "exact", "n_converted"] == 0).all()
    assert (runs.loc[runs.family != "exact", "n_converted"] == 14).all()
    assert len(summary) == 3 and (summary.n == 2).all()
    assert {"mean", "std", "final_mean", "saved_mib"} <= set(summary.columns)
    folder = tmp_path / "accuracy"
    on_disk = pd.read_csv(folder / "runs.csv")
    assert len(on_disk) == 6 and list(on_disk.columns[:6]) == study.KEYS + ["scope", "seed"]
    for name, columns in TABLE_COLUMNS.items():  # the format a resumed study continues
        assert list(pd.read_csv(folder / f"{name}.csv").columns) == columns, name
    assert set(on_disk.scope) == {"none", "all"}
    metrics = set(pd.read_csv(folder / "evals.csv").metric)
    assert {"accuracy", "eval_loss", "test_accuracy", "test_eval_loss"} == metrics
    assert on_disk.test_at_best.between(0, 1).all()
    saved = json.loads((folder / "config.json").read_text())
    assert saved["study"] == "accuracy" and saved["families"] == ["gaussian", "rows"]
    assert saved["max_steps"] == 2 and saved["seeds"] == [0, 1]


FRONT = ["task", "model", "family", "ratio", "scope", "seed"]
TABLE_COLUMNS = {
    "runs": FRONT + [
        "data_dir", "include", "exclude", "min_rows", "batch_size", "max_length", "padding", "lr",
        "epochs", "max_steps", "warmup", "weight_decay", "eps", "eval_every", "eval_examples",
        "test", "device", "dtype", "dropout", "out", "name", "num_threads", "run", "total_steps",
        "steps_per_epoch", "warmup_steps", "n_train", "n_eval", "n_test", "torch", "n_converted",
        "metric", "best_value", "best_step", "final_value", "test_at_best", "final_loss",
        "train_time_s", "examples_per_s", "saved_mib", "saved_linear_mib", "peak_cuda_mib",
        "host", "gpu_ids"],
    "steps": FRONT + ["step", "loss", "lr", "time_s"],
    "evals": FRONT + ["step", "metric", "value"],
    "summary": ["task", "model", "family", "ratio", "scope", "metric", "mean", "std",
                "final_mean", "final_std", "test_mean", "test_std", "n", "saved_mib",
                "train_time_s"],
}


def test_accuracy_resume_skips_done_runs(tmp_path):
    config = StudyConfig(out=str(tmp_path), **{**TINY, "seeds": (0,), "families": ("rows",)})
    study.accuracy(config)
    more = StudyConfig(out=str(tmp_path), resume=True, **{**TINY, "families": ("rows",)})
    runs, _ = study.accuracy(more)
    assert len(runs) == 2 * 2 and not runs.duplicated(["family", "ratio", "seed"]).any()


@pytest.fixture(scope="module")
def memory_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    config = StudyConfig(out=str(out), **{**TINY, "families": ("gaussian", "rows",
                                                               "countsketch"),
                                          "ratios": (0.5, 0.1)})
    return study.memory(config), out


def test_memory_grows_with_batch_and_shrinks_with_ratio(memory_table):
    table, out = memory_table
    assert len(table) == 7 * 3 and not table.duplicated(["family", "ratio", "batch_size"]).any()
    assert table.peak_cuda_mib.isna().all() and (table.device == "cpu").all()
    for _, part in table.groupby(["family", "ratio"]):
        assert part.sort_values("batch_size").saved_mib.is_monotonic_increasing
        assert np.all(np.diff(part.sort_values("batch_size").saved_mib) > 0)
    exact = table[table.family == "exact"].set_index("batch_size")
    for row in table[table.family != "exact"].itertuples():
        assert row.ratio <= 0.5
        assert row.saved_mib < exact.loc[row.batch_size, "saved_mib"]
        assert row.saved_linear_mib < exact.loc[row.batch_size, "saved_linear_mib"]
    written = pd.read_csv(out / "memory" / "memory.csv")
    assert list(written.columns) == ["task", "model", "family", "ratio", "batch_size", "seq_len",
                                     "saved_mib", "saved_linear_mib", "peak_cuda_mib", "device"]
    assert json.loads((out / "memory" / "config.json").read_text())["batch_sizes"] == [2, 4, 8]


def test_max_batch_from_linear_fit():
    rows = [dict(task="t", model="m", family=f, ratio=r, batch_size=b, seq_len=8,
                 saved_mib=10 + slope * b, peak_cuda_mib=np.nan)
            for f, r, slope in (("exact", 1.0, 2.0), ("rows", 0.1, 1.0)) for b in (1, 2, 4)]
    table = study.max_batch(pd.DataFrame(rows), budget_mib=110)
    fits = table.set_index("family")
    assert fits.loc["exact", "max_batch"] == 50 and fits.loc["rows", "max_batch"] == 100
    assert fits.loc["rows", "max_batch_vs_exact"] == pytest.approx(2.0)
    assert fits.loc["exact", "slope_mib_per_example"] == pytest.approx(2.0)
    assert (table.basis == "saved_mib").all() and (table.fit_max_rel_err < 1e-9).all()


def test_throughput_tables(tmp_path, memory_table):
    _, out = memory_table
    config = StudyConfig(out=str(tmp_path), memory_from=str(out / "memory" / "memory.csv"),
                         **{**TINY, "ratios": (0.1,)})
    table, fits = study.throughput(config)
    assert len(table) == 3 and (table.repeats == 2).all() and "load_avg_1m" in table
    assert table.set_index("family").loc["exact", "speedup_vs_exact"] == 1.0
    assert (table.examples_per_s > 0).all()
    assert len(fits) == 3 and (fits.max_batch > 0).all()  # this study's 3 of memory.csv's 7
    assert (fits[fits.family != "exact"].max_batch >= fits[fits.family == "exact"].max_batch.iloc[0]).all()
    for name in ("throughput.csv", "max_batch.csv", "config.json"):
        assert (tmp_path / "throughput" / name).is_file()


@pytest.mark.parametrize("argv,needle", [
    (["memory", "--families", "gaussian,fft"], "valid choices: gaussian"),
    (["speed"], "invalid choice 'speed'; valid choices: accuracy, memory, throughput"),
    (["memory", "--preset", "tpu"], "invalid choice 'tpu'; valid choices: cpu, gpu"),
    (["memory", "--ratios", "0.5,2"], "ratios must be in (0, 1]"),
    (["memory", "--batch-sizes", "4,x"], "expected a comma list of int, got 'x'"),
])
def test_cli_bad_values(capsys, argv, needle):
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_accuracy_scopes_convert_all_or_encoder_only(tmp_path):
    config = StudyConfig(out=str(tmp_path), **{**TINY, "seeds": (0,), "families": ("rows",),
                                               "scopes": ("all", "encoder"),
                                               "padding": "dynamic"})
    runs, summary = study.accuracy(config)
    got = dict(zip(runs.scope, runs.n_converted))
    # tiny-bert: 2 layers x 6 encoder linears, plus the pooler and the classifier
    assert got == {"none": 0, "all": 14, "encoder": 12}
    assert set(summary.scope) == {"none", "all", "encoder"}
    assert (runs.padding == "dynamic").all()


def test_accuracy_rejects_an_unknown_scope(tmp_path):
    with pytest.raises(study.VarstudyError, match="unknown scope.*valid choices: all, encoder"):
        study.check(StudyConfig(out=str(tmp_path), **{**TINY, "scopes": ("head",)}))


def test_cli_study_preset_config_and_flags(tmp_path):
    name, config = study.parse(["accuracy"])
    assert name == "accuracy" and config == study.preset("cpu", "accuracy")
    assert config.max_steps == 200 and config.num_threads is None
    _, memory = study.parse(["memory", "--preset", "gpu", "--batch-sizes", "2,4"])
    assert memory.model == "roberta-base" and memory.batch_sizes == (2, 4)
    _, alone = study.parse(["accuracy", "--epochs", "1"])
    assert (alone.epochs, alone.max_steps) == (1.0, None)  # --epochs alone clears max_steps
    _, flags = study.parse(["accuracy", "--resume", "--no-progress", "--families", "",
                            "--eval-examples", "none", "--num-threads", "1"])
    assert flags.resume and not flags.progress and flags.families == ()
    assert flags.eval_examples is None and flags.num_threads == 1
    config = StudyConfig(out=str(tmp_path), **{**TINY, "seeds": (0,), "families": ("rows",)})
    study.accuracy(config)
    saved = tmp_path / "accuracy" / "config.json"
    assert json.loads(saved.read_text())["threads"] >= 1
    _, again = study.parse(["accuracy", "--config", str(saved)])
    assert again == config
    _, more = study.parse(["accuracy", "--config", str(saved), "--resume", "--seeds", "0,1"])
    assert more.resume and more.seeds == (0, 1) and more.families == ("rows",)


def test_cli_resume_continues_the_folder(tmp_path, capsys):
    argv = ["accuracy", "--model", "tiny-bert", "--task", "synthetic", "--families", "rows",
            "--ratios", "0.5", "--scopes", "all", "--batch-size", "8", "--max-length", "16",
            "--max-steps", "1", "--eval-examples", "8", "--no-progress", "--out", str(tmp_path)]
    assert study.main(argv + ["--seeds", "0"]) == 0
    runs = pd.read_csv(tmp_path / "accuracy" / "runs.csv")
    assert study.main(argv + ["--seeds", "0,1", "--resume"]) == 0
    resumed = pd.read_csv(tmp_path / "accuracy" / "runs.csv")
    assert len(runs) == 2 and len(resumed) == 4 and set(resumed.seed) == {0, 1}
    pd.testing.assert_frame_equal(resumed.iloc[:2], runs)  # finished runs kept as they were


def test_help_imports_nothing_heavy():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "varstudy.study",
                           "accuracy", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--seeds SEEDS" in proc.stdout
    assert "--resume, --no-resume" in proc.stdout and "--preset {cpu,gpu}" in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "varstudy.study.config" in imported
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "transformers", "pandas")]
    assert not heavy


def test_executor_options_are_checked(tmp_path):
    """Ray-only options with the local executor, --num-threads unlike --cpus-per-run, and the
    timed studies with --executor ray: one line each, before anything runs (no Ray needed)."""
    from dataclasses import replace

    from varstudy.study import command

    with pytest.raises(study.VarstudyError, match="--cpus-per-run applies to --executor ray"):
        study.check(StudyConfig(out=str(tmp_path), cpus_per_run=2, **TINY))
    with pytest.raises(study.VarstudyError, match="--address, --retries apply to --executor"):
        study.check(StudyConfig(out=str(tmp_path), address="auto", retries=1, **TINY))
    ray_cfg = StudyConfig(out=str(tmp_path), executor="ray", cpus_per_run=1, **TINY)
    with pytest.raises(study.VarstudyError, match="--num-threads 2 differs"):
        study.check(replace(ray_cfg, num_threads=2))
    with pytest.raises(study.VarstudyError, match="gpus-per-run 1 with --device cpu"):
        study.check(replace(ray_cfg, gpus_per_run=1.0, device="cpu"))
    for name in ("memory", "throughput", "frontier"):
        with pytest.raises(study.VarstudyError, match=f"study {name} .* runs locally only"):
            command.check_study(name, ray_cfg)
    assert not (tmp_path / "frontier").exists()
