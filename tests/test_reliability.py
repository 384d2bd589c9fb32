"""Durable results and resume (issue 7): SIGKILL mid-run + --resume equals an uninterrupted run,
atomic writers, resume of over-training measurement, finetune and bench; determinism; seeds."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from varstudy import io as vio
from varstudy import measure as M
from varstudy.measure import runner as MR

ROOT = Path(__file__).resolve().parents[1]
KILL_ARGS = ["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
             "--max-length", "16", "--num-batches", "8", "--families", "gaussian,rows",
             "--ratios", "0.25", "--mc-layers", "none", "--mc-draws", "6", "--mc-batches", "8",
             "--seed", "5", "--no-progress"]
PER_BATCH = (14 + 1) * 2 * 1  # tiny-bert: 14 linears + "model", 2 families, 1 ratio


def _complete_batches(chunk: Path) -> int:
    rows = vio.read_chunk(chunk)
    return 0 if rows is None else int((rows.groupby("batch").size() == PER_BATCH).sum())


def _cmd(*args):
    return [sys.executable, "-m", "varstudy.measure", *KILL_ARGS, *args]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    for stale in ("layers.csv", "summary.csv", "env.json"):  # an older complete run
        (out / stale).write_text("stale\n")
    chunk = out / ".measure.staging" / "chunks" / "step_000000.csv"  # the run in progress
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(_cmd("--out", str(out)), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _complete_batches(chunk) < 1:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no batch finished in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = _complete_batches(chunk)
    assert 1 <= kept < 8
    # The older result is as it was (NOTE [staged results]); the new one never appeared.
    assert all((out / n).read_text() == "stale\n" for n in ("layers.csv", "summary.csv",
                                                           "env.json"))
    with open(chunk, "ab") as f:  # as if killed in the middle of an append
        f.write(b"0,7,bert.encoder.layer.0.attention.self.query,attention_q")
    resumed = subprocess.run(_cmd("--out", str(out), "--resume"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "env.json").read_text())["resumed"] is True
    assert not (out / ".measure.staging").exists()

    ref = tmp_path / "ref"
    assert M.main(KILL_ARGS + ["--out", str(ref)]) == 0
    for name in ("layers.csv", "summary.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(ref / name),
                                      check_exact=True)


SMALL = dict(model="tiny-bert", dataset="synthetic", batch_size=4, max_length=16, num_batches=2,
             families=("rows-norm",), ratios=(0.5,), mc_draws=2, mc_layers="classifier",
             train_steps=2, measure_at=(0, 1, 2), train_sketch="gaussian", train_ratio=0.3,
             lr=1e-3, progress=False, seed=2)


def test_resume_over_training_loads_checkpoint_not_replay(tmp_path, monkeypatch):
    out = str(tmp_path / "interrupted")
    real_batch, real_train = M.measure_batch, M.train

    def dying(model, encoded, cfg, names, mc_names, step, b, population, *rest):
        if (step, b) == (2, 1):
            raise KeyboardInterrupt
        return real_batch(model, encoded, cfg, names, mc_names, step, b, population, *rest)

    monkeypatch.setattr(MR, "measure_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        M.run(M.MeasureConfig(**SMALL, out=out))
    saved = vio.load_checkpoint(Path(out) / ".measure.staging" / "state" / "train.pt")
    assert saved["step"] == 2 and not (Path(out) / "layers.csv").exists()

    calls = []
    monkeypatch.setattr(MR, "measure_batch", real_batch)
    monkeypatch.setattr(MR, "train", lambda *a: calls.append(a[-2:]) or real_train(*a))
    resumed = M.run(M.MeasureConfig(**SMALL, out=out, resume=True))
    assert calls == []  # model and optimizer state came from the checkpoint
    monkeypatch.setattr(MR, "train", real_train)
    fresh = M.run(M.MeasureConfig(**SMALL, out=str(tmp_path / "fresh")))
    pd.testing.assert_frame_equal(resumed, fresh, check_exact=True)
    assert sorted(resumed.train_step.unique()) == [0, 1, 2]


def test_resume_refuses_a_different_config(tmp_path, capsys):
    base = ["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
            "--max-length", "16", "--num-batches", "1", "--families", "rows", "--ratios", "0.5",
            "--mc-draws", "0", "--no-progress", "--out", str(tmp_path)]
    assert M.main(base) == 0
    capsys.readouterr()
    assert M.main(base + ["--ratios", "0.25", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume with a different config" in err
    assert "ratios" in err and (tmp_path / "layers.csv").is_file()  # nothing was touched


CHUNK_ARGS = ["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
              "--max-length", "16", "--num-batches", "5", "--families", "gaussian,rows",
              "--ratios", "0.25,0.5", "--mc-draws", "0", "--seed", "4", "--no-progress"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A finished 5-batch measurement (its folder)."""
    out = tmp_path_factory.mktemp("measured")
    assert M.main(CHUNK_ARGS + ["--out", str(out)]) == 0
    return out


