"""Measurement engine: ``python -m varstudy.measure``; API ``run(MeasureConfig()) -> DataFrame``.

For each measured training step and each of ``num_batches`` random minibatches, it captures
(X, Y) of every selected ``nn.Linear`` of the exact model (:mod:`varstudy.randomized.capture`), then per
weight tensor and per (family, ratio): the sketch variance given the batch (closed form, and
Monte Carlo on a chosen subset), the minibatch sampling variance (per-example Gram trick,
finite-population correction with N = dataset size), their ratio, and the seed paper's numbers
(:mod:`varstudy.randomized.variance`). Conventions: a sample is one example, loss = mean over the batch,
variance = E‖ĝ − Eĝ‖²_F of a weight tensor, model totals = sums over layers (ARCHITECTURE.md).

NOTE [determinism / distribution]: minibatch b at training step t draws its B example indices
from ``derive_seed(seed, t, b, 0)`` (uniform without replacement) and its Monte Carlo sketch
seeds from ``derive_seed(seed, t, b, 1, layer, family, ratio)``; so rows of a batch depend only
on (config, t, b). Dropout (``dropout=True``) draws from torch's global RNG, seeded per
batch with ``derive_seed(seed, t, b, 3)`` and per training segment with ``derive_seed(seed,
start, 2**32, 3)``. A distributed run can give batch b to rank b % world; a resumed run can skip
batches already in ``chunks/step_<t>.csv`` (one chunk per measured step, appended per batch,
assembled into the final tables at the end). Training batches use ``derive_seed(seed, t, 2**32,
0)``; the classifier head is initialised from ``seed``.

NOTE [durable results / resume]: every finished batch is appended to its step's chunk with one
write + fsync (:mod:`varstudy.io`); final tables are written last, each through a temp file +
``os.replace``, and ``env.json`` is written after them, so its presence marks a complete run
(stale final tables are deleted when a run starts). Nothing in ``out`` changes before the model,
the data and the layer patterns are loaded and checked, and only while the run holds the
folder's lock (NOTE [one run per folder] in :mod:`varstudy.io`); only the run's own files are
deleted. ``resume=True`` (``--resume``) refuses a config.json that differs (except
``progress``/``resume``/``out``), drops from the chunks a trailing partial line and every batch
that is incomplete or holds a row that fails :func:`finished_rows`' checks (a line cut or edited
in the middle, a batch appended twice), and measures only the missing batches. Training over
steps is resumed from a checkpoint, not replayed: after training up to each measured step
t > 0, the model and AdamW state are saved atomically to ``state/train.pt`` (one file, replaced;
the run measures step t only after that), and resume loads it; steps before t are complete by
then. The tables of a resumed run equal those of an uninterrupted one (bit for bit on CPU).

Output directory ``out`` (default ``results/measure/default``): ``layers.csv``, ``summary.csv``,
``config.json`` (resolved config), ``env.json`` (versions, device, threads, wall time),
``chunks/``, ``state/`` (training checkpoint). Schema (variances in squared gradient units, i.e. (loss/weight)²):

layers.csv, one row per (train_step, batch, layer, family, ratio):
  train_step (optimizer updates done), batch (index b), layer (module name, or "model" for the
  sum over layers), layer_kind (models.layer_kind; "model"), layer_index (encoder layer; NaN),
  d_in, d_out, batch_size (B), n_rows (token rows n the sketch sees: B·L, or B for pooler and
  classifier), family, ratio (ρ), k (sketch rows), grad_sq_norm (‖g_B‖²), var_sampling
  (Var[g_B] estimate, FPC), var_sketch (closed form E‖Ĝ−G‖² given the batch), var_sketch_mc,
  var_sketch_mc_se (Monte Carlo mean and SE; NaN when not drawn), mc_draws (0 when not drawn),
  alpha (a/s), paper_ratio ((s−a)/(n·p−a)), paper_bound ((α+1)/α), paper_ratio_plotted,
  paper_bound_plotted (1+α, the inverted-α figure), ratio_sketch_sampling (var_sketch /
  var_sampling). Model rows: d_in, d_out, n_rows, k NaN; variances summed; alpha = Σa/Σs,
  paper_ratio = Σ(s−a)/Σ(n·p−a); var_sketch_mc only when every layer was drawn.
summary.csv, one row per (train_step, layer incl. "model", family, ratio):
  train_step, layer, layer_kind, layer_index, family, ratio, k, n_batches,
  var_sketch_{mean,ci_low,ci_high}, var_sampling_{mean,ci_low,ci_high}, var_total
  (= var_sketch_mean + var_sampling_mean, law of total variance), ratio_{mean,ci_low,ci_high}
  (of the per-batch ratio_sketch_sampling), var_sketch_mc_mean (over batches with MC),
  var_sketch_mc_se (Monte Carlo SE of that mean). CIs: t-intervals over batches at ``level``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from varstudy import cli
from varstudy import distributed as dist
from varstudy import io as vio
from varstudy.randomized import variance as V
from varstudy.randomized.capture import capture, mean_loss, select_layers
from varstudy.data import DATASETS, encode, load_dataset
from varstudy.errors import VarstudyError
from varstudy.randomized.layers import derandomize, derive_seed, randomize
from varstudy.models import layer_index, layer_kind, load_model, resolve_device
from varstudy.randomized.sketches import SKETCHES, get_sketch, rows_for

LAYER_COLUMNS = (
    "train_step", "batch", "layer", "layer_kind", "layer_index", "d_in", "d_out", "batch_size",
    "n_rows", "family", "ratio", "k", "grad_sq_norm", "var_sampling", "var_sketch",
    "var_sketch_mc", "var_sketch_mc_se", "mc_draws", "alpha", "paper_ratio", "paper_bound",
    "paper_ratio_plotted", "paper_bound_plotted", "ratio_sketch_sampling")
SUMMARY_COLUMNS = (
    "train_step", "layer", "layer_kind", "layer_index", "family", "ratio", "k", "n_batches",
    "var_sketch_mean", "var_sketch_ci_low", "var_sketch_ci_high", "var_sampling_mean",
    "var_sampling_ci_low", "var_sampling_ci_high", "var_total", "ratio_mean", "ratio_ci_low",
    "ratio_ci_high", "var_sketch_mc_mean", "var_sketch_mc_se")
INT_COLUMNS = ("train_step", "batch", "layer_index", "d_in", "d_out", "batch_size", "n_rows", "k",
               "mc_draws")  # nullable integers (NA on model rows)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
TRAIN_BATCH = 2**32  # batch key of training minibatches in derive_seed


@dataclass(frozen=True)
class MeasureConfig:
    """Everything a measurement depends on; the defaults take about 2-3 minutes on 2 CPU cores."""

    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    split: str = "train"
    data_dir: str | None = None
    batch_size: int = 16
    max_length: int = 64
    families: tuple[str, ...] = tuple(SKETCHES)
    ratios: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)
    min_rows: int = 1
    num_batches: int = 16
    layers: str | None = None
    mc_draws: int = 8
    mc_layers: str | None = r"layer\.3\.intermediate\.dense$"
    mc_batches: int = 1
    fpc: bool = True
    level: float = 0.95
    seed: int = 0
    train_steps: int = 0
    measure_at: tuple[int, ...] = ()
    train_sketch: str | None = None
    train_ratio: float = 0.1
    lr: float = 2e-5
    weight_decay: float = 0.1
    device: str = "auto"
    dtype: str = "float32"
    dropout: bool = False
    out: str = "results/measure/default"
    progress: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("families", "ratios", "measure_at"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for fam in self.families + ((self.train_sketch,) if self.train_sketch else ()):
            get_sketch(fam)
        _check(len(self.families) > 0, "families is empty; valid choices: "
               f"{', '.join(SKETCHES)}")
        cli.check_distinct("families", self.families)
        cli.check_distinct("ratios", self.ratios)
        cli.check_seed("seed", self.seed)
        vio.require_out(self.out)
        _check(len(self.ratios) > 0 and all(0 < r <= 1 for r in self.ratios + (self.train_ratio,)),
               f"ratios must be in (0, 1], got {self.ratios} / train_ratio {self.train_ratio}")
        _check(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; valid choices: "
               f"{', '.join(DATASETS)}")
        _check(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}; valid choices: "
               f"{', '.join(DTYPES)}")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
               f"unknown device {self.device!r}; valid choices: auto, cpu, cuda, cuda:N")
        for name, low in (("batch_size", 2), ("max_length", 2), ("num_batches", 1),
                          ("min_rows", 1), ("mc_draws", 0), ("mc_batches", 0),
                          ("train_steps", 0)):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                   f"{name} must be an integer >= {low}, got {value!r}")
        _check(all(0 <= t <= self.train_steps for t in self.measure_at),
               f"measure_at steps must lie in [0, train_steps={self.train_steps}], "
               f"got {self.measure_at}; valid choices: raise --train-steps or measure earlier")
        _check(not (self.train_sketch and self.train_steps == 0),
               f"train_sketch {self.train_sketch!r} has no effect with train_steps 0; valid "
               "choices: --train-steps N > 0, or --train-sketch none")
        _check(0 < self.level < 1 and 0 < self.lr < math.inf
               and 0 <= self.weight_decay < math.inf,
               f"level {self.level!r}, lr {self.lr!r} or weight_decay {self.weight_decay!r} "
               "is out of range; valid: 0 < level < 1, finite lr > 0 and weight_decay >= 0")
        for pattern in (self.layers, self.mc_layers):
            try:
                re.compile(pattern or "")
            except re.error as err:
                raise VarstudyError(f"invalid layer regex {pattern!r}: {err}") from None

    def resolved(self) -> "MeasureConfig":
        """Device resolved ("auto" -> cuda when present), measure_at made explicit and sorted."""
        device = resolve_device(self.device)
        steps = self.measure_at or ((0,) if self.train_steps == 0 else (0, self.train_steps))
        return replace(self, device=device, measure_at=tuple(sorted(set(steps))))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise VarstudyError(message)


# ------------------------------------------------------------------------------------------
# One minibatch -> rows
# ------------------------------------------------------------------------------------------


def batch_indices(num_examples: int, cfg: MeasureConfig, step: int, b: int) -> torch.Tensor:
    """The B example indices of batch ``b`` at step ``step`` (NOTE [determinism / distribution])."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, b, 0))
    return torch.randperm(num_examples, generator=gen)[:cfg.batch_size]


