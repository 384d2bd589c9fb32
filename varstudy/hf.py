"""Measure inside the user's own training: a Hugging Face ``Trainer`` callback.

``VarianceCallback`` decomposes the gradient variance of the model being trained every
``every_n_steps`` optimizer steps, on ``num_batches`` minibatches of the training data held
fixed for the whole run (drawn once with the run's seed, batch size and data collator):

* per (family, ratio) the sketch/sampling variance ratio of the encoder, the head and the whole
  model, and of every layer kind, plus the sampling variance of each scope, logged through
  ``trainer.log`` (so TensorBoard, W&B, CSV loggers and ``trainer.state.log_history`` get them);
* every per-layer row in ``<output_dir>/varstudy/layers.csv`` in the measure schema
  (:mod:`varstudy.measure`), with ``summary.csv`` and ``scopes.csv``, so :mod:`analysis` plots
  them like a ``python -m varstudy.measure`` run. The rows are appended during training to
  ``<output_dir>/varstudy/.callback.staging/layers.csv`` and the three tables replace the
  folder's earlier ones when training ends (NOTE [callback tables]).

The measurement is :func:`varstudy.measure.measure_now`: exact gradients (a randomized model is
measured through its exact layers), dropout off, no ``.grad`` touched, train mode restored.

NOTE [callback RNG]: everything the callback does (drawing and collating the held batches, even
with a collator that draws random numbers, measuring, logging) runs inside :func:`forked_rng`:
torch's CPU RNG and the CUDA RNG of the devices in use, Python's ``random`` and NumPy's global
RNG are saved before and restored after, so training is bit-identical with and without the
callback (tested with such a collator).

NOTE [callback tables]: a run's rows go to a staging folder (:func:`varstudy.io.staged`) and
replace the tables of ``out`` only at ``on_train_end``, with summary.csv and scopes.csv computed
from all rows; a run that fails leaves an earlier finished result in ``out`` as it was. A
resumed run (``trainer.train(resume_from_checkpoint=...)``, global step s > 0 at
``on_train_begin``) appends to the rows of the run it resumes (its staging folder when that run
was interrupted, else ``out``): rows of steps <= s are kept, later ones (measured after the
checkpoint) are dropped and measured again, so the tables equal an uninterrupted run's.

It needs the trainer to log: ``VarianceCallback(...).attach(trainer)``. Usage::

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    VarianceCallback(every_n_steps=50, num_batches=4, families=("gaussian", "rows"),
                     ratios=(0.1,)).attach(trainer)
    trainer.train()

Cost: one measurement is about num_batches × (forward + backward + the per-layer statistics),
roughly 1.3 training steps per batch (README, "Measure inside your training").
"""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from varstudy.errors import VarstudyError

SCOPES = ("encoder", "head", "all")
TABLES = ("layers.csv", "summary.csv", "scopes.csv")  # replaced together at on_train_end
STAGE = "callback"  # <out>/.callback.staging: the tables of a run not yet ended
LOCK = ".callback.lock"  # held while staging is entered and published


