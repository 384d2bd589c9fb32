"""Benchmark: ``python -m varstudy.bench grid``: runs per hour of the accuracy grid, one run at a
time with every core against one Ray task per core (issue 26).

Runs the same small accuracy grid (exact and the families × ratios at ``scope``, ``seeds``,
``max_steps`` steps of the CPU recipe: B 32, dynamic padding, lr 5e-5) three times, each as the
``python -m varstudy.study accuracy`` command a user would type, one after another:

1. ``local``: the local executor, one run at a time, ``--num-threads`` = the cores;
2. ``ray``: ``--executor ray --cpus-per-run 1`` on a local cluster the command starts (one run
   per core at a time); its wall time includes the cluster's start;
3. ``local-1``: the local executor with one thread per run, whose tables must equal the Ray
   grid's apart from the timing columns (NOTE [same numbers anywhere] in
   :mod:`varstudy.study.executors`): ``identical`` says whether they did.

Writes ``results/bench/grid.csv`` (per setting: executor, runs at a time, threads per run, runs,
wall seconds, runs per hour and its ratio to ``local``) and ``grid.json`` (the config, the three
commands, ``identical``, load averages before and after, the environment). Run it on an idle
machine: the three settings are timed one after another, not interleaved.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from varstudy import cli
from varstudy import io as vio
from varstudy.cli import option
from varstudy.errors import VarstudyError
from varstudy.names import MODEL_HELP, SKETCH_NAMES

PROG = "python -m varstudy.bench grid"
TIMING = {"runs": ["train_time_s", "examples_per_s"], "steps": ["time_s"], "evals": []}


@dataclass(frozen=True)
class GridBenchConfig:
    """The small grid the benchmark runs (defaults: the committed run)."""

    model: str = option("minilm", MODEL_HELP)
    families: tuple[str, ...] = option(("rows",), "sketch families (exact is always included)",
                                       choices=SKETCH_NAMES)
    ratios: tuple[float, ...] = option((0.1,), "ratios")
    scope: str = option("encoder", "conversion scope", choices=("all", "encoder"))
    seeds: tuple[int, ...] = option((0, 1, 2, 3), "seeds")
    max_steps: int = option(10, "optimizer steps per run")
    eval_examples: int = option(256, "validation and test examples evaluated per run")
    out: str = option("results/bench", "output folder (grid.csv, grid.json)")

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_examples"):
            if getattr(self, name) < 1:
                raise VarstudyError(f"--{name.replace('_', '-')} must be >= 1, got "
                                    f"{getattr(self, name)}")
        vio.require_out(self.out)


def parser() -> cli.Parser:
    """The command line of ``python -m varstudy.bench grid``, from :class:`GridBenchConfig`."""
    return cli.config_parser(GridBenchConfig, PROG, __doc__.split("\n")[0])


def commands(cfg: GridBenchConfig, work: Path, cores: int) -> dict[str, list[str]]:
    """The three study commands (setting -> argv), each writing ``work/<setting>``."""
    def join(values) -> str:
        return ",".join(str(v) for v in values)

    base = ["-m", "varstudy.study", "accuracy", "--preset", "cpu", "--model", cfg.model,
            "--families", join(cfg.families), "--ratios", join(cfg.ratios), "--scopes",
            cfg.scope, "--seeds", join(cfg.seeds), "--max-steps", str(cfg.max_steps),
            "--eval-every", str(cfg.max_steps), "--eval-examples", str(cfg.eval_examples),
            "--no-progress"]
    return {"local": base + ["--num-threads", str(cores), "--out", str(work / "local")],
            "ray": base + ["--executor", "ray", "--cpus-per-run", "1", "--out",
                           str(work / "ray")],
            "local-1": base + ["--num-threads", "1", "--out", str(work / "local-1")]}


def identical(a: Path, b: Path) -> bool:
    """Whether two accuracy folders hold the same tables apart from the timing columns."""
    import pandas as pd

    for name, timing in TIMING.items():
        x, y = (pd.read_csv(f / "accuracy" / f"{name}.csv").drop(columns=timing)
                for f in (a, b))
        if not x.equals(y):
            return False
    return True


def run(cfg: GridBenchConfig) -> tuple:
    """(table, details) of the three settings, run one after another under ``out``."""
    import pandas as pd

    cores = len(os.sched_getaffinity(0))  # what Ray's local cluster counts, and torch
    work = Path(cfg.out) / ".grid-work"
    shutil.rmtree(work, ignore_errors=True)
    argvs = commands(cfg, work, cores)
    load_before, rows = os.getloadavg(), []
    runs = len(cfg.seeds) * (1 + len(cfg.families) * len(cfg.ratios))
    for setting, argv in argvs.items():
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise VarstudyError(f"the {setting} grid failed ({tail[0]}); command: python "
                                f"{' '.join(argv)}")
        parallel = cores if setting == "ray" else 1
        threads = 1 if setting != "local" else cores
        rows.append(dict(setting=setting, executor=argv[argv.index("--executor") + 1]
                         if "--executor" in argv else "local", runs_at_a_time=parallel,
                         threads_per_run=threads, runs=runs, wall_s=wall,
                         runs_per_hour=runs * 3600 / wall))
    table = pd.DataFrame(rows)
    table["vs_local"] = table.runs_per_hour / table.runs_per_hour.iloc[0]
    details = dict(identical_ray_vs_local_1_thread=identical(work / "ray", work / "local-1"),
                   commands={k: "python " + " ".join(v) for k, v in argvs.items()},
                   cores=cores, load_avg_before=list(load_before),
                   load_avg_after=list(os.getloadavg()))
    shutil.rmtree(work, ignore_errors=True)
    return table, details


def main(argv: list[str] | None = None) -> int:
    """Run the grid benchmark; returns the exit status."""
    def body() -> int:
        cfg = cli.config_from(GridBenchConfig, parser().parse_args(argv))
        out = vio.check_writable(cfg.out)
        with vio.output_lock(out, ".grid.lock"):
            table, details = run(cfg)
            vio.atomic_write_csv(out / "grid.csv", table)
            vio.atomic_write_json(out / "grid.json", dict(config=asdict(cfg), **details,
                                                          env=vio.env_info("cpu")))
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"ray tables identical to local with 1 thread per run: "
              f"{details['identical_ray_vs_local_1_thread']}")
        return 0
    return cli.run_command(body, argv)