def layer_rows(cfg: MeasureConfig, name: str, pos: int, x, y, grad, population: float,
               mc: bool, step: int, b: int) -> list[dict]:
    """Rows of one layer of one batch: every (family, ratio). x (B, L, d_in) or (B, d_in)."""
    m = V.moments(x, y, grad)
    sampling = V.sampling_from_norms(V.per_example_sq_norms(x, y), m.a, population)
    base = dict(train_step=step, batch=b, layer=name, layer_kind=layer_kind(name),
                layer_index=layer_index(name), d_in=x.shape[-1], d_out=y.shape[-1],
                batch_size=x.shape[0], n_rows=m.n, grad_sq_norm=m.a,
                var_sampling=sampling.var_batch, _s=m.s, _a=m.a, _q=m.n * m.p - m.a)
    rows = []
    for ratio in cfg.ratios:
        k = rows_for(m.n, ratio, cfg.min_rows)
        paper = V.paper_quantities(m, k)
        for fam in cfg.families:
            var = V.closed_form(fam, m, k)
            mc_mean = mc_se = math.nan
            if mc and cfg.mc_draws > 0:
                seed = derive_seed(cfg.seed, step, b, 1, pos, V.family_key(fam),
                                   round(ratio * 1e6))
                mc_mean, mc_se = V.mc_sketch_variance(fam, x, y, k, cfg.mc_draws, seed)
            rows.append(dict(base, family=fam, ratio=ratio, k=k, var_sketch=var,
                             var_sketch_mc=mc_mean, var_sketch_mc_se=mc_se,
                             mc_draws=cfg.mc_draws if mc else 0, **paper,
                             ratio_sketch_sampling=_div(var, sampling.var_batch)))
    return rows


