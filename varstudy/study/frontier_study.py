"""``study frontier`` (issue 15): checkpointing, sketching and both together on one model and one
minibatch, measured in one run: which memory saving should a user pick?

Configurations (:func:`setups`): ``exact``; per-layer ``torch.utils.checkpoint`` (``torch``);
Revolve over the encoder layers with s fast slots (``revolve s=<s>``, every s of ``slots``); uniform
sketches (every family × ratio of the config); the planned model at the bytes of rows ρ =
``frontier_ratio`` (``rows plan (absolute|relative)``, built in-run); and checkpointing with rows
ρ = ``frontier_ratio`` (Revolve at the middle of ``slots``, and torch's checkpoint); and
gradient accumulation (issue 24) in m micro-batches of B/m examples for every m of
``accumulation`` (``accumulate m=<m>``), alone, with torch's checkpoint, with rows ρ =
``frontier_ratio`` and with the absolute rows plan (NOTE [accumulated step]).

Per configuration, one row of ``frontier.csv`` (``FRONTIER_COLUMNS``):

* memory: :func:`~varstudy.randomized.peak.peak_saved_bytes` over one whole forward + backward
  step on the timed minibatch: the peak of live saved-for-backward bytes plus the bytes a Revolve
  scan holds (``peak_bytes``, ``peak_ratio`` = / exact), the saved bytes when the forward ends
  (``forward_bytes``, ``forward_ratio``), and on CUDA ``torch.cuda.max_memory_allocated`` over the
  step (parameters and gradients included; ``cuda_peak_ratio``);
* time: whole training steps (forward, backward, AdamW), timed interleaved as in ``study
  throughput``: warm-up per configuration, then ``repeats`` rounds each running every
  configuration once in a fresh seeded random order; ``step_ms`` the median over rounds,
  ``time_ratio`` the median of the per-round ratios to exact (load drift cancels round by round);
* added gradient variance: the sketch variance of the engine (
  :func:`~varstudy.measure.engine.measure_now`, closed forms, finite-population correction with N = the training split) on
  ``num_batches`` held-out minibatches of the same shape, by scope (``encoder``, ``head``,
  ``all``): ``var_sketch_<scope>`` and ``var_sampling_<scope>`` (means over minibatches of the
  sums over the scope's layers) and ``var_ratio_<scope>`` = their quotient (Σ sketch / Σ
  sampling). Checkpointing and accumulation are exact: zero. A plan is measured with each
  layer's planned rows (``measure_now(plan=...)``, ``var_source`` "planned rows").
  Checkpointing + sketch is measured as it runs, by Monte Carlo (NOTE [combined variance] in
  :mod:`varstudy.study.frontier_variance`, where this phase lives; ``var_sketch_se_<scope>``:
  its standard error, NaN for closed forms).
  Accumulation + sketch draws a sketch per micro-batch: the closed forms per micro-batch,
  weighted (NOTE [accumulated variance] there).

NOTE [accumulated step]: an accumulated configuration runs the timed minibatch as m micro-batches
(:func:`varstudy.accumulation.split`: B/m examples each, at the same fixed padded length, the
loss weighted so the accumulated gradient is the minibatch's, tested equal to it) and one AdamW
step; ``batch_size`` stays B (the effective batch) and ``micro_batches`` is m (1 elsewhere). Its
memory is the largest per-micro-batch peak (saved tensors are all released between
micro-batches; the accumulated ``.grad`` is parameter-sized and not a saved tensor, as for
every configuration); its time is the whole accumulated step, interleaved with the others.

The plans (``plan_rows_<objective>.json``, written next to the table) come from ``measure_now``
statistics on ``num_batches`` other minibatches (``varstudy.plan.stats_from_layers``, then
``randomized.plan.plan_budget`` at the stored numbers of uniform rows ρ = ``frontier_ratio``), so
the held-out variance does not reward a plan for fitting its own minibatches.

NOTE [torch checkpoint peak]: the encoder's ``torch`` strategy checkpoints each layer with
``use_reentrant=False``, whose recomputation packs under hooks of its own, unseen by
``peak_saved_bytes`` (NOTE [release] in :mod:`varstudy.randomized.peak`). Its memory is
therefore measured with the same per-layer checkpoint made reentrant (``peak_method`` "reentrant
replay"): the forward saves the same layer inputs, and backward recomputes one layer at a time
under the outer hooks, so the recomputed layer's saved tensors are counted. Its timing uses the
strategy as it is (non-reentrant).

Minibatches: a seeded permutation (seed 0) of the training split, every example padded to
``max_length``: the first ``batch_size`` examples are the timed (and memory) minibatch, the next
``num_batches`` minibatches give the plans' statistics, the ``num_batches`` after those the
variance. ``config.json`` records the resolved config, the environment, the load averages before
and after, and each phase's wall time.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch

from varstudy import io as vio
from varstudy.study import frontier_variance
from varstudy.study.config import StudyConfig, write_config
from varstudy.study.frontier_variance import SCOPES

PLAN_FAMILY = "rows"
OBJECTIVES = ("absolute", "relative")
ACCUMULATED_OBJECTIVE = "absolute"  # the plan accumulation is combined with
FRONTIER_COLUMNS = (
    "task", "model", "config", "kind", "strategy", "slots", "family", "ratio", "objective",
    "micro_batches", "batch_size", "seq_len", "peak_bytes", "peak_phase", "peak_held_bytes",
    "peak_ratio", "peak_method", "forward_bytes", "forward_held_bytes", "forward_ratio",
    "cuda_max_allocated", "cuda_peak_ratio", "step_ms", "step_ms_min", "time_ratio", "repeats",
    *(f"var_{what}_{scope}" for what in ("sketch", "sampling", "ratio", "sketch_se")
      for scope in SCOPES),
    "var_source", "num_batches", "load_avg_1m", "device")


@dataclass(frozen=True)
class Setup:
    """One configuration: a checkpointing strategy (``none``, ``torch``, ``revolve`` with
    ``slots``), a sketch (family and ratio, or a plan of ``objective``; ``exact``: none) and
    the number of micro-batches of gradient accumulation (1: none)."""

    name: str
    kind: str  # exact | checkpoint | sketch | plan | combined | accumulation
    strategy: str = "none"
    slots: int | None = None
    family: str = "exact"
    ratio: float = 1.0
    objective: str | None = None
    micro_batches: int = 1

    @property
    def sketch(self) -> tuple[str, float, str | None]:
        """What decides the added variance (checkpointing adds none)."""
        return self.family, self.ratio, self.objective


def setups(config: StudyConfig) -> list[Setup]:
    """The configurations of one frontier run, exact first (module docstring)."""
    r = float(config.frontier_ratio)
    out = [Setup("exact", "exact"), Setup("torch", "checkpoint", "torch")]
    out += [Setup(f"revolve s={s}", "checkpoint", "revolve", s) for s in config.slots]
    out += [Setup(f"{f} {float(q):g}", "sketch", family=f, ratio=float(q))
            for f in config.families for q in config.ratios]
    out += [Setup(f"{PLAN_FAMILY} plan ({o})", "plan", family=PLAN_FAMILY, ratio=r, objective=o)
            for o in OBJECTIVES]
    s = config.slots[len(config.slots) // 2]
    out += [Setup(f"revolve s={s} + {PLAN_FAMILY} {r:g}", "combined", "revolve", s, PLAN_FAMILY, r),
            Setup(f"torch + {PLAN_FAMILY} {r:g}", "combined", "torch", None, PLAN_FAMILY, r)]
    for m in config.accumulation:
        name, o = f"accumulate m={m}", ACCUMULATED_OBJECTIVE
        out += [Setup(name, "accumulation", micro_batches=m),
                Setup(f"{name} + torch", "accumulation", "torch", micro_batches=m),
                Setup(f"{name} + {PLAN_FAMILY} {r:g}", "accumulation", family=PLAN_FAMILY,
                      ratio=r, micro_batches=m),
                Setup(f"{name} + {PLAN_FAMILY} plan ({o})", "accumulation", family=PLAN_FAMILY,
                      ratio=r, objective=o, micro_batches=m)]
    return out


def frontier(config: StudyConfig) -> pd.DataFrame:
    """Run the frontier study (module docstring); writes and returns ``frontier.csv``'s table
    (into a staging folder that replaces ``<out>/frontier`` once the study has finished, NOTE
    [staged results] in varstudy.io)."""
    with vio.staged(Path(config.out) / "frontier") as folder:
        return _frontier(config, folder)


def _frontier(config: StudyConfig, folder: Path) -> pd.DataFrame:
    from varstudy.finetune.training import threads
    from varstudy.models import resolve_device

    device = resolve_device(config.device)
    load_before, walls = _load_averages(), {}
    with threads(config.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        start = time.perf_counter()
        model, timed, plan_batches, held, population = _inputs(config, device)
        configs = setups(config)
        walls["load_s"] = _lap(start)
        plans = _make_plans(config, model, plan_batches, population, folder)
        walls["plans_s"] = _lap(start)
        variance = frontier_variance.variance(config, model, held, population, configs, folder,
                                              plan_family=PLAN_FAMILY, checkpointed=_checkpointed)
        walls["variance_s"] = _lap(start)
        memory = {c: _peak(model, c, plans, timed) for c in configs}
        walls["memory_s"] = _lap(start)
        times = _time_steps(config, model, configs, plans, timed, device)
        walls["timing_s"] = _lap(start)
    load_after = _load_averages()
    table = _table(config, configs, memory, times, variance, device, load_after[0])
    write_config(config, "frontier", folder, **_environment(), population=population,
                 load_avg_before=load_before, load_avg_after=load_after,
                 wall_s={**walls, "total_s": round(time.perf_counter() - start, 1)},
                 configurations=[c.name for c in configs])
    vio.atomic_write_csv(folder / "frontier.csv", table)
    return table


def _lap(start: float) -> float:
    return round(time.perf_counter() - start, 1)


def _load_averages() -> list[float]:
    """1, 5 and 15-minute load averages (NaN where unsupported): how shared the machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return [math.nan] * 3


