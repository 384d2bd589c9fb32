"""NOTE [staged results] (varstudy.io): a finished result is replaced only by a finished result.

The mechanism on its own (whole folder and file set, resume, crash roll-forward), then every
command that writes results made to fail late, after its inputs were checked, with a finished
folder in place: the folder is byte for byte as it was, the partial state waits in the staging
folder, and ``--resume`` continues from there.
"""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from tests.test_reliability import (COMMANDS, TINY_BENCH_MEASURE, TINY_LAYERS, TINY_STUDY,
                                    _bench_main, _study_main)
from varstudy import io as vio
from varstudy.errors import VarstudyError


def _tree(folder: Path) -> dict[str, bytes]:
    """relpath -> bytes of every file under ``folder`` (symlinks as their target text), leaving
    out staging folders only."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.endswith(vio.STAGING) for part in rel.parts):
            continue
        if p.is_symlink():
            out[str(rel)] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[str(rel)] = p.read_bytes()
    return out


def _write(folder: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


# The mechanism ---------------------------------------------------------------------------------


def test_whole_folder_is_replaced_only_when_the_block_ends_normally(tmp_path):
    final = tmp_path / "run"
    _write(final, {"a.csv": "old\n", "sub/b.csv": "old\n", "gone.csv": "old\n"})
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError):
        with vio.staged(final) as stage:
            assert stage == tmp_path / ".run.staging" and list(stage.iterdir()) == []
            _write(stage, {"a.csv": "new\n"})
            raise RuntimeError("late failure")
    assert _tree(tmp_path) == before and (stage / "a.csv").read_text() == "new\n"
    with vio.staged(final) as stage:  # a fresh run discards the old staging folder only
        assert list(stage.iterdir()) == []
        _write(stage, {"a.csv": "new\n", "sub/c.csv": "new\n"})
    assert _tree(tmp_path) == {"run/a.csv": b"new\n", "run/sub/c.csv": b"new\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left beside it


def test_resume_continues_the_staging_folder_else_a_copy_of_the_finished_one(tmp_path):
    final = tmp_path / "run"
    outside = tmp_path / "outside.txt"
    outside.write_text("never copied\n")
    _write(final, {"a.csv": "done\n", "chunks/s0.csv": "rows\n", ".tmp-a.csv.x": "tmp"})
    (final / ".lock").write_text("123\n")
    os.symlink(outside, final / "chunks" / "s1.csv")
    with pytest.raises(KeyboardInterrupt):
        with vio.staged(final, resume=True) as stage:  # no staging folder: a copy
            assert _tree(stage) == {"a.csv": b"done\n", "chunks/s0.csv": b"rows\n"}
            _write(stage, {"chunks/s1.csv": "partial\n"})
            raise KeyboardInterrupt
    with vio.staged(final, resume=True) as again:  # the interrupted one, as it was left
        assert again == stage and (stage / "chunks" / "s1.csv").read_text() == "partial\n"
    assert (final / "chunks" / "s1.csv").read_text() == "partial\n"
    assert not (final / "chunks" / "s1.csv").is_symlink() and not (final / ".lock").exists()
    assert outside.read_text() == "never copied\n"


def test_file_set_replaces_its_names_and_leaves_the_rest_of_the_folder(tmp_path):
    out = tmp_path / "out"
    _write(out, {"notes.txt": "mine\n", "layers.csv": "old\n", "layers.json": "old\n",
                 "chunks/step_000001.csv": "old\n", "chunks/keep.txt": "mine\n"})
    names = ("chunks/step_000000.csv", "chunks/step_000001.csv", "layers.csv", "layers.json")
    with pytest.raises(VarstudyError):
        with vio.staged(out, files=names, name="cmd") as stage:
            assert stage == out / ".cmd.staging"
            _write(stage, {"layers.csv": "new\n"})
            raise VarstudyError("late")
    assert (out / "layers.csv").read_text() == "old\n"
    with vio.staged(out, files=names, name="cmd") as stage:
        _write(stage, {"layers.csv": "new\n", "layers.json": "new\n",
                       "chunks/step_000000.csv": "new\n", "parts/x.csv": "state\n"})
    assert _tree(out) == {"chunks/keep.txt": b"mine\n", "chunks/step_000000.csv": b"new\n",
                          "layers.csv": b"new\n", "layers.json": b"new\n",
                          "notes.txt": b"mine\n"}  # step 1 is no longer made: removed
    assert not (out / ".cmd.staging").exists()


def test_a_crash_during_publication_is_rolled_forward_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, {"a.csv": "old\n", "b.csv": "old\n"})
    real, moved = vio._put, []

    def dies_after_one(src, dst):
        if moved:
            raise KeyboardInterrupt  # killed between two files
        moved.append(dst.name)
        real(src, dst)

    monkeypatch.setattr(vio, "_put", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        with vio.staged(out, files=("a.csv", "b.csv"), name="cmd") as stage:
            _write(stage, {"a.csv": "new\n", "b.csv": "new\n"})
    assert (out / "a.csv").read_text() == "new\n" and (out / "b.csv").read_text() == "old\n"
    monkeypatch.setattr(vio, "_put", real)
    with vio.staged(out, files=("a.csv", "b.csv"), name="cmd", resume=True) as stage:
        assert _tree(out) == {"a.csv": b"new\n", "b.csv": b"new\n"}  # finished first
        assert _tree(stage) == {"a.csv": b"new\n", "b.csv": b"new\n"}  # a copy of it


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_whole_folder_crash_after_the_mark_is_rolled_forward(tmp_path, monkeypatch,
                                                                exchange):
    final = tmp_path / "run"
    _write(final, {"a.csv": "old\n"})

    def killed(*args):
        raise KeyboardInterrupt

    def killed_between_renames(src, dst):
        os.rename(dst, dst.parent / ".run.old-0000")  # the first of the two renames
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        if exchange:  # killed right after the mark
            patch.setattr(vio, "_exchange", killed)
        else:
            patch.setattr(vio, "_exchange", lambda a, b: False)
            patch.setattr(vio, "_put", killed_between_renames)
        with pytest.raises(KeyboardInterrupt):
            with vio.staged(final) as stage:
                _write(stage, {"a.csv": "new\n"})
    assert exchange or not final.exists()
    if not exchange:
        monkeypatch.setattr(vio, "_exchange", lambda a, b: False)
    with vio.staged(final, resume=True) as stage:  # the next run finishes the publication
        assert (final / "a.csv").read_text() == "new\n"
        assert _tree(stage) == {"a.csv": b"new\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_without_renameat2_two_renames_publish_a_whole_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(vio, "_exchange", lambda a, b: False)
    final = tmp_path / "run"
    _write(final, {"a.csv": "old\n"})
    with vio.staged(final) as stage:
        _write(stage, {"b.csv": "new\n"})
    assert _tree(tmp_path) == {"run/b.csv": b"new\n"}


def test_renameat2_swaps_two_folders():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        a, b = Path(d) / "a", Path(d) / "b"
        _write(a, {"x": "a"})
        _write(b, {"x": "b"})
        if not vio._exchange(a, b):
            pytest.skip("this OS or file system has no renameat2 RENAME_EXCHANGE")
        assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# Every command, failing late with a finished folder in place --------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished output folder per command (bench checkpoint: its smoke preset)."""
    root = tmp_path_factory.mktemp("finished")
    for name, (main, _, _) in COMMANDS.items():
        assert main(["--out", str(root / name)]) == 0, name
    assert _bench_main(CHECKPOINT + ["--out", str(root / "bench-checkpoint")]) == 0
    return root


