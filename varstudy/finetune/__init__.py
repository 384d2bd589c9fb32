"""Fine-tuning with randomized linear layers: ``python -m varstudy.finetune [options]``.

Fine-tunes a sequence-classification model whose ``nn.Linear`` modules (all, or those picked by the
``include``/``exclude`` regexes) are converted to ``RandomizedLinear`` at ratio ρ with one sketch
family, or left exact (``sketch="exact"``), and evaluates on the validation split at intervals.

Recipe (paper 1, PAPERS.md): AdamW β = (0.9, 0.98), ε = 1e-6, weight decay 0.1 (not on biases and
LayerNorm weights), linear warm-up over 6% of the steps then linear decay to 0, best evaluation
on validation reported ("best epoch"). The paper's budget (RoBERTa-base, 10 epochs, max length
512, lr 2e-5) is the ``paper`` preset. The defaults are a reduced CPU budget that finishes in a
few minutes: MiniLM on rotten_tomatoes, max length 64, batch 32, 200 steps (~0.94 epoch),
lr 1e-4 (a short run needs a larger step than 10 epochs do), evaluation every 50 steps.

Outputs, in ``<out>/<name>/``: ``steps.csv`` (step, loss, lr, time_s: cumulative training wall
time), ``evals.csv`` (step, metric, value; GLUE metric definitions from ``varstudy.metrics``, plus
``eval_loss``), ``run.csv`` (one row: config columns, best/final primary metric, train_time_s,
saved_mib ...), ``config.json`` (the resolved config).

NOTE [durable results / resume]: with ``out`` set, ``checkpoint.pt`` (model, AdamW, scheduler,
RNG states, randomized-layer call counters, step, the steps/evals rows so far) is written
atomically every ``checkpoint_every`` steps (default: at every evaluation) and deleted when the
run ends; the final tables are written atomically, ``run.csv`` last (it marks a finished run).
The run folder ``<out>/<name>`` changes only after the data, the model and the checkpoint to
resume from are loaded, and while the run holds the folder's lock (NOTE [one run per folder] in
:mod:`varstudy.io`).
``resume=True`` (``--resume``) refuses a checkpoint made with a different config, restores it,
replays only the minibatch order up to its step and continues; the tables then equal those of
an uninterrupted run (bit for bit on CPU), except the wall-clock ``time_s``/``train_time_s``.

NOTE [randomness]: every random choice comes from ``seed``: the new head's initialisation
(``load_model``), the minibatch order (a ``torch.Generator``), the sketches (``randomize(seed=)``)
and dropout, which reads torch's global RNG and therefore runs inside ``torch.random.fork_rng``
seeded with ``seed`` (the caller's RNG state is restored afterwards).

NOTE [memory]: ``saved_mib`` is the exact activation memory autograd holds for backward after the
forward of the first training step (``varstudy.randomized.memory.saved_bytes``, parameters excluded);
``saved_linear_mib`` is the part attributed to linear modules. ``peak_cuda_mib`` is the
in-process ``torch.cuda.max_memory_allocated`` over the whole run (NaN on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from varstudy import cli
from varstudy import distributed as dist
from varstudy import models
from varstudy import io as vio
from varstudy.errors import VarstudyError
from varstudy.randomized.sketches import SKETCHES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEVICES = ("auto", "cpu", "cuda")
SKETCH_CHOICES = ("exact", *SKETCHES)
MIB = 2**20


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Defaults: the reduced CPU budget (module docstring)."""

    model: str = "minilm"
    task: str = "rotten_tomatoes"
    data_dir: str | None = None
    sketch: str = "gaussian"          # a family of varstudy.randomized.sketches.SKETCHES, or "exact"
    ratio: float = 0.2                # ρ = k / n; ignored when exact
    include: str | None = None        # regex on nn.Linear names to convert (None: all)
    exclude: str | None = None        # regex on nn.Linear names to keep exact
    min_rows: int = 1
    seed: int = 0
    batch_size: int = 32
    max_length: int = 64
    padding: str = "fixed"            # fixed: every batch max_length; dynamic: its longest
    lr: float = 1e-4
    epochs: float | None = None       # used when max_steps is None
    max_steps: int | None = 200       # wins over epochs when set
    warmup: float = 0.06              # fraction of the steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    eval_every: int | None = 50       # steps between evaluations; None: once per epoch
    eval_examples: int | None = None  # first N validation (and test) examples; None: all
    test: bool = True                 # also evaluate the test split, where it has labels
    device: str = "auto"              # auto: cuda when available
    dtype: str = "float32"
    dropout: bool = True
    out: str | None = "results/finetune"  # None: write nothing
    name: str | None = None           # run folder; None: derived from the config
    num_threads: int = 2
    progress: bool = True
    resume: bool = False              # continue from <out>/<name>/checkpoint.pt if present
    checkpoint_every: int | None = None  # steps between checkpoints; None: at every evaluation


