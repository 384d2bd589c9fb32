"""``python -m varstudy.bench checkpoint``: memory and time of exact backprop through long scans.

Strategies (registry ``STRATEGIES``): store_all (plain autograd), torch_checkpoint
(torch.utils.checkpoint over ceil(sqrt N)-step segments, reentrant so its saved inputs are counted),
revolve (Revolve over all N in fast memory, s + ``revolve_extra_slots`` slots = the same fast budget
as multistage, which also holds one prefetched state and one write in flight), multistage_host and
multistage_disk (asynchronous two-level plan, interval I = ceil(T_w / t_f) from measured times).

Step (registry ``WORKLOADS``, ``--workload``): a tanh RNN cell, h' = tanh(h W + x U + b), sized by
``--batch``/``--hidden``/``--inputs``. The transfer time is set with an ARTIFICIAL THROTTLE
(``transfer_delay_s`` = ratio * t_f slept by the tier's worker per transfer), so the
compute/transfer ratio can be swept. Fast-tier bytes = autograd saved tensors (re-tapes included) +
checkpoint states held in device memory, counted by ``MemoryMeter``.

Presets: ``default`` = ``paper`` (the committed results, results/checkpoint/): batch 128, hidden
512, so one step costs t_f ~ 0.47 ms and t_b ~ 2.0 ms (parameter gradients included) on one CPU
thread and per-step Python/thread overhead (~0.05 ms) is a few percent of t_f + t_b; N in {100,
300, 1000, 3000, 10000}, s = 5, transfer/compute ratio 5; store_all is skipped at N = 10,000
(~2.7 GiB tape > 2048 MiB). Runtime about 4.5-5 minutes on an idle 2-core machine (cost model
with those t_f, t_b: ~220 s N sweep, ~19 s ratio sweep, ~7 s wave; ``wall_*_s`` in config.json
says what it took). ``quick``: the old batch 64 / hidden 256 step (t_f ~ 0.08 ms, overhead-dominated, ~2 min).
``smoke``: tiny, for tests. ``long``: N up to 30,000 for two strategies.
Re-run the committed results with ``python -m varstudy.bench checkpoint --preset paper``.

Strategies whose fast-tier peak grows with N (store_all, torch_checkpoint) are SKIPPED where their
estimated peak (tape bytes per step measured on a few steps, times N) exceeds
``--store-all-max-mib`` (default 2048): the row stays in the CSV with NaN time/peak and the
reason in ``skipped``. Small N (<= ``repeat_max_n``) are run ``repeats`` times (median time) to damp noise.

Columns of vs_n.csv / vs_ratio.csv (besides the obvious): ``cost_fwd_units`` = time per step / t_f
and ``model_cost_fwd_units`` = the cost model (schedules.model_cost_per_step; store_all and
torch_checkpoint: 1 + t_b/t_f); ``overhead_vs_plain`` = time per step / (t_f + t_b) and
``model_overhead_vs_plain`` = the model in the same units, where t_f (one untaped step) and t_b
(re-tape + adjoint of one step, parameter gradients included) are medians timed once per run in
isolation (``calibrate``; also columns ``t_f_ms``, ``t_b_ms``); ``overhead_vs_store_all`` = time per
step / store_all's at the same N (NaN where store_all did not run); ``main_cpu_s`` = CPU time of
the calling thread during the run (time_s well above main_cpu_s + stall_s means the machine was
busy: the numbers are then not trustworthy).

Outputs under ``--out`` (default results/checkpoint/): vs_n.csv, vs_ratio.csv, wave.csv,
summary.csv (per strategy: overhead_vs_plain at the smallest and largest N and its change, the
+-10% target, not slower than revolve at every N, fast-tier peak min/max over N), config.json.

NOTE [resume]: each finished row (one (N, strategy) job, one ratio, one wave strategy) is appended
(fsynced) to ``<out>/parts/``; the final tables are written atomically at the end, config.json
last, and the parts removed. ``--resume`` keeps those rows and the calibration (t_f, t_b) of the
interrupted run and runs only the missing jobs (a different config is refused); timings of the
jobs run after the restart naturally differ from an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from varstudy import cli
from varstudy import io as vio
from varstudy.checkpointing import schedules as sch
from varstudy.errors import VarstudyError
from varstudy.checkpointing.sequence import ScanStats, checkpointed_scan
from varstudy.checkpointing.storage import MemoryMeter, make_tier
from varstudy.checkpointing.workloads import WaveStepper, tanh_rnn

STRATEGIES = ("store_all", "torch_checkpoint", "revolve", "multistage_host", "multistage_disk")
COLUMNS = ["workload", "strategy", "n_steps", "slots", "interval", "ratio", "time_s",
           "time_per_step_ms", "cost_fwd_units", "model_cost_fwd_units", "fast_peak_bytes",
           "fast_peak_mib", "recompute_steps", "stall_s", "overhead_vs_plain",
           "model_overhead_vs_plain", "overhead_vs_store_all", "t_f_ms", "t_b_ms", "repeats",
           "main_cpu_s", "skipped"]
GROWING = ("store_all", "torch_checkpoint")  # fast-tier peak grows with N: subject to the budget
WORKLOADS = {"tanh_rnn": lambda cfg: tanh_rnn(cfg.hidden, cfg.inputs, seed=cfg.seed)}


@dataclass(frozen=True)
class BenchConfig:
    """Resolved benchmark config; written next to the results as config.json."""

    ns: tuple[int, ...] = (100, 300, 1000, 3000, 10000)
    strategies: tuple[str, ...] = STRATEGIES
    slots: int = 5
    revolve_extra_slots: int = 2
    ratio: float = 5.0  # transfer/compute ratio T_w / t_f for the N sweep (as in the paper)
    ratios: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0)
    ratio_n: int = 1000
    workload: str = "tanh_rnn"
    batch: int = 128  # batch 128 x hidden 512: t_f ~ 0.47 ms, t_b ~ 2.0 ms on one CPU thread
    hidden: int = 512
    inputs: int = 32
    store_all_max_mib: float = 2048.0  # skip store_all/torch_checkpoint above this estimated peak
    repeats: int = 3  # runs (median time) for N <= repeat_max_n; larger N run once
    repeat_max_n: int = 300
    wave_n: int = 2000
    wave_grid: int = 96
    budget_mib: float = 64.0  # stated fast-memory budget for the wave workload
    threads: int = 1
    seed: int = 0
    out: str = "results/checkpoint"
    resume: bool = False


PRESETS = {  # short diffs against the defaults; default = paper (the committed results)
    "default": {},
    "paper": {},
    "quick": dict(batch=64, hidden=256),
    "smoke": dict(ns=(20, 60), ratios=(1.0, 3.0), ratio_n=40, batch=4, hidden=16, inputs=4,
                  wave_n=30, wave_grid=12, budget_mib=0.05, repeats=2, repeat_max_n=20),
    "long": dict(ns=(100, 1000, 10000, 30000), strategies=("store_all", "multistage_host")),
}


def calibrate(step, h0, x, params=(), reps: int = 200) -> tuple[float, float]:
    """(t_f, t_b) in seconds: median untaped step; median re-tape + adjoint of one step w.r.t. the
    state and ``params`` (what every reverse step of a checkpointed scan computes)."""
    params = list(params)
    fwd, bwd = [], []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            step(h0, x)
            fwd.append(time.perf_counter() - t0)
    for _ in range(reps // 2):
        t0 = time.perf_counter()
        h = h0.detach().requires_grad_()
        new, y = step(h, x)
        torch.autograd.grad([new, y], [h] + params, [torch.ones_like(new), torch.ones_like(y)])
        bwd.append(time.perf_counter() - t0)
    return statistics.median(fwd[reps // 4:]), statistics.median(bwd)


def transfer_time(tier: str, state, delay_s: float, reps: int = 5) -> float:
    """Median measured write time T_w of one state (throttle included) to a slow tier."""
    t = make_tier(tier, n_keys=reps, template=state, transfer_delay_s=delay_s, timeout_s=30)
    try:
        for k in range(reps):
            t.put(k, state)
        t.wait_writes()
    finally:
        t.close()
    return statistics.median(t.write_times_s)


def _torch_checkpoint(step, h0, xs):
    seg = max(1, math.ceil(math.sqrt(len(xs))))

    def run(h, x):
        ys = []
        for i in range(len(x)):
            h, y = step(h, x[i])
            ys.append(y)
        return h, torch.stack(ys)

    ys = []
    for a in range(0, len(xs), seg):
        h0, y = checkpoint(run, h0, xs[a:a + seg], use_reentrant=True)
        ys.append(y)
    return torch.cat(ys), h0


def run_once(name: str, step, h0, xs, *, slots: int, interval: int, delay_s: float) -> dict:
    """One forward + backward: time_s, main_cpu_s, fast_peak_bytes, interval, recompute_steps,
    stall_s."""
    meter, stats = MemoryMeter(), ScanStats()
    kw = dict(meter=meter, stats=stats, preserve_rng=False, timeout_s=60)
    gc.collect()  # the previous run's graph and pools are freed outside the timed region
    t0, c0 = time.perf_counter(), time.thread_time()
    with meter.track_saved():
        if name == "torch_checkpoint":
            ys, hT = _torch_checkpoint(step, h0, xs)
        elif name in ("store_all", "revolve"):
            ys, hT = checkpointed_scan(step, h0, xs, strategy=name, slots=slots, **kw)
        elif name in ("multistage_host", "multistage_disk"):
            ys, hT = checkpointed_scan(step, h0, xs, strategy="multistage", slots=slots,
                                       interval=interval, tier=name.split("_")[1],
                                       transfer_delay_s=delay_s, **kw)
        else:
            raise VarstudyError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
        (ys.sum() + hT.sum()).backward()
    return dict(time_s=time.perf_counter() - t0, main_cpu_s=time.thread_time() - c0,
                fast_peak_bytes=meter.peak_bytes,
                interval=stats.interval, recompute_steps=stats.recompute_steps,
                stall_s=stats.stall_s)


def _row(workload, name, n, slots, ratio, res, t_f, t_b, *, repeats=1, skipped="") -> dict:
    strategy = {"multistage_host": "multistage", "multistage_disk": "multistage"}.get(name, name)
    interval = res["interval"] or n
    if strategy in ("revolve", "multistage"):
        model = sch.model_cost_per_step(strategy, n, slots, interval, t_b / t_f)
    else:  # store_all, torch_checkpoint: one (untaped or taped) forward + one re-tape/adjoint
        model = sch.model_cost_per_step("store_all", n, slots, 1, t_b / t_f)
    per_step = res["time_s"] / n
    return dict(workload=workload, strategy=name, n_steps=n, slots=slots,
                interval=res["interval"], ratio=ratio, time_s=res["time_s"],
                time_per_step_ms=1e3 * per_step, cost_fwd_units=per_step / t_f,
                model_cost_fwd_units=model, fast_peak_bytes=res["fast_peak_bytes"],
                fast_peak_mib=res["fast_peak_bytes"] / 2**20, recompute_steps=res["recompute_steps"],
                stall_s=res["stall_s"], overhead_vs_plain=per_step / (t_f + t_b),
                model_overhead_vs_plain=model * t_f / (t_f + t_b),
                overhead_vs_store_all=float("nan"), t_f_ms=1e3 * t_f, t_b_ms=1e3 * t_b,
                repeats=repeats, main_cpu_s=res["main_cpu_s"], skipped=skipped)


_NAN_RESULT = dict(time_s=float("nan"), main_cpu_s=float("nan"), fast_peak_bytes=float("nan"),
                   interval=0,
                   recompute_steps=float("nan"), stall_s=float("nan"))


def _workload(cfg: BenchConfig):
    if cfg.workload not in WORKLOADS:
        raise VarstudyError(f"unknown workload {cfg.workload!r}; valid: {', '.join(WORKLOADS)}")
    return WORKLOADS[cfg.workload](cfg)


def _setup(cfg: BenchConfig, n: int):
    g = torch.Generator().manual_seed(cfg.seed)
    step, _ = _workload(cfg)
    h0 = torch.randn(cfg.batch, cfg.hidden, generator=g).requires_grad_()
    xs = torch.randn(n, cfg.batch, cfg.inputs, generator=g)
    return step, h0, xs


def tape_model(cfg: BenchConfig, k: int = 4) -> tuple[float, float]:
    """(offset, bytes per step) of store_all's fast-tier peak, from runs of k and 2k steps."""
    peaks = []
    for n in (k, 2 * k):
        step, h0, xs = _setup(cfg, n)
        peaks.append(run_once("store_all", step, h0, xs, slots=1, interval=n,
                              delay_s=0.0)["fast_peak_bytes"])
    per_step = max(0.0, (peaks[1] - peaks[0]) / k)
    return max(0.0, peaks[0] - k * per_step), per_step


