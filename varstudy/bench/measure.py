"""Benchmark: ``python -m varstudy.bench measure`` — cost of one per-layer variance decomposition.

Three costs on the same model and minibatch, measured side by side (interleaved repeats,
median; one warm-up each):

* ``step``: one exact training step (forward, backward, AdamW update).
* ``decomposition``: what the engine does per minibatch, ``measure.measure_batch`` with no
  Monte Carlo: capture (X, Y) of every linear (forward + backward with hooks), per-example
  Gram norms, sampling variance, closed-form sketch variances for every family × ratio,
  paper quantities, model totals, DataFrame rows.
* ``naive``: Monte Carlo that re-runs forward + backward of the randomized model per sketch
  draw, ``naive_draws`` times (spread over the repeat rounds), for one (family, ratio); the
  per-draw cost is their median, and each draw's model-total error ‖ĝ − g‖² (g from one
  exact backward) gives the coefficient of variation cv. Draws needed for a relative CI half-width h at level ℓ:
  n = ⌈(z_ℓ · cv / h)²⌉. Naive cost of one (family, ratio) = t_exact + n · t_draw, of the grid
  = |families|·|ratios| times the draws (cv assumed equal across the grid). cv is large
  because the model total is dominated by the pooler and classifier (summary.csv), whose
  n = B rows leave k = 1-8 sketch rows. The closed form has no
  Monte Carlo error, so "equal CI width" favours naive MC; the sampling variance, which the
  decomposition also returns, is not charged to naive MC either.

Writes ``results/bench/measure.csv`` (quantity, value, unit) and ``measure.json`` (config).

NOTE [resume]: a run works in ``<out>/.bench-measure.staging/`` and its tables replace those in
``<out>`` only once it has finished (NOTE [staged results] in :mod:`varstudy.io`). Each finished
round's raw times and errors are appended (fsynced) to ``measure.parts.csv`` (round, kind, value)
there; ``--resume`` keeps them and runs the missing rounds (after a fresh warm-up round); the
final tables are written at the end and the parts removed.
A resumed run's medians mix timings from two processes, so they differ from an uninterrupted
run's (as any two runs do); the naive-draw errors are identical (seeded per draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from varstudy import cli
from varstudy import io as vio
from varstudy.cli import option
from varstudy.errors import VarstudyError
from varstudy.names import DATASET_NAMES, DEVICE_HELP, MODEL_HELP, SKETCH_NAMES

PROG = "python -m varstudy.bench measure"


@dataclass(frozen=True)
class BenchConfig:
    """What the measure benchmark compares (defaults: the committed run)."""

    model: str = option("minilm", MODEL_HELP)
    dataset: str = option("rotten_tomatoes", "dataset", choices=DATASET_NAMES)
    batch_size: int = option(16, "B, examples per minibatch")
    max_length: int = option(64, "L, tokens per example")
    repeats: int = option(5, "interleaved timing rounds")
    naive_family: str = option("gaussian", "sketch family of the naive Monte Carlo",
                               choices=SKETCH_NAMES)
    naive_ratio: float = option(0.1, "ratio of the naive Monte Carlo, in (0, 1]")
    naive_draws: int = option(20, "naive Monte Carlo draws (>= 2)")
    half_width: float = option(0.10, "target relative CI half-width of the naive Monte Carlo")
    level: float = option(0.95, "confidence level of that CI")
    num_threads: int | None = option(None, "CPU threads (none: PyTorch's default, the "
                                           "machine's cores)")
    device: str = option("auto", DEVICE_HELP)
    seed: int = option(0, "seed of the minibatch and the draws")
    out: str = option("results/bench", "output folder")
    resume: bool = option(False, "keep finished rounds of an interrupted run in --out "
                                 "(NOTE [resume])")

    def __post_init__(self) -> None:
        if self.naive_family not in SKETCH_NAMES or self.naive_draws < 2 or self.repeats < 1:
            raise VarstudyError(f"need naive_family in {', '.join(SKETCH_NAMES)}, naive_draws "
                                ">= 2, repeats >= 1")
        if not (0 < self.naive_ratio <= 1 and 0 < self.half_width < math.inf
                and 0 < self.level < 1):
            raise VarstudyError(f"naive_ratio {self.naive_ratio}, half_width {self.half_width} "
                                f"or level {self.level} is out of range; valid: 0 < naive_ratio "
                                "<= 1, half_width > 0, 0 < level < 1")
        cli.check_seed("seed", self.seed)
        vio.require_out(self.out)


def parser() -> cli.Parser:
    """The command line of ``python -m varstudy.bench measure``, from :class:`BenchConfig`."""
    return cli.config_parser(BenchConfig, PROG, __doc__.split("\n")[0])


def parse(argv: list[str] | None = None) -> BenchConfig:
    """The config that the command line ``argv`` asks for."""
    return cli.config_from(BenchConfig, parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Run the measure benchmark; returns the exit status."""
    def body() -> int:
        cfg = parse(argv)
        cli.set_threads(cfg.num_threads)
        from varstudy.bench.measure_run import execute
        return execute(cfg)
    return cli.run_command(body, argv)
