"""Layer benchmark: training-step time and saved bytes of the randomized model vs the exact one.

``python -m varstudy.bench layers`` converts every nn.Linear of the shipped MiniLM (batch 32 × 128
tokens by default, dropout off) with each family and ratio, and measures in one run:

* ``time_ratio``: median training-step time (forward + backward, no optimizer) over the exact
  model's. Steps are interleaved across configurations (repeat r runs every configuration once)
  after one warm-up step each, so slow drifts of the machine hit every configuration alike.
* ``saved_ratio``: bytes saved for backward by the whole step over the exact model's
  (``varstudy.randomized.memory.saved_bytes``, parameters excluded, storages deduplicated);
* ``linear_saved_ratio``: bytes saved by the linear layers over what the exact linears hold, and
  ``linear_vs_predicted``: bytes saved by the linear layers over the prediction
  Σ_distinct inputs k·d_in·itemsize (+ O(k) index state for rows-norm).

Writes ``results/bench/layers.csv`` and ``layers.json`` (resolved config and environment).

NOTE [durable results / resume]: a run works in ``<out>/.bench-layers.staging/`` and its tables
replace those in ``<out>`` only once it has finished (NOTE [staged results] in
:mod:`varstudy.io`). While running, each configuration's memory row and each (configuration,
repeat) step time are appended (fsynced) to ``layers.parts/`` there; the tables are written at
the end and the parts removed. ``--resume`` skips what the parts hold
(a different config is refused); the resumed table mixes timings taken in two processes, so
``step_time_ms``/``time_ratio`` differ from an uninterrupted run (as any two runs do), while
the memory columns are identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from varstudy import cli
from varstudy import io as vio
from varstudy.cli import option
from varstudy.errors import VarstudyError
from varstudy.names import BASE_SKETCH_NAMES, DEVICE_HELP, MODEL_HELP, SKETCH_NAMES

PROG = "python -m varstudy.bench layers"


@dataclass(frozen=True)
class LayerBenchConfig:
    """What the layer benchmark times (defaults: the committed run, about 10 min on 2 cores)."""

    model: str = option("minilm", MODEL_HELP)
    batch_size: int = option(32, "B, sequences per step")
    seq_len: int = option(128, "tokens per sequence")
    families: tuple[str, ...] = option(BASE_SKETCH_NAMES, "sketch families",
                                       choices=SKETCH_NAMES)
    ratios: tuple[float, ...] = option((0.05, 0.1, 0.2, 0.5), "ratios rho = k/n in (0, 1]")
    plans: tuple[str, ...] = option((), "plan.json files of python -m varstudy.plan, each one "
                                        "more configuration (family <family>:<file stem>, ratio "
                                        "its nominal ratio)")
    repeats: int = option(3, "timed steps per configuration (interleaved)")
    autocast: str = option("none", "mixed precision of the timed steps (torch.autocast; "
                                   "none: float32)", choices=("none", "bfloat16", "float16"))
    num_threads: int | None = option(None, "CPU threads (none: PyTorch's default, the "
                                           "machine's cores)")
    device: str = option("auto", DEVICE_HELP)
    seed: int = option(0, "seed of the batch and the sketches")
    out: str = option("results/bench", "output folder")
    resume: bool = option(False, "skip the work an interrupted run kept in "
                                 "<out>/.bench-layers.staging/")
    progress: bool = option(True, "progress bars")

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(self.families))
        object.__setattr__(self, "ratios", tuple(self.ratios))
        unknown = [f for f in self.families if f not in SKETCH_NAMES]
        if unknown or not self.families:
            raise VarstudyError(f"unknown sketch {unknown[0] if unknown else '(none)'!r}; valid "
                                f"choices: {', '.join(SKETCH_NAMES)}")
        if not self.ratios or not all(0 < r <= 1 for r in self.ratios):
            raise VarstudyError(f"--ratios must lie in (0, 1], got {self.ratios}")
        cli.check_distinct("--families", self.families)
        cli.check_distinct("--ratios", self.ratios)
        cli.check_seed("seed", self.seed)
        vio.require_out(self.out)
        for name in ("batch_size", "seq_len", "repeats"):
            if not 1 <= getattr(self, name) <= cli.SIZE_LIMIT:
                raise VarstudyError(f"--{name.replace('_', '-')} must be in [1, 2**31 - 1], got "
                                    f"{getattr(self, name)}; valid choices: a positive integer")
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is None:
            raise VarstudyError(f"unknown device {self.device!r}; valid choices: auto, cpu, "
                                "cuda, cuda:N")


def parser() -> cli.Parser:
    """The command line of ``python -m varstudy.bench layers``, from :class:`LayerBenchConfig`."""
    return cli.config_parser(LayerBenchConfig, PROG, __doc__.split("\n")[0])


def parse(argv: list[str] | None = None) -> LayerBenchConfig:
    """The config that the command line ``argv`` asks for."""
    return cli.config_from(LayerBenchConfig, parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Run the layer benchmark; returns the exit status."""
    def body() -> int:
        cfg = parse(argv)
        from varstudy.models import resolve_device

        resolve_device(cfg.device)  # an absent CUDA device is one line
        cli.set_threads(cfg.num_threads)
        from varstudy.bench.layers_run import execute
        return execute(cfg)
    return cli.run_command(body, argv)