# Presets override only what differs from the defaults.
PRESETS: dict[str, dict] = {
    "cpu": {},
    # Paper 1's GLUE recipe; roberta-base must be a local HF directory or reachable on the hub.
    "paper": dict(model="roberta-base", max_length=512, batch_size=32, lr=2e-5, epochs=10,
                  max_steps=None, eval_every=None),
}


def preset(name: str, /, **overrides) -> FinetuneConfig:
    """A preset's config with ``overrides`` applied (``name=`` among them names the run)."""
    if name not in PRESETS:
        raise VarstudyError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS)}")
    return replace(FinetuneConfig(), **{**PRESETS[name], **overrides})


def check(config: FinetuneConfig) -> None:
    """Raise VarstudyError for a bad value, before anything is loaded."""
    if config.sketch not in SKETCH_CHOICES:
        raise VarstudyError(
            f"unknown sketch {config.sketch!r}; valid choices: {', '.join(SKETCH_CHOICES)}")
    if not 0.0 < config.ratio <= 1.0:
        raise VarstudyError(f"ratio must be in (0, 1], got {config.ratio!r}")
    if config.device not in DEVICES:
        raise VarstudyError(f"unknown device {config.device!r}; valid choices: {', '.join(DEVICES)}")
    models.resolve_device(config.device)  # raises when CUDA is requested but absent
    if config.dtype not in DTYPES:
        raise VarstudyError(f"unknown dtype {config.dtype!r}; valid choices: {', '.join(DTYPES)}")
    from varstudy.data import PADDINGS
    if config.padding not in PADDINGS:
        raise VarstudyError(f"unknown padding {config.padding!r}; valid choices: "
                            f"{', '.join(PADDINGS)}")
    if config.max_steps is None and config.epochs is None:
        raise VarstudyError("no training budget: set max_steps or epochs")
    positive = dict(batch_size=config.batch_size, max_length=config.max_length,
                    max_steps=config.max_steps, eval_every=config.eval_every,
                    eval_examples=config.eval_examples, num_threads=config.num_threads,
                    epochs=config.epochs, lr=config.lr, eps=config.eps)
    for key, value in positive.items():
        if value is not None and not 0 < value < math.inf:
            raise VarstudyError(f"{key} must be > 0 and finite, got {value!r}; valid: "
                                f"0 < {key} < inf")
    if not 0 <= config.weight_decay < math.inf:
        raise VarstudyError(f"weight_decay must be >= 0 and finite, got "
                            f"{config.weight_decay!r}; valid: 0 <= weight_decay < inf")
    betas = tuple(config.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise VarstudyError(f"betas {betas!r} are out of range; valid: two numbers B1 B2 with "
                            "0 <= B < 1 (AdamW; the paper's 0.9 0.98)")
    cli.check_seed("seed", config.seed)
    if config.name is not None and (config.name in (".", "..") or "/" in config.name
                                    or "\\" in config.name):
        raise VarstudyError(f"name {config.name!r} is not a folder name; valid: one path "
                            "component, not '.' or '..' (the run folder is <out>/<name>)")
    if config.checkpoint_every is not None and not config.checkpoint_every > 0:
        raise VarstudyError(f"checkpoint_every must be > 0, got {config.checkpoint_every!r}")
    if config.resume and not config.out:
        raise VarstudyError("resume needs an output directory: the checkpoint lives in "
                            "<out>/<name>; valid choices: --out DIR, or no --resume")
    if not 0.0 <= config.warmup < 1.0:
        raise VarstudyError(f"warmup must be a fraction in [0, 1), got {config.warmup!r}")


def run_name(config: FinetuneConfig) -> str:
    """Folder name of a run: model_task_sketch[ratio]_seedN, file-system safe."""
    if config.name:
        return config.name
    sketch = "exact" if config.sketch == "exact" else f"{config.sketch}{config.ratio:g}"
    raw = f"{Path(config.model).name}_{config.task}_{sketch}_seed{config.seed}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw)


resolve_device = models.resolve_device


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything a run needs, built from a config."""

    model: nn.Module
    train: dict
    valid: dict
    test: dict | None
    task: str
    metrics: tuple[str, ...]
    converted: list[str]
    total_steps: int
    steps_per_epoch: int
    device: str


def build(config: FinetuneConfig, ctx: dist.Context = dist.Context(),
          device: str | None = None) -> Setup:
    """Load data and model, convert the linear layers, and size the training budget.

    Under torchrun each rank trains on its own shard (examples rank::world) and draws its own
    sketches (seed derived from the run's seed and the rank); one process keeps ``seed``.
    """
    from varstudy.data import available_splits, encode, load_dataset
    from varstudy.randomized.layers import derive_seed, randomize
    from varstudy.models import load_model

    device = device or resolve_device(config.device)
    train_ds = load_dataset(config.task, "train", seed=config.seed, data_dir=config.data_dir)
    valid_ds = load_dataset(config.task, "validation", seed=config.seed, data_dir=config.data_dir)
    test_ds = None
    if config.test and "test" in available_splits(config.task):
        test_ds = load_dataset(config.task, "test", seed=config.seed, data_dir=config.data_dir)
    if config.eval_examples is not None:
        valid_ds = valid_ds.subset(slice(0, config.eval_examples))
        test_ds = test_ds and test_ds.subset(slice(0, config.eval_examples))
    model, tokenizer = load_model(config.model, num_labels=train_ds.num_labels,
                                  dropout=config.dropout, seed=config.seed,
                                  dtype=DTYPES[config.dtype], device=device)
    converted = []
    if config.sketch != "exact":
        sketch_seed = derive_seed(config.seed, ctx.rank) if ctx.active else config.seed
        converted = randomize(model, config.ratio, config.sketch, include=config.include,
                              exclude=config.exclude, min_rows=config.min_rows,
                              seed=sketch_seed).names
    if config.batch_size > len(train_ds):
        raise VarstudyError(f"batch_size {config.batch_size} exceeds the {len(train_ds)} "
                            f"training examples of {config.task!r}; valid: <= {len(train_ds)}")
    if ctx.active:
        train_ds = train_ds.subset(slice(ctx.rank, None, ctx.world))
        if config.batch_size > len(train_ds):
            raise VarstudyError(f"batch_size {config.batch_size} exceeds the {len(train_ds)} "
                                f"examples of one rank's shard; valid: <= {len(train_ds)}")
    per_epoch = len(train_ds) // config.batch_size
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    def held_out(ds):  # evaluation order does not change any metric; by length, padding is cheap
        enc = encode(ds, tokenizer, config.max_length)
        return by_length(enc) if config.padding == "dynamic" else enc

    return Setup(model, encode(train_ds, tokenizer, config.max_length), held_out(valid_ds),
                 test_ds and held_out(test_ds), config.task,
                 train_ds.metrics, converted, total, per_epoch, device)


def make_optimizer(model: nn.Module, config: FinetuneConfig, total_steps: int):
    """AdamW without decay on biases and LayerNorm weights, linear warm-up then linear decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas),
                                  eps=config.eps)
    warm = math.ceil(config.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def by_length(encoded: dict) -> dict:
    """The examples of ``encoded`` sorted by real length (stable), for cheap padded evaluation."""
    order = torch.argsort(encoded["attention_mask"].sum(1), stable=True)
    return {k: v[order] for k, v in encoded.items()}


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, encoded: dict, task: str, device: str,
             batch_size: int = 64, padding: str = "fixed") -> dict[str, float]:
    """The task's metrics (GLUE definitions) and the mean loss on ``encoded``; restores train mode."""
    from varstudy.data import pad_batches, sequential_batches
    from varstudy.metrics import compute_metrics

    was_training = model.training
    model.eval()
    logits, losses = [], []
    for batch in pad_batches(sequential_batches(encoded, batch_size), padding):
        out = model(**to_device(batch, device))
        logits.append(out.logits.float().cpu())
        losses.append(float(out.loss) * len(batch["labels"]))
    model.train(was_training)
    scores = torch.cat(logits)
    preds = scores[:, 0] if scores.shape[1] == 1 else scores
    values = compute_metrics(task, preds, encoded["labels"])
    values["eval_loss"] = sum(losses) / len(encoded["labels"])
    return values


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """Tables of one run: ``run`` (one row), ``steps`` and ``evals`` (tidy), ``config`` (resolved)."""

    run: pd.DataFrame
    steps: pd.DataFrame
    evals: pd.DataFrame
    config: dict


