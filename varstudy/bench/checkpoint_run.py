"""The checkpointing benchmark's runs (heavy part of :mod:`varstudy.bench.checkpoint`): timing
primitives, the N sweep, the ratio sweep, the wave workload and the run with its output folder."""

from __future__ import annotations

import gc
import math
import os
import platform
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from torch.utils.checkpoint import checkpoint
from varstudy.progress import tqdm

from varstudy import cli
from varstudy import io as vio
from varstudy.bench import checkpoint_tables as tables
from varstudy.bench.checkpoint_parts import Parts
from varstudy.bench.checkpoint import (COLUMNS, GROWING, NOT_COMPARED, STRATEGIES,
                                       WAVE_STRATEGIES, BenchConfig)
from varstudy.checkpointing import schedules as sch
from varstudy.checkpointing.meter import MemoryMeter
from varstudy.checkpointing.sequence import ScanStats, checkpointed_scan
from varstudy.checkpointing.storage import TIERS, make_tier
from varstudy.checkpointing.workloads import WaveStepper, tanh_rnn
from varstudy.errors import VarstudyError
from varstudy.models import resolve_device

WORKLOADS = {"tanh_rnn": lambda cfg: tanh_rnn(cfg.hidden, cfg.inputs, seed=cfg.seed,
                                               device=device_of(cfg.device))}
FINAL = ("vs_n.csv", "vs_ratio.csv", "wave.csv", "summary.csv", "env.json")
FILES = ("parts", "config.json", *FINAL)  # parts: the run's state, never published
STAGE = "bench-checkpoint"  # <out>/.bench-checkpoint.staging/ (NOTE [staged results] in io)


