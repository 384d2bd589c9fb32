"""Study drivers: ``python -m varstudy.study {accuracy,memory,throughput} [--preset cpu|gpu] ...``.

* ``accuracy``: fine-tune (``varstudy.finetune``) for exact and every (family, ρ), over seeds ->
  ``runs.csv`` (one row per task, family, ratio, seed), ``summary.csv`` (mean, std, n over seeds of
  the best validation metric; final_mean, final_std of the last evaluation),
  ``steps.csv`` / ``evals.csv`` (all runs, tidy), ``config.json``.
* ``memory``: bytes saved for backward by the forward of one training step, per (family, ρ) and
  batch size (exact accounting, ``varstudy.randomized.memory.saved_bytes``), plus the CUDA peak of two whole
  training steps (weights, gradients, AdamW state, activations) in an isolated subprocess when on
  GPU -> ``memory.csv``.
* ``throughput``: examples/s of full training steps (forward, backward, AdamW) at one batch size,
  all configurations in one process on one model, interleaved in a fresh random order per repeat
  after a warm-up; median over repeats and the median of the per-repeat ratio to exact ->
  ``throughput.csv``. Then the largest batch under ``budget_mib``: memory is linear in the batch
  (PAPERS.md), so a least-squares line per (family, ρ) through the memory grid gives
  B_max = ⌊(budget − intercept) / slope⌋ -> ``max_batch.csv`` (basis: saved bytes on CPU, the CUDA
  peak on GPU; ``memory_from`` reuses a memory.csv instead of measuring again). The 1-minute load
  average is recorded with the timings (``load_avg_1m``): on a shared machine it says how noisy
  they are.

Family "exact" has ratio 1.0. The ``cpu`` preset is the grid run for the committed results; the
``gpu`` preset is paper 1's scale (RoBERTa-base on GLUE CoLA; needs ``--data-dir`` with GLUE files
and a local or downloadable roberta-base).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from varstudy import cli, finetune
from varstudy import io as vio
from varstudy.errors import VarstudyError
from varstudy.randomized.sketches import SKETCHES

STUDIES = ("accuracy", "memory", "throughput")
MIB = 2**20


@dataclass(frozen=True)
class StudyConfig:
    """One study's grid and budget. Defaults: the CPU memory/throughput grid."""

    model: str = "minilm"
    task: str = "rotten_tomatoes"
    data_dir: str | None = None
    families: tuple[str, ...] = ("gaussian", "rows", "countsketch", "srht", "rows-norm")
    ratios: tuple[float, ...] = (0.5, 0.2, 0.1, 0.05)  # exact (ratio 1) is always included
    scopes: tuple[str, ...] = ("all",)           # accuracy: "all" linears or "encoder" only
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 16                         # accuracy and throughput
    batch_sizes: tuple[int, ...] = (4, 8, 16, 32)  # memory and the max-batch fit
    max_length: int = 64
    padding: str = "fixed"                       # accuracy: fixed or dynamic (finetune)
    max_steps: int | None = 30                   # accuracy
    epochs: float | None = None                  # accuracy, when max_steps is None
    lr: float = 3e-4                             # accuracy
    eval_every: int | None = None                # accuracy; None: once per epoch / at the end
    eval_examples: int | None = 256              # accuracy
    repeats: int = 5                             # throughput
    warmup_steps: int = 1                        # throughput, per configuration
    budget_mib: float = 256.0                    # max-batch fit
    memory_from: str | None = None               # max-batch fit from this memory.csv
    device: str = "auto"
    out: str = "results/study"
    num_threads: int = 2
    resume: bool = False                         # accuracy: skip runs already in runs.csv
    progress: bool = True


# Presets override only what differs from the defaults, per study.
PRESETS: dict[str, dict[str, dict]] = {
    "cpu": {
        # The converged CPU recipe (results/study/learning_curve): batch 32, dynamic padding
        # up to 64 tokens, lr 5e-5, 200 steps (0.94 epoch); the exact model's validation
        # accuracy plateaus at about 82 % from step 150 on. Full validation split every 25
        # steps, test split at each new best; both conversion scopes, 5 paired seeds.
        "accuracy": dict(families=("gaussian", "rows"), scopes=("all", "encoder"),
                         seeds=(0, 1, 2, 3, 4), batch_size=32, padding="dynamic", lr=5e-5,
                         max_steps=200, eval_every=25, eval_examples=None),
        "memory": {},
        "throughput": {},
    },
    "gpu": {
        # Paper 1: RoBERTa-base, GLUE CoLA, 10 epochs, lr 2e-5, batch 16, best epoch.
        "accuracy": dict(model="roberta-base", task="glue:cola", max_length=128,
                         families=("gaussian", "rademacher", "countsketch", "srht", "rows"),
                         max_steps=None, epochs=10, lr=2e-5, eval_examples=None),
        "memory": dict(model="roberta-base", task="glue:mrpc", max_length=128,
                       batch_sizes=(16, 32, 64, 128)),
        "throughput": dict(model="roberta-base", task="glue:mrpc", max_length=128,
                           batch_size=64, batch_sizes=(16, 32, 64, 128), repeats=10,
                           warmup_steps=3, budget_mib=12 * 1024),
    },
}


