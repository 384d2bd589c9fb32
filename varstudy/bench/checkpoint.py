"""``python -m varstudy.bench checkpoint``: memory and time of exact backprop through long scans.

Strategies (``STRATEGIES``): store_all (plain autograd), torch_checkpoint (torch.utils.checkpoint
over ceil(sqrt N)-step segments, reentrant so its saved inputs are counted), revolve (Revolve over
all N in fast memory, s + ``revolve_extra_slots`` slots = the same fast budget as multistage,
which also holds one prefetched state and one write in flight), multistage_host and
multistage_disk (asynchronous two-level plan, interval I = ceil(T_w / t_f) from measured times).

Step (``WORKLOADS``, ``--workload``): a tanh RNN cell, h' = tanh(h W + x U + b), sized by
``--batch``/``--hidden``/``--inputs``. The transfer time is set with an ARTIFICIAL THROTTLE
(``transfer_delay_s`` = ratio * t_f slept by the tier's worker per transfer), so the
compute/transfer ratio can be swept. Fast-tier bytes = autograd saved tensors (re-tapes
included) + checkpoint states held in device memory, counted by ``MemoryMeter``.

Device (``--device``, default cpu, so the committed CPU results rerun as they were): the step's
weights, h0 and inputs (drawn on the CPU from ``--seed``, then moved, so every device scans the
same numbers) and the wave stepper live there. On CUDA every timed region (calibration, each run,
each wave strategy) is bracketed by ``torch.cuda.synchronize(device)``, the host tier is a pinned
pool filled on a side stream (NOTE [device ops] in :mod:`varstudy.checkpointing.device`), the
disk tier copies through host memory, and the fast-tier bytes are device memory.

Presets (``--preset``; the first is the default): ``paper`` (the committed results,
results/checkpoint/): batch 128, hidden 512 on one CPU thread, so one step costs t_f ~ 0.47 ms
and t_b ~ 2.0 ms (parameter gradients included) and per-step Python/thread overhead (~0.05 ms) is
a few percent of t_f + t_b; N in {100, 300, 1000, 3000, 10000}, s = 5, transfer/compute ratio 5;
store_all is skipped at N = 10,000 (~2.7 GiB tape > 2048 MiB). Runtime about 4.5-5 minutes on an
idle 2-core machine (``wall_*_s`` in env.json says what it took). ``quick``: the batch 64 /
hidden 256 step (t_f ~ 0.08 ms, overhead-dominated, ~2 min). ``smoke``: tiny, for tests, on
torch's default threads. ``long``: N up to 30,000 for two strategies. Rerun the committed results
with ``--preset paper`` or ``--config results/checkpoint/config.json``.

Strategies whose fast-tier peak grows with N (store_all, torch_checkpoint) are SKIPPED where their
estimated peak (tape bytes per step measured on a few steps, times N) exceeds
``--store-all-max-mib``: the row stays in the CSV with NaN time/peak and the reason in
``skipped``. Small N (<= ``repeat_max_n``) are run ``repeats`` times (median time) to damp noise.

Columns of vs_n.csv / vs_ratio.csv (besides the obvious): ``cost_fwd_units`` = time per step / t_f
and ``model_cost_fwd_units`` = the cost model (schedules.model_cost_per_step; store_all and
torch_checkpoint: 1 + t_b/t_f); ``overhead_vs_plain`` = time per step / (t_f + t_b) and
``model_overhead_vs_plain`` = the model in the same units, where t_f (one untaped step) and t_b
(re-tape + adjoint of one step, parameter gradients included) are medians timed once per run in
isolation (``calibrate``; also columns ``t_f_ms``, ``t_b_ms``); ``overhead_vs_store_all`` = time
per step / store_all's at the same N (NaN where store_all did not run); ``main_cpu_s`` = CPU time
of the calling thread during the run (time_s well above main_cpu_s + stall_s means the machine
was busy: the numbers are then not trustworthy).

Outputs under ``--out`` (default results/checkpoint/): vs_n.csv, vs_ratio.csv, wave.csv,
summary.csv (per strategy: overhead_vs_plain at the smallest and largest N and its change, the
+-10% target, not slower than revolve at every N, fast-tier peak min/max over N), config.json
(the resolved options; ``--config`` reruns it) and env.json (versions, threads in effect,
t_f/t_b, wall times; written last, so its presence marks a complete run).

NOTE [resume]: nothing in ``--out`` changes before the options are checked, the workload is built
and run once and both slow tiers have stored a state; the run then holds the folder's lock
(NOTE [one run per folder] in :mod:`varstudy.io`), works in ``<out>/.bench-checkpoint.staging/``
and replaces only its own files in ``<out>``, once it has finished (NOTE [staged results]). Each
finished row (one (N, strategy) job, one ratio, one wave strategy) is appended (fsynced) to
``parts/`` there; the final tables are written at the end, env.json last, and the parts
removed. ``--resume`` keeps those rows and the calibration (t_f, t_b) of the interrupted
run and runs only the missing jobs (a different config is refused; rows that are not jobs of
this config, or repeat one, are dropped and run again); timings of the jobs run after the restart
naturally differ from an uninterrupted run's.

Modules: this one (config, presets, schema, command line; light), ``checkpoint_run`` (the runs),
``checkpoint_parts`` (the kept rows of NOTE [resume]), ``checkpoint_tables`` (cost-model columns,
summary.csv, the printed report).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from varstudy import cli
from varstudy import io as vio
from varstudy.cli import option
from varstudy.errors import VarstudyError

PROG = "python -m varstudy.bench checkpoint"
DESCRIPTION = ("Memory and time of exact backprop through long scans: store_all, "
               "torch.utils.checkpoint, Revolve and asynchronous multistage (host, disk) vs the "
               "length N and the transfer/compute ratio, and a 2-D wave equation against a fast-"
               "memory budget; writes vs_n.csv, vs_ratio.csv, wave.csv, summary.csv, config.json "
               "and env.json (module docstring of varstudy.bench.checkpoint: columns, resume).")
STRATEGIES = ("store_all", "torch_checkpoint", "revolve", "multistage_host", "multistage_disk")
GROWING = ("store_all", "torch_checkpoint")  # fast-tier peak grows with N: subject to the budget
WORKLOADS = ("tanh_rnn",)
WAVE_STRATEGIES = ("store_all", "revolve", "multistage_host")  # the wave workload's rows
COLUMNS = ["workload", "strategy", "n_steps", "slots", "interval", "ratio", "time_s",
           "time_per_step_ms", "cost_fwd_units", "model_cost_fwd_units", "fast_peak_bytes",
           "fast_peak_mib", "recompute_steps", "stall_s", "overhead_vs_plain",
           "model_overhead_vs_plain", "overhead_vs_store_all", "t_f_ms", "t_b_ms", "repeats",
           "main_cpu_s", "skipped"]
SUMMARY_COLUMNS = ["strategy", "n_min", "n_max", "overhead_at_n_min", "overhead_at_n_max",
                   "overhead_change_pct", "within_10pct", "model_change_pct",
                   "not_slower_than_revolve", "slower_than_revolve_at", "fast_peak_mib_min",
                   "fast_peak_mib_max", "skipped_at"]
NOT_COMPARED = ("out", "resume", "progress")  # a resumed run may change these
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


@dataclass(frozen=True)
class BenchConfig:
    """What the checkpointing benchmark runs; written next to the results as config.json."""

    ns: tuple[int, ...] = option((100, 300, 1000, 3000, 10000), "sequence lengths N of the N "
                                                                "sweep")
    strategies: tuple[str, ...] = option(STRATEGIES, "strategies of the N sweep",
                                         choices=STRATEGIES)
    slots: int = option(5, "fast checkpoint slots s of multistage")
    revolve_extra_slots: int = option(2, "extra slots of revolve (multistage's prefetched state "
                                         "and write in flight: the same fast budget)")
    ratio: float = option(5.0, "transfer/compute ratio T_w / t_f of the N sweep")
    ratios: tuple[float, ...] = option((1.0, 2.0, 5.0, 10.0, 20.0), "transfer/compute ratios "
                                                                   "of the ratio sweep")
    ratio_n: int = option(1000, "N of the ratio sweep")
    workload: str = option("tanh_rnn", "the scanned step", choices=WORKLOADS)
    batch: int = option(128, "batch rows of the step's state")
    hidden: int = option(512, "hidden size of the step")
    inputs: int = option(32, "input size of the step")
    store_all_max_mib: float = option(2048.0, "skip store_all/torch_checkpoint where their "
                                              "estimated fast-tier peak exceeds this many MiB "
                                              "(recorded in the skipped column)")
    repeats: int = option(3, "runs per point (median time) for N <= repeat_max_n")
    repeat_max_n: int = option(300, "largest N run repeats times (larger N run once)")
    wave_n: int = option(2000, "time steps of the 2-D wave equation")
    wave_grid: int = option(96, "grid side of the 2-D wave equation")
    budget_mib: float = option(64.0, "stated fast-memory budget of the wave workload, MiB")
    num_threads: int | None = option(None, "CPU threads (none: torch's default, the machine's "
                                           "cores; the paper, quick and long presets use 1; "
                                           "the count in effect goes to env.json)")
    seed: int = option(0, "seed of the step's weights, states and inputs")
    device: str = option("cpu", "where the step's weights, states and inputs live: cpu, cuda, "
                                "cuda:N or auto (cuda when present); on CUDA every timed region "
                                "is synchronized and the host tier is a pinned pool (NOTE "
                                "[device ops])", metavar="DEVICE")
    out: str = option("results/checkpoint", "output folder")
    progress: bool = option(True, "progress bars")
    resume: bool = option(False, "run only the jobs an interrupted run left "
                                 "undone (NOTE [resume])")

    def __post_init__(self) -> None:
        for name in ("ns", "strategies", "ratios"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, values, choices in (("strategies", self.strategies, STRATEGIES),
                                      ("workload", (self.workload,), WORKLOADS)):
            for value in values:
                _check(value in choices, f"unknown {name} {value!r}; valid choices: "
                                         f"{', '.join(choices)}")
        for name in ("ns", "strategies", "ratios"):
            _check(len(getattr(self, name)) > 0, f"--{name} is empty; valid choices: a comma "
                                                 "list of one or more values")
            cli.check_distinct(f"--{name}", getattr(self, name))
        for n in self.ns:
            _integer("ns", n, 1)
        for name, low in (("slots", 1), ("revolve_extra_slots", 0), ("ratio_n", 1), ("batch", 1),
                          ("hidden", 1), ("inputs", 1), ("repeats", 1), ("repeat_max_n", 0),
                          ("wave_n", 1), ("wave_grid", 3)):
            _integer(name, getattr(self, name), low)
        for name, value in [("ratio", self.ratio), ("store_all_max_mib", self.store_all_max_mib),
                            ("budget_mib", self.budget_mib)] + [("ratios", r) for r in self.ratios]:
            _check(isinstance(value, (int, float)) and not isinstance(value, bool)
                   and 0 < value < math.inf, f"--{name.replace('_', '-')} {value!r} is out of "
                                             "range; valid choices: finite numbers > 0")
        if self.num_threads is not None:
            _integer("num_threads", self.num_threads, 1, "or none")
        cli.check_seed("seed", self.seed)
        _check(isinstance(self.device, str) and re.fullmatch(DEVICE_PATTERN, self.device)
               is not None, f"unknown device {self.device!r}; valid choices: cpu, cuda, cuda:N, "
                            "auto")
        vio.require_out(self.out)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise VarstudyError(message)


def _integer(name: str, value, low: int, more: str = "") -> None:
    _check(isinstance(value, int) and not isinstance(value, bool)
           and low <= value <= cli.SIZE_LIMIT,
           f"--{name.replace('_', '-')} {value!r} is out of range; valid choices: integers "
           f">= {low} and < 2**31{' ' + more if more else ''}")


PAPER = dict(num_threads=1)  # the committed results were timed on one CPU thread
PRESETS = {  # short diffs against the defaults; the first is the default (the committed run)
    "paper": PAPER,
    "quick": dict(PAPER, batch=64, hidden=256),
    "smoke": dict(ns=(20, 60), ratios=(1.0, 3.0), ratio_n=40, batch=4, hidden=16, inputs=4,
                  wave_n=30, wave_grid=12, budget_mib=0.05, repeats=2, repeat_max_n=20),
    "long": dict(PAPER, ns=(100, 1000, 10000, 30000), strategies=("store_all", "multistage_host")),
}


def parser():
    """The command line of ``python -m varstudy.bench checkpoint``, from :class:`BenchConfig` and
    its presets."""
    return cli.config_parser(BenchConfig, PROG, DESCRIPTION, presets=tuple(PRESETS))


def parse(argv: list[str] | None = None) -> BenchConfig:
    """The config the arguments describe (exits 2 with one line on a usage error)."""
    args = parser().parse_args(argv)
    _legacy_config(args)
    return cli.config_from(BenchConfig, args, PRESETS)


def _legacy_config(args) -> None:
    """A config.json written before the one convention (options under "config", ``threads`` for
    ``num_threads``, as the committed results/checkpoint/config.json) reruns too: its options go
    into ``args`` where the command line did not give them."""
    path = getattr(args, "config", None)
    if path is None:
        return
    try:
        data = vio.read_json(path)
    except VarstudyError:
        return  # cli.saved_options reports an unreadable file in its own words
    old = data.get("config")
    if not isinstance(old, dict) or "ns" in data:
        return
    old = dict(old, num_threads=old.get("num_threads", old.get("threads")))
    for name, value in cli.config_options(old, BenchConfig, f"--config {path}").items():
        if not hasattr(args, name):
            setattr(args, name, value)
    del args.config


def main(argv: list[str] | None = None) -> int:
    """Run the checkpointing benchmark; returns the exit status."""
    def body() -> int:
        cfg = parse(argv)
        from varstudy.models import resolve_device

        resolve_device(cfg.device)  # an absent CUDA device is one line
        cli.set_threads(cfg.num_threads)
        from varstudy.bench.checkpoint_run import run
        from varstudy.bench.checkpoint_tables import report

        report(*run(cfg))
        return 0
    return cli.run_command(body, argv)