def _environment() -> dict:
    return dict(python=platform.python_version(), platform=platform.platform(),
                cpu_count=os.cpu_count())


def _inputs(config: StudyConfig, device: str):
    """(model with dropout on, timed minibatch, plan minibatches, held minibatches, N): the
    minibatches cut from a seeded permutation of the training split (module docstring)."""
    from varstudy.batching import encode
    from varstudy.finetune.training import to_device
    from varstudy.models import load_model
    from varstudy.study.inputs import frontier_examples, train_data

    data = train_data(config, [config.batch_size])
    model, tok = load_model(config.model, num_labels=data.num_labels, dropout=True, seed=0,
                            device=device)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    picked = order[:frontier_examples(config)].tolist()
    enc = encode(data.subset(picked), tok, config.max_length)
    b = config.batch_size
    cut = [to_device({k: v[i * b:(i + 1) * b] for k, v in enc.items()}, device)
           for i in range(1 + 2 * config.num_batches)]
    return model, cut[0], cut[1:1 + config.num_batches], cut[1 + config.num_batches:], len(data)


def _make_plans(config: StudyConfig, model, batches, population: float, folder: Path) -> dict:
    """{objective: plan dict} at the stored numbers of uniform rows ρ = frontier_ratio, from
    measure_now statistics; each also written as ``plan_rows_<objective>.json``."""
    from varstudy.measure.engine import measure_now
    from varstudy.plan import stats_from_layers, to_json
    from varstudy.randomized import plan as P
    from varstudy.randomized.layers import derandomize

    derandomize(model)
    rows = measure_now(model, batches, families=(PLAN_FAMILY,),
                       ratios=(config.frontier_ratio,), population=population)
    stats = stats_from_layers(rows, PLAN_FAMILY)
    budget = P.uniform(stats, PLAN_FAMILY, config.frontier_ratio).total_stored
    plans = {}
    for objective in OBJECTIVES:
        plan = P.plan_budget(stats, PLAN_FAMILY, budget, objective=objective,
                             uniform_ratio=config.frontier_ratio)
        plans[objective] = to_json(plan, stats, nominal_ratio=config.frontier_ratio,
                                   source=f"study frontier: measure_now on {len(batches)} "
                                          "minibatches")
        vio.atomic_write_json(folder / f"plan_{PLAN_FAMILY}_{objective}.json", plans[objective])
    return plans


