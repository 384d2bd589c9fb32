"""``python -m varstudy.study {accuracy,memory,throughput,frontier}``: the command line of the
studies (NOTE [one convention] in :mod:`varstudy.cli`). Parsing imports nothing heavy."""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from varstudy import cli
from varstudy.errors import VarstudyError
from varstudy.study.config import PRESETS, STUDIES, StudyConfig, check

PROG = "python -m varstudy.study"
DESCRIPTION = ("Fine-tuning studies over sketch families and ratios: accuracy (fine-tune every "
               "configuration over paired seeds), memory (bytes saved for backward per batch "
               "size), throughput (interleaved step timing and the largest batch under a "
               "budget), frontier (checkpointing, sketches, plans and both on one model: peak "
               "memory, step time and added variance per configuration); writes "
               "<out>/<study>/. The defaults shown are before the preset: --preset cpu (the default) or gpu sets each study's own grid and budget.")
# study -> module holding the function
RUNNERS = {"accuracy": "accuracy_study", "memory": "memory_study",
           "throughput": "throughput_study", "frontier": "frontier_study"}


def parser() -> cli.Parser:
    """The command line of ``python -m varstudy.study``, from
    :class:`~varstudy.study.config.StudyConfig` and its presets."""
    return cli.config_parser(StudyConfig, PROG, DESCRIPTION, presets=tuple(PRESETS),
                             positional=("study", STUDIES))


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The study's preset <- --config <- given options; --epochs alone clears max_steps."""
    if hasattr(args, "epochs") and not hasattr(args, "max_steps"):
        args.max_steps = None
    presets = {name: PRESETS[name][args.study] for name in PRESETS}
    return cli.config_from(StudyConfig, args, presets)


def parse(argv: list[str] | None = None) -> tuple[str, StudyConfig]:
    """(study, config) the arguments describe (exits 2 with one line on a usage error)."""
    args = parser().parse_args(argv)
    return args.study, config_from_args(args)


def run(study: str, config: StudyConfig):
    """Check ``config``, load the inputs, then run ``study`` holding its folder's lock; returns
    the study's table(s). The folder changes only after the inputs loaded."""
    from varstudy import io as vio
    from varstudy.study.inputs import check_inputs

    check_study(study, config)
    folder = vio.check_writable(Path(config.out) / study)
    check_inputs(config, study)  # before the folder changes
    with vio.output_lock(folder):  # NOTE [one run per folder] (varstudy.io)
        module = importlib.import_module(f"varstudy.study.{RUNNERS[study]}")
        return getattr(module, study)(config)


def check_study(study: str, config: StudyConfig) -> None:
    """Check ``config`` for ``study``: only the accuracy grid runs elsewhere than here."""
    if study != "accuracy" and config.executor != "local":
        raise VarstudyError(f"study {study} times its configurations against each other on one "
                            f"machine and runs locally only; valid choices: --executor local "
                            f"(the default), or study accuracy")
    check(config)


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m varstudy.study STUDY``; returns the exit status."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:  # --help (status 0) or a usage error (one line, status 2)
        return int(stop.code or 0)
    done = {}

    def body() -> None:
        done["config"] = config = config_from_args(args)
        check_study(args.study, config)
        cli.set_threads(config.num_threads)
        done["start"] = time.perf_counter()
        done["tables"] = run(args.study, config)

    code = cli.run_command(body, argv)  # bad input: one line, status 2; Ctrl-C: 130
    if code:
        return code
    import pandas as pd

    config, tables = done["config"], done["tables"]
    first = tables[1] if isinstance(tables, tuple) else tables
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(first.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{args.study}: {time.perf_counter() - done['start']:.0f} s -> "
          f"{Path(config.out) / args.study}")
    return 0
