"""``python -m varstudy.bench checkpoint``: memory and time of exact backprop through long scans.

Strategies (registry ``STRATEGIES``): store_all (plain autograd), torch_checkpoint
(torch.utils.checkpoint over ceil(sqrt N)-step segments, reentrant so its saved inputs are counted),
revolve (Revolve over all N in fast memory, s + ``revolve_extra_slots`` slots = the same fast budget
as multistage, which also holds one prefetched state and one write in flight), multistage_host and
multistage_disk (asynchronous two-level plan, interval I = ceil(T_w / t_f) from measured times).

Step: a tanh RNN cell (cheap, so N = 10,000 runs in seconds on a CPU). The transfer time is set with
an ARTIFICIAL THROTTLE (``transfer_delay_s`` = ratio * t_f slept by the tier's worker per transfer),
so the compute/transfer ratio can be swept. Fast-tier bytes = autograd saved tensors (re-tapes
included) + checkpoint states held in device memory, counted by ``MemoryMeter``.

Outputs under ``--out`` (default results/checkpoint/): vs_n.csv, vs_ratio.csv, wave.csv, config.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from varstudy import schedules as sch
from varstudy.errors import VarstudyError
from varstudy.sequence import ScanStats, checkpointed_scan
from varstudy.storage import MemoryMeter, make_tier
from varstudy.workloads import WaveStepper, tanh_rnn

STRATEGIES = ("store_all", "torch_checkpoint", "revolve", "multistage_host", "multistage_disk")
COLUMNS = ["workload", "strategy", "n_steps", "slots", "interval", "ratio", "time_s",
           "time_per_step_ms", "cost_fwd_units", "model_cost_fwd_units", "fast_peak_bytes",
           "fast_peak_mib", "recompute_steps", "stall_s"]


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
    batch: int = 64
    hidden: int = 256
    inputs: int = 32
    wave_n: int = 2000
    wave_grid: int = 96
    budget_mib: float = 64.0  # stated fast-memory budget for the wave workload
    threads: int = 1
    seed: int = 0
    out: str = "results/checkpoint"


PRESETS = {  # short diffs against the defaults
    "default": {},
    "smoke": dict(ns=(20, 60), ratios=(1.0, 3.0), ratio_n=40, batch=4, hidden=16, inputs=4,
                  wave_n=30, wave_grid=12, budget_mib=0.05),
    "long": dict(ns=(100, 1000, 10000, 30000), strategies=("store_all", "multistage_host")),
}


def calibrate(step, h0, x, reps: int = 200) -> tuple[float, float]:
    """(t_f, t_b) in seconds: median untaped step, median re-tape + adjoint of one step."""
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
        torch.autograd.grad([new, y], [h], [torch.ones_like(new), torch.ones_like(y)])
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
    """One forward + backward; returns time_s, fast_peak_bytes, interval, recompute_steps, stall_s."""
    meter, stats = MemoryMeter(), ScanStats()
    kw = dict(meter=meter, stats=stats, preserve_rng=False, timeout_s=60)
    t0 = time.perf_counter()
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
    return dict(time_s=time.perf_counter() - t0, fast_peak_bytes=meter.peak_bytes,
                interval=stats.interval, recompute_steps=stats.recompute_steps,
                stall_s=stats.stall_s)


def _row(workload, name, n, slots, ratio, res, t_f, t_b) -> dict:
    strategy = {"multistage_host": "multistage", "multistage_disk": "multistage"}.get(name, name)
    interval = res["interval"] or n
    model = (sch.model_cost_per_step(strategy, n, slots, interval, t_b / t_f)
             if strategy in ("revolve", "multistage") else float("nan"))
    per_step = res["time_s"] / n
    return dict(workload=workload, strategy=name, n_steps=n, slots=slots,
                interval=res["interval"], ratio=ratio, time_s=res["time_s"],
                time_per_step_ms=1e3 * per_step, cost_fwd_units=per_step / t_f,
                model_cost_fwd_units=model, fast_peak_bytes=res["fast_peak_bytes"],
                fast_peak_mib=res["fast_peak_bytes"] / 2**20, recompute_steps=res["recompute_steps"],
                stall_s=res["stall_s"])


def _setup(cfg: BenchConfig, n: int):
    g = torch.Generator().manual_seed(cfg.seed)
    step, _ = tanh_rnn(cfg.hidden, cfg.inputs, seed=cfg.seed)
    h0 = torch.randn(cfg.batch, cfg.hidden, generator=g).requires_grad_()
    xs = torch.randn(n, cfg.batch, cfg.inputs, generator=g)
    return step, h0, xs


def _intervals(cfg: BenchConfig, h0, t_f: float, ratio: float) -> tuple[float, dict]:
    """Throttle delay for a transfer/compute ratio, and I = ceil(T_w / t_f) per tier (measured)."""
    delay = ratio * t_f
    state = (h0.detach(),)
    return delay, {tier: sch.choose_interval(t_f, transfer_time(tier, state, delay))
                   for tier in ("host", "disk")}


def sweep_n(cfg: BenchConfig, t_f: float, t_b: float) -> pd.DataFrame:
    """Time and fast-tier peak vs N for each strategy at the configured transfer/compute ratio."""
    step, h0, _ = _setup(cfg, 1)
    delay, inter = _intervals(cfg, h0, t_f, cfg.ratio)
    rows = []
    jobs = [(n, name) for n in cfg.ns for name in cfg.strategies]
    for n, name in tqdm(jobs, desc="checkpoint vs N", leave=False):
        step, h0, xs = _setup(cfg, n)
        slots = cfg.slots + (cfg.revolve_extra_slots if name == "revolve" else 0)
        res = run_once(name, step, h0, xs, slots=slots, delay_s=delay,
                       interval=inter.get(name.rsplit("_", 1)[-1], 1))
        rows.append(_row("tanh_rnn", name, n, slots, cfg.ratio, res, t_f, t_b))
    return pd.DataFrame(rows, columns=COLUMNS)


def sweep_ratio(cfg: BenchConfig, t_f: float, t_b: float) -> pd.DataFrame:
    """Multistage (host tier) time vs transfer/compute ratio at N = ratio_n, beside Revolve."""
    n, rows = cfg.ratio_n, []
    step, h0, xs = _setup(cfg, n)
    slots = cfg.slots + cfg.revolve_extra_slots
    res = run_once("revolve", step, h0, xs, slots=slots, interval=n, delay_s=0.0)
    for ratio in tqdm(cfg.ratios, desc="checkpoint vs ratio", leave=False):
        delay, inter = _intervals(cfg, h0, t_f, ratio)
        ms = run_once("multistage_host", step, h0, xs, slots=cfg.slots, interval=inter["host"],
                      delay_s=delay)
        rows.append(_row("tanh_rnn", "multistage_host", n, cfg.slots, ratio, ms, t_f, t_b))
        rows.append(_row("tanh_rnn", "revolve", n, slots, ratio, res, t_f, t_b))
    return pd.DataFrame(rows, columns=COLUMNS)


def wave_memory(cfg: BenchConfig) -> pd.DataFrame:
    """2-D wave stepper: store-all's tape exceeds the stated budget; Revolve/multistage fit."""
    wave = WaveStepper(cfg.wave_grid, seed=cfg.seed)
    src = WaveStepper.source(cfg.wave_n)
    rows = []
    for name in tqdm(("store_all", "revolve", "multistage_host"), desc="wave", leave=False):
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
    return pd.DataFrame(rows)


