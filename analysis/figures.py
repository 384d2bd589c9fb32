"""Publication figures: one entry point per figure, each rebuilding ``figures/<name>.{png,pdf}``
from the CSVs under ``results/`` on CPU.

    python -m analysis.figures [NAME|all] [--results DIR] [--out DIR] [--list]

``all`` builds every figure whose results exist and skips the others with a message (exit 0:
results not produced yet are expected); a figure asked for by name whose inputs are missing is
an error (exit 1). A figure whose inputs are present but bad (an empty CSV, a missing column, a
non-numeric value) or whose files cannot be written (a read-only ``--out``) is skipped with one
line ``error: <figure> skipped: ...``, the other figures are still built, and the command exits
2. Each entry point ``<name>(results, out, **options) -> list[Path]`` loads its inputs (checking
their columns), calls :mod:`analysis.tables` for the numbers and :mod:`analysis.plots` for the
drawing, and writes the files; ``build_<name>(...)`` does the same from DataFrames and returns
the Figure.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from varstudy import cli
from varstudy.errors import VarstudyError

from analysis import plots, tables
from analysis.style import SAVE_DPI, new_figure, order_kinds

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
FIGURES = ROOT / "figures"


# Older or alternative spellings of a column, read as the name the figures use.
COLUMN_ALIASES = {"sketch": "family", "dataset": "task", "rho": "ratio"}


class MissingResultsError(VarstudyError):
    """A figure's input file is not in the results directory (yet)."""


# Columns the figures read as text; every other required column must be numeric.
TEXT_COLUMNS = {"layer", "layer_kind", "family", "task", "model", "metric", "strategy",
                "workload", "device", "basis", "scope"}


def load(results: Path, relpath: str, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read ``results/relpath`` and check its columns; MissingResultsError when absent,
    VarstudyError when empty, unparsable, lacking a column or holding a non-number where a
    number belongs."""
    path = Path(results) / relpath
    if not path.is_file():
        raise MissingResultsError(f"missing input {path} (not produced yet?)")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise VarstudyError(f"{path} is not a readable CSV ({' '.join(str(err).split())}); "
                            "valid choices: rerun the command that writes it") from None
    df = df.rename(columns={old: new for old, new in COLUMN_ALIASES.items()
                            if old in df and new not in df})
    try:
        tables.require_columns(df, required, str(path))
    except VarstudyError as err:
        raise VarstudyError(f"{err}; valid choices: rerun the command that writes it") from None
    if df.empty:
        raise VarstudyError(f"{path} has a header but no rows; valid choices: rerun the command "
                            "that writes it")
    for col in required:
        if col not in TEXT_COLUMNS and not pd.api.types.is_numeric_dtype(df[col]):
            bad = pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()
            row = int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else 0
            raise VarstudyError(f"{path} column {col} holds a non-numeric value "
                                f"{df[col].iloc[row]!r} (row {row + 2}); valid choices: numbers "
                                "(rerun the command that writes it)")
    return df


def _config(results: Path, relpath: str) -> dict:
    """The resolved config written next to a result (``{"config": {...}}`` or flat), or {}."""
    import json

    path = Path(results) / relpath
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # the config only labels the figure
        raise VarstudyError(f"{path} is not valid JSON ({err}); valid choices: rerun the "
                            "command that writes it") from None
    return data.get("config", data) if isinstance(data, dict) else {}


def save(fig: Figure, out: Path, name: str) -> list[Path]:
    """Write ``out/name.png`` and ``out/name.pdf``; return both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=SAVE_DPI)
    fig.savefig(paths[1], metadata={"CreationDate": None})  # byte-stable PDFs across rebuilds
    return paths


def _outer_labels(axes) -> None:
    """Keep x labels on the bottom row and y labels on the first column of a facet grid."""
    nrows, ncols = axes.shape
    for (i, j), ax in np.ndenumerate(axes):
        if j > 0:
            ax.set_ylabel("")
        if i < nrows - 1 and (i + 1) * ncols + j < axes.size and axes[i + 1, j].get_visible():
            ax.set_xlabel("")


def _write_text(out: Path, name: str, text: str) -> Path:
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Variance figures (measurement engine)
# --------------------------------------------------------------------------------------------

MEASURE_DEFAULT = "measure/default"
MEASURE_TRAINING = "measure/over_training"
SUMMARY_COLUMNS = ("train_step", "layer", "layer_kind", "layer_index", "family", "ratio",
                   "var_sketch_mean", "var_sampling_mean", "ratio_mean", "ratio_ci_low",
                   "ratio_ci_high")


