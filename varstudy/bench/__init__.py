"""Benchmarks: ``python -m varstudy.bench {layers,checkpoint,measure,callback,gpu,grid} [options]``.

Each benchmark lives in its own module with a ``main(argv)``; this file only dispatches.
Results are written under ``results/bench/`` and summarized on stdout.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "layers": "varstudy.bench.layers",
    "checkpoint": "varstudy.bench.checkpoint",
    "measure": "varstudy.bench.measure",
    "callback": "varstudy.bench.callback",
    "gpu": "varstudy.bench.gpu",
    "grid": "varstudy.bench.grid",
}


USAGE = """usage: python -m varstudy.bench {layers,checkpoint,measure,callback,gpu,grid} [options]

benchmarks:
  layers      training-step time and saved bytes of randomized linear layers vs exact
  checkpoint  long-sequence checkpointing: memory and time vs length and transfer/compute ratio
  measure     cost of one variance decomposition vs a training step and naive Monte Carlo
  callback    cost of the Trainer callback's measurements vs the Trainer's training steps
  gpu         the GPU check: CUDA tests, measure vs CPU, layers (fp32/bf16/fp16), CUDA peak,
              checkpoint with the pinned host tier; --device cpu --quick is the CPU dry run
  grid        runs per hour of the accuracy grid: one run at a time on every core vs one Ray
              task per core (and the Ray tables equal to the local ones)

`python -m varstudy.bench NAME --help` lists the options of one benchmark."""


def main(argv: list[str] | None = None) -> int:
    """``python -m varstudy.bench {layers,checkpoint,measure,callback,gpu,grid} [options]``: run one
    benchmark; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        got = argv[0] if argv else "nothing"
        print(f"error: unknown benchmark {got!r}; valid choices: {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