def train(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune as ``config`` says; write the tables when ``config.out`` is set.

    The run folder changes only after the data, the model and a checkpoint to resume from have
    been loaded, and while this run holds its lock (NOTE [one run per folder] in varstudy.io).
    """
    check(config)
    ctx, device = dist.setup(resolve_device(config.device))
    folder = Path(config.out) / run_name(config) if config.out else None
    writer = folder is not None and ctx.is_main
    if writer:
        finished = _finished_run(folder, config)
        if finished is not None and not ctx.active:
            return finished
        vio.check_writable(folder)
    with contextlib.ExitStack() as held:
        with _threads(config.num_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            setup = build(config, ctx, device)
            saved = _saved_state(folder, config) if config.resume and folder else None
            if writer:
                held.enter_context(vio.output_lock(folder))
                _clear_folder(folder, config)
            if setup.device.startswith("cuda"):
                torch.cuda.manual_seed_all(config.seed)
                torch.cuda.reset_peak_memory_stats()
            steps, evals, memory = _loop(setup, config, ctx, folder, saved)
        result = _tables(config, setup, steps, evals, memory)
        result.config["world_size"] = ctx.world
        if writer:
            write(result, folder)
            vio.remove(folder / CHECKPOINT)
    return result


def run(config: FinetuneConfig) -> pd.DataFrame:
    """Fine-tune and return the one-row run table (see :func:`train` for all tables)."""
    return train(config).run


def _loop(setup: Setup, config: FinetuneConfig, ctx: dist.Context = dist.Context(),
          folder: Path | None = None, saved: dict | None = None):
    from tqdm.auto import tqdm

    from varstudy.data import minibatches, pad_batches
    from varstudy.randomized.memory import saved_bytes

    device = setup.device
    model = dist.data_parallel(ctx, setup.model)  # DistributedDataParallel under torchrun
    optimizer, scheduler = make_optimizer(model, config, setup.total_steps)
    every = config.eval_every or setup.steps_per_epoch
    gen = torch.Generator().manual_seed(config.seed)
    batches = pad_batches(minibatches(setup.train, config.batch_size, generator=gen,
                                      num_batches=setup.total_steps), config.padding)
    steps, evals, memory, elapsed = [], [], None, 0.0
    if saved is not None:
        steps, evals, memory, elapsed = _restore(saved, setup, optimizer, scheduler)
    save_every = config.checkpoint_every or every
    bar = tqdm(total=setup.total_steps, desc=run_name(config), initial=len(steps),
               disable=not (config.progress and ctx.is_main), leave=False)
    for step, batch in enumerate(batches, start=1):
        if step <= len(steps):
            continue  # trained before the checkpoint: replay the minibatch order only
        batch = to_device(batch, device)
        _sync(device)
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        if memory is None:
            out, memory = saved_bytes(lambda: model(**batch).loss, model=setup.model)
        else:
            out = model(**batch).loss
        out.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = dist.mean_scalar(ctx, out.detach())  # synchronizes; mean over ranks
        if not math.isfinite(loss):
            raise VarstudyError(_non_finite(setup.model, step, loss))
        elapsed += time.perf_counter() - start
        steps.append((step, loss, lr, elapsed))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % every == 0 or step == setup.total_steps:
            evals += _evaluations(setup, config, step, evals)
        if folder is not None and ctx.is_main and step % save_every == 0 \
                and step < setup.total_steps:
            _checkpoint(folder, config, setup, optimizer, scheduler, steps, evals, memory,
                        elapsed)
    bar.close()
    return steps, evals, memory


def _evaluations(setup: Setup, config: FinetuneConfig, step: int, evals: list) -> list[tuple]:
    """(step, metric, value) rows of the validation split; when the primary validation metric
    reaches a new best (the step whose test score the run reports), also of the test split
    (metric names prefixed ``test_``)."""
    size = max(64, 2 * config.batch_size)
    values = evaluate(setup.model, setup.valid, setup.task, setup.device, size, config.padding)
    rows = [(step, k, v) for k, v in values.items()]
    metric = setup.metrics[0]
    best = max((v for _, k, v in evals if k == metric), default=-math.inf)
    if setup.test is not None and values[metric] > best:
        rows += [(step, f"test_{k}", v) for k, v in evaluate(
            setup.model, setup.test, setup.task, setup.device, size, config.padding).items()]
    return rows


def _non_finite(model: nn.Module, step: int, loss: float) -> str:
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    where = f"first non-finite weight: {bad}" if bad else "weights still finite"
    return (f"non-finite training loss {loss} at step {step} ({where}); valid choices: a lower "
            "--lr, --dtype float32 or float64, finite data")


# --------------------------------------------------------------------------------------------
# Checkpoints (NOTE [durable results / resume])
# --------------------------------------------------------------------------------------------

CHECKPOINT = "checkpoint.pt"
NOT_COMPARED = ("progress", "resume", "checkpoint_every", "out")
FINAL = ("run.csv", "steps.csv", "evals.csv", "config.json")


def _finished_run(folder: Path, config: FinetuneConfig) -> FinetuneResult | None:
    """With ``resume``, the tables of a run that already finished in ``folder`` (else None)."""
    if config.resume and not (folder / CHECKPOINT).is_file() and (folder / "run.csv").is_file():
        done = vio.read_json(folder / "config.json")
        vio.refuse_changed(folder, {k: done.get(k) for k in asdict(config)}, asdict(config),
                           NOT_COMPARED + ("device",))
        return FinetuneResult(*(pd.read_csv(folder / f"{n}.csv") for n in
                                ("run", "steps", "evals")), done)
    return None


def _clear_folder(folder: Path, config: FinetuneConfig) -> None:
    """Delete what a new run replaces (only the run's own files; a resumed run keeps its
    checkpoint)."""
    vio.remove(*(folder / n for n in FINAL))  # run.csv first: a partial run never looks done
    if not config.resume:
        vio.remove(folder / CHECKPOINT)


def _saved_state(folder: Path, config: FinetuneConfig) -> dict | None:
    """The checkpoint to resume from (None when there is none), made with this config."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    saved = vio.load_checkpoint(path)
    vio.refuse_changed(path, saved.get("config", {}), asdict(config), NOT_COMPARED)
    return saved


def _checkpoint(folder, config, setup, optimizer, scheduler, steps, evals, memory, elapsed):
    from varstudy.randomized.layers import RandomizedLinear

    vio.atomic_torch_save(folder / CHECKPOINT, dict(
        config=asdict(config), model=setup.model.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state_all() if setup.device.startswith("cuda") else None,
        calls={n: m.calls for n, m in setup.model.named_modules()
               if isinstance(m, RandomizedLinear)},
        steps=steps, evals=evals, elapsed=elapsed,
        memory=dict(total=memory.total, by_module=dict(memory.by_module))))


def _restore(saved, setup, optimizer, scheduler):
    """State of a checkpoint (:func:`_saved_state`) -> (steps, evals, memory, elapsed)."""
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
    memory = SavedBytes(total=saved["memory"]["total"],
                        by_module=defaultdict(int, saved["memory"]["by_module"]))
    return list(saved["steps"]), list(saved["evals"]), memory, saved["elapsed"]


def _tables(config: FinetuneConfig, setup: Setup, steps, evals, memory) -> FinetuneResult:
    steps_df = pd.DataFrame(steps, columns=["step", "loss", "lr", "time_s"])
    evals_df = pd.DataFrame(evals, columns=["step", "metric", "value"])
    metric = setup.metrics[0]
    primary = evals_df[evals_df.metric == metric]
    best = primary.loc[primary.value.idxmax()]
    linear = [n for n, m in setup.model.named_modules() if isinstance(m, nn.Linear)]
    resolved = {**asdict(config), "device": setup.device, "run": run_name(config),
                "total_steps": setup.total_steps, "steps_per_epoch": setup.steps_per_epoch,
                "warmup_steps": math.ceil(config.warmup * setup.total_steps),
                "n_train": len(setup.train["labels"]), "n_eval": len(setup.valid["labels"]),
                "n_test": 0 if setup.test is None else len(setup.test["labels"]),
                "converted": setup.converted, "torch": torch.__version__}
    train_time = float(steps_df.time_s.iloc[-1])
    row = {k: v for k, v in resolved.items()
           if k not in ("converted", "betas", "progress", "resume", "checkpoint_every")}
    test = evals_df[(evals_df.metric == f"test_{metric}") & (evals_df.step == best.step)]
    row.update(n_converted=len(setup.converted), metric=metric, best_value=float(best.value),
               best_step=int(best.step), final_value=float(primary.value.iloc[-1]),
               test_at_best=float(test.value.iloc[0]) if len(test) else float("nan"),
               final_loss=float(steps_df.loss.tail(10).mean()), train_time_s=train_time,
               examples_per_s=len(steps_df) * config.batch_size / train_time,
               saved_mib=memory.total / MIB, saved_linear_mib=memory.for_modules(linear) / MIB,
               peak_cuda_mib=(torch.cuda.max_memory_allocated() / MIB
                              if setup.device == "cuda" else float("nan")))
    return FinetuneResult(pd.DataFrame([row]), steps_df, evals_df, resolved)


def write(result: FinetuneResult, folder: Path) -> Path:
    """Write steps.csv, evals.csv, config.json and, last, run.csv into ``folder`` (atomically)."""
    vio.atomic_write_csv(folder / "steps.csv", result.steps)
    vio.atomic_write_csv(folder / "evals.csv", result.evals)
    vio.atomic_write_json(folder / "config.json", result.config)
    vio.atomic_write_csv(folder / "run.csv", result.run)
    return folder


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _optional(kind):
    def convert(text: str):
        return None if text.lower() in ("none", "") else kind(text)
    return convert


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}; valid choices: true, false")


