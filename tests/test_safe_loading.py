"""NOTE [data, never code] (varstudy.io): a results folder handed over by someone else is data.

A checkpoint whose pickle would run code when loaded makes ``--resume`` refuse with one line
and runs nothing; a ``.lock`` that is a symlink (or not a regular file) is refused, and what it
points at is never written; no ``torch.load`` in the project loads more than tensors.
"""

import io
import os
import re
from pathlib import Path

import pytest
import torch

from tests.test_reliability import TINY_FINETUNE, TINY_MEASURE, _finetune_main
from varstudy import io as vio
from varstudy import measure as M

ROOT = Path(__file__).resolve().parents[1]


class _Opens:
    """Pickles as ``open(path, "w")``: loading it with full pickle creates ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A checkpoint at ``path`` that would create ``marker`` if it were unpickled in full
    (``legacy``: a plain pickle instead of torch's zip format)."""
    obj = {"step": 1, "config": {}, "model": _Opens(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        import pickle
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "plain-pickle"])
def test_the_crafted_file_would_run_code_but_load_checkpoint_refuses(tmp_path, legacy):
    probe, marker = tmp_path / "probe", tmp_path / "marker"
    with open(_crafted(tmp_path / "a.pt", probe, legacy), "rb") as f:
        try:  # the threat is real (a plain pickle runs its code, then fails torch's check) ...
            torch.load(io.BytesIO(f.read()), weights_only=False)
        except RuntimeError:
            assert legacy
    assert probe.exists()
    with pytest.raises(vio.VarstudyError) as err:  # ... and never realised here
        vio.load_checkpoint(_crafted(tmp_path / "b.pt", marker, legacy))
    message = str(err.value)
    assert "\n" not in message and "nothing in it was run" in message
    assert message.endswith("or rerun without --resume") and not marker.exists()


def _one_line_refusal(capsys, code: int, marker: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not marker.exists()
    return err


@pytest.mark.parametrize("where", ["run folder", "staging folder"])
def test_finetune_resume_refuses_a_crafted_checkpoint(tmp_path, capsys, where):
    name = "run"
    folder = tmp_path / (name if where == "run folder" else f".{name}.staging")
    marker = tmp_path / "marker"
    _crafted(folder / "checkpoint.pt", marker)
    code = _finetune_main(TINY_FINETUNE + ["--name", name, "--out", str(tmp_path), "--resume"])
    err = _one_line_refusal(capsys, code, marker)
    assert "checkpoint.pt is unreadable" in err


@pytest.mark.parametrize("config", [[1, 2], "opts", 3], ids=["list", "str", "int"])
def test_finetune_resume_refuses_a_checkpoint_whose_config_is_not_a_mapping(tmp_path, capsys,
                                                                          config):
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"step": 1, "config": config}, folder / "checkpoint.pt")
    before = (folder / "checkpoint.pt").read_bytes()
    code = _finetune_main(TINY_FINETUNE + ["--name", "run", "--out", str(tmp_path), "--resume"])
    err = _one_line_refusal(capsys, code, tmp_path / "marker")
    assert f"holds a {type(config).__name__} where the run's options belong" in err
    assert (folder / "checkpoint.pt").read_bytes() == before


def test_measure_resume_refuses_a_crafted_training_state(tmp_path, capsys):
    argv = TINY_MEASURE + ["--train-steps", "1", "--measure-at", "0,1", "--out", str(tmp_path)]
    assert M.main(argv) == 0
    state, marker = tmp_path / "state" / "train.pt", tmp_path / "marker"
    assert set(vio.load_checkpoint(state)) == {"step", "model", "optimizer"}  # as data
    _crafted(state, marker)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = M.main(argv + ["--resume"])
    err = _one_line_refusal(capsys, code, marker)
    assert "train.pt is unreadable" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
            and vio.STAGING not in str(p.relative_to(tmp_path))} == before


def test_a_lock_symlink_is_refused_and_its_target_untouched(tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / ".lock")
    assert M.main(TINY_MEASURE + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a symlink or not a regular file" in err, err
    assert err.endswith("valid choices: remove it (no run of varstudy makes one), or another "
                        "--out")
    assert target.read_text() == "keep me\n" and (out / ".lock").is_symlink()
    assert not (out / "layers.csv").exists()


@pytest.mark.parametrize("kind", ["dangling symlink", "directory", "fifo"])
def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    lock = tmp_path / ".lock"
    if kind == "dangling symlink":
        os.symlink(tmp_path / "created?", lock)
    elif kind == "directory":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    with pytest.raises(vio.VarstudyError, match="is a symlink or not a regular file"):
        with vio.output_lock(tmp_path):
            pass
    assert not (tmp_path / "created?").exists() and os.path.lexists(lock)


def test_no_torch_load_in_the_project_loads_code():
    """Every torch.load names weights_only=True (grep of the package, analysis and tests)."""
    calls = []
    for folder in ("varstudy", "analysis", "tests", "notebooks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                depth, end = 0, m.end() - 1
                for end in range(m.end() - 1, len(text)):  # to the matching parenthesis
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    if depth == 0:
                        break
                calls.append((path.name, text[m.start():end + 1]))
    assert calls, "the search found no torch.load at all"
    unsafe = [(f, c) for f, c in calls if "weights_only=True" not in c
              and f != Path(__file__).name]
    assert unsafe == []


def test_a_finetune_checkpoint_loads_as_data(tmp_path, monkeypatch):
    """The finetune checkpoint, with the online planner's state, holds tensors and plain data
    only: torch.load(weights_only=True) reads it whole (measure's state: test above)."""
    from varstudy.finetune import FinetuneConfig, train
    from varstudy.finetune import training

    cfg = FinetuneConfig(model="tiny-bert", task="synthetic", sketch="rows", ratio=0.5,
                         batch_size=4, max_length=16, max_steps=4, eval_every=2,
                         eval_examples=16, checkpoint_every=2, replan_every=2,
                         progress=False, num_threads=1, out=str(tmp_path), name="run")
    real = training.evaluations

    def stop(setup, config, step, evals):
        if step == 4:
            raise KeyboardInterrupt
        return real(setup, config, step, evals)

    monkeypatch.setattr(training, "evaluations", stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    saved = vio.load_checkpoint(tmp_path / ".run.staging" / "checkpoint.pt")
    assert {"model", "optimizer", "scheduler", "rng_cpu", "planner", "plans"} <= set(saved)
    assert len(saved["steps"]) == 2 and saved["planner"] is not None