def build_variance_ratio_over_training(layers: pd.DataFrame, summary: pd.DataFrame, *,
                                       layer_kind: str = "ffn_in", layer_index: int | None = None,
                                       family: str = "gaussian", ratio: float = 0.5) -> Figure:
    """Left: the paper's ratio and bounds for one layer; right: sketch / sampling ratio with CI."""
    layer = tables.pick_layer(summary, layer_kind, layer_index)
    ratio = tables.nearest(summary["ratio"], ratio)
    paper = tables.paper_view(layers, layer, family, ratio)
    view = tables.ratio_view(summary, layer, ratio)
    label = tables.layer_label(layer_kind, summary.loc[summary["layer"] == layer,
                                                       "layer_index"].iloc[0])
    fig, ax = new_figure(1, 2, panel=(5.0, 3.6))
    plots.plot_paper_ratio(paper, ax=ax[0, 0], family=family,
                           title=f"as in the paper: {family}, one batch per step")
    plots.plot_ratio_over_training(view, ax=ax[0, 1],
                                   title="corrected: per-example sampling, mean ± 95% CI")
    fig.suptitle(f"Variance ratio over training, layer {label}, ρ = {100 * ratio:g}%")
    return fig


def variance_ratio_over_training(results: Path = RESULTS, out: Path = FIGURES,
                                 **options) -> list[Path]:
    """Figure: variance ratio over training, the paper's way and the corrected way."""
    layers = load(results, f"{MEASURE_TRAINING}/layers.csv",
                  ("train_step", "batch", "layer", "family", "ratio", "alpha",
                   *tables.PAPER_COLUMNS))
    summary = load(results, f"{MEASURE_TRAINING}/summary.csv", SUMMARY_COLUMNS)
    return save(build_variance_ratio_over_training(layers, summary, **options), out,
                "variance_ratio_over_training")


def build_variance_vs_ratio(summary: pd.DataFrame, train_step: int | None = None) -> Figure:
    """Facets by layer kind: sketch variance per family and sampling variance vs ρ."""
    kv = tables.kind_variance(summary, train_step)
    kinds = order_kinds(kv["layer_kind"].unique())
    ncols = min(3, len(kinds))
    nrows = -(-len(kinds) // ncols)
    fig, axes = new_figure(nrows, ncols, panel=(3.6, 3.0), sharex=True)
    for i, ax in enumerate(axes.flat):
        if i >= len(kinds):
            ax.set_visible(False)
            continue
        d = kv[kv["layer_kind"] == kinds[i]]
        plots.plot_variance_vs_ratio(d, ax=ax, legend=False,
                                     title=f"{kinds[i]} (mean of {d['n_layers'].max()} layers)")
    _outer_labels(axes)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(5, len(labels)),
               fontsize="small", frameon=False)
    fig.suptitle("Sketch vs minibatch-sampling variance of the weight gradient")
    return fig


def variance_vs_ratio(results: Path = RESULTS, out: Path = FIGURES, **options) -> list[Path]:
    """Figure: sketch and sampling variance vs ρ, facets by layer kind."""
    summary = load(results, f"{MEASURE_DEFAULT}/summary.csv", SUMMARY_COLUMNS)
    return save(build_variance_vs_ratio(summary, **options), out, "variance_vs_ratio")


def build_ratio_heatmap(summary: pd.DataFrame, ratio: float = 0.1,
                        train_step: int | None = None) -> Figure:
    """Per-layer × family heat map of Var[sketch] / Var[sampling] at one ρ."""
    ratio = tables.nearest(summary["ratio"], ratio)
    wide = tables.heatmap_matrix(summary, ratio, "ratio_mean", train_step)
    fig, ax = new_figure(1, 1, panel=(2.0 + 0.25 * wide.shape[0], 1.6 + 0.3 * wide.shape[1]))
    plots.plot_ratio_heatmap(wide, ax=ax[0, 0],
                             title=f"Sketch / sampling variance per layer, ρ = {100 * ratio:g}%")
    return fig


def ratio_heatmap(results: Path = RESULTS, out: Path = FIGURES, **options) -> list[Path]:
    """Figure: heat map of the sketch / sampling variance ratio per layer and family."""
    summary = load(results, f"{MEASURE_DEFAULT}/summary.csv", SUMMARY_COLUMNS)
    return save(build_ratio_heatmap(summary, **options), out, "ratio_heatmap")