def device_of(name: str) -> torch.device:
    """The torch device of ``--device`` ("auto": cuda when present); an absent CUDA device or
    an index beyond the machine's devices is one line."""
    device = torch.device(resolve_device(name))
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise VarstudyError(f"device {name!r} does not exist: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s); valid choices: cpu, "
                            f"cuda, cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; a no-op on the CPU), before and after a timed
    region, so the clock measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(step, h0, x, params=(), reps: int = 200) -> tuple[float, float]:
    """(t_f, t_b) in seconds: median untaped step; median re-tape + adjoint of one step w.r.t. the
    state and ``params`` (what every reverse step of a checkpointed scan computes)."""
    params, device = list(params), h0.device
    fwd, bwd = [], []
    with torch.no_grad():
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            step(h0, x)
            sync(device)
            fwd.append(time.perf_counter() - t0)
    for _ in range(reps // 2):
        sync(device)
        t0 = time.perf_counter()
        h = h0.detach().requires_grad_()
        new, y = step(h, x)
        torch.autograd.grad([new, y], [h] + params, [torch.ones_like(new), torch.ones_like(y)])
        sync(device)
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
    sync(h0.device)
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
            raise VarstudyError(f"unknown strategy {name!r}; valid choices: "
                                f"{', '.join(STRATEGIES)}")
        (ys.sum() + hT.sum()).backward()
        sync(h0.device)
    return dict(time_s=time.perf_counter() - t0, main_cpu_s=time.thread_time() - c0,
                fast_peak_bytes=meter.peak_bytes, interval=stats.interval,
                recompute_steps=stats.recompute_steps, stall_s=stats.stall_s)


def setup(cfg: BenchConfig, n: int):
    """(step, h0 (batch, hidden) requiring grad, xs (n, batch, inputs)) from ``cfg.seed``, on
    ``cfg.device`` (drawn on the CPU, then moved: the same numbers on every device)."""
    g, device = torch.Generator().manual_seed(cfg.seed), device_of(cfg.device)
    step, _ = WORKLOADS[cfg.workload](cfg)
    h0 = torch.randn(cfg.batch, cfg.hidden, generator=g).to(device).requires_grad_()
    xs = torch.randn(n, cfg.batch, cfg.inputs, generator=g).to(device)
    return step, h0, xs


def tape_model(cfg: BenchConfig, k: int = 4) -> tuple[float, float]:
    """(offset, bytes per step) of store_all's fast-tier peak, from runs of k and 2k steps."""
    peaks = []
    for n in (k, 2 * k):
        step, h0, xs = setup(cfg, n)
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


def _intervals(h0, t_f: float, ratio: float) -> tuple[float, dict]:
    """Throttle delay for a transfer/compute ratio, and I = ceil(T_w / t_f) per tier (measured)."""
    delay = ratio * t_f
    state = (h0.detach(),)
    return delay, {tier: sch.choose_interval(t_f, transfer_time(tier, state, delay))
                   for tier in TIERS}


def _timed(cfg: BenchConfig, name: str, n: int, *, slots: int, interval: int,
           delay_s: float) -> tuple[dict, int]:
    """run_once ``repeats`` times for N <= repeat_max_n (median time, max peak), else once."""
    reps = max(1, cfg.repeats) if n <= cfg.repeat_max_n else 1
    results = []
    for _ in range(reps):
        step, h0, xs = setup(cfg, n)
        results.append(run_once(name, step, h0, xs, slots=slots, interval=interval,
                                delay_s=delay_s))
    res = dict(results[0])
    for key in ("time_s", "stall_s", "main_cpu_s"):
        res[key] = statistics.median(r[key] for r in results)
    res["fast_peak_bytes"] = max(r["fast_peak_bytes"] for r in results)
    return res, reps


def sweep_n(cfg: BenchConfig, t_f: float, t_b: float, parts: Parts | None = None) -> pd.DataFrame:
    """Time and fast-tier peak vs N for each strategy at the configured transfer/compute ratio."""
    step, h0, xs = setup(cfg, 1)
    delay, inter = _intervals(h0, t_f, cfg.ratio)
    tape = tape_model(cfg)
    for name in cfg.strategies:  # warm-up: first calls of each code path are slow
        run_once(name, step, h0, xs.expand(20, -1, -1), slots=cfg.slots, delay_s=0.0,
                 interval=inter.get(name.rsplit("_", 1)[-1], 1))
    order = [(n, name) for n in cfg.ns for name in cfg.strategies]
    parts = parts or Parts(None, cfg)
    rows, done = parts.kept("vs_n")
    for n, name in tqdm([j for j in order if j not in done], desc="checkpoint vs N", leave=False,
                        disable=not cfg.progress):
        slots = cfg.slots + (cfg.revolve_extra_slots if name == "revolve" else 0)
        est = estimated_peak_mib(name, n, tape)
        if name in GROWING and est > cfg.store_all_max_mib:
            why = (f"estimated fast peak {est:.4g} MiB > store_all_max_mib "
                   f"{cfg.store_all_max_mib:.4g}")
            rows.append(tables.row(cfg.workload, name, n, slots, cfg.ratio, tables.NAN_RESULT,
                                   t_f, t_b, repeats=0, skipped=why))
        else:
            res, reps = _timed(cfg, name, n, slots=slots, delay_s=delay,
                               interval=inter.get(name.rsplit("_", 1)[-1], 1))
            rows.append(tables.row(cfg.workload, name, n, slots, cfg.ratio, res, t_f, t_b,
                                   repeats=reps))
        parts.append("vs_n", rows[-1:])
    rows.sort(key=lambda r: order.index((r["n_steps"], r["strategy"])))
    return tables.add_vs_store_all(pd.DataFrame(rows, columns=COLUMNS))


def sweep_ratio(cfg: BenchConfig, t_f: float, t_b: float,
                parts: Parts | None = None) -> pd.DataFrame:
    """Multistage (host tier) time vs transfer/compute ratio at N = ratio_n, beside Revolve."""
    n = cfg.ratio_n
    parts = parts or Parts(None, cfg)
    rows, done = parts.kept("vs_ratio")
    pairs = {r for r in cfg.ratios if {(r, "multistage_host"), (r, "revolve")} <= done}
    rows = [r for r in rows if r["ratio"] in pairs]  # a ratio counts with both of its rows
    todo = [r for r in cfg.ratios if r not in pairs]
    if not todo:
        return pd.DataFrame(rows, columns=COLUMNS)
    step, h0, xs = setup(cfg, n)
    slots = cfg.slots + cfg.revolve_extra_slots
    res, reps = _timed(cfg, "revolve", n, slots=slots, interval=n, delay_s=0.0)
    for ratio in tqdm(todo, desc="checkpoint vs ratio", leave=False, disable=not cfg.progress):
        delay, inter = _intervals(h0, t_f, ratio)
        ms, ms_reps = _timed(cfg, "multistage_host", n, slots=cfg.slots, interval=inter["host"],
                             delay_s=delay)
        rows.append(tables.row(cfg.workload, "multistage_host", n, cfg.slots, ratio, ms, t_f,
                               t_b, repeats=ms_reps))
        rows.append(tables.row(cfg.workload, "revolve", n, slots, ratio, res, t_f, t_b,
                               repeats=reps))
        parts.append("vs_ratio", rows[-2:])
    rows.sort(key=lambda r: cfg.ratios.index(r["ratio"]))  # stable: multistage, then revolve
    return pd.DataFrame(rows, columns=COLUMNS)


def wave_memory(cfg: BenchConfig, parts: Parts | None = None) -> pd.DataFrame:
    """2-D wave stepper: store-all's tape exceeds the stated budget; Revolve/multistage fit."""
    device = device_of(cfg.device)
    wave = WaveStepper(cfg.wave_grid, seed=cfg.seed).to(device)
    src = WaveStepper.source(cfg.wave_n).to(device)
    parts = parts or Parts(None, cfg)
    rows, done = parts.kept("wave")
    for name in tqdm([s for s in WAVE_STRATEGIES if (s,) not in done], desc="wave", leave=False,
                     disable=not cfg.progress):
        meter, stats = MemoryMeter(), ScanStats()
        strategy = "multistage" if name == "multistage_host" else name
        wave.zero_grad()
        sync(device)
        t0 = time.perf_counter()
        with meter.track_saved():
            ys, _ = checkpointed_scan(wave.step, wave.initial_state(), src, strategy=strategy,
                                      slots=cfg.slots, interval=max(2, cfg.wave_n // 50),
                                      meter=meter, stats=stats)
            ys.pow(2).mean().backward()
        sync(device)
        rows.append(dict(workload="wave2d", strategy=name, n_steps=cfg.wave_n, grid=cfg.wave_grid,
                         time_s=time.perf_counter() - t0, fast_peak_mib=meter.peak_bytes / 2**20,
                         budget_mib=cfg.budget_mib,
                         within_budget=meter.peak_bytes / 2**20 <= cfg.budget_mib,
                         grad_norm=float(wave.c.grad.norm())))
        parts.append("wave", rows[-1:])
    rows.sort(key=lambda r: WAVE_STRATEGIES.index(r["strategy"]))
    return pd.DataFrame(rows)


def prepare(cfg: BenchConfig):
    """Everything checked before ``out`` changes (NOTE [resume]): a resumed run's config,
    calibration and kept rows, the folder's writability, the workload (one step and its
    calibration inputs) and both slow tiers (one state stored and read back).
    Returns (step, params, h0, xs, calibration (t_f, t_b) or None, Parts)."""
    out = Path(cfg.out)
    source = vio.resume_source(out, files=FILES, name=STAGE)  # an interrupted run's, or out
    saved = source / "parts" / "calibration.json"
    old = vio.read_json(saved) if cfg.resume and saved.is_file() else None
    if old is not None:
        kept = old.get("config") if isinstance(old.get("config"), dict) else {}
        vio.refuse_changed(source / "parts", {k: kept.get(k) for k in asdict(cfg)}, asdict(cfg),
                           NOT_COMPARED)
        if not all(isinstance(old.get(k), (int, float)) and old[k] > 0 for k in ("t_f", "t_b")):
            raise VarstudyError(f"{saved} holds no calibration (t_f, t_b > 0); valid choices: "
                                "rerun without --resume (start over), or another --out")
    parts = Parts(source / "parts", cfg, resume=old is not None)  # run() moves it to the stage
    vio.check_writable(out)
    step, params = WORKLOADS[cfg.workload](cfg)  # calibrate needs the parameters it closes over
    _, h0, xs = setup(cfg, 1)
    with torch.no_grad():
        step(h0, xs[0])
    for tier in TIERS:
        transfer_time(tier, (h0.detach(),), 0.0, reps=1)
    WaveStepper(cfg.wave_grid, seed=cfg.seed)
    return step, params, h0, xs, (None if old is None else (old["t_f"], old["t_b"])), parts


def run(cfg: BenchConfig):
    """Run the benchmark into ``cfg.out`` (module docstring of :mod:`varstudy.bench.checkpoint`);
    returns (vs_n, vs_ratio, wave, summary, env) for :func:`~varstudy.bench.checkpoint_tables.report`."""
    step, params, h0, xs, calibration, parts = prepare(cfg)
    resumed = calibration is not None
    with vio.output_lock(cfg.out, ".checkpoint.lock"), \
            vio.staged(cfg.out, resume=resumed, files=FILES, name=STAGE) as out:
        parts.folder = out / "parts"  # NOTE [one run per folder], [staged results] (io)
        vio.atomic_write_json(out / "config.json",
                              {cli.COMMAND_KEY: cli.command_name(BenchConfig), **asdict(cfg)})
        run_once("multistage_host", step, h0, xs.expand(50, -1, -1), slots=cfg.slots, interval=5,
                 delay_s=0.0)  # warm-up
        if calibration is None:
            calibration = calibrate(step, h0.detach(), xs[0], params)
            vio.atomic_write_json(parts.folder / "calibration.json", dict(
                config=asdict(cfg), t_f=calibration[0], t_b=calibration[1]))
        t_f, t_b = calibration
        t0 = time.perf_counter()
        vs_n = sweep_n(cfg, t_f, t_b, parts)
        t1 = time.perf_counter()
        vs_ratio = sweep_ratio(cfg, t_f, t_b, parts)
        t2 = time.perf_counter()
        wave = wave_memory(cfg, parts)
        t3 = time.perf_counter()
        summary = tables.summarize(vs_n)
        device = device_of(cfg.device)
        env = dict(torch=torch.__version__, python=platform.python_version(),
                   device=str(device), device_name=torch.cuda.get_device_name(device)
                   if device.type == "cuda" else platform.processor() or platform.machine(),
                   machine=platform.machine(), cpu_count=os.cpu_count(),
                   torch_threads=torch.get_num_threads(), t_f_ms=1e3 * t_f, t_b_ms=1e3 * t_b,
                   resumed=resumed, wall_s=t3 - t0, wall_vs_n_s=t1 - t0,
                   wall_vs_ratio_s=t2 - t1, wall_wave_s=t3 - t2)
        for name, df in (("vs_n", vs_n), ("vs_ratio", vs_ratio), ("wave", wave),
                         ("summary", summary)):
            vio.atomic_write_csv(out / f"{name}.csv", df)
        vio.atomic_write_json(out / "env.json", env)  # last: marks a complete run
        shutil.rmtree(parts.folder, ignore_errors=True)
    return vs_n, vs_ratio, wave, summary, env
