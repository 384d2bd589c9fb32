"""Resume checkpoints and the run folder's preparation (NOTE [durable results / resume] in
:mod:`varstudy.finetune`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from varstudy import cli
from varstudy import io as vio
from varstudy.errors import VarstudyError
from varstudy.finetune.config import FinetuneConfig
from varstudy.finetune.tables import FinetuneResult

CHECKPOINT = "checkpoint.pt"
NOT_COMPARED = ("progress", "resume", "checkpoint_every", "out")  # a resume may change these
FINAL = ("run.csv", "steps.csv", "evals.csv", "config.json")


def finished_run(folder: Path, config: FinetuneConfig) -> FinetuneResult | None:
    """With ``resume``, the tables of a run that already finished in ``folder`` (else None;
    an interrupted rerun's staging folder is continued instead, NOTE [staged results])."""
    if config.resume and vio.resume_source(folder) == folder \
            and not (folder / CHECKPOINT).is_file() and (folder / "run.csv").is_file():
        done = vio.read_json(folder / "config.json")
        cli.config_options(done, FinetuneConfig, f"--resume {folder / 'config.json'}")
        vio.refuse_changed(folder, {k: done.get(k) for k in asdict(config)}, asdict(config),
                           NOT_COMPARED + ("device",))
        plans = folder / "plans.csv"
        return FinetuneResult(*(_finished_table(folder / f"{n}.csv") for n in
                                ("run", "steps", "evals")), done,
                              _finished_table(plans) if plans.is_file() else None)
    return None


def _finished_table(path: Path) -> pd.DataFrame:
    """A table of a finished run, or one line when it is not CSV (or missing)."""
    try:
        return pd.read_csv(path)
    except ValueError as err:  # empty, not UTF-8, not CSV (pandas' errors are ValueErrors)
        raise VarstudyError(f"{path} cannot be read as CSV ({cli.one_line(err)[:120]}); valid "
                            "choices: rerun without --resume (start over), or another --out") \
            from None


def saved_state(folder: Path, config: FinetuneConfig) -> dict | None:
    """The checkpoint to resume from (None when there is none), made with this config: in the
    staging folder an interrupted run left (else in ``folder``); loaded as data only
    (``weights_only``, NOTE [data, never code] in varstudy.io)."""
    path = vio.resume_source(folder) / CHECKPOINT
    if not path.is_file():
        return None
    saved = vio.load_checkpoint(path)
    vio.refuse_changed(path, saved.get("config", {}), asdict(config), NOT_COMPARED)
    return saved


def save(folder: Path, config: FinetuneConfig, setup, optimizer, scheduler, steps, evals,
         memory, elapsed: float, planner=None, plans=()) -> None:
    """Write ``<folder>/checkpoint.pt`` atomically: model, AdamW, scheduler, RNG states,
    randomized-layer call counters, rows-adaptive's statistics, the rows so far, the saved-bytes report, and the online
    planner's state with its rows."""
    from varstudy.randomized.layers import RandomizedLinear

    vio.atomic_torch_save(folder / CHECKPOINT, dict(
        config=asdict(config), model=setup.model.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state_all() if setup.device.startswith("cuda") else None,
        calls={n: m.calls for n, m in setup.model.named_modules()
               if isinstance(m, RandomizedLinear)},
        row_stats={n: m.sketch.stats.state_dict() for n, m in setup.model.named_modules()
                   if isinstance(m, RandomizedLinear) and hasattr(m.sketch, "stats")},
        steps=steps, evals=evals, elapsed=elapsed,
        memory=dict(total=memory.total, by_module=dict(memory.by_module)),
        planner=None if planner is None else planner.state_dict(), plans=list(plans)))


def restore(saved: dict, setup, optimizer, scheduler, planner=None):
    """State of a checkpoint (:func:`saved_state`) -> (steps, evals, memory, elapsed, plans
    rows); the online planner, when given, gets its state back."""
    from collections import defaultdict

    from varstudy.randomized.layers import RandomizedLinear
    from varstudy.randomized.memory import SavedBytes

    setup.model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng_cpu"])
    if saved["rng_cuda"] is not None and setup.device.startswith("cuda"):
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    for name, module in setup.model.named_modules():
        if isinstance(module, RandomizedLinear):
            module.calls = saved["calls"][name]
            if hasattr(module.sketch, "stats"):  # rows-adaptive's per-position statistics
                module.sketch.stats.load_state_dict(saved.get("row_stats", {}).get(name, {}))
    memory = SavedBytes(total=saved["memory"]["total"],
                        by_module=defaultdict(int, saved["memory"]["by_module"]))
    if planner is not None:
        planner.load_state_dict(saved["planner"])
    return (list(saved["steps"]), list(saved["evals"]), memory, saved["elapsed"],
            list(saved.get("plans", ())))