def preset(name: str, study: str, /, **overrides) -> StudyConfig:
    if study not in STUDIES:
        raise VarstudyError(f"unknown study {study!r}; valid choices: {', '.join(STUDIES)}")
    if name not in PRESETS:
        raise VarstudyError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS)}")
    return replace(StudyConfig(), **{**PRESETS[name][study], **overrides})


def check(config: StudyConfig) -> None:
    bad = [f for f in config.families if f not in SKETCHES]
    if bad:
        raise VarstudyError(f"unknown famil{'ies' if len(bad) > 1 else 'y'} {bad}; "
                            f"valid choices: {', '.join(SKETCHES)}")
    bad = [s for s in config.scopes if s not in CONVERSION_SCOPES]
    if bad or not config.scopes:
        raise VarstudyError(f"unknown scope {bad or '(none)'}; valid choices: "
                            f"{', '.join(CONVERSION_SCOPES)}")
    if not config.ratios or not all(0 < r <= 1 for r in config.ratios):
        raise VarstudyError(f"ratios must be in (0, 1], got {config.ratios!r}")
    if not config.batch_sizes or min(config.batch_sizes) < 1 or config.batch_size < 1:
        raise VarstudyError("batch sizes must be integers >= 1")
    if config.repeats < 1 or config.warmup_steps < 0 or not config.seeds:
        raise VarstudyError("repeats must be >= 1, warmup_steps >= 0, and seeds non-empty")
    for name in ("families", "ratios", "scopes", "seeds", "batch_sizes"):
        cli.check_distinct(name, getattr(config, name))
    for seed in config.seeds:
        cli.check_seed("seeds", seed)
    vio.require_out(config.out)
    finetune.check(finetune_config(config, "exact", 1.0, config.seeds[0]))


def check_inputs(config: StudyConfig, study: str) -> None:
    """Load the data and the model once and check the batch sizes against the data, so that a bad
    --model, --task or batch fails before the study's folder is touched."""
    from varstudy.data import encode, load_dataset
    from varstudy.models import load_model

    sizes = {"accuracy": [config.batch_size], "memory": list(config.batch_sizes),
             "throughput": [config.batch_size] + ([] if config.memory_from
                                                  else list(config.batch_sizes))}[study]
    data = _train_data(config, sizes)
    if study == "accuracy":
        load_dataset(config.task, "validation", data_dir=config.data_dir)
    _, tokenizer = load_model(config.model, num_labels=data.num_labels, device="cpu")
    encode(data.subset(slice(0, 1)), tokenizer, config.max_length)
    if config.memory_from and study == "throughput" and not Path(config.memory_from).is_file():
        raise VarstudyError(f"memory_from file {config.memory_from} not found; valid choices: "
                            "a memory.csv written by `study memory`, or none (measure again)")


def _train_data(config: StudyConfig, sizes):
    """The training split of ``config.task``; an error when a batch size exceeds it."""
    from varstudy.data import load_dataset

    data = load_dataset(config.task, "train", data_dir=config.data_dir)
    if max(sizes) > len(data):
        raise VarstudyError(f"batch size {max(sizes)} exceeds the {len(data)} training examples "
                            f"of {config.task!r}; valid: batch sizes <= {len(data)}")
    return data


# Conversion scopes of the accuracy study: which nn.Linear modules are randomized.
# "encoder" keeps the pooler and the classifier exact (NOTE [scopes] in varstudy.models).
CONVERSION_SCOPES = {
    "all": None,
    "encoder": r"(^|\.)(pooler\.dense|classifier|pre_classifier|score)(\.|$)",
}


def grid(config: StudyConfig) -> list[tuple[str, float]]:
    """(family, ratio) pairs: exact first, then families × ratios."""
    return [("exact", 1.0)] + [(f, float(r)) for f in config.families for r in config.ratios]


def accuracy_grid(config: StudyConfig) -> list[tuple[str, float, str]]:
    """(family, ratio, scope) triples: exact first (scope "none"), then every scope."""
    return [("exact", 1.0, "none")] + [(f, r, scope) for scope in config.scopes
                                       for f, r in grid(config)[1:]]