def _configure(model, setup: Setup, plans: dict) -> None:
    """Make ``model``'s linears those of ``setup`` (exact, uniform or planned)."""
    from varstudy.randomized.layers import derandomize, randomize

    derandomize(model)
    if setup.objective is not None:
        randomize(model, plan=plans[setup.objective])
    elif setup.family != "exact":
        randomize(model, setup.ratio, setup.family)


def _checkpointed(model, setup: Setup, meter=None):
    from varstudy.checkpointing.encoder import checkpoint_encoder

    return checkpoint_encoder(model, strategy=setup.strategy, slots=setup.slots or 1,
                              meter=meter)


@contextlib.contextmanager
def _reentrant_torch_checkpoint():
    """NOTE [torch checkpoint peak]: the encoder's per-layer checkpoint made reentrant.

    A reentrant checkpoint backpropagates its recomputed layer only into its explicit inputs; a
    tensor the layer closes over that has a graph of its own (MPNet's position bias, made once
    for all layers) would be backpropagated through that graph by every layer, the second time
    failing. So each such tensor of the layer's arguments becomes an explicit input.
    """
    from varstudy.checkpointing import encoder

    original = encoder.checkpoint

    def reentrant(step, hidden, use_reentrant=None, **kwargs):
        slots = [i for i, a in enumerate(step.args) if _has_graph(a)]
        keys = [k for k, v in step.kwargs.items() if _has_graph(v)]

        def call(h, *tensors):
            args, kw = list(step.args), dict(step.kwargs)
            for i, t in zip(slots, tensors):
                args[i] = t
            kw.update(zip(keys, tensors[len(slots):]))
            kept, (step.args, step.kwargs) = (step.args, step.kwargs), (tuple(args), kw)
            try:
                return step(h)
            finally:
                step.args, step.kwargs = kept

        inputs = [step.args[i] for i in slots] + [step.kwargs[k] for k in keys]
        return original(call, hidden, *inputs, use_reentrant=True, **kwargs)

    with mock.patch.object(encoder, "checkpoint", reentrant):
        yield