def model_rows(rows: list[dict]) -> list[dict]:
    """Model totals (sums over layers) per (family, ratio) of one batch's layer rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["ratio"]), []).append(r)
    out = []
    for (fam, ratio), g in groups.items():
        tot = {c: sum(r[c] for r in g) for c in
               ("grad_sq_norm", "var_sampling", "var_sketch", "_s", "_a", "_q")}
        drawn = all(r["mc_draws"] > 0 for r in g)
        alpha = _div(tot["_a"], tot["_s"])
        paper_ratio = _div(tot["_s"] - tot["_a"], tot["_q"])
        out.append(dict(
            train_step=g[0]["train_step"], batch=g[0]["batch"], layer="model",
            layer_kind="model", layer_index=None, d_in=None, d_out=None,
            batch_size=g[0]["batch_size"], n_rows=None, family=fam, ratio=ratio, k=None,
            grad_sq_norm=tot["grad_sq_norm"], var_sampling=tot["var_sampling"],
            var_sketch=tot["var_sketch"],
            var_sketch_mc=sum(r["var_sketch_mc"] for r in g) if drawn else math.nan,
            var_sketch_mc_se=(math.sqrt(sum(r["var_sketch_mc_se"] ** 2 for r in g)) if drawn
                              else math.nan),
            mc_draws=min(r["mc_draws"] for r in g), alpha=alpha, paper_ratio=paper_ratio,
            paper_bound=_div(alpha + 1, alpha), paper_ratio_plotted=paper_ratio,
            paper_bound_plotted=1 + alpha,
            ratio_sketch_sampling=_div(tot["var_sketch"], tot["var_sampling"])))
    return out


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b and not math.isnan(b) else math.nan


def measure_batch(model, encoded: dict, cfg: MeasureConfig, names: list[str],
                  mc_names: set[str], step: int, b: int, population: float) -> pd.DataFrame:
    """Capture batch ``b`` of step ``step`` and return its layers.csv rows."""
    idx = batch_indices(len(encoded["labels"]), cfg, step, b)
    batch = {k: v[idx].to(cfg.device) for k, v in encoded.items()}
    with _seeded_rng(cfg, derive_seed(cfg.seed, step, b, 3)):  # dropout, if kept
        cap = capture(model, batch, names=names)
    rows = []
    for pos, name in enumerate(names):
        x, y = cap.layers[name]
        rows += layer_rows(cfg, name, pos, x, y, cap.grads[name], population,
                           name in mc_names and b < cfg.mc_batches, step, b)
    return typed(pd.DataFrame(rows + model_rows(rows)))


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """layers.csv columns in schema order, integer columns as nullable Int64."""
    frame = frame[list(LAYER_COLUMNS)].copy()
    for c in INT_COLUMNS:
        frame[c] = frame[c].astype("Int64")
    return frame


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------


def summarize(layers: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """summary.csv from layers.csv: t-intervals over batches per (step, layer, family, ratio)."""
    keys = ["train_step", "layer", "family", "ratio"]
    out = []
    for key, g in layers.groupby(keys, sort=False):
        sk, sa, rt = (V.mean_ci(g[c], level) for c in
                      ("var_sketch", "var_sampling", "ratio_sketch_sampling"))
        mc = g[g["mc_draws"] > 0]
        mc_se = math.sqrt((mc["var_sketch_mc_se"] ** 2).sum()) / len(mc) if len(mc) else math.nan
        out.append(dict(zip(keys, key), layer_kind=g["layer_kind"].iloc[0],
                        layer_index=g["layer_index"].iloc[0], k=g["k"].iloc[0],
                        n_batches=len(g), var_sketch_mean=sk[0], var_sketch_ci_low=sk[1],
                        var_sketch_ci_high=sk[2], var_sampling_mean=sa[0],
                        var_sampling_ci_low=sa[1], var_sampling_ci_high=sa[2],
                        var_total=sk[0] + sa[0], ratio_mean=rt[0], ratio_ci_low=rt[1],
                        ratio_ci_high=rt[2],
                        var_sketch_mc_mean=mc["var_sketch_mc"].mean() if len(mc) else math.nan,
                        var_sketch_mc_se=mc_se))
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))


def env_info(device: str) -> dict:
    """Versions, device and threads; no hostname."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        (platform.processor() or platform.machine())
    return dict(python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, numpy=np.__version__,
                pandas=pd.__version__, platform=f"{platform.system()} {platform.machine()}",
                device=device, device_name=name, torch_threads=torch.get_num_threads(),
                cpu_count=os.cpu_count())