CHECKPOINT = ["checkpoint", "--preset", "smoke", "--no-progress"]


def _copy(finished: Path, name: str, tmp_path: Path) -> Path:
    import shutil
    out = tmp_path / name
    shutil.copytree(finished / name, out, symlinks=True)
    return out


def _raise(*args, **kwargs):
    raise VarstudyError("injected late failure; valid choices: none")


def _count_trains(monkeypatch, fail_after: int | None = None) -> list:
    """Count the study's fine-tuning runs (``train`` is imported when the study runs); with
    ``fail_after``, the runs after that many fail."""
    from varstudy.finetune import training

    real, calls = training.train, []

    def counted(cfg):
        calls.append(cfg)
        if fail_after is not None and len(calls) > fail_after:
            _raise()
        return real(cfg)

    monkeypatch.setattr(training, "train", counted)
    return calls


def _late(monkeypatch, name: str) -> None:
    """Make command ``name`` fail after its inputs were checked and work was done."""
    from varstudy import distributed as dist
    from varstudy.bench import checkpoint_run as BC
    from varstudy.bench import layers_run as BL
    from varstudy.bench import measure_run as BM
    from varstudy.measure import runner as MR

    if name == "measure":  # the final assembly: layers.csv and summary.csv are written by then
        monkeypatch.setattr(MR, "scope_summary", _raise)
    elif name == "finetune":  # a non-finite training loss at step 2
        real, seen = dist.mean_scalar, []
        monkeypatch.setattr(dist, "mean_scalar", lambda ctx, t: (
            float("nan") if seen else seen.append(1) or real(ctx, t)))
    elif name == "study":  # the second fine-tuning run (exact's tables are saved by then)
        _count_trains(monkeypatch, fail_after=1)
    elif name == "bench-layers":  # after layers.csv is written
        monkeypatch.setattr(BL, "_environment", _raise)
    elif name == "bench-measure":  # after measure.csv is written
        monkeypatch.setattr(BM, "env_info", _raise)
    elif name == "bench-checkpoint":  # after every sweep finished
        monkeypatch.setattr(BC.tables, "summarize", _raise)


