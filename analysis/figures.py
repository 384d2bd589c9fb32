"""Publication figures: one entry point per figure, each rebuilding ``figures/<name>.{png,pdf}``
from the CSVs under ``results/`` on CPU.

    python -m analysis.figures [NAME|all] [--results DIR] [--out DIR] [--list] [--debug]

``all`` builds every figure whose results exist and skips the others with a message (exit 0:
results not produced yet are expected); a figure asked for by name whose inputs are missing is
an error (exit 1). A figure that fails (an input present but damaged: empty, cut short by an
interrupted write, lacking a column, a non-number or an empty cell where a value belongs, rows
missing such as a configuration with fewer seeds than the others; an input it cannot draw; files
that cannot be written) is reported in one line ``error: <figure> skipped: <reason>``, writes
nothing (NOTE [whole figures]), the other figures are still built, and the command exits 2.
Each entry point ``<name>(results, out, **options) -> list[Path]`` loads its inputs (checked by
:func:`analysis.results.load`), calls :mod:`analysis.tables` for the numbers and
:mod:`analysis.plots` for the drawing, and writes the files; ``build_<name>(...)`` does the same
from DataFrames and returns the Figure.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from varstudy import cli
from varstudy.errors import VarstudyError
from varstudy.io import atomic_write_bytes

from analysis.figures_checkpoint import checkpoint_vs_n, checkpoint_vs_ratio
from analysis.figures_epochs import three_epochs
from analysis.figures_accuracy import accuracy_vs_ratio, learning_curve, variance_vs_accuracy
from analysis.figures_frontier import frontier, frontier_mpnet
from analysis.figures_plan import online_plans, plan_accuracy, plan_frontier
from analysis.figures_samplers import sampler_limit
from analysis.figures_study import layer_bench, memory_vs_batch, throughput_vs_ratio
from analysis.figures_time_to_accuracy import time_to_accuracy
from analysis.figures_variance import (closed_form_vs_mc, ratio_heatmap, variance_by_scope,
                                       variance_ratio_over_training,
                                       variance_ratio_over_training_mpnet, variance_vs_ratio)
from analysis.results import FIGURES, RESULTS, MissingResultsError


@dataclass(frozen=True)
class FigureEntry:
    """One figure: its entry point and one line of description."""

    build: Callable[..., list[Path]]
    description: str


FIGURE_ENTRIES: dict[str, FigureEntry] = {
    "variance_ratio_over_training": FigureEntry(
        variance_ratio_over_training, "paper's ratio and bounds vs corrected ratio with CI"),
    "variance_ratio_over_training_mpnet": FigureEntry(
        variance_ratio_over_training_mpnet, "the same at the paper's setting: MPNet-base, B 64"),
    "variance_vs_ratio": FigureEntry(variance_vs_ratio, "sketch/sampling variance vs ρ per kind"),
    "variance_by_scope": FigureEntry(variance_by_scope,
                                     "encoder / head / model totals and per-layer ratios vs ρ"),
    "ratio_heatmap": FigureEntry(ratio_heatmap, "per-layer sketch/sampling ratio at one ρ"),
    "closed_form_vs_mc": FigureEntry(closed_form_vs_mc, "closed-form vs Monte Carlo variance"),
    "sampler_limit": FigureEntry(sampler_limit, "row samplers against the best possible one "
                                                "(the limit, needs Y); sampler_limit.{md,csv}"),
    "three_epochs": FigureEntry(three_epochs, "the 3-epoch recipe: WTA-CRS, rows-adaptive, rows "
                                "vs exact per epoch"),
    "memory_vs_batch": FigureEntry(memory_vs_batch, "memory vs batch size per ρ"),
    "throughput_vs_ratio": FigureEntry(throughput_vs_ratio, "throughput vs ρ"),
    "learning_curve": FigureEntry(learning_curve, "exact model's validation accuracy vs step"),
    "accuracy_vs_ratio": FigureEntry(accuracy_vs_ratio,
                                     "paired accuracy cost vs ρ, both scopes; paired_diff.*"),
    "variance_vs_accuracy": FigureEntry(variance_vs_accuracy,
                                        "variance summaries vs accuracy cost, rank correlations"),
    "layer_bench": FigureEntry(layer_bench, "layer benchmark: time and memory vs ρ"),
    "plan_frontier": FigureEntry(plan_frontier, "planned vs uniform sizes: variance, time vs bytes"),
    "plan_accuracy": FigureEntry(plan_accuracy, "accuracy of plans vs uniform at equal bytes"),
    "online_plans": FigureEntry(online_plans, "online re-planning vs the plan from exact stats"),
    "checkpoint_vs_n": FigureEntry(checkpoint_vs_n, "checkpointing: memory and time vs N"),
    "checkpoint_vs_ratio": FigureEntry(checkpoint_vs_ratio,
                                       "checkpointing: overhead vs transfer/compute ratio"),
    "frontier": FigureEntry(frontier, "memory savings on one model: memory vs time vs variance, "
                                      "Pareto sets; frontier_table.md (which to use)"),
    "frontier_mpnet": FigureEntry(frontier_mpnet, "the same frontier on MPNet-base "
                                                  "(study frontier --model mpnet-base)"),
    "time_to_accuracy": FigureEntry(time_to_accuracy, "time to 80 % validation accuracy at "
                                                      "50/25/10 % of exact's peak, per method; "
                                                      "time_to_accuracy.{md,csv}"),
}


def build_one(name: str, results: Path = RESULTS, out: Path = FIGURES) -> list[Path]:
    """Build figure ``name`` into ``out``; returns the paths written.

    NOTE [whole figures]: the entry point writes into a fresh staging folder inside ``out``
    (``.tmp-<name>-*``); only when it has returned, with every file of the figure and its
    tables complete, is each file copied into ``out`` atomically (:mod:`varstudy.io`). A figure
    that fails (a bad input, a bug) leaves ``out`` as it was: no half-drawn PNG, no table
    without its figure. The staging folder is removed either way.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=out))
    except OSError as err:  # name the folder asked for, not the staging folder's random name
        raise type(err)(err.errno, err.strerror, str(out)) from None
    try:
        staged = FIGURE_ENTRIES[name].build(results, stage)
        return [atomic_write_bytes(out / p.relative_to(stage), p.read_bytes()) for p in staged]
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _reason(err: Exception, out: Path) -> str:
    """One line saying why a figure was not built."""
    if isinstance(err, VarstudyError):
        why = str(err)
    elif isinstance(err, OSError):
        why = (f"cannot write {getattr(err, 'filename', None) or out}: {err.strerror or err}; "
               "valid choices: a writable --out")
    else:  # a bug met by an input the figure does not handle
        why = (f"failed with {type(err).__name__}: {err}; valid choices: report it (rerun with "
               "--debug for the traceback)")
    return " ".join(why.split())


