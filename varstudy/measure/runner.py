"""A measurement run: load, lock the output folder, train between measured steps, measure the
missing batches, assemble the tables (NOTE [durable results / resume] in
:mod:`varstudy.measure`)."""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

from varstudy import cli
from varstudy import distributed as dist
from varstudy import io as vio
from varstudy.data import load_dataset
from varstudy.batching import encode, pad_batches
from varstudy.errors import VarstudyError
from varstudy.measure.chunks import finished_rows
from varstudy.measure.config import (LAYER_COLUMNS, NOT_COMPARED, TRAIN_BATCH, MeasureConfig)
from varstudy.measure.engine import (_seeded_rng, batch_indices, informed_for, measure_batch,
                                     typed)
from varstudy.measure.informed import wanted
from varstudy.randomized.support import first_token_layers
from varstudy.measure.tables import scope_summary, summarize
from varstudy.models import load_model
from varstudy.randomized.capture import mean_loss, select_layers
from varstudy.randomized.layers import derandomize, derive_seed, randomize

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
FINAL = ("layers.csv", "summary.csv", "scopes.csv", "env.json")
STAGE = "measure"  # <out>/.measure.staging/ (NOTE [staged results] in varstudy.io)
STATE = "state/train.pt"


def entries(out: Path, cfg: MeasureConfig) -> list[str]:
    """The names a run owns in ``out``, published in this order (env.json, the mark of a
    complete run, last): the step chunks (the configured ones and any older ones, which a run
    that no longer makes them removes), the training state, config.json and the tables."""
    steps = {f"chunks/step_{s:06d}.csv" for s in cfg.measure_at}
    old = {f"chunks/{p.name}" for p in (out / "chunks").glob("step_*.csv")} \
        if (out / "chunks").is_dir() else set()
    return sorted(steps | old) + [STATE, "config.json", *FINAL]


def train(model, optimizer, encoded: dict, cfg: MeasureConfig, start: int, stop: int) -> None:
    """Optimizer updates start..stop−1 (exact, or randomized with train_sketch/train_ratio).

    Non-finite losses are accumulated on the device (no per-step host sync) and reported once
    at the end, with the first module holding a non-finite weight.
    """
    if stop <= start:
        return
    if cfg.train_sketch:
        randomize(model, cfg.train_ratio, cfg.train_sketch, min_rows=cfg.min_rows,
                  seed=derive_seed(cfg.seed, start, TRAIN_BATCH, 2))
    finite = torch.ones((), dtype=torch.bool, device=cfg.device)
    try:
        from varstudy.progress import tqdm
        with _seeded_rng(cfg, derive_seed(cfg.seed, start, TRAIN_BATCH, 3)):
            for step in tqdm(range(start, stop), desc="train", disable=not cfg.progress,
                             leave=False):
                idx = batch_indices(len(encoded["labels"]), cfg, step, TRAIN_BATCH)
                batch = next(iter(pad_batches(iter([{k: v[idx] for k, v in encoded.items()}]),
                                              cfg.padding)))
                loss = mean_loss(model, {k: v.to(cfg.device) for k, v in batch.items()})
                finite &= torch.isfinite(loss.detach())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        derandomize(model)
    if not bool(finite):
        bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()),
                   "(weights finite)")
        raise VarstudyError(f"non-finite loss (NaN/Inf) while training steps {start}..{stop - 1}; "
                            f"first non-finite weight: {bad}; valid choices: a lower --lr, "
                            "--dtype float32 or float64")


def prepare(cfg: MeasureConfig):
    """(model, encoded dataset, population N) for a resolved config."""
    data = load_dataset(cfg.dataset, cfg.split, seed=cfg.seed, data_dir=cfg.data_dir)
    model, tokenizer = load_model(cfg.model, num_labels=data.num_labels, dropout=cfg.dropout,
                                  seed=cfg.seed, dtype=DTYPES[cfg.dtype], device=cfg.device)
    encoded = encode(data, tokenizer, cfg.max_length)
    if cfg.batch_size > len(data):
        raise VarstudyError(f"batch_size {cfg.batch_size} exceeds the {len(data)} examples of "
                            f"{cfg.dataset}/{cfg.split}; valid: 2 <= batch_size <= {len(data)}")
    return model, encoded, (float(len(data)) if cfg.fpc else math.inf)