# ------------------------------------------------------------------------------------------
# Training and the run
# ------------------------------------------------------------------------------------------


def _seeded_rng(cfg: MeasureConfig, seed: int):
    """torch's global RNG (read by dropout only) forked and seeded; restored afterwards."""
    if not cfg.dropout:
        return contextlib.nullcontext()
    cuda = [torch.device(cfg.device).index or 0] if cfg.device.startswith("cuda") else []

    @contextlib.contextmanager
    def forked():
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            yield
    return forked()


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
        from tqdm.auto import tqdm
        with _seeded_rng(cfg, derive_seed(cfg.seed, start, TRAIN_BATCH, 3)):
            for step in tqdm(range(start, stop), desc="train", disable=not cfg.progress,
                             leave=False):
                idx = batch_indices(len(encoded["labels"]), cfg, step, TRAIN_BATCH)
                loss = mean_loss(model, {k: v[idx].to(cfg.device) for k, v in encoded.items()})
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


NOT_COMPARED = ("progress", "resume", "out")  # config.json keys a resumed run may change
FINAL = ("layers.csv", "summary.csv", "env.json")


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
    resuming = cfg.resume and (out / "config.json").is_file()
    if resuming:
        old = vio.read_json(out / "config.json")
        vio.refuse_changed(out, {k: old.get(k) for k in asdict(cfg)}, asdict(cfg), NOT_COMPARED)
    if ctx.is_main:
        vio.check_writable(out)
    # Model, data and layer patterns are loaded and checked before anything in `out` changes.
    model, encoded, population = prepare(replace(cfg, device=device))
    names = select_layers(model, cfg.layers)
    mc_names = mc_layer_names(cfg, names)
    with contextlib.ExitStack() as held:
        if ctx.is_main:
            held.enter_context(vio.output_lock(out))  # NOTE [one run per folder] (io)
        return _run(cfg, ctx, device, started, resuming, model, encoded, population, names,
                    mc_names)


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