def build(names: list[str], results: Path = RESULTS, out: Path = FIGURES,
          strict: bool = True, errors: dict[str, str] | None = None, debug: bool = False
          ) -> tuple[list[Path], dict[str, str]]:
    """Build the named figures; returns (written paths, {skipped name: reason}).

    With ``strict`` the first failure is raised (MissingResultsError for a missing input,
    VarstudyError for a bad one, OSError for an unwritable ``out``, anything else as it is);
    otherwise a figure whose input is missing is skipped (its reason in ``skipped``) and one
    that fails for any other reason too, its one-line reason in ``errors`` when that dict is
    given (else in ``skipped``); the other figures are still built. ``debug`` re-raises a
    failure that is neither a VarstudyError nor an OSError (a bug), with its traceback.
    """
    written, skipped = [], {}
    for name in names:
        try:
            written += build_one(name, results, out)
        except MissingResultsError as err:
            if strict:
                raise
            skipped[name] = " ".join(str(err).split())
        except Exception as err:  # noqa: BLE001 - one figure's failure never stops the others
            if strict or (debug and not isinstance(err, (VarstudyError, OSError))):
                raise
            (skipped if errors is None else errors)[name] = _reason(err, out)
    return written, skipped


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.figures [NAME|all] [--results DIR] [--out DIR] [--list]``: build the
    named figures; returns the exit status (0, 1 for a missing input asked for by name, 2 for a
    failed figure)."""
    parser = cli.Parser(prog="python -m analysis.figures", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["all"], metavar="NAME|all")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--out", type=Path, default=FIGURES, help="output directory")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a figure that fails with a bug")
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
    written, skipped = build(names, args.results, args.out, strict=False, errors=errors,
                             debug=args.debug)
    for path in written:
        print(f"wrote {path}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    for name, reason in errors.items():
        print(f"error: {name} skipped: {reason}", file=sys.stderr)
    return 2 if errors else 1 if skipped and not everything else 0


if __name__ == "__main__":
    sys.exit(main())