def cache_model(cfg: MeasureConfig, model, names: list[str]):
    """The model of ``--wtacrs-cache-model`` (None without one), loaded as the measured one;
    refused unless its selected linear layers are the measured model's (NOTE [wta-crs in a
    measurement] in varstudy.measure.informed)."""
    if cfg.wtacrs_cache_model is None:
        return None
    other, _ = load_model(cfg.wtacrs_cache_model, num_labels=model.config.num_labels,
                          dropout=cfg.dropout, seed=cfg.seed, dtype=DTYPES[cfg.dtype],
                          device=cfg.device)
    theirs = select_layers(other, cfg.layers)
    if theirs != names:
        raise VarstudyError(f"wtacrs_cache_model {cfg.wtacrs_cache_model!r} has other linear "
                            f"layers ({len(theirs)} selected) than the measured model "
                            f"{cfg.model!r} ({len(names)}); valid choices: an earlier "
                            "checkpoint of the measured model")
    return other


def run(config: MeasureConfig | None = None) -> pd.DataFrame:
    """Measure, write ``config.out`` (module docstring) and return the layers.csv DataFrame.

    Under ``torchrun`` (:mod:`varstudy.distributed`) rank r measures batches r, r + world, ...;
    rank 0 gathers the rows, writes the same files a single process writes and returns the
    table; the other ranks return an empty frame with the same columns. ``resume`` continues
    an interrupted run in ``out`` (NOTE [durable results / resume]).
    """
    cfg = (config or MeasureConfig()).resolved()
    ctx, device = dist.setup(cfg.device)
    started = time.perf_counter()
    out = Path(cfg.out)
    source = vio.resume_source(out, files=FINAL, name=STAGE)  # an interrupted run, or out
    resuming = cfg.resume and (source / "config.json").is_file()
    if resuming:
        old = cli.config_options(vio.read_json(source / "config.json"), MeasureConfig,
                                 f"--resume {source / 'config.json'}")
        vio.refuse_changed(source, {k: old.get(k) for k in asdict(cfg)}, asdict(cfg),
                           NOT_COMPARED)
    if ctx.is_main:
        vio.check_writable(out)
    # Model, data and layer patterns are loaded and checked before anything in `out` changes.
    model, encoded, population = prepare(replace(cfg, device=device))
    names = select_layers(model, cfg.layers)
    mc_names = mc_layer_names(cfg, names)
    cached = cache_model(replace(cfg, device=device), model, names)
    with contextlib.ExitStack() as held:
        stage = vio.staging_path(out, files=FINAL, name=STAGE)
        if ctx.is_main:  # NOTE [one run per folder], NOTE [staged results] (varstudy.io)
            held.enter_context(vio.output_lock(out))
            stage = held.enter_context(vio.staged(out, resume=resuming, name=STAGE,
                                                  files=entries(out, cfg)))
        return _run(cfg, ctx, device, started, resuming, model, encoded, population, names,
                    mc_names, stage, cached)


def mc_layer_names(cfg: MeasureConfig, names: list[str]) -> set[str]:
    """The selected layers that get Monte Carlo (``mc_layers`` None: all of them); an error when
    Monte Carlo is asked for (``mc_draws`` > 0) but the pattern matches none of them."""
    picked = {n for n in names if cfg.mc_draws and re.search(cfg.mc_layers or "", n)}
    if cfg.mc_draws and cfg.mc_batches and not picked:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise VarstudyError(f"mc_layers {cfg.mc_layers!r} matches none of the {len(names)} "
                            f"selected layers ({shown}); valid choices: a regex matching one of "
                            "them, 'none' (all selected layers), or mc_draws 0 (no Monte Carlo)")
    return picked