def estimated_peak_mib(name: str, n: int, tape: tuple[float, float]) -> float:
    """Estimated fast-tier peak of a strategy whose peak grows with N (0 for the others)."""
    offset, per_step = tape
    if name == "store_all":
        return (offset + n * per_step) / 2**20
    if name == "torch_checkpoint":  # segment inputs kept + one segment's tape in backward
        seg = max(1, math.ceil(math.sqrt(n)))
        return (offset + (math.ceil(n / seg) + seg) * per_step) / 2**20
    return 0.0


def _intervals(cfg: BenchConfig, h0, t_f: float, ratio: float) -> tuple[float, dict]:
    """Throttle delay for a transfer/compute ratio, and I = ceil(T_w / t_f) per tier (measured)."""
    delay = ratio * t_f
    state = (h0.detach(),)
    return delay, {tier: sch.choose_interval(t_f, transfer_time(tier, state, delay))
                   for tier in ("host", "disk")}


def _timed(cfg: BenchConfig, name: str, n: int, *, slots: int, interval: int,
           delay_s: float) -> tuple[dict, int]:
    """run_once ``repeats`` times for N <= repeat_max_n (median time, max peak), else once."""
    reps = max(1, cfg.repeats) if n <= cfg.repeat_max_n else 1
    results = []
    for _ in range(reps):
        step, h0, xs = _setup(cfg, n)
        results.append(run_once(name, step, h0, xs, slots=slots, interval=interval,
                                delay_s=delay_s))
    res = dict(results[0])
    res["time_s"] = statistics.median(r["time_s"] for r in results)
    res["stall_s"] = statistics.median(r["stall_s"] for r in results)
    res["main_cpu_s"] = statistics.median(r["main_cpu_s"] for r in results)
    res["fast_peak_bytes"] = max(r["fast_peak_bytes"] for r in results)
    return res, reps


