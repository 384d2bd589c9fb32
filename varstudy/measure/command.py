"""``python -m varstudy.measure``: the command line of the measurement (NOTE [one convention]
in :mod:`varstudy.cli`). Parsing imports nothing heavy; the run imports torch."""

from __future__ import annotations

from varstudy import cli
from varstudy.measure.config import MeasureConfig

PROG = "python -m varstudy.measure"
DESCRIPTION = ("Decompose the gradient variance of a model with randomized linear layers into a "
               "sketch part and a minibatch-sampling part, per layer, per sketch family and "
               "ratio; writes layers.csv, summary.csv, scopes.csv, config.json and env.json.")


def parser():
    """The command line of ``python -m varstudy.measure``, from
    :class:`~varstudy.measure.config.MeasureConfig`."""
    return cli.config_parser(MeasureConfig, PROG, DESCRIPTION)


def parse(argv: list[str] | None = None) -> MeasureConfig:
    """The config the arguments describe (exits 2 with one line on a usage error)."""
    return cli.config_from(MeasureConfig, parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m varstudy.measure``; returns the exit status."""
    def body() -> None:
        cfg = parse(argv)
        from varstudy import distributed as dist
        try:
            cli.set_threads(cfg.num_threads)
            from varstudy.measure.runner import run
            from varstudy.measure.tables import format_summary, scope_summary
            layers = run(cfg)
            if len(layers):  # rank 0 (or a single process) holds the tables
                print(format_summary(scope_summary(layers, cfg.level)))
                print(f"wrote {cfg.out}/layers.csv ({len(layers)} rows), summary.csv, "
                      "scopes.csv, config.json, env.json")
        finally:
            dist.teardown()
    return cli.run_command(body, argv)