def test_incomplete_batch_is_dropped_from_a_chunk(tmp_path, measured):
    lines = (measured / "chunks" / "step_000000.csv").read_text().splitlines(keepends=True)
    per_batch = (14 + 1) * 2 * 2
    path = tmp_path / "step.csv"
    path.write_text("".join(lines[:1 + per_batch + per_batch - 1]))  # batch 1 lacks a row
    cfg = M.MeasureConfig(**{**_config_of(measured), "num_batches": 5})
    names = json.loads((measured / "config.json").read_text())["layers_selected"]
    whole = M.finished_rows(path, cfg, names, repair=True, step=0)
    assert set(whole.batch) == {0} and path.read_text() == "".join(lines[:1 + per_batch])


def _config_of(folder: Path) -> dict:
    saved = json.loads((folder / "config.json").read_text())
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()
            if k in M.MeasureConfig.__dataclass_fields__}


def _damage(chunk: Path) -> None:
    """Batch 0: a line cut in the middle; 1: a row with an empty family; 2: a value "xyz";
    3: appended twice (two runs on one folder); 4: untouched."""
    header, *rows = chunk.read_text().splitlines(keepends=True)
    by_batch = {b: [r for r in rows if r.split(",")[1] == str(b)] for b in range(5)}
    cut = by_batch[0][7]
    by_batch[0][7] = cut[:len(cut) // 2] + "\n"
    fields = by_batch[1][3].split(",")
    fields[M.LAYER_COLUMNS.index("family")] = ""
    by_batch[1][3] = ",".join(fields)
    fields = by_batch[2][5].split(",")
    fields[M.LAYER_COLUMNS.index("var_sketch")] = "xyz"
    by_batch[2][5] = ",".join(fields)
    by_batch[3] = by_batch[3] + by_batch[3]
    chunk.write_text(header + "".join(r for b in range(5) for r in by_batch[b]))


def test_resume_measures_again_every_batch_with_a_damaged_chunk_line(tmp_path, measured,
                                                                      monkeypatch):
    out = tmp_path / "damaged"
    shutil.copytree(measured, out)
    _damage(out / "chunks" / "step_000000.csv")
    real, again = M.measure_batch, []
    monkeypatch.setattr(MR, "measure_batch", lambda *a: again.append(a[6]) or real(*a))
    assert M.main(CHUNK_ARGS + ["--out", str(out), "--resume"]) == 0
    assert sorted(again) == [0, 1, 2, 3]  # batch 4 was kept
    for name in ("layers.csv", "summary.csv"):
        assert (out / name).read_bytes() == (measured / name).read_bytes(), name


# A rerun with a bad option never costs a finished result (issue 11, item 4) ---------------

TINY_MEASURE = ["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
                "--max-length", "16", "--num-batches", "1", "--families", "rows", "--ratios",
                "0.5", "--mc-draws", "0", "--no-progress"]
TINY_FINETUNE = ["--model", "tiny-bert", "--task", "synthetic", "--batch-size", "4",
                 "--max-length", "16", "--max-steps", "2", "--eval-every", "2",
                 "--eval-examples", "8", "--no-progress"]
TINY_STUDY = ["accuracy", "--model", "tiny-bert", "--task", "synthetic", "--families", "rows",
              "--ratios", "0.5", "--seeds", "0", "--batch-size", "4", "--max-length", "16",
              "--max-steps", "1", "--eval-examples", "8", "--no-progress"]
TINY_LAYERS = ["layers", "--model", "tiny-bert", "--batch-size", "2", "--seq-len", "8",
               "--families", "rows", "--ratios", "0.5", "--repeats", "1"]
TINY_BENCH_MEASURE = ["measure", "--model", "tiny-bert", "--dataset", "synthetic",
                      "--max-length", "16", "--batch-size", "4", "--repeats", "1",
                      "--naive-draws", "2"]
COMMANDS = {  # name: (main, its arguments, the folder a run locks, relative to --out; lock file)
    "measure": (lambda a: M.main(TINY_MEASURE + a), ".", ".lock"),
    "finetune": (lambda a: _finetune_main(TINY_FINETUNE + a),
                 "tiny-bert_synthetic_gaussian0.2_seed0", ".lock"),  # the derived run name
    "study": (lambda a: _study_main(TINY_STUDY + a), "accuracy", ".lock"),
    "bench-layers": (lambda a: _bench_main(TINY_LAYERS + a), ".", ".layers.lock"),
    "bench-measure": (lambda a: _bench_main(TINY_BENCH_MEASURE + a), ".", ".measure.lock"),
}


def _finetune_main(argv):
    from varstudy import finetune
    return finetune.main(argv)


def _study_main(argv):
    from varstudy import study
    return study.main(argv)


def _bench_main(argv):
    from varstudy import bench
    try:
        return bench.main(argv)
    except SystemExit as stop:  # usage errors
        return stop.code


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished output folder per command."""
    root = tmp_path_factory.mktemp("finished")
    for name, (main, _, _) in COMMANDS.items():
        assert main(["--out", str(root / name)]) == 0, name
    return root


RERUNS = [  # (command, a bad option)
    ("measure", ["--model", "nope"]),
    ("measure", ["--batch-size", "1000"]),
    ("measure", ["--layers", "nothing_matches"]),
    ("measure", ["--mc-draws", "2", "--mc-layers", "nothing_matches"]),
    ("finetune", ["--model", "nope", "--name", "tiny-bert_synthetic_gaussian0.2_seed0"]),
    ("finetune", ["--batch-size", "100000"]),
    ("finetune", ["--include", "nothing_matches"]),
    ("study", ["--model", "nope"]),
    ("study", ["--batch-size", "1000"]),
    ("bench-layers", ["--model", "nope"]),
    ("bench-layers", ["--seq-len", "1000"]),
    ("bench-measure", ["--model", "nope"]),
    ("bench-measure", ["--batch-size", "1000"]),
]


@pytest.mark.parametrize("command, bad", RERUNS, ids=[f"{c} {' '.join(b)}" for c, b in RERUNS])
def test_a_failed_rerun_leaves_the_finished_folder_as_it_was(command, bad, finished, tmp_path,
                                                             capsys):
    out = tmp_path / command
    shutil.copytree(finished / command, out)
    before = _hashes(out)
    capsys.readouterr()
    assert COMMANDS[command][0](bad + ["--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert _hashes(out) == before  # every file, byte for byte; nothing added or removed


def test_finetune_rerun_with_a_bad_model_keeps_the_named_run_folder(tmp_path):
    from varstudy import finetune

    cfg = _finetune_cfg(tmp_path, name="run", max_steps=2, checkpoint_every=None)
    finetune.train(cfg)
    before = _hashes(tmp_path / "run")
    with pytest.raises(vio.VarstudyError, match="unknown model 'nope'"):
        finetune.train(replace(cfg, model="nope"))
    assert _hashes(tmp_path / "run") == before


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_second_run_on_a_folder_in_use_refuses_with_one_line(command, finished, tmp_path,
                                                                capsys):
    main, locked, lock_name = COMMANDS[command]
    out = tmp_path / command
    shutil.copytree(finished / command, out)
    before = _hashes(out)
    with vio.output_lock(out / locked, lock_name):  # as a run in progress holds it
        capsys.readouterr()
        assert main(["--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is in use by another run" in err
    assert f"(pid {os.getpid()}); valid choices: wait for it, or another --out" in err
    assert _hashes(out) == before
    assert main(["--out", str(out)]) == 0  # the lock is released with its holder


def test_the_lock_of_a_killed_run_is_free_again(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from varstudy import io\n"
         f"with io.output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert M.main(TINY_MEASURE + ["--out", str(out)]) == 2
        assert f"in use by another run (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert M.main(TINY_MEASURE + ["--out", str(out)]) == 0  # the OS released the lock
    assert not (out / ".lock").exists()  # a finished run removes its lock file


def test_a_fresh_run_removes_only_its_own_files(tmp_path, monkeypatch):
    """--out . (or any folder holding other files): a new run replaces its own result files
    and leaves everything else alone."""
    mine = {"notes.txt": "keep me\n", "data.csv": "a\n1\n", "chunks/keep.txt": "mine\n",
            "state/keep.pt": "mine\n", "layers.csv": "stale\n"}
    for rel, text in mine.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.chdir(tmp_path)
    assert M.main(TINY_MEASURE + ["--out", "."]) == 0
    assert all((tmp_path / rel).read_text() == text for rel, text in mine.items()
               if rel != "layers.csv")
    assert (tmp_path / "layers.csv").read_text() != "stale\n"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_result_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        vio.atomic_write_csv(tmp_path / "table.csv", pd.DataFrame({"a": [1]}))
        vio.atomic_write_json(tmp_path / "config.json", {"a": 1})
        vio.atomic_torch_save(tmp_path / "checkpoint.pt", {"a": 1})
        vio.append_csv(tmp_path / "chunk.csv", pd.DataFrame({"a": [1]}))
        assert M.main(TINY_MEASURE + ["--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(previous)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 4 + 4  # the above, and layers.csv, summary.csv, config.json, env.json
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == \
        {p.name: oct(mode) for p in files}


def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    vio.atomic_write_text(path, "old\n")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vio, "_write", full)
    with pytest.raises(vio.VarstudyError, match="No space left"):
        vio.atomic_write_csv(path, pd.DataFrame({"a": [1]}))
    assert path.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["table.csv"]


def _finetune_cfg(out, **kw):
    from varstudy.finetune import FinetuneConfig
    return FinetuneConfig(**{**dict(
        model="tiny-bert", task="synthetic", sketch="gaussian", ratio=0.5, batch_size=4,
        max_length=16, max_steps=6, eval_every=3, eval_examples=16, lr=1e-3, dropout=True,
        checkpoint_every=2, progress=False, num_threads=2, out=str(out)), **kw})


@pytest.mark.parametrize("extra", [{}, dict(sketch="rows", replan_every=2, replan_check=True),
                                   dict(sketch="rows-adaptive")],
                         ids=["uniform", "online-plans", "rows-adaptive-statistics"])
def test_finetune_resume_equals_uninterrupted(tmp_path, monkeypatch, extra):
    from varstudy import finetune
    from varstudy.finetune import training

    cfg = _finetune_cfg(tmp_path / "cut", **extra)
    folder = tmp_path / "cut" / finetune.run_name(cfg)
    real_sync, calls = training.synchronize, []

    def dying(device):
        calls.append(device)
        if len(calls) == 5:  # start of step 5: steps 1-4 done, checkpoints at 2 and 4
            raise KeyboardInterrupt
        real_sync(device)

    monkeypatch.setattr(training, "synchronize", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune.train(cfg)
    monkeypatch.setattr(training, "synchronize", real_sync)
    stage = folder.parent / f".{folder.name}.staging"  # NOTE [staged results]
    assert list(folder.iterdir()) == []  # nothing looks done
    assert sorted(p.name for p in stage.iterdir()) == ["checkpoint.pt"]
    assert len(vio.load_checkpoint(stage / "checkpoint.pt")["steps"]) == 4

    with pytest.raises(vio.VarstudyError, match="different config"):
        finetune.train(_finetune_cfg(tmp_path / "cut", **extra, lr=2e-3, resume=True))
    resumed = finetune.train(_finetune_cfg(tmp_path / "cut", **extra, resume=True))
    fresh = finetune.train(_finetune_cfg(tmp_path / "fresh", **extra))
    cols = ["step", "loss", "lr"]
    pd.testing.assert_frame_equal(resumed.steps[cols], fresh.steps[cols], check_exact=True)
    pd.testing.assert_frame_equal(resumed.evals, fresh.evals, check_exact=True)
    written = sorted(finetune.FINAL + (("plans.csv",) if "replan_every" in extra else ()))
    assert sorted(p.name for p in folder.iterdir()) == written and not stage.exists()
    again = finetune.train(_finetune_cfg(tmp_path / "cut", **extra, resume=True))  # finished
    pd.testing.assert_frame_equal(again.evals, fresh.evals, check_exact=True)
    if "replan_every" in extra:  # the re-plans at steps 2, 4 and 6, the same after resume
        pd.testing.assert_frame_equal(resumed.plans, fresh.plans, check_exact=True)
        pd.testing.assert_frame_equal(again.plans, fresh.plans, check_exact=True)
        assert sorted(fresh.plans.step.unique()) == [2, 4, 6]
        assert len(fresh.plans) == 3 * len(resumed.config["converted"])


BENCH_LAYERS = ["layers", "--model", "tiny-bert", "--batch-size", "2", "--seq-len", "8",
                "--families", "gaussian,rows", "--ratios", "0.5", "--repeats", "2"]


def test_bench_layers_resume_skips_finished_configurations(tmp_path, monkeypatch):
    from varstudy import bench
    from varstudy.bench import layers_run as BL

    out = tmp_path / "cut"
    real_step, real_memory = BL._step, BL._memory_row
    steps = []

    def dying(model, batch, *rest):
        steps.append(1)
        if len(steps) == 6:  # warm-ups (3), then repeat 0 of exact and gaussian, then die
            raise KeyboardInterrupt
        return real_step(model, batch, *rest)

    monkeypatch.setattr(BL, "_step", dying)
    assert bench.main(BENCH_LAYERS + ["--out", str(out)]) == 130
    assert not (out / "layers.csv").exists()
    assert len(pd.read_csv(out / ".bench-layers.staging" / "layers.parts" / "times.csv")) == 2
    monkeypatch.setattr(BL, "_step", real_step)
    memory_calls = []
    monkeypatch.setattr(BL, "_memory_row", lambda *a: memory_calls.append(1) or real_memory(*a))
    assert bench.main(BENCH_LAYERS + ["--out", str(out), "--resume"]) == 0
    assert len(memory_calls) == 1  # only the exact reference is recomputed
    assert not (out / "layers.parts").exists() and not (out / ".bench-layers.staging").exists()
    assert bench.main(BENCH_LAYERS + ["--out", str(tmp_path / "ref")]) == 0
    got, ref = pd.read_csv(out / "layers.csv"), pd.read_csv(tmp_path / "ref" / "layers.csv")
    memory = ["family", "ratio", "saved_mib", "linear_saved_mib", "saved_ratio",
              "linear_saved_ratio", "linear_vs_predicted"]
    pd.testing.assert_frame_equal(got[memory], ref[memory])  # timings differ, by nature
    assert json.loads((out / "layers.json").read_text())["config"]["seed"] == 0


def test_bench_checkpoint_resume_skips_finished_rows(tmp_path, monkeypatch):
    from varstudy import bench
    from varstudy.bench import checkpoint_run as BC
    from varstudy.bench.checkpoint import PRESETS, BenchConfig

    out = tmp_path / "ckpt"
    argv = ["checkpoint", "--preset", "smoke", "--out", str(out)]
    real, calls = BC._timed, []

    def dying(*a, **k):
        calls.append(a[1:3])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(BC, "_timed", dying)
    assert bench.main(argv) == 130
    assert not (out / "env.json").exists() and not (out / "vs_n.csv").exists()
    kept = pd.read_csv(out / ".bench-checkpoint.staging" / "parts" / "vs_n.csv")
    assert len(kept) == 2
    calls.clear()
    monkeypatch.setattr(BC, "_timed", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    assert bench.main(argv + ["--resume"]) == 0
    done = {(int(n), s) for n, s in zip(kept.n_steps, kept.strategy)}
    assert not done & {(n, s) for s, n in calls}  # finished jobs were not run again
    vs_n = pd.read_csv(out / "vs_n.csv")
    cfg = BenchConfig(**PRESETS["smoke"])
    assert [(n, s) for n, s in zip(vs_n.n_steps, vs_n.strategy)] == \
        [(n, s) for n in cfg.ns for s in cfg.strategies]
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    assert json.loads((out / "env.json").read_text())["resumed"] is True
    assert not (out / "parts").exists()


def test_bench_measure_resume_keeps_finished_rounds(tmp_path, monkeypatch):
    from varstudy import bench
    from varstudy.bench import measure_run as BM

    argv = ["measure", "--model", "tiny-bert", "--dataset", "synthetic", "--max-length", "16",
            "--batch-size", "4", "--repeats", "2", "--naive-draws", "4", "--seed", "3",
            "--out", str(tmp_path)]
    real, rounds = BM.naive_draws, []

    def dying(model, batch, weights, exact, cfg, first, count):
        rounds.append(first)
        if len(rounds) == 3:  # warm-up, round 1, then round 2 dies
            raise KeyboardInterrupt
        return real(model, batch, weights, exact, cfg, first, count)

    monkeypatch.setattr(BM, "naive_draws", dying)
    assert bench.main(argv) == 130
    stage = tmp_path / ".bench-measure.staging"  # NOTE [staged results]
    assert set(pd.read_csv(stage / "measure.parts.csv")["round"]) == {1}
    rounds.clear()
    monkeypatch.setattr(BM, "naive_draws", lambda *a: rounds.append(a[-2]) or real(*a))
    assert bench.main(argv + ["--resume"]) == 0
    assert rounds == [0, 4]  # the warm-up again, then only round 2 (draws 4..5)
    assert json.loads((tmp_path / "measure.json").read_text())["config"]["seed"] == 3
    assert not (tmp_path / "measure.parts.csv").exists() and not stage.exists()


# Determinism (issue 7, item 3) ---------------------------------------------------------------


def test_finetune_same_seed_same_tables_other_seed_differs(tmp_path):
    from varstudy import finetune

    runs = [finetune.train(_finetune_cfg(tmp_path / f"r{i}", seed=seed, max_steps=3,
                                         checkpoint_every=None))
            for i, seed in enumerate((4, 4, 5))]
    cols = ["step", "loss", "lr"]
    pd.testing.assert_frame_equal(runs[0].steps[cols], runs[1].steps[cols], check_exact=True)
    pd.testing.assert_frame_equal(runs[0].evals, runs[1].evals, check_exact=True)
    assert not runs[0].steps.loss.equals(runs[2].steps.loss)
    folder = tmp_path / "r0" / finetune.run_name(_finetune_cfg(tmp_path, seed=4))
    assert json.loads((folder / "config.json").read_text())["seed"] == 4


def test_different_seeds_give_different_sketches_same_seed_the_same():
    import torch

    from varstudy.randomized.layers import randomize

    def weight_grad(seed):
        torch.manual_seed(0)  # same weights and data; only the sketch seed varies
        model = torch.nn.Sequential(torch.nn.Linear(8, 4))
        x = torch.randn(32, 8)
        randomize(model, 0.25, "gaussian", seed=seed)
        model(x).square().sum().backward()
        return model[0].weight.grad

    assert torch.equal(weight_grad(1), weight_grad(1))
    assert not torch.allclose(weight_grad(1), weight_grad(2))
    cfg = M.MeasureConfig()
    assert not torch.equal(M.batch_indices(400, cfg, 0, 0),
                           M.batch_indices(400, M.MeasureConfig(seed=1), 0, 0))


def test_every_command_records_its_seeds(tmp_path):
    from varstudy import study

    assert M.main(["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
                   "--max-length", "16", "--num-batches", "1", "--families", "rows",
                   "--ratios", "0.5", "--mc-draws", "0", "--no-progress", "--seed", "7",
                   "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["seed"] == 7
    assert study.main(["memory", "--model", "tiny-bert", "--task", "synthetic", "--families",
                       "rows", "--ratios", "0.5", "--batch-sizes", "2", "--max-length", "16",
                       "--seeds", "3,4", "--no-progress", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "memory" / "config.json").read_text())["seeds"] == [3, 4]
    # finetune: test_finetune_same_seed...; bench layers/checkpoint/measure: the resume tests.
