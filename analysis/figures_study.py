"""Study figures: memory, throughput, accuracy and the layer benchmark (results/study, bench)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from varstudy.errors import VarstudyError

from analysis import plots, tables
from analysis.results import FIGURES, RESULTS, MissingResultsError, config, load, most_common, save
from analysis.style import new_figure

def build_memory_vs_batch(memory: pd.DataFrame, model: str | None = None,
                          family: str = "gaussian") -> Figure:
    """Saved activations (whole step, linear layers; CUDA peak when measured) vs batch size,
    exact and one family per ρ; the other families' largest gap to it goes in the title."""
    model = model or most_common(memory, "model")
    d = memory[memory["model"] == model] if model is not None else memory
    if "seq_len" in d:
        d = d[d["seq_len"] == most_common(d, "seq_len")]
    if family not in set(d["family"]):
        family = next((f for f in d["family"] if f != tables.EXACT), None)
    if family is None:
        raise VarstudyError(f"memory table has no randomized family for model {model} (only "
                            "exact); valid choices: a memory study with at least one sketch "
                            "family (python -m varstudy.study memory)")
    shown = d[d["family"].isin([tables.EXACT, family])]
    panels = [("saved_mib", "saved for backward (MiB)", "whole training step")]
    if "saved_linear_mib" in d:
        panels.append(("saved_linear_mib", "saved for backward (MiB)", "linear layers only"))
    if "peak_cuda_mib" in d and d["peak_cuda_mib"].notna().any():
        panels.append(("peak_cuda_mib", "peak CUDA memory (MiB)", "CUDA peak, 2 AdamW steps"))
    fig, axes = new_figure(1, len(panels), panel=(4.4, 3.6))
    for i, (col, ylabel, title) in enumerate(panels):
        plots.plot_memory_vs_batch(shown.dropna(subset=[col]), col, ax=axes[0, i],
                                   ylabel=ylabel, title=title)
        if i:
            axes[0, i].get_legend().remove()
    others = sorted(set(d["family"]) - {tables.EXACT, family})
    gap = tables.family_spread(d, "saved_mib", reference=family) if others else float("nan")
    note = f"; {', '.join(others)} within {100 * gap:.1f}%" if others else ""
    seq = f", {int(d['seq_len'].iloc[0])} tokens" if "seq_len" in d and len(d) else ""
    fig.suptitle(f"Memory vs batch size ({model}{seq}; {family}{note})", fontsize="medium")
    return fig


def memory_vs_batch(results: Path = RESULTS, out: Path = FIGURES, **options) -> list[Path]:
    """Figure: memory vs batch size per ρ."""
    memory = load(results, "study/memory/memory.csv",
                  ("family", "ratio", "batch_size", "saved_mib"))
    return save(build_memory_vs_batch(memory, **options), out, "memory_vs_batch")


SPEEDUP_COLUMNS = ("speedup_vs_exact", "ratio_to_exact")


def build_throughput_vs_ratio(throughput: pd.DataFrame, max_batch: pd.DataFrame | None = None,
                              batch_size: int | None = None) -> Figure:
    """Throughput relative to exact vs ρ (and the largest batch that fits, when measured).

    The speed-up column is the study's own (median of per-repeat ratios) when present, else
    examples_per_s over the exact row's.
    """
    col = next((c for c in SPEEDUP_COLUMNS if c in throughput), None)
    if col is None:
        col = "speedup_vs_exact"
        throughput = tables.ratio_to_baseline(throughput, "examples_per_s",
                                              [c for c in ("model", "batch_size", "device")
                                               if c in throughput], column=col)
    batch_size = batch_size or int(throughput["batch_size"].max())
    d = throughput[throughput["batch_size"] == batch_size]
    fig, axes = new_figure(1, 2 if max_batch is not None else 1, panel=(4.6, 3.6))
    device = f" on {d['device'].iloc[0]}" if "device" in d and len(d) else ""
    exact_tp = d.loc[d["family"] == "exact", "examples_per_s"]
    exact_note = f", exact {exact_tp.iloc[0]:.0f} ex/s" if len(exact_tp) else ""
    plots.plot_metric_vs_ratio(d, col, ax=axes[0, 0], baseline=1.0,
                               ylabel="throughput / exact (examples/s ratio)",
                               title=f"training steps, batch {batch_size}{device}{exact_note}",
                               legend=max_batch is None)
    if max_batch is not None:
        basis = f" ({max_batch['basis'].iloc[0]} ≤ {max_batch['budget_mib'].iloc[0]:g} MiB)" \
            if {"basis", "budget_mib"} <= set(max_batch.columns) else ""
        plots.plot_metric_vs_ratio(max_batch, "max_batch", ax=axes[0, 1],
                                   ylabel="largest batch that fits (examples)",
                                   title=f"largest batch{basis}")
    fig.suptitle("Training throughput and batch capacity vs compression ratio")
    return fig


def throughput_vs_ratio(results: Path = RESULTS, out: Path = FIGURES, **options) -> list[Path]:
    """Figure: throughput vs ρ."""
    tp = load(results, "study/throughput/throughput.csv",
              ("family", "ratio", "batch_size", "examples_per_s"))
    try:
        mb = load(results, "study/throughput/max_batch.csv", ("family", "ratio", "max_batch"))
    except MissingResultsError:
        mb = None
    return save(build_throughput_vs_ratio(tp, mb, **options), out, "throughput_vs_ratio")


def layer_bench(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure: whole-model step time and saved bytes relative to exact, vs ρ (layer benchmark)."""
    bench = load(results, "bench/layers.csv", ("family", "ratio", "time_ratio", "saved_ratio"))
    panels = [("time_ratio", "step time / exact", "training-step time"),
              ("saved_ratio", "saved bytes / exact", "saved for backward, whole step")]
    if "linear_saved_ratio" in bench:
        panels.append(("linear_saved_ratio", "saved bytes / exact",
                       "saved for backward, linear layers"))
    fig, axes = new_figure(1, len(panels), panel=(4.2, 3.4))
    for i, (col, ylabel, title) in enumerate(panels):
        plots.plot_metric_vs_ratio(bench, col, ax=axes[0, i], baseline=1.0, ylabel=ylabel,
                                   title=title, legend=i == len(panels) - 1)
    cfg = config(results, "bench/layers.json")
    where = ", ".join(f"{k} {cfg[k]}" for k in ("model", "batch_size", "seq_len") if k in cfg)
    fig.suptitle("Randomized linear layers: cost relative to exact backprop"
                 + (f" ({where})" if where else ""))
    return save(fig, out, "layer_bench")


