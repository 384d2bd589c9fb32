"""``study accuracy``: fine-tune every (family, ratio, scope) for every seed (NOTE [accuracy
tables / resume] in :mod:`varstudy.study`)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from varstudy import io as vio
from varstudy.errors import VarstudyError
from varstudy.study.config import (KEYS, RUN_KEYS, StudyConfig, accuracy_grid, finetune_config,
                                   write_config)


def accuracy(config: StudyConfig, *, run=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fine-tune every (family, ratio, scope) for every seed; returns (runs, summary).

    Runs are paired by seed: a seed fixes the new head's initialisation, the minibatch order and
    the dropout draws (NOTE [randomness] in varstudy.finetune), whatever the configuration. The
    study writes into a staging folder that replaces ``<out>/accuracy`` once every run has
    finished (NOTE [staged results] in varstudy.io); ``resume`` continues it, or a copy of the
    finished study's folder (to extend it). ``config.executor`` says where the runs run (local
    or Ray tasks, :mod:`varstudy.study.executors`); this process alone writes the folder.
    ``run`` replaces :func:`varstudy.study.executors.run_one` (tests inject faults with it).
    """
    from varstudy.study import executors

    with vio.staged(Path(config.out) / "accuracy", resume=config.resume) as folder:
        pool = executors.executor(config, run or executors.run_one)
        try:
            return _accuracy(config, folder, pool)
        finally:
            pool.close()


def _accuracy(config: StudyConfig, folder: Path, pool) -> tuple[pd.DataFrame, pd.DataFrame]:
    from varstudy.progress import tqdm
    from varstudy.study.executors import Failure, Job, threads_per_run

    write_config(config, "accuracy", folder)
    vio.atomic_write_json(folder / "env.json", _env(config, pool))
    tables = load_partial(folder) if config.resume else {"runs": [], "steps": [], "evals": []}
    done = {tuple(r) for r in pd.concat(tables["runs"] or [pd.DataFrame(
        columns=RUN_KEYS)])[RUN_KEYS].itertuples(index=False)}
    keys = [(f, r, sc, s) for s in config.seeds for f, r, sc in accuracy_grid(config)
            if (f, r, sc, s) not in done]
    threads = threads_per_run(config)
    jobs = [Job(i, key, replace(finetune_config(config, *_config_args(key)), num_threads=threads))
            for i, key in enumerate(keys)]
    finished, failed = {}, []
    bar = tqdm(total=len(jobs), desc="accuracy", disable=not config.progress)
    for job, outcome in pool.results(jobs):
        bar.update()
        if isinstance(outcome, Failure):
            failed.append(outcome.line(job))
            print(failed[-1], file=sys.stderr, flush=True)
            continue
        finished[job.index] = _tagged(config, job.key, outcome)
        # the grid's order, whatever order the runs finish in (NOTE [same numbers anywhere])
        save_tables({name: tables[name] + [finished[i][name] for i in sorted(finished)]
                     for name in tables}, folder)
    bar.close()
    if failed:
        raise VarstudyError(f"{len(failed)} of {len(jobs)} run(s) failed on every attempt "
                            f"(first: {failed[0]}); every finished run is saved in {folder}; "
                            f"valid choices: fix the cause and rerun with --resume "
                            f"(runs only the missing ones)")
    runs = pd.concat(tables["runs"] + [finished[i]["runs"] for i in sorted(finished)],
                     ignore_index=True)
    # A resumed study may have added ratios or families: record what the tables hold.
    write_config(config, "accuracy", folder, in_tables=sorted(
        {(f, float(r), sc) for f, r, sc in zip(runs.family, runs.ratio, runs.scope)}),
        seeds_in_tables=sorted({int(s) for s in runs.seed}))
    return runs, summarize(runs)


def _config_args(key: tuple) -> tuple:
    family, ratio, scope, seed = key
    return family, ratio, seed, scope


