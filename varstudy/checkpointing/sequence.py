"""Exact backprop through long scans in bounded fast memory: Revolve + asynchronous multistage.

Public API::

    ys, final = checkpointed_scan(step_fn, state0, inputs, strategy="multistage", slots=4)
    loss(ys, final).backward()            # same gradients as plain autograd
    out = checkpointed_sequential(modules, x, strategy="revolve", slots=3)

``step_fn(state, x_t) -> (new_state, y_t)``; ``state`` is a tensor or a tuple of tensors (LSTM:
(h, c), each (B, H)); ``inputs`` is ``(N, *x_shape)`` and ``x_t = inputs[t]``; ys is ``(N, *y_shape)``.

How it works: NOTE [design] in :mod:`~varstudy.checkpointing.replay` (one autograd Function,
Revolve inside intervals, slow tiers between them), NOTE [parameters] in
:mod:`~varstudy.checkpointing.closures` (what ``params`` must hold, non-leaf tensors made outside
the step), NOTE [RNG] in :mod:`~varstudy.checkpointing.rng` (exact replay under dropout).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from varstudy.checkpointing import schedules as sch
from varstudy.checkpointing.closures import MissingParams, discover_params
from varstudy.checkpointing.meter import MemoryMeter
from varstudy.checkpointing.replay import Runner, Scan
from varstudy.checkpointing.rng import get_rng, rng_ops, set_rng
from varstudy.checkpointing.storage import TIERS
from varstudy.errors import VarstudyError


@dataclass(frozen=True)
class ScanConfig:
    """How a scan is checkpointed. ``interval=None``: I = ceil(T_w / t_f), measured (multistage)."""

    strategy: str = "multistage"
    slots: int = 4
    interval: int | None = None
    tier: str = "host"
    transfer_delay_s: float = 0.0
    disk_dir: str | None = None
    max_pending: int = 1
    timeout_s: float = 60.0
    preserve_rng: bool = True
    write_fn: Callable | None = None  # disk tier serializer (default torch.save); fault injection
    device_ops: object | None = None  # CUDA calls (default device.CudaOps on CUDA); tests: a fake

    def __post_init__(self) -> None:
        if self.strategy not in sch.STRATEGIES:
            raise VarstudyError(f"unknown strategy {self.strategy!r}; valid choices: "
                                f"{', '.join(sch.STRATEGIES)}")
        if self.tier not in TIERS:
            raise VarstudyError(f"unknown storage tier {self.tier!r}; valid choices: "
                                f"{', '.join(TIERS)}")
        if self.slots < 1:
            raise VarstudyError(f"slots {self.slots} is below 1; valid choices: slots >= 1")
        if self.interval is not None and self.interval < 1:
            raise VarstudyError(f"interval {self.interval} is below 1; valid choices: "
                                "interval >= 1, or None (measured)")


@dataclass
class ScanStats:
    """Filled by a scan: counts and fast-tier bytes (slots, live state, in-flight transfers)."""

    interval: int = 0
    forward_steps: int = 0
    recompute_steps: int = 0
    retaped_steps: int = 0
    slow_writes: int = 0
    fast_peak_bytes: int = 0
    stall_s: float = 0.0


def _as_tuple(state) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def _plain(step, state, n, inputs):
    """Reference: plain autograd over the loop (strategy ``store_all``)."""
    ys = []
    for i in range(n):
        state, y = step(i, state, None if inputs is None else inputs[i])
        ys.append(y)
    return (torch.stack(ys) if ys and ys[0] is not None else torch.empty(0)), state


def _check_params(params) -> tuple[torch.Tensor, ...]:
    params = tuple(params)
    for j, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise VarstudyError(f"params[{j}] is a {type(p).__name__}, not a tensor; valid "
                                "choices: the tensors the step takes from outside (leaf or "
                                "not), or params=None to discover them")
    return params


def _scan(step, state0, inputs, n, params, cfg, stats, meter=None, *, distinct_steps=False):
    """Shared driver: step(i, state_tuple, x_i) -> (state_tuple, y or None).

    ``distinct_steps``: each index is a different function (a sequential), so the first call of
    every step is checked for missing parameters, not only step 0's (NOTE [parameters]).
    """
    if n < 1:
        raise VarstudyError(f"scan has {n} steps; valid choices: at least 1 step")
    stats = stats if stats is not None else ScanStats()
    if cfg.strategy == "store_all" or not torch.is_grad_enabled():
        return _plain(step, state0, n, inputs)
    x0, device = None if inputs is None else inputs[0], state0[0].device
    if params is None:
        params = discover_params(step, state0, x0, rng_ops(device, state0 + (x0,),
                                                           cfg.device_ops))
        check = ()
    else:
        check = range(n) if distinct_steps else (0,)
    params = _check_params(params)
    needs = [t.requires_grad for t in state0 + params] + [inputs is not None
                                                           and inputs.requires_grad]
    if not any(needs):
        return _plain(step, state0, n, inputs)
    meter = meter if meter is not None else MemoryMeter()
    while True:  # a step naming a missing non-leaf parameter starts the forward pass again
        ops = rng_ops(device, state0 + (x0,) + params, cfg.device_ops)
        rng, counts = get_rng(ops), dataclasses.replace(stats)
        r = Runner(step, n, len(state0), cfg, stats, meter, device, ops, params, check)
        try:
            out = Scan.apply(r, inputs, *state0, *params)
            return out[0], tuple(out[1:])
        except MissingParams as missing:  # NOTE [parameters]
            set_rng(ops, rng)
            for f in dataclasses.fields(stats):
                setattr(stats, f.name, getattr(counts, f.name))
            params += tuple(missing.tensors)


def checkpointed_scan(step_fn, state0, inputs, *, strategy: str = "multistage", slots: int = 4,
                      interval: int | None = None, tier: str = "host", params=None,
                      config: ScanConfig | None = None, stats: ScanStats | None = None,
                      meter: MemoryMeter | None = None, **kw):
    """Scan ``step_fn`` over ``inputs`` with exact gradients in bounded fast memory.

    Args: ``step_fn(state, x_t) -> (new_state, y_t)``; state0: tensor (B, H) or tuple of
    tensors (LSTM (h, c)); inputs: ``(N, *x_shape)``; strategy: ``store_all`` | ``revolve`` |
    ``multistage``;
    slots: fast checkpoint slots s; interval: slow-tier interval I (None: ceil(T_w / t_f),
    measured); tier: ``host`` | ``disk``; meter: a MemoryMeter receiving fast-tier bytes (wrap
    forward and backward in ``meter.track_saved()`` to add the re-taped steps); params: tensors
    step_fn takes from outside that need gradients, leaf or not (None: discovered, or an
    ``nn.Module`` step's parameters; a non-leaf tensor made outside the step that they miss is
    added, NOTE [parameters]); config overrides all of these; extra keywords go to
    :class:`ScanConfig` (transfer_delay_s, disk_dir, max_pending, timeout_s, preserve_rng,
    write_fn, device_ops).
    Returns (ys of shape ``(N, *y_shape)``, final state shaped like state0).
    """
    cfg = config or ScanConfig(strategy=strategy, slots=slots, interval=interval, tier=tier, **kw)
    is_tuple = isinstance(state0, (tuple, list))

    def step(i, st, x):
        new, y = step_fn(st if is_tuple else st[0], x)
        return _as_tuple(new), y

    if params is None and isinstance(step_fn, nn.Module):
        params = [p for p in step_fn.parameters() if p.requires_grad]
    ys, final = _scan(step, _as_tuple(state0), inputs, len(inputs), params, cfg, stats, meter)
    return ys, (tuple(final) if is_tuple else final[0])


def checkpointed_sequential(modules, x, *, strategy: str = "revolve", slots: int = 4,
                            config: ScanConfig | None = None, stats: ScanStats | None = None,
                            meter: MemoryMeter | None = None, **kw):
    """Apply ``modules`` (a sequence of nn.Module, each ``(B, *d) -> (B, *d)``) to x with
    checkpointing; their parameters are the scan's (NOTE [parameters])."""
    modules = list(modules)
    cfg = config or ScanConfig(strategy=strategy, slots=slots, **kw)
    params, seen = [], set()
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)

    def step(i, st, _x):
        return (modules[i](st[0]),), None

    _, final = _scan(step, (x,), None, len(modules), params, cfg, stats, meter,
                     distinct_steps=True)
    return final[0]
