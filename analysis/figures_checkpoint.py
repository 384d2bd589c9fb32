"""Checkpointing figures (plot functions in :mod:`analysis.checkpoint`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.results import FIGURES, RESULTS, MissingResultsError, load, most_common, save
from typing import Callable

def _checkpoint_plot(name: str) -> Callable[..., Figure]:
    try:
        from analysis import checkpoint
    except ImportError as err:
        raise MissingResultsError(f"analysis/checkpoint.py is not importable ({err})") from None
    if not hasattr(checkpoint, name):
        raise MissingResultsError(f"analysis/checkpoint.py has no {name}() (yet)")
    return getattr(checkpoint, name)


def _one_workload(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    workload = most_common(df, "workload")
    return (df, "") if workload is None else (df[df["workload"] == workload], str(workload))


def checkpoint_vs_n(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure: fast-tier peak memory and time per step vs sequence length, per strategy."""
    df, workload = _one_workload(load(results, "checkpoint/vs_n.csv",
                                      ("strategy", "n_steps", "fast_peak_mib",
                                       "time_per_step_ms")))
    fig = _checkpoint_plot("memory_time_vs_n")(df)
    fig.suptitle(f"Backprop through {workload or 'a sequence'}: memory and time vs length N")
    return save(fig, out, "checkpoint_vs_n")


def checkpoint_vs_ratio(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure: cost per step vs transfer/compute ratio, measured and modelled."""
    df, workload = _one_workload(load(results, "checkpoint/vs_ratio.csv",
                                      ("strategy", "ratio", "cost_fwd_units",
                                       "model_cost_fwd_units")))
    fig = _checkpoint_plot("overhead_vs_ratio")(df)
    n = f", N = {int(df['n_steps'].iloc[0])}" if "n_steps" in df and len(df) else ""
    fig.suptitle(f"Overhead vs transfer/compute ratio ({workload}{n})")
    return save(fig, out, "checkpoint_vs_ratio")