def _add_vs_store_all(df: pd.DataFrame) -> pd.DataFrame:
    base = df[df["strategy"] == "store_all"].set_index("n_steps")["time_s"]
    df["overhead_vs_store_all"] = df["time_s"] / df["n_steps"].map(base)
    return df


def _parts(parts, name: str, keys: tuple[str, ...]):
    """(done rows, done keys, append) of one parts file (NOTE [resume]); no-ops without parts."""
    if parts is None:
        return [], set(), lambda rows: None
    path = parts / f"{name}.csv"
    frame = vio.read_chunk(path)
    rows = [] if frame is None else frame.to_dict("records")
    return rows, {tuple(r[k] for k in keys) for r in rows}, \
        lambda new: vio.append_csv(path, pd.DataFrame(new))


def sweep_n(cfg: BenchConfig, t_f: float, t_b: float, parts=None) -> pd.DataFrame:
    """Time and fast-tier peak vs N for each strategy at the configured transfer/compute ratio."""
    step, h0, xs = _setup(cfg, 1)
    delay, inter = _intervals(cfg, h0, t_f, cfg.ratio)
    tape = tape_model(cfg)
    for name in cfg.strategies:  # warm-up: first calls of each code path are slow
        run_once(name, step, h0, xs.expand(20, -1, -1), slots=cfg.slots, delay_s=0.0,
                 interval=inter.get(name.rsplit("_", 1)[-1], 1))
    rows, done, append = _parts(parts, "vs_n", ("n_steps", "strategy"))
    jobs = [(n, name) for n in cfg.ns for name in cfg.strategies if (n, name) not in done]
    for n, name in tqdm(jobs, desc="checkpoint vs N", leave=False):
        slots = cfg.slots + (cfg.revolve_extra_slots if name == "revolve" else 0)
        est = estimated_peak_mib(name, n, tape)
        if name in GROWING and est > cfg.store_all_max_mib:
            why = (f"estimated fast peak {est:.4g} MiB > store_all_max_mib "
                   f"{cfg.store_all_max_mib:.4g}")
            rows.append(_row(cfg.workload, name, n, slots, cfg.ratio, _NAN_RESULT, t_f, t_b,
                             repeats=0, skipped=why))
        else:
            res, reps = _timed(cfg, name, n, slots=slots, delay_s=delay,
                               interval=inter.get(name.rsplit("_", 1)[-1], 1))
            rows.append(_row(cfg.workload, name, n, slots, cfg.ratio, res, t_f, t_b,
                             repeats=reps))
        append(rows[-1:])
    order = {job: i for i, job in enumerate((n, s) for n in cfg.ns for s in cfg.strategies)}
    rows.sort(key=lambda r: order[r["n_steps"], r["strategy"]])
    return _add_vs_store_all(pd.DataFrame(rows, columns=COLUMNS))