_CONVERTERS = {
    "data_dir": _optional(str), "include": _optional(str), "exclude": _optional(str),
    "epochs": _optional(float), "max_steps": _optional(int), "eval_every": _optional(int),
    "eval_examples": _optional(int), "out": _optional(str), "name": _optional(str),
    "dropout": _flag, "progress": _flag, "resume": _flag, "test": _flag,
    "checkpoint_every": _optional(int),
}


def parser() -> argparse.ArgumentParser:
    """Options mirror FinetuneConfig fields (``--batch-size`` for ``batch_size``)."""
    p = _Parser(prog="python -m varstudy.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", help=f"one of {', '.join(PRESETS)} (default cpu)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    for f in fields(FinetuneConfig):
        opt = "--" + f.name.replace("_", "-")
        if f.name == "betas":
            p.add_argument(opt, type=float, nargs=2, metavar=("B1", "B2"),
                           default=argparse.SUPPRESS)
            continue
        kind = _CONVERTERS.get(f.name, type(f.default))
        # SUPPRESS: an absent option is missing from the namespace, so "--out none" (None) is
        # told apart from "not given" (the preset's value).
        p.add_argument(opt, type=kind, default=argparse.SUPPRESS, help=f"default {f.default!r}")
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """A preset plus the options that were given; --epochs alone clears max_steps."""
    given = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig)
             if hasattr(args, f.name)}
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    if "epochs" in given and "max_steps" not in given:
        given["max_steps"] = None
    if given.get("sketch") == "exact" and "ratio" in given:
        raise VarstudyError("--ratio conflicts with --sketch exact (an exact model has no "
                            "ratio); valid choices: drop --ratio, or pick a sketch family")
    return preset(args.preset, **given)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:  # usage error (one line, status 2) or --help (status 0)
        return int(stop.code or 0)
    done = {}

    def body() -> None:
        done["config"] = config = config_from_args(args)
        done["result"] = train(config)
    try:  # bad input: one line, status 2; Ctrl-C: status 130 and the --resume hint
        code = cli.guarded(body, debug=args.debug)
    finally:
        dist.teardown()
    if code or not dist.is_main_process():
        return code
    config, result = done["config"], done["result"]
    row = result.run.iloc[0]
    print(f"{row['run']}: best {row['metric']} {row['best_value']:.4f} at step "
          f"{row['best_step']}, final {row['final_value']:.4f}, "
          f"train {row['train_time_s']:.1f} s, saved {row['saved_mib']:.1f} MiB"
          + (f" -> {Path(config.out) / row['run']}" if config.out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
