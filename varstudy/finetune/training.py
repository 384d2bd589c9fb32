"""Building, training and evaluating one fine-tuning run: :func:`train` (NOTE [recipe],
NOTE [randomness] and NOTE [durable results / resume] in :mod:`varstudy.finetune`)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from varstudy import distributed as dist
from varstudy import io as vio
from varstudy.errors import VarstudyError
from varstudy.finetune import checkpoint as ckpt
from varstudy.finetune.config import FinetuneConfig, check, run_name
from varstudy.finetune.tables import FinetuneResult, run_tables, write
from varstudy.models import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


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
    from varstudy.data import available_splits, load_dataset
    from varstudy.batching import encode
    from varstudy.models import load_model
    from varstudy.randomized.layers import randomize
    from varstudy.randomized.seeds import derive_seed

    device = device or resolve_device(config.device)

    def split(name: str):
        return load_dataset(config.task, name, seed=config.seed, data_dir=config.data_dir)

    train_ds, valid_ds = split("train"), split("validation")
    test_ds = split("test") if config.test and "test" in available_splits(config.task) else None
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
                              seed=sketch_seed, plan=config.plan).names
    train_ds = _shard(train_ds, config, ctx)
    per_epoch = len(train_ds) // config.batch_size
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))

    def held_out(ds):  # evaluation order does not change any metric; by length, padding is cheap
        enc = encode(ds, tokenizer, config.max_length)
        return by_length(enc) if config.padding == "dynamic" else enc

    return Setup(model, encode(train_ds, tokenizer, config.max_length), held_out(valid_ds),
                 test_ds and held_out(test_ds), config.task,
                 train_ds.metrics, converted, total, per_epoch, device)


def _shard(train_ds, config: FinetuneConfig, ctx: dist.Context):
    """This rank's training examples; an error when one batch exceeds them."""
    if config.batch_size > len(train_ds):
        raise VarstudyError(f"batch_size {config.batch_size} exceeds the {len(train_ds)} "
                            f"training examples of {config.task!r}; valid: <= {len(train_ds)}")
    if ctx.active:
        train_ds = train_ds.subset(slice(ctx.rank, None, ctx.world))
        if config.batch_size > len(train_ds):
            raise VarstudyError(f"batch_size {config.batch_size} exceeds the {len(train_ds)} "
                                f"examples of one rank's shard; valid: <= {len(train_ds)}")
    return train_ds


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
    """``batch`` with every tensor moved to ``device`` (non-blocking)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, encoded: dict, task: str, device: str,
             batch_size: int = 64, padding: str = "fixed") -> dict[str, float]:
    """The task's metrics (GLUE definitions) and the mean loss on ``encoded``; restores train mode."""
    from varstudy.batching import pad_batches, sequential_batches
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


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that wall-clock timings are honest."""
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def threads(num_threads: int | None):
    """Use ``num_threads`` CPU threads in torch within the block, then restore the count
    (None: leave torch's setting alone)."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune as ``config`` says; write the tables when ``config.out`` is set.

    The run writes into a staging folder, which replaces the run folder once the run has
    finished (NOTE [staged results] in varstudy.io); it is made only after the data, the model
    and a checkpoint to resume from have been loaded, and while this run holds the folder's lock
    (NOTE [one run per folder]).
    """
    check(config)
    if config.plan is not None:  # the plan's family and nominal ratio label the run
        from dataclasses import replace

        from varstudy.randomized.plan import load_plan
        family, _, nominal = load_plan(config.plan)
        config = replace(config, sketch=family, ratio=nominal or config.ratio)
    ctx, device = dist.setup(resolve_device(config.device))
    folder = Path(config.out) / run_name(config) if config.out else None
    writer = folder is not None and ctx.is_main
    if writer:
        finished = ckpt.finished_run(folder, config)
        if finished is not None and not ctx.active:
            return finished
        vio.check_writable(folder)
    with contextlib.ExitStack() as held:
        with threads(config.num_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            setup = build(config, ctx, device)
            saved = ckpt.saved_state(folder, config) if config.resume and folder else None
            stage = None
            if writer:
                held.enter_context(vio.output_lock(folder))
                stage = held.enter_context(vio.staged(folder, resume=config.resume))
            if setup.device.startswith("cuda"):
                torch.cuda.manual_seed_all(config.seed)
                torch.cuda.reset_peak_memory_stats()
            steps, evals, memory, plans = loop(setup, config, ctx, stage, saved)
            in_effect = torch.get_num_threads()
        result = run_tables(config, setup, steps, evals, memory, in_effect, plans)
        result.config["world_size"] = ctx.world
        if writer:
            if config.save_model:
                save_model(setup.model, config.model, stage / "model", config.progress)
            write(result, stage)
            vio.remove(stage / ckpt.CHECKPOINT)
    return result


def save_model(model, name: str, folder: Path, progress: bool = True) -> Path:
    """The model's weights, config and its tokenizer in Hugging Face format (RandomizedLinear
    has nn.Linear's state_dict keys, so the folder loads as a plain model); transformers' own
    progress bar only with ``progress``."""
    from transformers.utils import logging as hf_logging

    from varstudy.models import load_tokenizer

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    load_tokenizer(name, vocab_size=getattr(model.config, "vocab_size", None)).save_pretrained(
        folder)
    return folder


def run(config: FinetuneConfig) -> pd.DataFrame:
    """Fine-tune and return the one-row run table (see :func:`train` for all tables)."""
    return train(config).run


def loop(setup: Setup, config: FinetuneConfig, ctx: dist.Context = dist.Context(),
         folder: Path | None = None, saved: dict | None = None):
    """Train ``setup.model`` for ``setup.total_steps`` steps (from a checkpoint ``saved``);
    returns (steps rows, evals rows, the saved-bytes report of the first step, the online
    re-plans' rows)."""
    from varstudy.progress import tqdm

    from varstudy.batching import minibatches, pad_batches
    from varstudy.randomized.memory import saved_bytes
    from varstudy.randomized.wtacrs import set_examples

    device = setup.device
    model = dist.data_parallel(ctx, setup.model)  # DistributedDataParallel under torchrun
    optimizer, scheduler = make_optimizer(model, config, setup.total_steps)
    every = config.eval_every or setup.steps_per_epoch
    gen = torch.Generator().manual_seed(config.seed)
    with_ids = _uses_examples(setup.model)  # wta-crs: NOTE in varstudy.randomized.wtacrs
    batches = pad_batches(minibatches(setup.train, config.batch_size, generator=gen,
                                      num_batches=setup.total_steps, with_ids=with_ids),
                          config.padding)
    planner = _planner(setup, config, ctx)
    steps, evals, memory, elapsed, plans = [], [], None, 0.0, []
    if saved is not None:
        steps, evals, memory, elapsed, plans = ckpt.restore(saved, setup, optimizer, scheduler,
                                                            planner)
    save_every = config.checkpoint_every or every
    bar = tqdm(total=setup.total_steps, desc=run_name(config), initial=len(steps),
               disable=not (config.progress and ctx.is_main), leave=False)
    for step, batch in enumerate(batches, start=1):
        if step <= len(steps):
            continue  # trained before the checkpoint: replay the minibatch order only
        if with_ids:
            set_examples(setup.model, batch.pop("example_ids"))
        batch = to_device(batch, device)
        synchronize(device)
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
        record = planner and planner.step()
        if record:
            from varstudy.randomized.online import replan_rows
            plans += replan_rows(record)
        loss = dist.mean_scalar(ctx, out.detach())  # synchronizes; mean over ranks
        if not math.isfinite(loss):
            raise VarstudyError(_non_finite(setup.model, step, loss))
        elapsed += time.perf_counter() - start
        steps.append((step, loss, lr, elapsed))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % every == 0 or step == setup.total_steps:
            evals += evaluations(setup, config, step, evals)
        if folder is not None and ctx.is_main and step % save_every == 0 \
                and step < setup.total_steps:
            ckpt.save(folder, config, setup, optimizer, scheduler, steps, evals, memory, elapsed,
                      planner, plans)
    bar.close()
    if planner is not None:
        planner.close()
    return steps, evals, memory, plans


def _uses_examples(model: nn.Module) -> bool:
    """Whether a layer of ``model`` samples from a per-example cache (``wta-crs``)."""
    return any(getattr(getattr(m, "sketch", None), "uses_examples", False)
               for m in model.modules())


def _planner(setup: Setup, config: FinetuneConfig, ctx: dist.Context):
    """The online planner of ``--replan-every`` (None without it); one process only."""
    if config.replan_every is None:
        return None
    if ctx.active:
        raise VarstudyError("--replan-every runs in one process: each rank would plan from its "
                            "own statistics; valid choices: drop --replan-every under torchrun")
    from varstudy.randomized.online import OnlinePlanner
    return OnlinePlanner(setup.model, config.ratio, every=config.replan_every,
                         reference=config.replan_check)


def evaluations(setup: Setup, config: FinetuneConfig, step: int, evals: list) -> list[tuple]:
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
