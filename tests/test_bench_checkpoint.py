"""Tiny-budget smoke run of ``python -m varstudy.bench checkpoint`` and its plots."""

import json
import os

import pandas as pd
import pytest
from matplotlib.figure import Figure

from analysis.checkpoint import memory_time_vs_n, overhead_vs_ratio
from varstudy import bench
from varstudy.bench_checkpoint import COLUMNS, STRATEGIES, _parse


def test_smoke_run_writes_results_and_plots(tmp_path, capsys):
    out = str(tmp_path / "ckpt")
    assert bench.main(["checkpoint", "--preset", "smoke", "--out", out]) == 0
    vs_n = pd.read_csv(os.path.join(out, "vs_n.csv"))
    assert list(vs_n.columns) == COLUMNS
    assert set(vs_n["strategy"]) == set(STRATEGIES)
    assert (vs_n["fast_peak_bytes"] > 0).all() and (vs_n["time_s"] > 0).all()
    vs_ratio = pd.read_csv(os.path.join(out, "vs_ratio.csv"))
    assert set(vs_ratio["ratio"]) == {1.0, 3.0}
    wave = pd.read_csv(os.path.join(out, "wave.csv"))
    assert wave["grad_norm"].nunique() == 1  # every strategy gives the same gradient
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["config"]["ns"] == [20, 60] and cfg["t_f_ms"] > 0
    assert isinstance(memory_time_vs_n(vs_n), Figure)
    assert isinstance(overhead_vs_ratio(vs_ratio), Figure)
    assert "t_f =" in capsys.readouterr().out


def test_cli_rejects_unknown_strategy():
    with pytest.raises(SystemExit):
        _parse(["--strategies", "bogus"])