def _has_graph(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.requires_grad


def _peak(model, setup: Setup, plans: dict, batch: dict):
    """PeakReport of one forward + backward step of ``setup`` on ``batch``; accumulated: the
    largest of its micro-batches' (NOTE [accumulated step])."""
    from varstudy.accumulation import split
    from varstudy.checkpointing.meter import MemoryMeter
    from varstudy.randomized.peak import peak_saved_bytes

    _configure(model, setup, plans)
    meter = MemoryMeter() if setup.strategy == "revolve" else None
    replay = _reentrant_torch_checkpoint() if setup.strategy == "torch" else \
        contextlib.nullcontext()

    def loss(micro: dict, weight: float):
        with _checkpointed(model, setup, meter):
            out = model(**micro).loss  # the backward may follow the block
        return out if weight == 1.0 else out * weight

    with replay:
        reports = [peak_saved_bytes(loss, micro, w, model=model, meter=meter)
                   for micro, w in split(batch, setup.micro_batches)]
    model.zero_grad(set_to_none=True)
    return _largest(reports)


def _largest(reports: list):
    """One PeakReport for consecutive steps that share nothing saved: the one with the largest
    peak (the first of equals), its forward and CUDA numbers the largest of all."""
    best = max(reports, key=lambda r: r.peak_bytes)  # max keeps the first of equals
    cuda = [r.cuda_max_allocated for r in reports if r.cuda_max_allocated is not None]
    return replace(best, forward_bytes=max(r.forward_bytes for r in reports),
                   forward_held_bytes=max(r.forward_held_bytes for r in reports),
                   cuda_max_allocated=max(cuda) if cuda else None)


def _time_steps(config: StudyConfig, model, configs: list[Setup], plans: dict, batch: dict,
                device: str) -> dict[Setup, list[float]]:
    """Seconds per training step: warm-up per configuration, then one step per configuration per
    round, in a fresh seeded random order each round (interleaving spreads load drift evenly)."""
    from varstudy.accumulation import accumulate
    from varstudy.finetune.training import synchronize
    from varstudy.progress import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(setup: Setup) -> float:
        synchronize(device)
        start = time.perf_counter()
        accumulate(model, batch, setup.micro_batches,
                   context=lambda: _checkpointed(model, setup))  # m = 1: one plain step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    for setup in configs:
        _configure(model, setup, plans)
        for _ in range(config.warmup_steps):
            step(setup)
    times: dict[Setup, list[float]] = {c: [] for c in configs}
    rng = np.random.default_rng(0)
    for _ in tqdm(range(config.repeats), desc="frontier", disable=not config.progress):
        for i in rng.permutation(len(configs)):
            _configure(model, configs[i], plans)
            times[configs[i]].append(step(configs[i]))
    return times


def _table(config: StudyConfig, configs: list[Setup], memory: dict, times: dict,
           variance: dict, device: str, load: float) -> pd.DataFrame:
    exact = configs[0]
    base_peak, base_fwd = memory[exact].peak_bytes, memory[exact].forward_bytes
    base_cuda, base_t = memory[exact].cuda_max_allocated, np.asarray(times[exact])
    rows = []
    for c in configs:
        m, t = memory[c], np.asarray(times[c])
        var = variance.get(c.name) or \
            variance[c.sketch if c.family != "exact" else ("exact", 1.0, None)]
        cuda = m.cuda_max_allocated
        rows.append(dict(
            task=config.task, model=config.model, config=c.name, kind=c.kind,
            strategy=c.strategy, slots=c.slots, family=c.family, ratio=c.ratio,
            objective=c.objective, micro_batches=c.micro_batches,
            batch_size=config.batch_size, seq_len=config.max_length,
            peak_bytes=m.peak_bytes, peak_phase=m.peak_phase, peak_held_bytes=m.peak_held_bytes,
            peak_ratio=m.peak_bytes / base_peak,
            peak_method="reentrant replay" if c.strategy == "torch" else "saved-tensor hooks",
            forward_bytes=m.forward_bytes, forward_held_bytes=m.forward_held_bytes,
            forward_ratio=m.forward_bytes / base_fwd,
            cuda_max_allocated=math.nan if cuda is None else cuda,
            cuda_peak_ratio=math.nan if cuda is None or not base_cuda else cuda / base_cuda,
            step_ms=1e3 * float(np.median(t)), step_ms_min=1e3 * float(t.min()),
            time_ratio=float(np.median(t / base_t)), repeats=len(t), **var,
            num_batches=config.num_batches, load_avg_1m=load, device=device))
    return pd.DataFrame(rows, columns=list(FRONTIER_COLUMNS))
