"""The tables of one fine-tuning run (schema in :mod:`varstudy.finetune`) and their writing."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from varstudy import cli
from varstudy import io as vio
from varstudy.finetune.config import FinetuneConfig, run_name
from varstudy.randomized.wtacrs import cache_bytes

MIB = 2**20
STEP_COLUMNS = ("step", "loss", "lr", "time_s")
EVAL_COLUMNS = ("step", "metric", "value")
# Resolved-config keys left out of run.csv (and so of the study's runs.csv, whose columns stay
# as they were): lists, options that do not change the results, and extras of config.json.
NOT_IN_RUN = ("converted", "host_cache_mib", "betas", "progress", "resume", "checkpoint_every",
              "plan", "threads", "save_model", "replan_every", "replan_check")


@dataclass
class FinetuneResult:
    """Tables of one run: ``run`` (one row), ``steps`` and ``evals`` (tidy), ``config`` (resolved)."""

    run: pd.DataFrame
    steps: pd.DataFrame
    evals: pd.DataFrame
    config: dict
    plans: pd.DataFrame | None = None  # with replan_every: one row per layer and re-plan


def run_tables(config: FinetuneConfig, setup, steps: list, evals: list, memory,
               threads: int, plans: list | None = None) -> FinetuneResult:
    """The run's tables from its (step, loss, lr, time_s) and (step, metric, value) rows, the
    saved-bytes report of the first step, the CPU threads in effect and the re-plans' rows."""
    steps_df = pd.DataFrame(steps, columns=list(STEP_COLUMNS))
    evals_df = pd.DataFrame(evals, columns=list(EVAL_COLUMNS))
    metric = setup.metrics[0]
    primary = evals_df[evals_df.metric == metric]
    best = primary.loc[primary.value.idxmax()]
    linear = [n for n, m in setup.model.named_modules() if isinstance(m, nn.Linear)]
    resolved = {**asdict(config), "device": setup.device, "run": run_name(config),
                "total_steps": setup.total_steps, "steps_per_epoch": setup.steps_per_epoch,
                "warmup_steps": math.ceil(config.warmup * setup.total_steps),
                "n_train": len(setup.train["labels"]), "n_eval": len(setup.valid["labels"]),
                "n_test": 0 if setup.test is None else len(setup.test["labels"]),
                "converted": setup.converted, "torch": torch.__version__, "threads": threads,
                "host_cache_mib": cache_bytes(setup.model) / MIB}  # wta-crs's per-example cache
    train_time = float(steps_df.time_s.iloc[-1])
    row = {k: v for k, v in resolved.items() if k not in NOT_IN_RUN}
    row["num_threads"] = threads  # the count in effect (the option may be none)
    test = evals_df[(evals_df.metric == f"test_{metric}") & (evals_df.step == best.step)]
    row.update(n_converted=len(setup.converted), metric=metric, best_value=float(best.value),
               best_step=int(best.step), final_value=float(primary.value.iloc[-1]),
               test_at_best=float(test.value.iloc[0]) if len(test) else float("nan"),
               final_loss=float(steps_df.loss.tail(10).mean()), train_time_s=train_time,
               examples_per_s=len(steps_df) * config.batch_size / train_time,
               saved_mib=memory.total / MIB, saved_linear_mib=memory.for_modules(linear) / MIB,
               peak_cuda_mib=(torch.cuda.max_memory_allocated() / MIB
                              if setup.device == "cuda" else float("nan")))
    plans_df = pd.DataFrame(plans) if config.replan_every else None
    return FinetuneResult(pd.DataFrame([row]), steps_df, evals_df, resolved, plans_df)


def write(result: FinetuneResult, folder: Path) -> Path:
    """Write steps.csv, evals.csv, config.json and, last, run.csv into ``folder`` (atomically)."""
    vio.atomic_write_csv(folder / "steps.csv", result.steps)
    vio.atomic_write_csv(folder / "evals.csv", result.evals)
    if result.plans is not None:
        vio.atomic_write_csv(folder / "plans.csv", result.plans)
    vio.atomic_write_json(folder / "config.json",
                          {cli.COMMAND_KEY: cli.command_name(FinetuneConfig), **result.config})
    vio.atomic_write_csv(folder / "run.csv", result.run)
    return folder
