"""Tiny-budget smoke run of ``python -m varstudy.bench checkpoint`` and its plots."""

import json
import os

import pandas as pd
import pytest
from matplotlib.figure import Figure

from analysis.checkpoint import memory_time_vs_n, overhead_vs_n, overhead_vs_ratio
from varstudy import bench
from varstudy.bench.checkpoint import (COLUMNS, PRESETS, STRATEGIES, SUMMARY_COLUMNS, BenchConfig,
                                       _parse, estimated_peak_mib, summarize, tape_model)


def test_smoke_run_writes_results_and_plots(tmp_path, capsys):
    out = str(tmp_path / "ckpt")
    assert bench.main(["checkpoint", "--preset", "smoke", "--out", out]) == 0
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
    assert cfg["config"]["ns"] == [20, 60] and cfg["t_f_ms"] > 0
    assert isinstance(memory_time_vs_n(vs_n), Figure)
    assert isinstance(overhead_vs_ratio(vs_ratio), Figure)
    assert isinstance(overhead_vs_n(vs_n), Figure)
    printed = capsys.readouterr().out
    assert "t_f =" in printed and "overhead_vs_plain" in printed


def test_store_all_over_budget_is_skipped_and_recorded(tmp_path, capsys):
    """A tiny --store-all-max-mib skips store_all at the larger N only; the row stays, with NaN."""
    cfg = BenchConfig(**PRESETS["smoke"])
    tape = tape_model(cfg)
    budget = 1.5 * estimated_peak_mib("store_all", 20, tape)
    assert estimated_peak_mib("store_all", 60, tape) > budget  # 60 steps: over budget
    assert estimated_peak_mib("torch_checkpoint", 60, tape) < budget  # sqrt(N) segments: fits
    out = str(tmp_path / "skip")
    assert bench.main(["checkpoint", "--preset", "smoke", "--out", out, "--ratios", "2",
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
    cfg = _parse(["--preset", "paper", "--hidden", "64", "--batch", "8",
                  "--store-all-max-mib", "9"])
    assert (cfg.hidden, cfg.batch, cfg.store_all_max_mib, cfg.workload) == (64, 8, 9.0, "tanh_rnn")
    assert _parse([]) == _parse(["--preset", "paper"])  # default = the committed configuration
    paper = _parse(["--preset", "paper"])
    assert (paper.ns, paper.slots, paper.ratio) == ((100, 300, 1000, 3000, 10000), 5, 5.0)
    with pytest.raises(SystemExit):
        _parse(["--workload", "bogus"])


def test_cli_rejects_unknown_strategy():
    with pytest.raises(SystemExit):
        _parse(["--strategies", "bogus"])