def finetune_config(config: StudyConfig, family: str, ratio: float, seed: int,
                    scope: str = "all"):
    return finetune.FinetuneConfig(
        model=config.model, task=config.task, data_dir=config.data_dir, sketch=family,
        ratio=ratio, exclude=CONVERSION_SCOPES.get(scope), seed=seed,
        batch_size=config.batch_size, max_length=config.max_length, padding=config.padding,
        lr=config.lr, max_steps=config.max_steps, epochs=config.epochs,
        eval_every=config.eval_every, eval_examples=config.eval_examples, device=config.device,
        out=None, num_threads=config.num_threads, progress=False)


def write_config(config: StudyConfig, study: str, folder: Path, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    resolved = {"study": study, **asdict(config), "torch": torch.__version__,
                "device_resolved": finetune.resolve_device(config.device), **extra}
    vio.atomic_write_json(folder / "config.json", resolved)


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------

KEYS = ["task", "model", "family", "ratio"]
RUN_KEYS = ["family", "ratio", "scope", "seed"]  # one accuracy run


def accuracy(config: StudyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fine-tune every (family, ratio, scope) for every seed; returns (runs, summary).

    Runs are paired by seed: a seed fixes the new head's initialisation, the minibatch order and
    the dropout draws (NOTE [randomness] in varstudy.finetune), whatever the configuration.
    """
    from tqdm.auto import tqdm

    folder = Path(config.out) / "accuracy"
    write_config(config, "accuracy", folder)
    tables = _load_partial(folder) if config.resume else {"runs": [], "steps": [], "evals": []}
    done = {tuple(r) for r in pd.concat(tables["runs"] or [pd.DataFrame(
        columns=RUN_KEYS)])[RUN_KEYS].itertuples(index=False)}
    jobs = [(f, r, sc, s) for s in config.seeds for f, r, sc in accuracy_grid(config)
            if (f, r, sc, s) not in done]
    for family, ratio, scope, seed in tqdm(jobs, desc="accuracy", disable=not config.progress):
        result = finetune.train(finetune_config(config, family, ratio, seed, scope))
        tag = dict(task=config.task, model=config.model, family=family, ratio=ratio,
                   scope=scope, seed=seed)
        tables["runs"].append(result.run.drop(columns=["sketch"]).assign(**tag))
        tables["steps"].append(result.steps.assign(**tag))
        tables["evals"].append(result.evals.assign(**tag))
        runs = _save_accuracy(tables, folder)
    runs = pd.concat(tables["runs"], ignore_index=True)
    # A resumed study may have added ratios or families: record what the tables hold.
    write_config(config, "accuracy", folder, in_tables=sorted(
        {(f, float(r), sc) for f, r, sc in zip(runs.family, runs.ratio, runs.scope)}),
        seeds_in_tables=sorted({int(s) for s in runs.seed}))
    return runs, summarize(runs)


def _load_partial(folder: Path) -> dict[str, list[pd.DataFrame]]:
    """Tables of finished runs; steps/evals rows of a run missing from runs.csv (written last,
    so a crash in between leaves such rows) are dropped, as that run is redone."""
    tables = {name: [pd.read_csv(folder / f"{name}.csv")] if (folder / f"{name}.csv").is_file()
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


def _save_accuracy(tables: dict, folder: Path) -> pd.DataFrame:
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


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _model_and_batches(config: StudyConfig, device: str, sizes):
    from varstudy.data import encode
    from varstudy.models import load_model

    data = _train_data(config, sizes)
    model, tok = load_model(config.model, num_labels=data.num_labels, dropout=True, seed=0,
                            device=device)
    enc = encode(data.subset(slice(0, max(sizes))), tok, config.max_length)
    return model, {b: finetune.to_device({k: v[:b] for k, v in enc.items()}, device)
                   for b in sizes}


def convert(model, family: str, ratio: float, seed: int = 0) -> None:
    """Make ``model``'s linears exact, then convert them all to (family, ratio) unless exact."""
    from varstudy.randomized.layers import derandomize, randomize

    derandomize(model)
    if family != "exact":
        randomize(model, ratio, family, seed=seed)


def memory(config: StudyConfig, write: bool = True) -> pd.DataFrame:
    """Saved-for-backward MiB (and CUDA peak MiB on GPU) per (family, ratio, batch size)."""
    from varstudy.randomized.memory import saved_bytes
    from varstudy.models import linear_names

    device = finetune.resolve_device(config.device)
    with finetune._threads(config.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, batches = _model_and_batches(config, device, config.batch_sizes)
        linear = linear_names(model)
        rows = []
        for family, ratio in grid(config):
            convert(model, family, ratio)
            for b, batch in batches.items():
                _, report = saved_bytes(lambda: model(**batch).loss, model=model)
                peak = _cuda_peak(config, family, ratio, b) if device == "cuda" else math.nan
                rows.append(dict(task=config.task, model=config.model, family=family,
                                 ratio=ratio, batch_size=b, seq_len=config.max_length,
                                 saved_mib=report.total / MIB,
                                 saved_linear_mib=report.for_modules(linear) / MIB,
                                 peak_cuda_mib=peak, device=device))
    table = pd.DataFrame(rows)
    if write:
        folder = Path(config.out) / "memory"
        write_config(config, "memory", folder)
        vio.atomic_write_csv(folder / "memory.csv", table)
    return table


def _cuda_peak(config: StudyConfig, family: str, ratio: float, batch: int) -> float:
    from varstudy.randomized.memory import cuda_peak_bytes

    return cuda_peak_bytes(peak_step, config.model, family, ratio, batch,
                           config.max_length) / MIB


def peak_step(model_name: str, family: str, ratio: float, batch: int, length: int) -> None:
    """Two whole training steps on CUDA (the second holds AdamW state); for cuda_peak_bytes."""
    from varstudy.models import load_model

    model, _ = load_model(model_name, dropout=True, seed=0, device="cuda")
    convert(model, family, ratio)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(input_ids=torch.randint(1000, 2000, (batch, length), generator=gen),
                  attention_mask=torch.ones(batch, length, dtype=torch.long),
                  labels=torch.randint(0, 2, (batch,), generator=gen))
    inputs = finetune.to_device(inputs, "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for _ in range(2):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------
# Throughput and the largest batch under a budget
# --------------------------------------------------------------------------------------------


def throughput(config: StudyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Interleaved timing of full training steps, then the memory fit; returns both tables."""
    device = finetune.resolve_device(config.device)
    with finetune._threads(config.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        times = _time_steps(config, device)
    table = _throughput_table(config, times, device)
    table["load_avg_1m"] = _load_average()
    mem = pd.read_csv(config.memory_from) if config.memory_from else memory(config, write=False)
    fit = max_batch(mem, config.budget_mib)
    folder = Path(config.out) / "throughput"
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
    from tqdm.auto import tqdm

    model, batches = _model_and_batches(config, device, [config.batch_size])
    batch = batches[config.batch_size]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    configs = grid(config)
    times: dict[tuple[str, float], list[float]] = {c: [] for c in configs}

    def step() -> float:
        finetune._sync(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        finetune._sync(device)
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _tuple(kind):
    def convert(text: str):
        try:
            return tuple(kind(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid list {text!r}; expected comma-separated {kind.__name__} values") from None
    return convert


_CONVERTERS = {"memory_from": finetune._optional(str), "families": _tuple(str),
               "scopes": _tuple(str),
               "ratios": _tuple(float), "seeds": _tuple(int),
               "batch_sizes": _tuple(int), **finetune._CONVERTERS,
               "resume": finetune._flag}


def parser() -> argparse.ArgumentParser:
    p = finetune._Parser(prog="python -m varstudy.study", description=__doc__.split("\n\n")[0])
    p.add_argument("study", help=f"one of {', '.join(STUDIES)}")
    p.add_argument("--preset", default="cpu", help=f"one of {', '.join(PRESETS)} (default cpu)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    for f in fields(StudyConfig):
        kind = _CONVERTERS.get(f.name, type(f.default))
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                       help=f"default {f.default!r}")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    done = {}

    def body() -> None:
        given = {f.name: getattr(args, f.name) for f in fields(StudyConfig)
                 if hasattr(args, f.name)}
        if "epochs" in given and "max_steps" not in given:
            given["max_steps"] = None
        done["config"] = config = preset(args.preset, args.study, **given)
        check(config)
        folder = vio.check_writable(Path(config.out) / args.study)
        check_inputs(config, args.study)  # before the folder changes
        done["start"] = time.perf_counter()
        with vio.output_lock(folder):  # NOTE [one run per folder] (varstudy.io)
            done["tables"] = {"accuracy": accuracy, "memory": memory,
                              "throughput": throughput}[args.study](config)
    code = cli.guarded(body, debug=args.debug)  # Ctrl-C: status 130 and the --resume hint
    if code:
        return code
    config, tables, start = done["config"], done["tables"], done["start"]
    first = tables[1] if isinstance(tables, tuple) else tables
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(first.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{args.study}: {time.perf_counter() - start:.0f} s -> {Path(config.out) / args.study}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
