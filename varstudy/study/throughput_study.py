"""``study throughput``: interleaved timing of whole training steps, then the largest batch
under a memory budget (the ``throughput`` item of :mod:`varstudy.study`)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from varstudy import io as vio
from varstudy.study.config import (KEYS, StudyConfig, check_memory_from, grid, memory_rows,
                                   write_config)
from varstudy.study.inputs import convert, model_and_batches


def throughput(config: StudyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Interleaved timing of full training steps, then the memory fit; returns both tables."""
    from varstudy.finetune.training import threads
    from varstudy.models import resolve_device
    from varstudy.study.memory_study import memory

    if config.memory_from:  # before the timing, which takes minutes
        check_memory_from(config)
    device = resolve_device(config.device)
    with threads(config.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        times = _time_steps(config, device)
    table = _throughput_table(config, times, device)
    table["load_avg_1m"] = _load_average()
    mem = (memory_rows(config, pd.read_csv(config.memory_from)) if config.memory_from
           else memory(config, write=False))
    fit = max_batch(mem, config.budget_mib)
    with vio.staged(Path(config.out) / "throughput") as folder:  # NOTE [staged results]
        write_config(config, "throughput", folder)
        vio.atomic_write_csv(folder / "throughput.csv", table)
        vio.atomic_write_csv(folder / "max_batch.csv", fit)
    return table, fit


def _load_average() -> float:
    """1-minute load average at the end of timing (NaN where unsupported): context for noise."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return math.nan


def _time_steps(config: StudyConfig, device: str) -> dict[tuple[str, float], list[float]]:
    """Seconds per training step: warm-up per config, then one step per config per repeat, in a
    fresh seeded random order each repeat (NOTE: interleaving spreads load drift evenly)."""
    from varstudy.progress import tqdm

    from varstudy.finetune.training import synchronize

    model, batches = model_and_batches(config, device, [config.batch_size])
    batch = batches[config.batch_size]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    configs = grid(config)
    times: dict[tuple[str, float], list[float]] = {c: [] for c in configs}

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    for family, ratio in configs:
        convert(model, family, ratio)
        for _ in range(config.warmup_steps):
            step()
    rng = np.random.default_rng(0)
    for _ in tqdm(range(config.repeats), desc="throughput", disable=not config.progress):
        for i in rng.permutation(len(configs)):
            convert(model, *configs[i])
            times[configs[i]].append(step())
    return times


def _throughput_table(config: StudyConfig, times: dict, device: str) -> pd.DataFrame:
    exact = np.asarray(times[("exact", 1.0)])
    rows = []
    for (family, ratio), seconds in times.items():
        seconds = np.asarray(seconds)
        rows.append(dict(task=config.task, model=config.model, family=family, ratio=ratio,
                         batch_size=config.batch_size, seq_len=config.max_length,
                         repeats=len(seconds), step_ms=1e3 * float(np.median(seconds)),
                         step_ms_min=1e3 * float(seconds.min()),
                         examples_per_s=config.batch_size / float(np.median(seconds)),
                         speedup_vs_exact=float(np.median(exact / seconds)), device=device))
    return pd.DataFrame(rows)


def max_batch(memory_table: pd.DataFrame, budget_mib: float) -> pd.DataFrame:
    """Least-squares line MiB = intercept + slope·B per (family, ratio); B_max under the budget.

    The basis is the CUDA peak when measured (GPU), else the saved-for-backward bytes.
    """
    cuda = memory_table.peak_cuda_mib.notna().all()
    basis = "peak_cuda_mib" if cuda else "saved_mib"
    rows = []
    for (task, model, family, ratio), part in memory_table.groupby(KEYS, sort=False):
        slope, intercept = np.polyfit(part.batch_size, part[basis], 1)
        fitted = intercept + slope * part.batch_size
        fit_err = float(np.max(np.abs(fitted - part[basis]) / part[basis]))
        fits = int(max(0, math.floor((budget_mib - intercept) / slope + 1e-9)))
        rows.append(dict(task=task, model=model, family=family, ratio=ratio,
                         seq_len=int(part.seq_len.iloc[0]), basis=basis,
                         slope_mib_per_example=slope, intercept_mib=intercept,
                         fit_max_rel_err=fit_err, budget_mib=budget_mib, max_batch=fits))
    table = pd.DataFrame(rows)
    exact = table.loc[table.family == "exact", "max_batch"].iloc[0]
    table["max_batch_vs_exact"] = table.max_batch / exact if exact else math.nan
    return table