def closed_form_vs_mc(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure: closed-form sketch variance against its Monte Carlo estimate, every layer."""
    layers = load(results, f"{MEASURE_DEFAULT}/layers.csv",
                  ("layer", "family", "ratio", "var_sketch", "var_sketch_mc",
                   "var_sketch_mc_se", "mc_draws"))
    d = layers[(layers["layer"] != tables.MODEL_ROW) & (layers["mc_draws"] > 0)
               & layers["var_sketch_mc"].notna()]
    if d.empty:
        raise MissingResultsError(f"{MEASURE_DEFAULT}/layers.csv has no Monte Carlo rows")
    where = ", ".join(sorted({tables.layer_label(k, i) for k, i in
                              zip(d["layer_kind"], d["layer_index"])})) \
        if {"layer_kind", "layer_index"} <= set(d.columns) else f"{d['layer'].nunique()} layers"
    n_batches = d.groupby(["train_step", "batch"]).ngroups if "batch" in d else 1
    fig, ax = new_figure(1, 1, panel=(6.0, 4.0))
    plots.plot_closed_vs_mc(d, ax=ax[0, 0], legend=False,
                            title=f"{where}, {n_batches} batch{'es' if n_batches > 1 else ''}, "
                                  f"{int(d['mc_draws'].max())} draws per point")
    fig.legend(*ax[0, 0].get_legend_handles_labels(), loc="outside right center",
               fontsize="x-small", frameon=False)
    fig.suptitle("Closed-form sketch variance checked by Monte Carlo")
    return save(fig, out, "closed_form_vs_mc")


# --------------------------------------------------------------------------------------------
# Cost and accuracy figures (fine-tuning study, layer benchmark)
# --------------------------------------------------------------------------------------------


def _most_common(df: pd.DataFrame, column: str):
    return df[column].value_counts().idxmax() if column in df else None


def build_memory_vs_batch(memory: pd.DataFrame, model: str | None = None,
                          family: str = "gaussian") -> Figure:
    """Saved activations (whole step, linear layers; CUDA peak when measured) vs batch size,
    exact and one family per ρ; the other families' largest gap to it goes in the title."""
    model = model or _most_common(memory, "model")
    d = memory[memory["model"] == model] if model is not None else memory
    if "seq_len" in d:
        d = d[d["seq_len"] == _most_common(d, "seq_len")]
    if family not in set(d["family"]):
        family = next(f for f in d["family"] if f != tables.EXACT)
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


def build_accuracy_vs_ratio(summary: pd.DataFrame, scale: float = 100.0) -> Figure:
    """Per task: mean ± std over seeds of the task metric vs ρ, exact baseline as a band."""
    tasks = list(dict.fromkeys(summary["task"]))
    fig, axes = new_figure(1, len(tasks), panel=(4.4, 3.6), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        d = summary[summary["task"] == task].copy()
        d[["mean", "std"]] = d[["mean", "std"]] * scale
        n = f"n = {int(d['n'].min())}–{int(d['n'].max())}" if d["n"].nunique() > 1 \
            else f"n = {int(d['n'].iloc[0])}"
        plots.plot_metric_vs_ratio(d, "mean", err="std", ax=ax,
                                   ylabel=f"{d['metric'].iloc[0]} × {scale:g}",
                                   title=f"{task} (mean ± std over seeds, {n})")
    fig.suptitle("Fine-tuning accuracy vs compression ratio")
    return fig


def accuracy_vs_ratio(results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Figure and tables: accuracy vs ρ; figures/accuracy_table.{md,tex}."""
    runs = load(results, "study/accuracy/runs.csv",
                ("task", "family", "ratio", "seed", "metric", "best_value"))
    summary = tables.accuracy_summary(runs)
    wide = tables.accuracy_table(summary)
    lo, hi = int(summary["n"].min()), int(summary["n"].max())
    seeds = f"{lo} seed{'s' if lo > 1 else ''}" if lo == hi else f"{lo}–{hi} seeds"
    caption = (f"Best validation metric × 100 during fine-tuning (mean ± std over {seeds}); "
               "columns: compression ratio ρ (100%: exact)")
    md, tex = tables.to_markdown(wide, caption), tables.to_latex(wide, caption, "tab:accuracy")
    if "train_time_s" in runs:
        timing = tables.accuracy_summary(runs.assign(metric="train time (s)"), "train_time_s")
        wide_t = tables.accuracy_table(timing, scale=1.0, digits=1)
        caption_t = "Training wall time in seconds (mean ± std over seeds)"
        md += "\n" + tables.to_markdown(wide_t, caption_t)
        tex += "\n" + tables.to_latex(wide_t, caption_t, "tab:accuracy-time")
    paths = save(build_accuracy_vs_ratio(summary), out, "accuracy_vs_ratio")
    paths.append(_write_text(out, "accuracy_table.md", md))
    paths.append(_write_text(out, "accuracy_table.tex", tex))
    return paths


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
    cfg = _config(results, "bench/layers.json")
    where = ", ".join(f"{k} {cfg[k]}" for k in ("model", "batch_size", "seq_len") if k in cfg)
    fig.suptitle("Randomized linear layers: cost relative to exact backprop"
                 + (f" ({where})" if where else ""))
    return save(fig, out, "layer_bench")


# --------------------------------------------------------------------------------------------
# Checkpointing figures (plot functions live in analysis/checkpoint.py)
# --------------------------------------------------------------------------------------------


def _checkpoint_plot(name: str) -> Callable[..., Figure]:
    try:
        from analysis import checkpoint
    except ImportError as err:
        raise MissingResultsError(f"analysis/checkpoint.py is not importable ({err})") from None
    if not hasattr(checkpoint, name):
        raise MissingResultsError(f"analysis/checkpoint.py has no {name}() (yet)")
    return getattr(checkpoint, name)


def _one_workload(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    workload = _most_common(df, "workload")
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


# --------------------------------------------------------------------------------------------
# Registry and command line
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureEntry:
    """One figure: its entry point and one line of description."""

    build: Callable[..., list[Path]]
    description: str


FIGURE_ENTRIES: dict[str, FigureEntry] = {
    "variance_ratio_over_training": FigureEntry(
        variance_ratio_over_training, "paper's ratio and bounds vs corrected ratio with CI"),
    "variance_vs_ratio": FigureEntry(variance_vs_ratio, "sketch/sampling variance vs ρ per kind"),
    "ratio_heatmap": FigureEntry(ratio_heatmap, "per-layer sketch/sampling ratio at one ρ"),
    "closed_form_vs_mc": FigureEntry(closed_form_vs_mc, "closed-form vs Monte Carlo variance"),
    "memory_vs_batch": FigureEntry(memory_vs_batch, "memory vs batch size per ρ"),
    "throughput_vs_ratio": FigureEntry(throughput_vs_ratio, "throughput vs ρ"),
    "accuracy_vs_ratio": FigureEntry(accuracy_vs_ratio, "accuracy vs ρ, + accuracy_table.md/.tex"),
    "layer_bench": FigureEntry(layer_bench, "layer benchmark: time and memory vs ρ"),
    "checkpoint_vs_n": FigureEntry(checkpoint_vs_n, "checkpointing: memory and time vs N"),
    "checkpoint_vs_ratio": FigureEntry(checkpoint_vs_ratio,
                                       "checkpointing: overhead vs transfer/compute ratio"),
}


def build(names: list[str], results: Path = RESULTS, out: Path = FIGURES,
          strict: bool = True, errors: dict[str, str] | None = None
          ) -> tuple[list[Path], dict[str, str]]:
    """Build the named figures; returns (written paths, {skipped name: reason}).

    With ``strict`` a missing input raises MissingResultsError and a bad input or an unwritable
    ``out`` raises VarstudyError / OSError; otherwise the figure is skipped (its reason in
    ``skipped``, or for bad inputs and unwritable files in ``errors`` when that dict is given).
    """
    written, skipped = [], {}
    for name in names:
        try:
            written += FIGURE_ENTRIES[name].build(results, out)
        except MissingResultsError as err:
            if strict:
                raise
            skipped[name] = str(err)
        except (VarstudyError, OSError) as err:
            if strict:
                raise
            why = err if isinstance(err, VarstudyError) else (
                f"cannot write {getattr(err, 'filename', None) or out}: "
                f"{err.strerror or err}; valid choices: a writable --out")
            (skipped if errors is None else errors)[name] = " ".join(str(why).split())
    return written, skipped


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m analysis.figures", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["all"], metavar="NAME|all")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--out", type=Path, default=FIGURES, help="output directory")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, entry in FIGURE_ENTRIES.items():
            print(f"{name:30s} {entry.description}")
        return 0
    everything = "all" in args.names
    names = list(FIGURE_ENTRIES) if everything else args.names
    unknown = [n for n in names if n not in FIGURE_ENTRIES]
    if unknown:
        print(f"error: unknown figure(s) {', '.join(unknown)}; valid choices: all, "
              f"{', '.join(FIGURE_ENTRIES)}", file=sys.stderr)
        return 2
    errors: dict[str, str] = {}
    written, skipped = build(names, args.results, args.out, strict=False, errors=errors)
    for path in written:
        print(f"wrote {path}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    for name, reason in errors.items():
        print(f"error: {name} skipped: {reason}", file=sys.stderr)
    return 2 if errors else 1 if skipped and not everything else 0


if __name__ == "__main__":
    sys.exit(main())