def sweep_ratio(cfg: BenchConfig, t_f: float, t_b: float, parts=None) -> pd.DataFrame:
    """Multistage (host tier) time vs transfer/compute ratio at N = ratio_n, beside Revolve."""
    n = cfg.ratio_n
    rows, done, append = _parts(parts, "vs_ratio", ("ratio",))
    todo = [r for r in cfg.ratios if (r,) not in done]
    step, h0, xs = _setup(cfg, n)
    slots = cfg.slots + cfg.revolve_extra_slots
    if not todo:
        return pd.DataFrame(rows, columns=COLUMNS)
    res, reps = _timed(cfg, "revolve", n, slots=slots, interval=n, delay_s=0.0)
    for ratio in tqdm(todo, desc="checkpoint vs ratio", leave=False):
        delay, inter = _intervals(cfg, h0, t_f, ratio)
        ms, ms_reps = _timed(cfg, "multistage_host", n, slots=cfg.slots, interval=inter["host"],
                             delay_s=delay)
        rows.append(_row(cfg.workload, "multistage_host", n, cfg.slots, ratio, ms, t_f, t_b,
                         repeats=ms_reps))
        rows.append(_row(cfg.workload, "revolve", n, slots, ratio, res, t_f, t_b, repeats=reps))
        append(rows[-2:])
    rows.sort(key=lambda r: cfg.ratios.index(r["ratio"]))  # stable: multistage, then revolve
    return pd.DataFrame(rows, columns=COLUMNS)


