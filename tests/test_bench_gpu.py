"""``python -m varstudy.bench gpu``: the CPU dry run of CI (``--device cpu --quick``), the one line
without a GPU, the stage runner, the measure comparison and the pytest line parser; the CUDA peak
test runs where a GPU is."""
import contextlib
import io
import json
import re
from dataclasses import asdict

import pandas as pd
import pytest
import torch

from varstudy import bench
from varstudy.bench import gpu_stages
from varstudy.bench.gpu import STAGES, parse, slug
from varstudy.bench.gpu_stages import (Outcome, compare_summaries, committed_reference,
                                       pytest_counts, visible_devices)
from varstudy.measure import MeasureConfig

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(folder, status, what it printed) of ``bench gpu --device cpu --quick``."""
    out = tmp_path_factory.mktemp("gpu")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = bench.main(["gpu", "--device", "cpu", "--quick", "--out", str(out)])
    return out / "cpu", status, printed.getvalue()


def test_cpu_dry_run_passes_every_stage_and_writes_the_summary(dry_run):
    folder, status, printed = dry_run
    summary = json.loads((folder / "summary.json").read_text())
    stages = {r["stage"]: r for r in summary["stages"]}
    assert [r["stage"] for r in summary["stages"]] == list(STAGES)
    assert status == 0 and summary["ok"] is True, printed
    assert {s: r["status"] for s, r in stages.items()} == dict(
        tests="passed", measure="passed", layers="passed", peak="skipped",
        checkpoint="passed"), printed
    assert "no CUDA" in stages["peak"]["note"]
    assert all(r["seconds"] > 0 and (folder / f"{r['stage']}.log").is_file()
               for r in summary["stages"])
    tests = stages["tests"]["numbers"]
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    measure = stages["measure"]["numbers"]  # the same run twice on the CPU: bit for bit
    assert measure["max_rel_diff"] == 0.0 and measure["n_compared"] > 0
    assert measure["unmatched"] == 0
    assert set(stages["layers"]["numbers"]) == {"float32", "bfloat16"}  # no CPU float16
    assert all(v["predicted_err"] < 5e-4 for v in stages["layers"]["numbers"].values())
    peak = stages["peak"]["numbers"]
    assert set(peak) == {"exact", "gaussian"} and peak["exact"]["peak_mib"] is None
    assert 0 < peak["gaussian"]["saved_mib"] < peak["exact"]["saved_mib"]
    ckpt = stages["checkpoint"]["numbers"]
    assert ckpt["host_round_trip"] is True and ckpt["host_pinned"] is False
    assert ckpt["host_write_ms"] > 0 and ckpt["wave_grad_spread"] == 0.0
    text = (folder / "summary.md").read_text()
    assert text in printed and len(text.splitlines()) <= 20  # one screen
    assert "-> OK" in text.splitlines()[0]
    config = json.loads((folder / "config.json").read_text())
    assert config["device_resolved"] == "cpu" and config["quick"] is True
    for path in ("layers/float32/layers.csv", "layers/bfloat16/layers.csv", "peak/peak.csv",
                 "measure/device/summary.csv", "measure/cpu/summary.csv",
                 "checkpoint/bench/env.json"):
        assert (folder / path).is_file(), path
    assert json.loads((folder / "checkpoint/bench/env.json").read_text())["device"] == "cpu"


@pytest.mark.skipif(not NO_CUDA, reason="checks the machine without a GPU")
@pytest.mark.parametrize("device", [[], ["--device", "cuda"], ["--device", "cuda:1"]])
def test_without_a_gpu_cuda_is_one_line_and_status_2(device, tmp_path, capsys):
    assert bench.main(["gpu", *device, "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: no CUDA device"), err
    assert "--device cpu --quick" in err and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_bench_help_lists_gpu(capsys):
    assert bench.main(["--help"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\{[a-z,]*\bgpu\b[a-z,]*\}", printed) and "\n  gpu " in printed
    assert bench.main(["gpu", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


BAD = [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--stages", "tests,bogus"], "invalid choice 'bogus'"),
    (["--stages", "tests,tests"], "'tests' more than once"),
    (["--rtol", "0"], "--rtol 0.0 is out of range"),
    (["--test-timeout-s", "inf"], "--test-timeout-s inf is out of range"),
    (["--num-threads", "0"], "--num-threads 0 is out of range"),
    (["--out", ""], "is empty"),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    assert bench.main(["gpu", "--device", "cpu", *argv, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert "valid" in err
    assert list(tmp_path.iterdir()) == []


def test_a_failing_stage_is_recorded_and_the_next_runs(tmp_path, monkeypatch, capsys):
    """A stage that raises fails with its one-line reason (traceback in its log); the next
    stage still runs; the status is 1; the thread count the stage changed is restored."""
    def broken(run):
        torch.set_num_threads(1)
        print("started")
        raise RuntimeError("boom\nsecond line")

    ran = []
    monkeypatch.setitem(gpu_stages.STAGE_FUNCTIONS, "tests", broken)
    monkeypatch.setitem(gpu_stages.STAGE_FUNCTIONS, "measure",
                        lambda run: ran.append(run.device) or Outcome(numbers=dict(
                            n_compared=3, max_rel_diff=1e-6, rtol=1e-3, reference="x")))
    threads = torch.get_num_threads()
    assert bench.main(["gpu", "--device", "cpu", "--stages", "tests,measure", "--out",
                       str(tmp_path)]) == 1
    assert torch.get_num_threads() == threads and ran == [torch.device("cpu")]
    summary = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    assert [(r["stage"], r["status"]) for r in summary["stages"]] == [("tests", "failed"),
                                                                      ("measure", "passed")]
    assert summary["stages"][0]["note"] == "RuntimeError: boom second line"
    assert summary["ok"] is False
    log = (tmp_path / "cpu" / "tests.log").read_text()
    assert "started" in log and "Traceback" in log
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "* tests: RuntimeError: boom second line" in printed


def _summary(values):
    rows = [dict(train_step=0, layer=f"l{i}", family="gaussian", ratio=0.1,
                 var_sketch_mean=v, var_sampling_mean=2 * v) for i, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_compare_summaries_max_relative_difference_above_the_floor():
    ref = _summary([1.0, 0.5, 1e-14])
    assert compare_summaries(ref, ref) == dict(n_compared=4, max_rel_diff=0.0, worst="",
                                               unmatched=0)  # 1e-14 is below the floor
    dev = ref.copy()
    dev.loc[1, "var_sketch_mean"] *= 1 + 2e-3
    dev.loc[2, "var_sketch_mean"] *= 100  # below 1e-12 x the largest: not compared
    got = compare_summaries(dev, ref)
    assert got["max_rel_diff"] == pytest.approx(2e-3)
    assert got["worst"] == "var_sketch_mean of l1 gaussian 0.1" and got["n_compared"] == 4
    dev.loc[0, "var_sampling_mean"] = float("nan")  # a NaN on the device is never "close"
    assert compare_summaries(dev, ref)["max_rel_diff"] == float("inf")
    assert compare_summaries(ref.iloc[:2], ref)["unmatched"] == 1


def test_committed_reference_only_for_the_default_config(tmp_path):
    folder = tmp_path / "results" / "measure" / "default"
    folder.mkdir(parents=True)
    default = MeasureConfig(progress=False)
    assert committed_reference(tmp_path, default)[0] is None  # no files
    saved = dict(asdict(MeasureConfig(device="cpu", num_threads=2)), layers_selected=["x"])
    saved.pop("padding")  # a key written before that option existed: its default
    (folder / "config.json").write_text(json.dumps(saved))
    for name in ("summary.csv", "env.json"):
        (folder / name).write_text("x\n")
    assert committed_reference(tmp_path, default) == (folder / "summary.csv", "")
    other = MeasureConfig(progress=False, batch_size=8)
    path, why = committed_reference(tmp_path, other)
    assert path is None and "not the default config" in why


@pytest.mark.parametrize("committed, cpu, status, words", [
    (1.0, None, "passed", ""),  # the committed run agrees: no CPU run
    (1.2, 1.0, "passed", "committed results/measure/default differs by 0.17"),
    (1.2, 1.01, "failed", "max relative difference 0.0099 > rtol 0.001"),
], ids=["committed", "stale-committed", "cpu-differs"])
def test_full_measure_reference(committed, cpu, status, words, tmp_path, monkeypatch):
    """Full mode: the committed summary.csv is the reference when it agrees; a stale one (the
    committed run predates the derive_seed fix) is named and a CPU run decides."""
    from varstudy.bench.gpu_stages import Run, measure
    from varstudy.measure import runner

    repo = tmp_path / "repo"
    committed_dir = repo / "results" / "measure" / "default"
    committed_dir.mkdir(parents=True)
    (committed_dir / "config.json").write_text(json.dumps(asdict(MeasureConfig(device="cpu"))))
    (committed_dir / "env.json").write_text("{}")
    _scaled(committed).to_csv(committed_dir / "summary.csv", index=False)
    runs = []

    def fake_run(cfg):  # the device's run gives the values x1, a CPU run x `cpu`
        runs.append(cfg.device)
        out = tmp_path / "f" / "measure" / ("cpu" if len(runs) > 1 else "device")
        out.mkdir(parents=True, exist_ok=True)
        _scaled(1.0 if len(runs) == 1 else cpu).to_csv(out / "summary.csv", index=False)

    monkeypatch.setattr(runner, "run", fake_run)
    run = Run(parse(["--device", "cpu"]), torch.device("cpu"), tmp_path / "f", repo)
    outcome = measure(run)
    assert (outcome.status, len(runs)) == (status, 1 if cpu is None else 2), outcome
    assert words in outcome.note and (words or outcome.note == "")
    reference = "committed results/measure/default" if cpu is None else "a CPU run"
    assert outcome.numbers["reference"] == reference


def _scaled(factor):
    frame = _summary([1.0, 0.5])
    frame.loc[1, ["var_sketch_mean", "var_sampling_mean"]] *= factor
    return frame


def test_pytest_counts_and_visible_devices(monkeypatch):
    assert pytest_counts("..s\n1 failed, 3 passed, 2 skipped, 9 deselected in 1.20s\n") == dict(
        passed=3, failed=1, skipped=2, errors=0, deselected=9)
    assert pytest_counts("E   boom\n1 error in 0.5s")["errors"] == 1
    assert pytest_counts("no summary") == dict(passed=0, failed=0, skipped=0, errors=0,
                                               deselected=0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices(torch.device("cpu")) is None
    assert visible_devices(torch.device("cuda")) is None
    assert visible_devices(torch.device("cuda:1")) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert visible_devices(torch.device("cuda:1")) == "6"


def test_slug_and_defaults():
    assert slug("NVIDIA H200") == "nvidia-h200"
    assert slug("NVIDIA GeForce RTX 4090 (24 GB)") == "nvidia-geforce-rtx-4090-24-gb"
    assert slug("  ") == "device"
    cfg = parse([])
    assert (cfg.device, cfg.quick, cfg.out, cfg.stages, cfg.rtol) == ("cuda", False,
                                                                     "results/gpu", STAGES, 1e-3)


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_cuda_peak_holds_at_least_what_forward_keeps(tmp_path):
    """On a GPU: the peak of two AdamW steps is at least parameters + moments + saved bytes."""
    from varstudy.bench.gpu_stages import Run, peak

    run = Run(parse(["--device", "cuda", "--quick"]), torch.device("cuda"), tmp_path, None)
    outcome = peak(run)
    assert outcome.status == "passed", outcome.note
    for numbers in outcome.numbers.values():
        assert numbers["peak_mib"] >= numbers["saved_mib"] > 0 and numbers["ratio"] > 0.5
