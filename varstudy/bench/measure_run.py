"""The measure benchmark's run (heavy part of :mod:`varstudy.bench.measure`)."""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from scipy.stats import norm

from varstudy import io as vio
from varstudy.errors import VarstudyError
from varstudy.randomized.capture import mean_loss, select_layers
from varstudy.randomized.layers import derandomize, randomize, reseed
from varstudy.io import env_info
from varstudy.measure import MeasureConfig, batch_indices, measure_batch, prepare
from varstudy.bench.measure import BenchConfig


def timed(fn) -> float:
    """Seconds that ``fn()`` takes, synchronizing CUDA around it when present."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def setup(cfg: BenchConfig):
    """(measure config, model, encoded data, population): a bad model or data fails here."""
    mcfg = MeasureConfig(model=cfg.model, dataset=cfg.dataset, batch_size=cfg.batch_size,
                         max_length=cfg.max_length, mc_draws=0, seed=cfg.seed,
                         device=cfg.device, progress=False).resolved()
    return (mcfg, *prepare(mcfg))


def bench(cfg: BenchConfig, parts: Path | None = None, loaded=None) -> pd.DataFrame:
    """Run the three measurements; return the tidy (quantity, value, unit) table.
    ``loaded``: what :func:`setup` returns (loaded here when None)."""
    mcfg, model, encoded, population = loaded or setup(cfg)
    names = select_layers(model)
    batch = {k: v[batch_indices(len(encoded["labels"]), mcfg, 0, 0)].to(mcfg.device)
             for k, v in encoded.items()}
    weights = [model.get_submodule(n).weight for n in names]
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the model stays put

    def step():
        mean_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def decomposition():
        measure_batch(model, encoded, mcfg, names, set(), 0, 0, population)

    exact = torch.autograd.grad(mean_loss(model, batch), weights)
    per_round = math.ceil(cfg.naive_draws / cfg.repeats)
    rows = kept_rounds(parts, cfg)
    done = {r[0] for r in rows}
    for i in range(cfg.repeats + 1):  # round 0 is warm-up; rounds interleave all costs
        if i in done:
            continue
        a, b = timed(step), timed(decomposition)
        c = timed(lambda: torch.autograd.grad(mean_loss(model, batch), weights))
        times, sq = naive_draws(model, batch, weights, exact, cfg, i * per_round,
                                per_round if i else 1)
        if i:
            new = [(i, "step", a), (i, "decomposition", b), (i, "exact_grad", c)] + \
                [(i, "naive_draw", t) for t in times] + [(i, "naive_err", e) for e in sq]
            rows += new
            if parts is not None:
                vio.append_csv(parts, pd.DataFrame(new, columns=["round", "kind", "value"]))
    rows.sort(key=lambda r: r[0])
    of = {k: [v for _, kind, v in rows if kind == k] for k in
          ("step", "decomposition", "exact_grad", "naive_draw", "naive_err")}
    med = statistics.median
    return table(cfg, mcfg, med(of["step"]), med(of["decomposition"]), med(of["exact_grad"]),
                 med(of["naive_draw"]), of["naive_err"])


KINDS = ("step", "decomposition", "exact_grad", "naive_draw", "naive_err")


def kept_rounds(parts: Path | None, cfg: BenchConfig) -> list[tuple]:
    """The (round, kind, value) rows of rounds 1..repeats an interrupted run appended to
    ``parts``; a file that is not that table is one line (it cannot be resumed)."""
    bad = "valid choices: rerun without --resume (start over), or another --out"
    try:
        kept = vio.read_chunk(parts) if parts is not None else None
    except ValueError as err:  # not UTF-8, not CSV (pandas' errors are ValueErrors)
        raise VarstudyError(f"{parts} is damaged ({' '.join(str(err).split())[:120]}); {bad}") \
            from None
    if kept is None:
        return []
    if list(kept.columns) != ["round", "kind", "value"] or not (
            pd.api.types.is_integer_dtype(kept["round"])
            and pd.api.types.is_numeric_dtype(kept["value"])):
        raise VarstudyError(f"{parts} is not a table of (round, kind, value) rows with integer "
                            f"rounds and numeric values; {bad}")
    return [r for r in kept.itertuples(index=False, name=None)
            if 1 <= r[0] <= cfg.repeats and r[1] in KINDS]


def naive_draws(model, batch, weights, exact, cfg: BenchConfig, first: int, count: int):
    """``count`` forward + backward passes of the randomized model (draws first..): times and
    model-total ‖ĝ − g‖²."""
    randomize(model, cfg.naive_ratio, cfg.naive_family, seed=cfg.seed)
    times, errs = [], []
    try:
        for d in range(first, first + count):
            reseed(model, 1000 + d)
            grads = []
            times.append(timed(lambda: grads.extend(
                torch.autograd.grad(mean_loss(model, batch), weights))))
            errs.append(sum(float((g.double() - e.double()).square().sum())
                            for g, e in zip(grads, exact)))
    finally:
        derandomize(model)
    return times, errs


def table(cfg, mcfg, t_step, t_dec, t_exact, t_draw, errs) -> pd.DataFrame:
    """The benchmark's one-row table: decomposition cost against an exact step and against naive
    Monte Carlo at the requested relative CI half-width."""
    mean, sd = statistics.fmean(errs), statistics.stdev(errs)
    cv = sd / mean
    z = norm.isf((1 - cfg.level) / 2)
    draws = math.ceil((z * cv / cfg.half_width) ** 2)
    grid = len(mcfg.families) * len(mcfg.ratios)
    naive_one = t_exact + draws * t_draw
    naive_grid = t_exact + grid * draws * t_draw
    rows = [
        ("step_time", t_step, "s"), ("decomposition_time", t_dec, "s"),
        ("decomposition_over_step", t_dec / t_step, "x"),
        ("exact_grad_time", t_exact, "s"), ("naive_draw_time", t_draw, "s"),
        ("naive_cv", cv, "1"), ("naive_var_sketch_mc", mean, "grad^2"),
        ("naive_draws_needed", draws, "draws"), ("naive_time_one_config", naive_one, "s"),
        ("grid_configs", grid, "configs"), ("naive_time_grid", naive_grid, "s"),
        ("speedup_vs_naive_one_config", naive_one / t_dec, "x"),
        ("speedup_vs_naive_grid", naive_grid / t_dec, "x"),
        ("target_decomposition_over_step_max", 3.0, "x"),
        ("target_speedup_vs_naive_min", 30.0, "x"),
        ("load_average_1min", os.getloadavg()[0], "procs"),
    ]
    return pd.DataFrame(rows, columns=["quantity", "value", "unit"])


PARTS = ("measure.parts.csv", "measure.parts.json")  # the run's state: never published
FILES = (*PARTS, "measure.csv", "measure.json")
STAGE = "bench-measure"  # <out>/.bench-measure.staging/ (NOTE [staged results] in varstudy.io)


def execute(cfg: BenchConfig) -> int:
    """The benchmark: load, lock, run into the staging folder, publish the tables (module
    docstring of bench.measure)."""
    out = vio.check_writable(cfg.out)
    marker = vio.resume_source(out, files=FILES, name=STAGE) / PARTS[1]
    resuming = cfg.resume and marker.is_file()
    if resuming:
        vio.refuse_changed(marker, vio.read_json(marker), asdict(cfg), ("out", "resume"))
    loaded = setup(cfg)  # before the folder changes: a bad --model leaves it as it was
    with vio.output_lock(out, ".measure.lock"), \
            vio.staged(out, resume=resuming, files=FILES, name=STAGE) as stage:
        parts, marker = stage / PARTS[0], stage / PARTS[1]  # NOTE [one run per folder] (io)
        if not resuming:
            vio.atomic_write_json(marker, asdict(cfg))
        result = bench(cfg, parts, loaded)
        vio.atomic_write_csv(stage / "measure.csv", result)
        env = env_info(MeasureConfig(device=cfg.device).resolved().device)
        vio.atomic_write_json(stage / "measure.json", dict(config=asdict(cfg), env=env))
        vio.remove(parts, marker)
    print(result.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0

