"""The accuracy grid on a local Ray cluster (issue 26): the same tables as the local executor,
a killed worker's run retried, a run that always fails reported in one line while the others are
saved, Ctrl-C in the driver leaving every finished run saved for --resume.

One 2-CPU cluster serves the module (started once: Ray's start-up is most of the cost). The
functions given as ``run`` are pickled by value, so Ray's workers need not import this module.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from varstudy import study
from varstudy.errors import VarstudyError
from varstudy.study import StudyConfig
from varstudy.study.executors import run_one

ray = pytest.importorskip("ray", reason="the Ray tests need the cluster extra: "
                                        'pip install -e ".[cluster]"')
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# 2 seeds x (exact, rows 0.5) = 4 runs of 2 steps on tiny-bert
TINY = dict(model="tiny-bert", task="synthetic", families=("rows",), ratios=(0.5,),
            seeds=(0, 1), batch_size=8, max_length=16, max_steps=2, eval_examples=20,
            progress=False)
RUN_KEYS = ["family", "ratio", "scope", "seed"]
TIMING = {"runs": ["train_time_s", "examples_per_s"], "steps": ["time_s"], "evals": []}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    # one GPU declared as a resource (there is none): Ray schedules GPU tasks and sets
    # CUDA_VISIBLE_DEVICES as on a GPU node; torch finds no CUDA and the runs stay on the CPU
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_tables(tmp_path_factory):
    """The reference: the tiny grid run by the local executor, one thread per run."""
    out = tmp_path_factory.mktemp("local")
    study.accuracy(StudyConfig(out=str(out), num_threads=1, **TINY))
    return tables(out / "accuracy")


def tables(folder: Path) -> dict[str, pd.DataFrame]:
    """runs, steps and evals of a study folder without their timing columns."""
    return {name: pd.read_csv(folder / f"{name}.csv").drop(columns=TIMING[name])
            for name in TIMING}


def assert_same(got: dict, want: dict, *, by_run: bool = False) -> None:
    """Equal tables, row for row; ``by_run``: in any order of the runs (a resumed study appends
    the runs it adds after those it kept)."""
    for name in TIMING:
        a, b = got[name], want[name]
        if by_run:
            a, b = (t.sort_values(RUN_KEYS, kind="stable").reset_index(drop=True) for t in (a, b))
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)


def ray_config(out: Path, **kw) -> StudyConfig:
    return StudyConfig(out=str(out), executor="ray", cpus_per_run=1, **{**TINY, **kw})


def test_ray_grid_equals_local(cluster, local_tables, tmp_path):
    study.accuracy(ray_config(tmp_path))
    folder = tmp_path / "accuracy"
    got = tables(folder)
    assert len(got["runs"]) == 4 and (got["runs"].num_threads == 1).all()
    assert_same(got, local_tables)
    env = pd.read_json(folder / "env.json", typ="series")
    assert env["executor"] == "ray" and env["cluster_resources"]["CPU"] == 2
    assert got["runs"].host.notna().all()


def test_gpus_per_run_reserves_and_records_the_gpu(cluster, local_tables, tmp_path):
    """--gpus-per-run 0.5: two runs share the cluster's one GPU and record the id Ray gave them;
    on this CPU-only machine their numbers are the local executor's."""
    study.accuracy(ray_config(tmp_path, gpus_per_run=0.5, seeds=(0,)))
    got = tables(tmp_path / "accuracy")
    assert list(got["runs"].gpu_ids.astype(str)) == ["0", "0"]
    want = {name: t[t.seed == 0].reset_index(drop=True) for name, t in local_tables.items()}
    got["runs"] = got["runs"].drop(columns="gpu_ids")
    want["runs"] = want["runs"].drop(columns="gpu_ids")
    assert_same(got, want)
    env = pd.read_json(tmp_path / "accuracy" / "env.json", typ="series")
    assert env["gpus_per_run"] == 0.5 and env["cluster_resources"]["GPU"] == 1


def kill_once(marker_dir: str, victim: tuple):
    """A run that kills its own worker process (SIGKILL) the first time it meets ``victim``."""

    def run(config):
        key = (config.sketch, config.seed)
        marker = Path(marker_dir) / f"{key[0]}-{key[1]}"
        if key == victim and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return run_one(config)

    return run


def test_killed_worker_is_retried_and_nothing_is_lost(cluster, local_tables, tmp_path):
    run = kill_once(str(tmp_path), ("rows", 0))
    study.accuracy(ray_config(tmp_path, retries=1), run=run)
    assert (tmp_path / "rows-0").exists()  # the worker was killed once
    assert_same(tables(tmp_path / "accuracy"), local_tables)


def always_fails(family: str, seed: int):
    def run(config):
        if (config.sketch, config.seed) == (family, seed):
            raise RuntimeError("out of memory (injected)")
        return run_one(config)

    return run


def test_failed_run_is_reported_and_the_others_saved(cluster, local_tables, tmp_path):
    with pytest.raises(VarstudyError) as err:
        study.accuracy(ray_config(tmp_path, retries=1), run=always_fails("rows", 1))
    line = str(err.value)
    assert "\n" not in line and "1 of 4 run(s) failed" in line
    assert "family=rows ratio=0.5 scope=all seed=1 failed 2 time(s)" in line
    assert "RuntimeError: out of memory (injected)" in line and "--resume" in line
    staged = pd.read_csv(tmp_path / ".accuracy.staging" / "runs.csv")
    assert sorted(zip(staged.family, staged.seed)) == [("exact", 0), ("exact", 1), ("rows", 0)]
    assert not (tmp_path / "accuracy").exists()  # the finished folder only when all finished
    study.accuracy(ray_config(tmp_path, resume=True))
    assert_same(tables(tmp_path / "accuracy"), local_tables, by_run=True)


DRIVER = textwrap.dedent("""
    import sys, time
    from varstudy.study import StudyConfig, accuracy
    from varstudy.study.executors import run_one

    def run(config):
        if (config.sketch, config.seed) == ("rows", 0):
            time.sleep(600)  # still running when the driver gets Ctrl-C
        return run_one(config)

    tiny = {tiny!r}
    accuracy(StudyConfig(out=sys.argv[1], executor="ray", address=sys.argv[2],
                         cpus_per_run=1, **tiny), run=run)
""")


def test_ctrl_c_in_the_driver_keeps_finished_runs(cluster, local_tables, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(tiny=TINY), str(tmp_path),
                               cluster], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    runs = tmp_path / ".accuracy.staging" / "runs.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if runs.is_file() and len(pd.read_csv(runs)) >= 1:
            break
        time.sleep(0.5)
    assert driver.poll() is None, driver.communicate()[0]
    driver.send_signal(signal.SIGINT)
    output = driver.communicate(timeout=60)[0]
    assert driver.returncode != 0, output
    saved = pd.read_csv(runs)  # the finished runs are saved, the interrupted one is not
    assert len(saved) >= 1 and ("rows", 0) not in set(zip(saved.family, saved.seed))
    study.accuracy(ray_config(tmp_path, resume=True))
    assert_same(tables(tmp_path / "accuracy"), local_tables, by_run=True)
