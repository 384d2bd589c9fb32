"""Measure inside the user's own training: a Hugging Face ``Trainer`` callback.

``VarianceCallback`` decomposes the gradient variance of the model being trained every
``every_n_steps`` optimizer steps, on ``num_batches`` minibatches of the training data held
fixed for the whole run (drawn once with the run's seed, batch size and data collator):

* per (family, ratio) the sketch/sampling variance ratio of the encoder, the head and the whole
  model, and of every layer kind, plus the sampling variance of each scope, logged through
  ``trainer.log`` (so TensorBoard, W&B, CSV loggers and ``trainer.state.log_history`` get them);
* every per-layer row appended to ``<output_dir>/varstudy/layers.csv`` in the measure schema
  (:mod:`varstudy.measure`), with ``summary.csv`` and ``scopes.csv`` written when training ends,
  so :mod:`analysis` plots them like a ``python -m varstudy.measure`` run.

The measurement is :func:`varstudy.measure.measure_now`: exact gradients (a randomized model is
measured through its exact layers), dropout off, no ``.grad`` touched, RNG states and train mode
restored, so training goes on exactly as without the callback (tested). It needs the trainer
to log: ``VarianceCallback(...).attach(trainer)``. Usage::

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    VarianceCallback(every_n_steps=50, num_batches=4, families=("gaussian", "rows"),
                     ratios=(0.1,)).attach(trainer)
    trainer.train()

Cost: one measurement is about num_batches × (forward + backward + the per-layer statistics),
roughly 1.3 training steps per batch (README, "Measure inside your training").
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from varstudy.errors import VarstudyError

SCOPES = ("encoder", "head", "all")


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
        loader = train_dataloader if train_dataloader is not None else \
            self.trainer.get_train_dataloader()
        self.batches, self.population = held_batches(
            loader.dataset, loader.collate_fn, self.num_batches,
            self.batch_size or args.per_device_train_batch_size,
            args.seed if self.seed is None else self.seed)
        self.population = self.population if self.fpc else math.inf
        if self.out != "":
            self.folder = Path(self.out or Path(args.output_dir) / "varstudy")
            from varstudy import io as vio
            vio.check_writable(self.folder)
            vio.remove(*(self.folder / n for n in ("layers.csv", "summary.csv", "scopes.csv")))
        if self.at_start and state.global_step == 0:
            self._measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0:
            # NOTE: trainer.log clears control.should_log; the trainer's own loss log of this
            # step (decided before this callback ran) must still happen.
            should_log = control.should_log
            self._measure(model, state.global_step)
            control.should_log = should_log

    def on_train_end(self, args, state, control, **kw):
        if self.folder is None or not (self.folder / "layers.csv").is_file():
            return
        import pandas as pd

        from varstudy import io as vio
        from varstudy.measure.tables import scope_summary, summarize

        layers = pd.read_csv(self.folder / "layers.csv")
        vio.atomic_write_csv(self.folder / "summary.csv", summarize(layers))
        vio.atomic_write_csv(self.folder / "scopes.csv", scope_summary(layers))

    # ---------------------------------------------------------------------------------------

    def _measure(self, model, step: int) -> None:
        from varstudy import io as vio
        from varstudy.measure.engine import measure_now

        started = time.perf_counter()
        rows = measure_now(model, self.batches, self.families, self.ratios,
                           population=self.population, layers=self.layers, train_step=step)
        self.seconds.append(time.perf_counter() - started)
        if self.folder is not None:
            vio.append_csv(self.folder / "layers.csv", rows)
        self.trainer.log(log_values(rows) | {"varstudy/measure_s": self.seconds[-1]})


def held_batches(dataset, collate, num_batches: int, batch_size: int, seed: int):
    """``num_batches`` minibatches of ``batch_size`` distinct examples (uniform without
    replacement within each batch, from a generator seeded with ``seed``), collated; and N."""
    n = len(dataset)
    if not 2 <= batch_size <= n:
        raise VarstudyError(f"held minibatches of {batch_size} examples need 2 <= batch_size <= "
                            f"{n} (the training set's size)")
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