def wave_memory(cfg: BenchConfig, parts=None) -> pd.DataFrame:
    """2-D wave stepper: store-all's tape exceeds the stated budget; Revolve/multistage fit."""
    wave = WaveStepper(cfg.wave_grid, seed=cfg.seed)
    src = WaveStepper.source(cfg.wave_n)
    names = ("store_all", "revolve", "multistage_host")
    rows, done, append = _parts(parts, "wave", ("strategy",))
    for name in tqdm([s for s in names if (s,) not in done], desc="wave", leave=False):
        meter, stats = MemoryMeter(), ScanStats()
        strategy = "multistage" if name == "multistage_host" else name
        wave.zero_grad()
        t0 = time.perf_counter()
        with meter.track_saved():
            ys, _ = checkpointed_scan(wave.step, wave.initial_state(), src, strategy=strategy,
                                      slots=cfg.slots, interval=max(2, cfg.wave_n // 50),
                                      meter=meter, stats=stats)
            ys.pow(2).mean().backward()
        rows.append(dict(workload="wave2d", strategy=name, n_steps=cfg.wave_n, grid=cfg.wave_grid,
                         time_s=time.perf_counter() - t0, fast_peak_mib=meter.peak_bytes / 2**20,
                         budget_mib=cfg.budget_mib,
                         within_budget=meter.peak_bytes / 2**20 <= cfg.budget_mib,
                         grad_norm=float(wave.c.grad.norm())))
        append(rows[-1:])
    rows.sort(key=lambda r: names.index(r["strategy"]))
    return pd.DataFrame(rows)


def _parse(argv) -> BenchConfig:
    p = cli.Parser(prog="python -m varstudy.bench checkpoint", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--workload", choices=sorted(WORKLOADS))
    p.add_argument("--batch", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--inputs", type=int)
    p.add_argument("--ns", type=int, nargs="+")
    p.add_argument("--ratios", type=float, nargs="+")
    p.add_argument("--ratio-n", type=int, dest="ratio_n")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES)
    p.add_argument("--slots", type=int)
    p.add_argument("--ratio", type=float)
    p.add_argument("--store-all-max-mib", type=float, dest="store_all_max_mib",
                   help="skip store_all/torch_checkpoint where their estimated fast-tier peak "
                        "exceeds this (recorded in the 'skipped' column)")
    p.add_argument("--repeats", type=int, help="runs per point (median) for N <= repeat_max_n")
    p.add_argument("--repeat-max-n", type=int, dest="repeat_max_n")
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true", default=None,
                   help="skip the rows kept in <out>/parts (NOTE [resume])")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    a = p.parse_args(argv)
    over = dict(PRESETS[a.preset])
    for key in ("workload", "batch", "hidden", "inputs", "ns", "ratios", "ratio_n", "strategies",
                "slots", "ratio", "store_all_max_mib", "repeats", "repeat_max_n", "out",
                "resume"):
        val = getattr(a, key)
        if val is not None:
            over[key] = tuple(val) if isinstance(val, list) else val
    return BenchConfig(**over)


def main(argv: list[str] | None = None) -> int:
    return cli.guarded(lambda: _main(_parse(argv or [])), debug=cli.wants_debug(argv or []))


def _main(cfg: BenchConfig) -> int:
    torch.set_num_threads(cfg.threads)
    out = vio.check_writable(cfg.out)
    parts = out / "parts"
    step, params = _workload(cfg)  # calibrate needs the parameters this step closes over
    _, h0, xs = _setup(cfg, 1)
    run_once("multistage_host", step, h0, xs.expand(50, -1, -1), slots=cfg.slots, interval=5,
             delay_s=0.0)  # warm-up
    t_f, t_b = _calibration(cfg, parts, lambda: calibrate(step, h0.detach(), xs[0], params))
    vio.remove(*(out / f"{n}.csv" for n in ("vs_n", "vs_ratio", "wave", "summary")),
               out / "config.json")
    t0 = time.perf_counter()
    vs_n = sweep_n(cfg, t_f, t_b, parts)
    t1 = time.perf_counter()
    vs_ratio = sweep_ratio(cfg, t_f, t_b, parts)
    t2 = time.perf_counter()
    wave = wave_memory(cfg, parts)
    t3 = time.perf_counter()
    summary = summarize(vs_n)
    meta = dict(config=dataclasses.asdict(cfg), t_f_ms=1e3 * t_f, t_b_ms=1e3 * t_b,
                torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count(),
                wall_s=t3 - t0, wall_vs_n_s=t1 - t0, wall_vs_ratio_s=t2 - t1, wall_wave_s=t3 - t2)
    for name, df in (("vs_n", vs_n), ("vs_ratio", vs_ratio), ("wave", wave),
                     ("summary", summary)):
        vio.atomic_write_csv(out / f"{name}.csv", df)
    vio.atomic_write_json(out / "config.json", meta)  # last: marks a complete run
    shutil.rmtree(parts, ignore_errors=True)
    _summary(vs_n, vs_ratio, wave, summary, meta)
    return 0


def _calibration(cfg: BenchConfig, parts, measure) -> tuple[float, float]:
    """(t_f, t_b): measured for a new run, kept in parts/calibration.json for a resumed one, so
    the intervals and cost units of resumed rows match the rows kept (NOTE [resume])."""
    path = parts / "calibration.json"
    if cfg.resume and path.is_file():
        old = json.loads(path.read_text())
        vio.refuse_changed(parts, old["config"], dataclasses.asdict(cfg), ("out", "resume"))
        return old["t_f"], old["t_b"]
    shutil.rmtree(parts, ignore_errors=True)
    t_f, t_b = measure()
    vio.atomic_write_json(path, dict(config=dataclasses.asdict(cfg), t_f=t_f, t_b=t_b))
    return t_f, t_b


SUMMARY_COLUMNS = ["strategy", "n_min", "n_max", "overhead_at_n_min", "overhead_at_n_max",
                   "overhead_change_pct", "within_10pct", "model_change_pct",
                   "not_slower_than_revolve", "slower_than_revolve_at", "fast_peak_mib_min",
                   "fast_peak_mib_max", "skipped_at"]


def summarize(vs_n: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: the issue's targets. overhead = overhead_vs_plain; change = (at N_max / at
    N_min - 1) in %, ``within_10pct`` |change| <= 10 (NaN where a point was skipped);
    not_slower_than_revolve: time per step <= revolve's at every N where both ran (NaN for
    revolve itself); fast-tier peak min/max over N (its flatness)."""
    n_lo, n_hi = int(vs_n["n_steps"].min()), int(vs_n["n_steps"].max())
    rev = vs_n[vs_n["strategy"] == "revolve"].set_index("n_steps")["time_s"]
    rows = []
    for strategy in vs_n["strategy"].unique():
        d = vs_n[vs_n["strategy"] == strategy].set_index("n_steps")
        lo, hi = d["overhead_vs_plain"].get(n_lo), d["overhead_vs_plain"].get(n_hi)
        m_lo, m_hi = d["model_overhead_vs_plain"].get(n_lo), d["model_overhead_vs_plain"].get(n_hi)
        change = 100 * (hi / lo - 1)
        ran = d["time_s"].notna()
        if strategy == "revolve" or rev.empty:
            le, slower = float("nan"), ""
        else:
            both = [n for n in d.index[ran] if n in rev.index and pd.notna(rev[n])]
            bad = [int(n) for n in both if d.loc[n, "time_s"] > rev[n]]
            le = (not bad) if both else float("nan")
            slower = " ".join(map(str, bad))
        skipped = d.index[d["skipped"].fillna("").astype(str) != ""] if "skipped" in d else []
        rows.append(dict(strategy=strategy, n_min=n_lo, n_max=n_hi, overhead_at_n_min=lo,
                         overhead_at_n_max=hi, overhead_change_pct=change,
                         within_10pct=(abs(change) <= 10) if pd.notna(change) else float("nan"),
                         model_change_pct=100 * (m_hi / m_lo - 1),
                         not_slower_than_revolve=le, slower_than_revolve_at=slower,
                         fast_peak_mib_min=d["fast_peak_mib"].min(),
                         fast_peak_mib_max=d["fast_peak_mib"].max(),
                         skipped_at=" ".join(str(int(n)) for n in skipped)))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _summary(vs_n, vs_ratio, wave, summary, meta) -> None:
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    print(f"t_f = {meta['t_f_ms']:.3f} ms, t_b = {meta['t_b_ms']:.3f} ms, "
          f"wall {meta['wall_s']:.0f} s "
          f"(vs N {meta['wall_vs_n_s']:.0f} s, vs ratio {meta['wall_vs_ratio_s']:.0f} s, "
          f"wave {meta['wall_wave_s']:.0f} s)")
    for col in ("overhead_vs_plain", "model_overhead_vs_plain", "overhead_vs_store_all",
                "fast_peak_mib"):
        print(f"-- {col} (rows N, NaN = skipped or not applicable)")
        print(vs_n.pivot_table(index="n_steps", columns="strategy", values=col,
                               dropna=False).round(3))
    skipped = vs_n[vs_n["skipped"].fillna("").astype(str) != ""]
    for _, r in skipped.iterrows():
        print(f"skipped {r['strategy']} at N={r['n_steps']}: {r['skipped']}")
    print("-- targets: overhead_vs_plain at N_min / N_max (+-10%), <= revolve at every N, "
          "fast peak over N")
    print(summary.round(3).to_string(index=False))
    cols = ["strategy", "ratio", "interval", "time_per_step_ms", "overhead_vs_plain",
            "model_overhead_vs_plain"]
    print(vs_ratio[cols].round(3).to_string(index=False))
    print(wave.to_string(index=False))