MAINS = {**{name: main for name, (main, _, _) in COMMANDS.items()},
         "bench-checkpoint": lambda a: _bench_main(CHECKPOINT + a)}


@pytest.mark.parametrize("name", list(MAINS))
def test_a_run_that_fails_late_leaves_the_finished_folder_byte_for_byte(name, finished,
                                                                         tmp_path, monkeypatch,
                                                                         capsys):
    out = _copy(finished, name, tmp_path)
    before = _tree(tmp_path)
    _late(monkeypatch, name)
    capsys.readouterr()
    assert MAINS[name](["--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "injected late failure" in err or "non-finite training loss" in err, err[-500:]
    assert _tree(tmp_path) == before  # every file, byte for byte; nothing added or removed
    stages = list(tmp_path.rglob(f"*{vio.STAGING}"))
    assert len(stages) == 1 and stages[0].is_dir()  # the partial state waits there


def test_study_resume_after_a_late_failure_continues_and_matches_the_finished_study(
        finished, tmp_path, monkeypatch):
    out = _copy(finished, "study", tmp_path)
    _late(monkeypatch, "study")
    assert _study_main(TINY_STUDY + ["--out", str(out)]) != 0
    monkeypatch.undo()
    trained = _count_trains(monkeypatch)
    assert _study_main(TINY_STUDY + ["--out", str(out), "--resume"]) == 0
    keys = ["family", "ratio", "scope", "seed", "best_value", "final_value", "final_loss"]
    got = pd.read_csv(out / "accuracy" / "runs.csv")[keys]
    ref = pd.read_csv(finished / "study" / "accuracy" / "runs.csv")[keys]
    assert len(ref) >= 2 and ref.family.iloc[0] == "exact"
    assert [c.sketch for c in trained] == ["rows"] * (len(ref) - 1)  # exact: from the staging
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    assert not (out / ".accuracy.staging").exists()


def test_bench_layers_and_measure_share_a_folder_with_their_own_staging(finished, tmp_path,
                                                                        monkeypatch):
    out = _copy(finished, "bench-layers", tmp_path)
    assert _bench_main(TINY_BENCH_MEASURE + ["--out", str(out)]) == 0
    before = _tree(out)
    _late(monkeypatch, "bench-layers")
    assert _bench_main(TINY_LAYERS + ["--out", str(out)]) != 0
    assert _tree(out) == before and (out / ".bench-layers.staging").is_dir()
    monkeypatch.undo()
    assert _bench_main(TINY_BENCH_MEASURE + ["--out", str(out)]) == 0  # its own files only
    after = _tree(out)
    assert {k: v for k, v in after.items() if k.startswith("layers")} == \
        {k: v for k, v in before.items() if k.startswith("layers")}
    assert json.loads(after["measure.json"])["config"]["out"] == str(out)