def _run(cfg, ctx, device, started, resuming, model, encoded, population, names, mc_names):
    """:func:`run` once its inputs are loaded and, on rank 0, the output folder is locked."""
    out = Path(cfg.out)
    chunks, state = out / "chunks", out / "state" / "train.pt"
    if ctx.is_main:
        vio.remove(*(out / name for name in FINAL))  # a partial run never looks complete
        if not resuming:  # a fresh run
            vio.remove(state, *chunks.glob("step_*.csv"))
    dist.barrier(ctx)  # every rank reads the chunks only after rank 0 prepared them
    if ctx.is_main:
        vio.atomic_write_json(out / "config.json", dict(
            asdict(cfg), population=population, world_size=ctx.world, layers_selected=names,
            mc_layers_selected=sorted(mc_names)))
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
                      chunks / f"step_{step:06d}.csv")
    dist.barrier(ctx)
    if not ctx.is_main:
        return typed(pd.DataFrame(columns=list(LAYER_COLUMNS)))
    layers = assemble(out, cfg)
    vio.atomic_write_json(out / "env.json", dict(
        env_info(device), world_size=ctx.world, resumed=resuming,
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


def rows_per_batch(cfg: MeasureConfig, names: list[str]) -> int:
    """layers.csv rows of one batch: every selected layer plus "model", per (family, ratio)."""
    return (len(names) + 1) * len(cfg.families) * len(cfg.ratios)


def finished_rows(path: Path, cfg: MeasureConfig, names: list[str], repair: bool,
                  step: int | None = None):
    """Rows of the complete, well-formed batches in chunk ``path`` (None when there are none).

    A row counts when it has every schema column, each parses as its type (no empty text, no
    ``xyz`` in a number), and it names this ``step``, a batch index below ``num_batches``, a
    selected layer or "model", a configured family and ratio; a batch counts when its rows hold
    every (layer, family, ratio) exactly once. Anything else (a trailing partial line, a line cut
    or edited in the middle, a batch appended twice) drops its whole batch, which is measured
    again; with ``repair`` the chunk is rewritten without it (the kept lines byte for byte).
    """
    if repair:
        vio.trim_partial_line(path)
    lines = vio.whole_lines(path)
    if not lines or lines[0].rstrip("\r\n") != ",".join(LAYER_COLUMNS):
        kept = []  # no schema header: nothing in this chunk can be trusted
    else:
        kept = _valid_batch_lines(lines[1:], cfg, names, step)
    if repair and len(kept) + 1 < len(lines):
        if kept:
            vio.atomic_write_text(path, lines[0] + "".join(kept))
        else:
            vio.remove(path)
    if not kept:
        return None
    return typed(pd.read_csv(io.StringIO(lines[0] + "".join(kept))))


_TEXT = ("layer", "layer_kind", "family")
_REQUIRED = ("train_step", "batch", "batch_size", "mc_draws", "ratio", "grad_sq_norm",
             "var_sampling", "var_sketch")             # never empty
_LAYER_ONLY = ("d_in", "d_out", "n_rows", "k")          # empty on "model" rows only


def _valid_batch_lines(lines: list[str], cfg: MeasureConfig, names: list[str],
                       step: int | None) -> list[str]:
    """The lines of the batches whose every row is valid and that are complete (finished_rows)."""
    expected = {(n, f, r) for n in [*names, "model"] for f in cfg.families for r in cfg.ratios}
    batches: dict[int, list] = {}
    broken = set()
    for line, cells in zip(lines, csv.reader(lines)):
        row = _parse_row(cells)
        if row is None:  # its batch (when the line still names one) is measured again
            if len(cells) > 1 and cells[1].isdigit():
                broken.add(int(cells[1]))
            continue
        key = (row["layer"], row["family"], row["ratio"])
        ok = (key in expected and 0 <= row["batch"] < cfg.num_batches
              and (step is None or row["train_step"] == step))
        if not ok:
            broken.add(row["batch"])
        batches.setdefault(row["batch"], []).append((key, line))
    kept = []
    for b, rows in batches.items():
        keys = [k for k, _ in rows]
        if b not in broken and len(keys) == len(expected) and set(keys) == expected:
            kept += [line for _, line in rows]
    return kept


def _parse_row(cells: list[str]) -> dict | None:
    """One chunk line as {column: value}, or None when a column is missing or does not parse."""
    if len(cells) != len(LAYER_COLUMNS):
        return None
    row = dict(zip(LAYER_COLUMNS, cells))
    model = row["layer"] == "model"
    for c, text in row.items():
        if c in _TEXT:
            if not text.strip():
                return None
            continue
        if text == "":
            if c in _REQUIRED or (c in _LAYER_ONLY and not model):
                return None
            continue
        try:
            value = float(text)
        except ValueError:
            return None
        if c in INT_COLUMNS:
            if not value.is_integer():
                return None
            value = int(value)
        row[c] = value
    return row


def _measure_step(model, encoded, cfg, names, mc_names, step, population, ctx, path) -> None:
    """Measure this rank's missing batches of one step; every finished batch reaches ``path``."""
    from tqdm.auto import tqdm
    have = finished_rows(path, cfg, names, repair=ctx.is_main, step=step)
    done = set() if have is None else set(have["batch"])
    todo = [b for b in range(cfg.num_batches) if b not in done]
    mine = []
    for b in tqdm(ctx.mine(todo), desc=f"measure step {step}", disable=not cfg.progress):
        frame = measure_batch(model, encoded, cfg, names, mc_names, step, b, population)
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
    return layers


def format_summary(summary: pd.DataFrame) -> str:
    """One screen: model totals per family × ratio at the last measured step."""
    last = summary["train_step"].max()
    s = summary[(summary["layer"] == "model") & (summary["train_step"] == last)]
    table = pd.DataFrame({
        "family": s["family"], "ratio": s["ratio"], "var_sketch": s["var_sketch_mean"],
        "var_sampling": s["var_sampling_mean"], "ratio_sketch/sampling": s["ratio_mean"],
        "ratio_ci": [f"[{lo:.3g}, {hi:.3g}]" for lo, hi in zip(s["ratio_ci_low"],
                                                              s["ratio_ci_high"])]})
    head = (f"model totals (sum over {summary['layer'].nunique() - 1} layers) at train step "
            f"{last}, {int(s['n_batches'].iloc[0])} batches")
    return head + "\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4g}")


# ------------------------------------------------------------------------------------------
# Command line: one option per MeasureConfig field
# ------------------------------------------------------------------------------------------

HELP = {
    "model": "minilm, tiny-bert, tiny-roberta, a local HF directory or a hub id",
    "dataset": f"one of {', '.join(DATASETS)}", "split": "train, validation or test",
    "data_dir": "GLUE root or movie-reviews folder ('none': default)",
    "batch_size": "B examples per minibatch (>= 2)", "max_length": "tokens per example L",
    "families": f"comma list of sketch families ({', '.join(SKETCHES)})",
    "ratios": "comma list of ratios rho = k/n in (0, 1]", "min_rows": "fewest sketch rows k",
    "num_batches": "minibatches per measured step",
    "layers": "regex on linear module names ('none': all)",
    "mc_draws": "Monte Carlo draws per (layer, family, ratio) on the MC subset (0: none)",
    "mc_layers": "regex of the layers that get Monte Carlo ('none': all selected layers)",
    "mc_batches": "the first this-many batches of each step get Monte Carlo",
    "fpc": "finite-population correction with N = dataset size", "level": "CI level",
    "seed": "base seed (batches, sketches, head init)",
    "train_steps": "AdamW fine-tuning steps (0: measure the loaded model)",
    "measure_at": "comma list of steps to measure at (default: 0 and train_steps)",
    "train_sketch": "train with this sketch family ('none': exact)",
    "train_ratio": "ratio of the training sketch", "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay", "device": "auto, cpu, cuda or cuda:N",
    "dtype": f"model dtype ({', '.join(DTYPES)})", "dropout": "keep the model's dropout",
    "out": "output directory", "progress": "tqdm progress bars",
    "resume": "continue an interrupted run in --out (same options; finished batches kept)",
}


def _tuple_of(kind):
    def parse(text: str):
        try:
            return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            import argparse
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind.__name__}, "
                                             f"got {text!r}") from None
    return parse