class VarianceCallback(TrainerCallback):
    """Log the sketch/sampling variance decomposition of the model every N steps.

    Args:
        every_n_steps: measure at steps N, 2N, ... (and at step 0 when ``at_start``).
        num_batches: held minibatches per measurement (>= 2 for confidence intervals).
        batch_size: examples per held minibatch (None: the trainer's per-device batch size).
        families, ratios: sketch families and ratios ρ to evaluate (closed forms).
        layers: regex on linear module names (None: all).
        seed: seed of the held minibatches (None: the run's ``args.seed``).
        out: folder of the tidy tables (None: ``<output_dir>/varstudy``; "" writes none).
        fpc: finite-population correction with N = the training set's size.
        at_start: also measure before the first step.
    """

    def __init__(self, *, every_n_steps: int = 50, num_batches: int = 4,
                 batch_size: int | None = None, families=("gaussian", "rows"),
                 ratios=(0.1,), layers: str | None = None, seed: int | None = None,
                 out: str | None = None, fpc: bool = True, at_start: bool = True) -> None:
        from varstudy.names import SKETCH_NAMES

        if not (isinstance(every_n_steps, int) and every_n_steps >= 1):
            raise VarstudyError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if not (isinstance(num_batches, int) and num_batches >= 1):
            raise VarstudyError(f"num_batches must be an integer >= 1, got {num_batches!r}")
        bad = [f for f in families if f not in SKETCH_NAMES]
        if bad or not families:
            raise VarstudyError(f"unknown sketch {bad[0] if bad else '(none)'!r}; valid choices: "
                                f"{', '.join(SKETCH_NAMES)}")
        if not ratios or not all(0 < r <= 1 for r in ratios):
            raise VarstudyError(f"ratios must lie in (0, 1], got {ratios!r}")
        self.every, self.num_batches, self.batch_size = every_n_steps, num_batches, batch_size
        self.families, self.ratios, self.layers = tuple(families), tuple(ratios), layers
        self.seed, self.out, self.fpc, self.at_start = seed, out, fpc, at_start
        self.trainer = None
        self.batches: list[dict] = []
        self.population = math.inf
        self.folder: Path | None = None
        self.stage: Path | None = None  # staging folder of this run's tables
        self.publishing: ExitStack | None = None
        self.devices: list[int] = []
        self.seconds: list[float] = []

    def attach(self, trainer) -> "VarianceCallback":
        """Register with ``trainer`` (its ``log`` reaches every logger); returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    # ---------------------------------------------------------------------------------------
    # Trainer events
    # ---------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
        if self.trainer is None:
            raise VarstudyError("VarianceCallback logs through the trainer; valid choices: "
                                "VarianceCallback(...).attach(trainer) instead of callbacks=[...]")
        self.devices = cuda_devices(args, model)
        with forked_rng(self.devices):  # NOTE [callback RNG]
            loader = train_dataloader if train_dataloader is not None else \
                self.trainer.get_train_dataloader()
            self.batches, population = held_batches(
                loader.dataset, loader.collate_fn, self.num_batches,
                self.batch_size or args.per_device_train_batch_size,
                args.seed if self.seed is None else self.seed)
            self.population = population if self.fpc else math.inf
            if self.out != "":
                self.folder = Path(self.out or Path(args.output_dir) / "varstudy")
                self.stage = self._stage(state.global_step)
            if self.at_start and state.global_step == 0:
                self._measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0:
            # NOTE: trainer.log clears control.should_log; the trainer's own loss log of this
            # step (decided before this callback ran) must still happen.
            should_log = control.should_log
            with forked_rng(self.devices):  # NOTE [callback RNG]
                self._measure(model, state.global_step)
            control.should_log = should_log

    def on_train_end(self, args, state, control, **kw):
        if self.stage is None:
            return
        with forked_rng(self.devices):
            self._publish()

    # ---------------------------------------------------------------------------------------

    def _stage(self, step: int) -> Path:
        """The staging folder of this run's tables (NOTE [callback tables]): empty for a fresh
        run; for a run resumed at ``step``, the rows of steps <= ``step`` of the run it resumes
        (its staging folder when it was interrupted, else a copy of ``out``'s)."""
        from varstudy import io as vio

        vio.check_writable(self.folder)
        self.publishing = ExitStack()  # the staged block spans on_train_begin .. on_train_end
        with vio.output_lock(self.folder, LOCK):
            stage = self.publishing.enter_context(
                vio.staged(self.folder, resume=step > 0, files=TABLES, name=STAGE))
        vio.remove(stage / "summary.csv", stage / "scopes.csv")  # recomputed at the end
        kept = rows_up_to(vio.whole_lines(stage / "layers.csv"), step)
        if len(kept) < 2:
            vio.remove(stage / "layers.csv")  # no whole row
        else:
            self._check_resumed("".join(kept))
            vio.atomic_write_text(stage / "layers.csv", "".join(kept))  # bytes as measured
        return stage

    def _check_resumed(self, text: str) -> None:
        """Refuse to append to rows measured with other families, ratios or held batches, or
        to an incomplete measurement."""
        import io

        import pandas as pd

        earlier = pd.read_csv(io.StringIO(text))
        want = {(f, float(r), b) for f in self.families for r in self.ratios
                for b in range(self.num_batches)}
        have = earlier[["family", "ratio", "batch"]].itertuples(index=False, name=None)
        if set(have) != want:
            raise VarstudyError(
                f"the rows in {self.folder} of the run this one resumes were measured with "
                "other families, ratios or num_batches; valid choices: the same VarianceCallback "
                "options as that run, or a fresh run (another output_dir, or out=...)")
        if earlier.groupby("train_step").size().nunique() != 1:
            raise VarstudyError(
                f"the rows in {self.folder} of the run this one resumes hold an incomplete "
                "measurement; valid choices: resume from an earlier checkpoint, or a fresh run")

    def _publish(self) -> None:
        """summary.csv and scopes.csv from all staged rows, then the staged tables into place."""
        from varstudy import io as vio
        from varstudy.measure.tables import scope_summary, summarize

        layers = vio.read_chunk(self.stage / "layers.csv")
        if layers is not None:
            vio.atomic_write_csv(self.stage / "summary.csv", summarize(layers))
            vio.atomic_write_csv(self.stage / "scopes.csv", scope_summary(layers))
        with vio.output_lock(self.folder, LOCK):
            self.publishing.close()  # leaves staged(): publishes
        self.stage = None

    def _measure(self, model, step: int) -> None:
        from varstudy import io as vio
        from varstudy.measure.engine import measure_now

        started = time.perf_counter()
        rows = measure_now(model, self.batches, self.families, self.ratios,
                           population=self.population, layers=self.layers, train_step=step)
        self.seconds.append(time.perf_counter() - started)
        if self.stage is not None:
            vio.append_csv(self.stage / "layers.csv", rows)
        self.trainer.log(log_values(rows) | {"varstudy/measure_s": self.seconds[-1]})


@contextmanager
def forked_rng(devices=()):
    """NOTE [callback RNG]: run the block on copies of every global RNG (torch CPU, CUDA on
    ``devices``, Python ``random``, NumPy): their states are restored when it ends."""
    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def cuda_devices(args, model) -> list[int]:
    """Indices of the CUDA devices training uses (the trainer's device and the model's)."""
    found = {p.device.index or 0 for p in (model.parameters() if model is not None else ())
             if p.is_cuda}
    if getattr(args, "device", None) is not None and args.device.type == "cuda":
        found.add(args.device.index or 0)
    return sorted(found)


def rows_up_to(lines: list[str], step: int) -> list[str]:
    """The header and the rows of train_step <= ``step`` of layers.csv ``lines`` (each line as
    written; train_step is the first column, NOTE [callback tables])."""
    def step_of(line: str) -> int:
        try:
            return int(line.split(",", 1)[0])
        except ValueError:
            raise VarstudyError(f"a row of the resumed run's layers.csv starts with no "
                                f"train_step ({line[:40]!r}); valid choices: a fresh run "
                                "(train() without resume_from_checkpoint)") from None
    return lines[:1] + [line for line in lines[1:] if step_of(line) <= step]


def held_batches(dataset, collate, num_batches: int, batch_size: int, seed: int):
    """``num_batches`` minibatches of ``batch_size`` distinct examples (uniform without
    replacement within each batch, from a generator seeded with ``seed``), collated; and N."""
    n = len(dataset)
    if not 2 <= batch_size <= n:
        raise VarstudyError(f"held minibatches of {batch_size} examples need 2 <= batch_size <= "
                            f"{n} (the training set's size); valid choices: batch_size from 2 "
                            f"to {n}")
    gen = torch.Generator().manual_seed(int(seed))
    batches = []
    for _ in range(num_batches):
        idx = torch.randperm(n, generator=gen)[:batch_size].tolist()
        batch = collate([dataset[i] for i in idx])
        batches.append({k: v for k, v in dict(batch).items() if isinstance(v, torch.Tensor)})
    return batches, float(n)


def log_values(rows) -> dict[str, float]:
    """Logged numbers of one measurement (per-batch rows of measure_now): per (family, ratio)
    the sketch/sampling ratio of every scope and layer kind, and each scope's sampling
    variance, all means over the held batches."""
    from varstudy.roles import layer_scope

    layers = rows[rows.layer != "model"].assign(scope=lambda d: d.layer.map(layer_scope))
    out: dict[str, float] = {}
    for (family, ratio), g in layers.groupby(["family", "ratio"], sort=False):
        tag = f"varstudy/{family}@{ratio:g}"
        for scope in SCOPES:
            part = g if scope == "all" else g[g.scope == scope]
            if part.empty:
                continue
            sums = part.groupby("batch")[["var_sketch", "var_sampling"]].sum()
            out[f"{tag}/ratio_{scope}"] = float((sums.var_sketch / sums.var_sampling).mean())
            out[f"varstudy/sampling_{scope}"] = float(sums.var_sampling.mean())
        for kind, part in g.groupby("layer_kind", sort=False):
            sums = part.groupby("batch")[["var_sketch", "var_sampling"]].sum()
            out[f"{tag}/ratio_{kind}"] = float((sums.var_sketch / sums.var_sampling).mean())
    return out
