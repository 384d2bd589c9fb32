"""``python -m varstudy.finetune``: the command line of one fine-tuning run (NOTE [one
convention] in :mod:`varstudy.cli`). Parsing imports nothing heavy; the run imports torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from varstudy import cli
from varstudy.errors import VarstudyError
from varstudy.finetune.config import PRESETS, FinetuneConfig, check

PROG = "python -m varstudy.finetune"
DESCRIPTION = ("Fine-tune a sequence classifier whose linear layers are randomized (one sketch "
               "family at ratio rho) or exact; writes steps.csv, evals.csv, config.json and "
               "run.csv to <out>/<name>/.")


def parser() -> cli.Parser:
    """The command line of ``python -m varstudy.finetune``, from
    :class:`~varstudy.finetune.config.FinetuneConfig` and its presets."""
    return cli.config_parser(FinetuneConfig, PROG, DESCRIPTION, presets=tuple(PRESETS))


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """preset <- --config <- given options; --epochs alone clears max_steps; --ratio with an
    exact model is a conflict."""
    if hasattr(args, "epochs") and not hasattr(args, "max_steps"):
        args.max_steps = None
    config = cli.config_from(FinetuneConfig, args, PRESETS)
    if config.sketch == "exact" and hasattr(args, "ratio"):
        raise VarstudyError("--ratio conflicts with --sketch exact (an exact model has no "
                            "ratio); valid choices: drop --ratio, or pick a sketch family")
    return config


def parse(argv: list[str] | None = None) -> FinetuneConfig:
    """The config the arguments describe (exits 2 with one line on a usage error)."""
    return config_from_args(parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m varstudy.finetune``; returns the exit status."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:  # --help (status 0) or a usage error (one line, status 2)
        return int(stop.code or 0)
    done = {}

    def body() -> None:
        from varstudy import distributed as dist
        from varstudy.finetune import training

        try:
            done["config"] = config = config_from_args(args)
            check(config)
            cli.set_threads(config.num_threads)
            done["result"] = training.train(config)
            done["main"] = dist.is_main_process()
        finally:
            dist.teardown()

    code = cli.run_command(body, argv)  # bad input: one line, status 2; Ctrl-C: 130
    if code or not done["main"]:
        return code
    config, row = done["config"], done["result"].run.iloc[0]
    print(f"{row['run']}: best {row['metric']} {row['best_value']:.4f} at step "
          f"{row['best_step']}, final {row['final_value']:.4f}, "
          f"train {row['train_time_s']:.1f} s, saved {row['saved_mib']:.1f} MiB"
          + (f" -> {Path(config.out) / row['run']}" if config.out else ""))
    return 0