def _parse(argv) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m varstudy.bench checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--ns", type=int, nargs="+")
    p.add_argument("--ratios", type=float, nargs="+")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES)
    p.add_argument("--slots", type=int)
    p.add_argument("--ratio", type=float)
    p.add_argument("--out")
    a = p.parse_args(argv)
    over = dict(PRESETS[a.preset])
    for key in ("ns", "ratios", "strategies", "slots", "ratio", "out"):
        val = getattr(a, key)
        if val is not None:
            over[key] = tuple(val) if isinstance(val, list) else val
    return BenchConfig(**over)


def main(argv: list[str] | None = None) -> int:
    cfg = _parse(argv or [])
    torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    step, h0, xs = _setup(cfg, 1)
    run_once("multistage_host", step, h0, xs.expand(50, -1, -1), slots=cfg.slots, interval=5,
             delay_s=0.0)  # warm-up
    t_f, t_b = calibrate(step, h0.detach(), xs[0])
    t0 = time.perf_counter()
    vs_n, vs_ratio, wave = sweep_n(cfg, t_f, t_b), sweep_ratio(cfg, t_f, t_b), wave_memory(cfg)
    meta = dict(config=dataclasses.asdict(cfg), t_f_ms=1e3 * t_f, t_b_ms=1e3 * t_b,
                torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count(),
                wall_s=time.perf_counter() - t0)
    for name, df in (("vs_n", vs_n), ("vs_ratio", vs_ratio), ("wave", wave)):
        df.to_csv(os.path.join(cfg.out, f"{name}.csv"), index=False)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)
    _summary(vs_n, vs_ratio, wave, meta)
    return 0


def _summary(vs_n, vs_ratio, wave, meta) -> None:
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    print(f"t_f = {meta['t_f_ms']:.3f} ms, t_b = {meta['t_b_ms']:.3f} ms, wall {meta['wall_s']:.0f} s")
    cols = ["time_per_step_ms", "cost_fwd_units", "model_cost_fwd_units", "fast_peak_bytes"]
    print(vs_n.pivot_table(index="n_steps", columns="strategy", values=cols[1]).round(2))
    print(vs_n.pivot_table(index="n_steps", columns="strategy", values=cols[3]).astype(int))
    print(vs_ratio[["strategy", "ratio", "interval"] + cols[:3]].round(3).to_string(index=False))
    print(wave.to_string(index=False))