def _run(cfg, ctx, device, started, resuming, model, encoded, population, names, mc_names,
         out: Path, cached=None):
    """:func:`run` once its inputs are loaded and, on rank 0, the output folder is locked;
    everything is written to staging folder ``out``, published when the run has finished.
    ``cached``: the model of ``--wtacrs-cache-model``, or None."""
    chunks, state = out / "chunks", out / STATE
    dist.barrier(ctx)  # every rank reads the chunks only after rank 0 prepared them
    if ctx.is_main:
        vio.atomic_write_json(out / "config.json", dict(
            command=cli.command_name(MeasureConfig), **asdict(cfg), population=population,
            world_size=ctx.world, layers_selected=names, mc_layers_selected=sorted(mc_names)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                                  weight_decay=cfg.weight_decay) if cfg.train_steps else None
    local = replace(cfg, device=device, progress=cfg.progress and ctx.is_main)
    done = _load_state(model, optimizer, state) if resuming and optimizer else 0
    for step in cfg.measure_at:
        if step < done:  # measured completely before the checkpoint at `done` was saved
            continue
        if step > done:
            train(model, optimizer, encoded, local, done, step)  # replicated on every rank ...
            if ctx.is_main:
                vio.atomic_torch_save(state, dict(step=step, model=model.state_dict(),
                                                  optimizer=optimizer.state_dict()))
        dist.broadcast_module(ctx, model)                        # ... and made bit-identical
        done = step
        _measure_step(model, encoded, local, names, mc_names, step, population, ctx,
                      chunks / f"step_{step:06d}.csv", cached)
    dist.barrier(ctx)
    if not ctx.is_main:
        return typed(pd.DataFrame(columns=list(LAYER_COLUMNS)))
    layers = assemble(out, cfg)
    vio.atomic_write_json(out / "env.json", dict(
        vio.env_info(device), world_size=ctx.world, resumed=resuming,
        wall_time_s=round(time.perf_counter() - started, 1)))
    return layers


def _load_state(model, optimizer, path: Path) -> int:
    """Model and AdamW state of the last checkpoint (its training step), or 0 when none."""
    if not path.is_file():
        return 0
    saved = vio.load_checkpoint(path)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return int(saved["step"])


def _measure_step(model, encoded, cfg, names, mc_names, step, population, ctx, path,
                  cached=None) -> None:
    """Measure this rank's missing batches of one step; every finished batch reaches ``path``."""
    from varstudy.progress import tqdm
    have = finished_rows(path, cfg, names, repair=ctx.is_main, step=step)
    done = set() if have is None else set(have["batch"])
    todo = [b for b in range(cfg.num_batches) if b not in done]
    mine = []
    informed = None
    if todo and wanted(cfg.families):  # rows-live / rows-adaptive (varstudy.measure.informed)
        informed = informed_for(model, encoded, cfg, names, step, first_token_layers(model))
    for b in tqdm(ctx.mine(todo), desc=f"measure step {step}", disable=not cfg.progress):
        frame = measure_batch(model, encoded, cfg, names, mc_names, step, b, population,
                              informed, cached)
        if ctx.active:
            mine.append((b, frame))
        else:
            vio.append_csv(path, frame)  # one write + fsync per finished batch
    if ctx.active:
        gathered = dist.gather(ctx, mine)
        if ctx.is_main and todo:
            pairs = sorted((p for part in gathered for p in part), key=lambda p: p[0])
            frames = ([] if have is None else [have]) + [f for _, f in pairs]
            vio.atomic_write_csv(path, pd.concat(frames, ignore_index=True))


def assemble(out: Path, cfg: MeasureConfig) -> pd.DataFrame:
    """Concatenate the step chunks into layers.csv (batch order) and derive summary.csv."""
    frames = []
    for s in cfg.measure_at:
        frame = vio.read_chunk(out / "chunks" / f"step_{s:06d}.csv")
        got = 0 if frame is None else frame["batch"].nunique()
        if got < cfg.num_batches:
            raise VarstudyError(f"chunk of step {s} in {out} holds {got} of {cfg.num_batches} "
                                "batches; valid choices: rerun with --resume")
        frames.append(frame)
    layers = typed(pd.concat(frames, ignore_index=True).sort_values(
        ["train_step", "batch"], kind="stable", ignore_index=True))
    vio.atomic_write_csv(out / "layers.csv", layers)
    vio.atomic_write_csv(out / "summary.csv", summarize(layers, cfg.level))
    vio.atomic_write_csv(out / "scopes.csv", scope_summary(layers, cfg.level))
    return layers
