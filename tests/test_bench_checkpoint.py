"""Tiny-budget smoke run of ``python -m varstudy.bench checkpoint``, its plots and its command
line (NOTE [one convention] in varstudy.cli; NOTE [resume] in varstudy.bench.checkpoint)."""

import contextlib
import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from analysis.checkpoint import memory_time_vs_n, overhead_vs_n, overhead_vs_ratio
from varstudy import bench
from varstudy import io as vio
from varstudy.bench.checkpoint import (COLUMNS, PRESETS, STRATEGIES, SUMMARY_COLUMNS, BenchConfig,
                                       parse)
from varstudy.bench.checkpoint_run import device_of, estimated_peak_mib, setup, tape_model
from varstudy.checkpointing.workloads import tanh_rnn
from varstudy.errors import VarstudyError
from varstudy.bench.checkpoint_tables import summarize

SMOKE = ["checkpoint", "--preset", "smoke", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(folder of one finished smoke run, what it printed)."""
    out = tmp_path_factory.mktemp("finished") / "ckpt"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main(SMOKE + ["--out", str(out)]) == 0
    return out, printed.getvalue()


def test_smoke_run_writes_results_and_plots(finished):
    out, printed = str(finished[0]), finished[1]
    vs_n = pd.read_csv(os.path.join(out, "vs_n.csv"))
    assert list(vs_n.columns) == COLUMNS
    assert set(vs_n["strategy"]) == set(STRATEGIES)
    assert (vs_n["fast_peak_bytes"] > 0).all() and (vs_n["time_s"] > 0).all()
    assert vs_n["skipped"].isna().all()  # nothing skipped at the default budget
    t_sum = vs_n["t_f_ms"] + vs_n["t_b_ms"]
    assert (vs_n["overhead_vs_plain"] - vs_n["time_per_step_ms"] / t_sum).abs().max() < 1e-9
    assert vs_n["model_overhead_vs_plain"].notna().all()
    store = vs_n[vs_n["strategy"] == "store_all"]
    assert (store["overhead_vs_store_all"] == 1.0).all()
    assert vs_n["overhead_vs_store_all"].notna().all()
    assert (vs_n.loc[vs_n["n_steps"] == 20, "repeats"] == 2).all()  # smoke: N <= 20 run twice
    assert (vs_n.loc[vs_n["n_steps"] == 60, "repeats"] == 1).all()
    summary = pd.read_csv(os.path.join(out, "summary.csv"))
    assert list(summary.columns) == SUMMARY_COLUMNS and set(summary["strategy"]) == set(STRATEGIES)
    vs_ratio = pd.read_csv(os.path.join(out, "vs_ratio.csv"))
    assert set(vs_ratio["ratio"]) == {1.0, 3.0}
    wave = pd.read_csv(os.path.join(out, "wave.csv"))
    assert wave["grad_norm"].nunique() == 1  # every strategy gives the same gradient
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["ns"] == [20, 60] and cfg["num_threads"] is None  # smoke: torch's default
    env = json.load(open(os.path.join(out, "env.json")))
    assert env["t_f_ms"] > 0 and env["torch_threads"] >= 1 and env["resumed"] is False
    assert sorted(os.listdir(out)) == ["config.json", "env.json", "summary.csv", "vs_n.csv",
                                       "vs_ratio.csv", "wave.csv"]  # no parts, no lock file
    assert isinstance(memory_time_vs_n(vs_n), Figure)
    assert isinstance(overhead_vs_ratio(vs_ratio), Figure)
    assert isinstance(overhead_vs_n(vs_n), Figure)
    assert "t_f =" in printed and "overhead_vs_plain" in printed


def test_store_all_over_budget_is_skipped_and_recorded(tmp_path, capsys):
    """A tiny --store-all-max-mib skips store_all at the larger N only; the row stays, with NaN."""
    cfg = BenchConfig(**PRESETS["smoke"])
    tape = tape_model(cfg)
    budget = 1.5 * estimated_peak_mib("store_all", 20, tape)
    assert estimated_peak_mib("store_all", 60, tape) > budget  # 60 steps: over budget
    assert estimated_peak_mib("torch_checkpoint", 60, tape) < budget  # sqrt(N) segments: fits
    out = str(tmp_path / "skip")
    assert bench.main(SMOKE + ["--out", out, "--ratios", "2",
                               "--store-all-max-mib", str(budget)]) == 0
    vs_n = pd.read_csv(os.path.join(out, "vs_n.csv"))
    assert len(vs_n) == 2 * len(STRATEGIES)  # skipped rows are recorded, not dropped
    skipped = vs_n[vs_n["skipped"].notna()]
    assert list(zip(skipped["strategy"], skipped["n_steps"])) == [("store_all", 60)]
    assert skipped["time_s"].isna().all() and skipped["fast_peak_mib"].isna().all()
    assert "store_all_max_mib" in skipped["skipped"].iloc[0]
    ran = vs_n[vs_n["skipped"].isna()]
    assert (ran["time_s"] > 0).all()
    # store_all missing at N = 60: no baseline there, one at N = 20
    assert vs_n.loc[vs_n["n_steps"] == 60, "overhead_vs_store_all"].isna().all()
    assert vs_n.loc[vs_n["n_steps"] == 20, "overhead_vs_store_all"].notna().all()
    summary = pd.read_csv(os.path.join(out, "summary.csv"), dtype={"skipped_at": str})
    summary = summary.set_index("strategy")
    assert summary.loc["store_all", "skipped_at"] == "60"
    assert pd.isna(summary.loc["store_all", "overhead_at_n_max"])
    assert pd.notna(summary.loc["multistage_host", "overhead_change_pct"])
    assert summary.loc["revolve", "fast_peak_mib_max"] > 0
    assert isinstance(memory_time_vs_n(vs_n), Figure)  # NaN points leave gaps
    assert isinstance(overhead_vs_n(vs_n), Figure)
    assert "skipped store_all at N=60" in capsys.readouterr().out


def test_summarize_targets():
    """Overhead change, +-10% flag, <= revolve at each N and peak flatness from a made-up frame."""
    rows = []
    for n, ms, rv in ((100, 1.20, 1.30), (10000, 1.25, 2.80)):
        for name, ov, peak in (("revolve", rv, 1.0), ("multistage_host", ms, 2.0)):
            rows.append(dict(strategy=name, n_steps=n, time_s=ov * n, overhead_vs_plain=ov,
                             model_overhead_vs_plain=ov, fast_peak_mib=peak, skipped=None))
    s = summarize(pd.DataFrame(rows)).set_index("strategy")
    assert s.loc["multistage_host", "overhead_change_pct"] == pytest.approx(100 * (1.25 / 1.2 - 1))
    assert s.loc["multistage_host", "within_10pct"] == True  # noqa: E712
    assert s.loc["revolve", "within_10pct"] == False  # noqa: E712
    assert s.loc["multistage_host", "not_slower_than_revolve"] == True  # noqa: E712
    assert s.loc["multistage_host", "fast_peak_mib_max"] == 2.0


def test_cli_workload_size_and_presets():
    cfg = parse(["--preset", "paper", "--hidden", "64", "--batch", "8",
                 "--store-all-max-mib", "9"])
    assert (cfg.hidden, cfg.batch, cfg.store_all_max_mib, cfg.workload) == (64, 8, 9.0, "tanh_rnn")
    assert parse([]) == parse(["--preset", "paper"])  # default = the committed configuration
    paper = parse(["--preset", "paper"])
    assert (paper.ns, paper.slots, paper.ratio) == ((100, 300, 1000, 3000, 10000), 5, 5.0)
    assert paper.num_threads == 1 and BenchConfig().num_threads is None  # committed: 1 thread
    with pytest.raises(SystemExit):
        parse(["--workload", "bogus"])


def test_cli_rejects_unknown_strategy():
    with pytest.raises(SystemExit):
        parse(["--strategies", "bogus"])


def test_cli_comma_lists_none_flags_and_config_rerun(finished, tmp_path):
    cfg = parse(["--ns", "10,30", "--strategies", "revolve,multistage_disk", "--ratios", "2,4",
                 "--num-threads", "none", "--no-progress", "--resume"])
    assert (cfg.ns, cfg.strategies, cfg.ratios) == ((10, 30), ("revolve", "multistage_disk"),
                                                    (2.0, 4.0))
    assert cfg.num_threads is None and not cfg.progress and cfg.resume
    saved = finished[0] / "config.json"  # --config reruns a saved run; flags override it
    assert parse(["--config", str(saved)]) == BenchConfig(**PRESETS["smoke"], progress=False,
                                                          out=str(finished[0]))
    assert parse(["--config", str(saved), "--hidden", "8"]).hidden == 8
    # a config.json written before the one convention (the committed results/checkpoint/)
    paper = asdict(parse(["--preset", "paper"]))
    old = {k: v for k, v in paper.items() if k not in ("num_threads", "progress")}
    legacy = tmp_path / "config.json"
    legacy.write_text(json.dumps(dict(config=dict(old, threads=1), t_f_ms=0.5, wall_s=280)))
    assert parse(["--config", str(legacy)]) == parse(["--preset", "paper"])
    assert parse(["--config", str(legacy), "--num-threads", "2"]).num_threads == 2


BAD = [  # (arguments, words the one line must hold)
    (["--ns", "20,20"], "--ns lists 20 more than once"),
    (["--strategies", "revolve,revolve"], "'revolve' more than once"),
    (["--ratios", "1,1"], "--ratios lists 1.0 more than once"),
    (["--strategies", ""], "--strategies is empty"),
    (["--out", ""], "--out '' is empty"),
    (["--ns", "0"], "--ns 0 is out of range"),
    (["--slots", "0"], "--slots 0 is out of range"),
    (["--ratio", "0"], "--ratio 0.0 is out of range"),
    (["--ratios", "1,inf"], "--ratios inf is out of range"),
    (["--num-threads", "0"], "--num-threads 0 is out of range"),
    (["--seed", "-1"], "0 <= seed < 2**63"),
    (["--config", "no/such/config.json"], "cannot be read as JSON"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda:x"], "unknown device 'cuda:x'"),
] + ([(["--device", "cuda"], "CUDA is not available")] if not torch.cuda.is_available() else [])


@pytest.mark.parametrize("argv, words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_before_anything_is_written(argv, words, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.chdir(tmp_path)  # an empty --out would be the current directory
    out = ["--out", str(tmp_path / "out")] if "--out" not in argv else []
    assert bench.main(SMOKE + argv + out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert "valid" in err
    assert os.listdir(tmp_path) == []


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _damaged_calibration(out: Path) -> None:
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "calibration.json").write_text('{"config": {"ns": [20')


def _other_calibration(out: Path) -> None:
    (out / "parts").mkdir(parents=True)
    smoke = asdict(BenchConfig(**PRESETS["smoke"], progress=False, out=str(out)))
    vio.atomic_write_json(out / "parts" / "calibration.json", dict(config=smoke, t_f=1e-4,
                                                                   t_b=2e-4))


def _damaged_rows(out: Path) -> None:
    _other_calibration(out)
    (out / "parts" / "vs_n.csv").write_text("n_steps,strategy\n20,revolve\n20,revolve,1,2\n")


RERUNS = [  # (bad options, how the folder is prepared, words of the one line)
    (["--slots", "0"], None, "--slots 0 is out of range"),
    (["--ns", "20,20"], None, "more than once"),
    (["--resume"], _damaged_calibration, "is not valid JSON"),
    (["--resume", "--hidden", "8"], _other_calibration, "--resume with a different config"),
    (["--resume"], _damaged_rows, "vs_n.csv is damaged"),
]


@pytest.mark.parametrize("bad, prepare, words", RERUNS, ids=[" ".join(b) for b, _, _ in RERUNS])
def test_a_failed_rerun_leaves_the_finished_folder_as_it_was(bad, prepare, words, finished,
                                                             tmp_path, capsys):
    out = tmp_path / "ckpt"
    shutil.copytree(finished[0], out)
    if prepare is not None:
        prepare(out)
    before = _hashes(out)
    assert bench.main(SMOKE + bad + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "valid choices" in err, err
    assert _hashes(out) == before  # every file, byte for byte; nothing added or removed


def test_a_second_run_on_a_folder_in_use_refuses_with_one_line(finished, tmp_path, capsys):
    out = tmp_path / "ckpt"
    shutil.copytree(finished[0], out)
    before = _hashes(out)
    with vio.output_lock(out, ".checkpoint.lock"):  # as a run in progress holds it
        assert bench.main(SMOKE + ["--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is in use by another run" in err
    assert f"(pid {os.getpid()}); valid choices: wait for it, or another --out" in err
    assert _hashes(out) == before
    with vio.output_lock(finished[0], ".checkpoint.lock"):  # the finished run let it go
        pass


def test_output_directory_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    assert bench.main(SMOKE + ["--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker) in err and "valid choices" in err
    assert blocker.read_text() == "not a directory\n"


def test_resume_drops_kept_rows_that_are_not_jobs_or_repeat_one(tmp_path, monkeypatch):
    """NOTE [resume]: a kept row of another N, or a second copy of a job's row, is dropped; the
    first copy is kept as it is, with the kept calibration, and every other job runs once."""
    from varstudy.bench import checkpoint_run as BC
    from varstudy.bench.checkpoint_tables import row

    out = tmp_path / "ckpt"
    _other_calibration(out)  # t_f = 0.1 ms, t_b = 0.2 ms
    first = row("tanh_rnn", "store_all", 20, 5, 5.0, dict(
        time_s=0.123, main_cpu_s=0.1, fast_peak_bytes=1000, interval=0, recompute_steps=0,
        stall_s=0.0), 1e-4, 2e-4, repeats=2)
    rows = [first, dict(first, time_s=0.456), dict(first, n_steps=999)]
    vio.append_csv(out / "parts" / "vs_n.csv", pd.DataFrame(rows, columns=COLUMNS))
    real, calls = BC._timed, []
    monkeypatch.setattr(BC, "_timed", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    assert bench.main(SMOKE + ["--resume", "--out", str(out)]) == 0
    cfg = BenchConfig(**PRESETS["smoke"])
    vs_n = pd.read_csv(out / "vs_n.csv")
    assert list(zip(vs_n.n_steps, vs_n.strategy)) == [(n, s) for n in cfg.ns
                                                       for s in cfg.strategies]
    kept = vs_n[(vs_n.n_steps == 20) & (vs_n.strategy == "store_all")]
    assert kept.time_s.tolist() == [0.123] and (vs_n.t_f_ms == 0.1).all()
    assert sorted((n, s) for s, n in calls if n in cfg.ns) == \
        sorted((n, s) for n in cfg.ns for s in cfg.strategies if (n, s) != (20, "store_all"))
    assert json.loads((out / "env.json").read_text())["resumed"] is True


def test_device_defaults_to_cpu_and_cpu_draws_are_unchanged(finished):
    """--device cpu (the default) keeps the committed CPU runs: same config, the same draws as
    before the option existed (weights, h0 and inputs from one CPU generator, in this order)."""
    assert BenchConfig().device == "cpu" and parse([]).device == "cpu"
    assert parse(["--preset", "paper"]) == parse(["--preset", "paper", "--device", "cpu"])
    cfg = BenchConfig(**PRESETS["smoke"])
    step, h0, xs = setup(cfg, 7)
    g = torch.Generator().manual_seed(cfg.seed)
    assert torch.equal(h0, torch.randn(cfg.batch, cfg.hidden, generator=g)) and h0.requires_grad
    assert torch.equal(xs, torch.randn(7, cfg.batch, cfg.inputs, generator=g))
    _, params = tanh_rnn(cfg.hidden, cfg.inputs, seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    w = torch.randn(cfg.hidden, cfg.hidden, generator=g) / cfg.hidden ** 0.5
    u = torch.randn(cfg.inputs, cfg.hidden, generator=g) / cfg.inputs ** 0.5
    assert torch.equal(params[0], w) and torch.equal(params[1], u) and not params[2].any()
    assert {p.device.type for p in params} | {h0.device.type, xs.device.type} == {"cpu"}
    assert device_of("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    out = finished[0]
    assert json.load(open(out / "config.json"))["device"] == "cpu"
    assert json.load(open(out / "env.json"))["device"] == "cpu"


def test_device_index_beyond_the_machine_is_one_line():
    with pytest.raises(VarstudyError, match="valid choices") as err:
        device_of("cuda:99")
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smoke_run_on_cuda_device(tmp_path):
    """On a GPU: the smoke run with the step on CUDA (pinned host tier); every strategy of the
    wave gives the same gradient up to float32 recomputation."""
    out = tmp_path / "cuda"
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(SMOKE + ["--device", "cuda", "--out", str(out)]) == 0
    env = json.load(open(out / "env.json"))
    assert env["device"].startswith("cuda") and env["t_f_ms"] > 0
    vs_n = pd.read_csv(out / "vs_n.csv")
    assert (vs_n["time_s"] > 0).all() and (vs_n["fast_peak_bytes"] > 0).all()
    wave = pd.read_csv(out / "wave.csv")
    assert (wave["grad_norm"] - wave["grad_norm"].iloc[0]).abs().max() <= \
        1e-5 * wave["grad_norm"].abs().max()