def _optional(text: str) -> str | None:
    return None if text.lower() in ("none", "") else text


def build_parser():
    import argparse

    parser = cli.Parser(prog="python -m varstudy.measure", description=__doc__.split("\n")[0])
    for f in fields(MeasureConfig):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=HELP[f.name])
            continue
        if isinstance(default, tuple):
            kind = float if f.name == "ratios" else int if f.name == "measure_at" else str
            parse, shown = _tuple_of(kind), ",".join(map(str, default))
        else:
            parse = (_optional if default is None or f.name in ("train_sketch", "mc_layers")
                     else type(default))
            shown = default
        parser.add_argument(flag, type=parse, default=default, metavar=f.name.upper(),
                            help=f"{HELP[f.name]} (default: {shown})".replace("%", "%%"))
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    debug = args.pop("debug")

    def body() -> None:
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
        cfg = MeasureConfig(**args)
        layers = run(cfg)
        if len(layers):  # rank 0 (or a single process) holds the tables
            print(format_summary(summarize(layers, cfg.level)))
            print(f"wrote {cfg.out}/layers.csv ({len(layers)} rows), summary.csv, config.json, "
                  "env.json")
    try:
        return cli.guarded(body, debug=debug)
    finally:
        dist.teardown()


if __name__ == "__main__":
    raise SystemExit(main())