def _tagged(config: StudyConfig, key: tuple, outcome) -> dict[str, pd.DataFrame]:
    """A finished run's three tables, tagged with its configuration (and its host in runs)."""
    family, ratio, scope, seed = key
    tag = dict(task=config.task, model=config.model, family=family, ratio=ratio, scope=scope,
               seed=seed)
    result = outcome.result
    return {"runs": result.run.drop(columns=["sketch"]).assign(
                **tag, host=outcome.host, gpu_ids=outcome.gpu_ids),
            "steps": result.steps.assign(**tag), "evals": result.evals.assign(**tag)}


def _env(config: StudyConfig, pool) -> dict:
    """env.json: versions and device of the driver, and where the runs run (the executor, the
    cluster's resources and nodes)."""
    from varstudy.models import resolve_device

    return {**vio.env_info(resolve_device(config.device)), **pool.describe()}


def load_partial(folder: Path) -> dict[str, list[pd.DataFrame]]:
    """Tables of finished runs; steps/evals rows of a run missing from runs.csv (written last,
    so a crash in between leaves such rows) are dropped, as that run is redone."""
    tables = {name: [_kept_table(folder / f"{name}.csv")] if (folder / f"{name}.csv").is_file()
              else [] for name in ("runs", "steps", "evals")}
    if not tables["runs"]:
        return {"runs": [], "steps": [], "evals": []}
    for frames in tables.values():  # tables written before scopes existed converted all linears
        for t in frames:
            if "scope" not in t.columns:
                t.insert(4, "scope", np.where(t.family == "exact", "none", "all"))
    done = tables["runs"][0][RUN_KEYS].drop_duplicates()
    for name in ("steps", "evals"):
        tables[name] = [t.merge(done, on=RUN_KEYS) for t in tables[name]]
    return tables


def _kept_table(path: Path) -> pd.DataFrame:
    """A table of an interrupted study, or one line when it is not one (not CSV, or lacking
    the columns of a run)."""
    bad = "valid choices: rerun without --resume (start over), or another --out"
    try:
        frame = pd.read_csv(path)
    except ValueError as err:  # empty, not UTF-8, not CSV (pandas' errors are ValueErrors)
        raise VarstudyError(f"{path} cannot be read as CSV ({' '.join(str(err).split())[:120]}"
                            f"); {bad}") from None
    missing = [c for c in RUN_KEYS if c not in frame.columns and c != "scope"]
    if missing:
        raise VarstudyError(f"{path} lacks column(s) {', '.join(missing)}; {bad}")
    return frame


def save_tables(tables: dict, folder: Path) -> pd.DataFrame:
    """Rewrite the tidy tables after every run, so an interrupted study keeps its rows."""
    front = KEYS + ["scope", "seed"]
    for name in ("steps", "evals"):
        frame = pd.concat(tables[name], ignore_index=True)
        vio.atomic_write_csv(folder / f"{name}.csv",
                             frame[front + [c for c in frame.columns if c not in front]])
    runs = pd.concat(tables["runs"], ignore_index=True)
    runs = runs[front + [c for c in runs.columns if c not in front]]
    vio.atomic_write_csv(folder / "summary.csv", summarize(runs))
    vio.atomic_write_csv(folder / "runs.csv", runs)  # last: a run counts once it is here
    return runs


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per configuration, over seeds: ``mean``, ``std`` (ddof 1) and ``n`` of the best validation
    metric (the paper's "best epoch"), the same for the final metric, mean saved MiB and time."""
    if "test_at_best" not in runs.columns:  # tables made before test evaluation existed
        runs = runs.assign(test_at_best=np.nan)
    grouped = runs.groupby(KEYS + ["scope", "metric"], sort=False)
    out = grouped.agg(mean=("best_value", "mean"), std=("best_value", "std"),
                      final_mean=("final_value", "mean"), final_std=("final_value", "std"),
                      test_mean=("test_at_best", "mean"), test_std=("test_at_best", "std"),
                      n=("seed", "nunique"), saved_mib=("saved_mib", "mean"),
                      train_time_s=("train_time_s", "mean")).reset_index()
    return out
