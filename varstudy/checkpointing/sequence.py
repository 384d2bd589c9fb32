"""Exact backprop through long scans in bounded fast memory: Revolve + asynchronous multistage.

Public API::

    ys, final = checkpointed_scan(step_fn, state0, inputs, strategy="multistage", slots=4)
    loss(ys, final).backward()            # same gradients as plain autograd
    out = checkpointed_sequential(modules, x, strategy="revolve", slots=3)

``step_fn(state, x_t) -> (new_state, y_t)``; ``state`` is a tensor or a tuple of tensors (LSTM:
(h, c), each (B, H)); ``inputs`` is (N, *x_shape) and x_t = inputs[t]; ys is (N, *y_shape).

NOTE [design]: the whole scan is one ``torch.autograd.Function``. Its forward runs the N steps
without a tape, keeping checkpoints as the schedule says (strategy ``multistage``: interval starts go
to a slow tier asynchronously every I steps, the last interval keeps Revolve's slots in fast memory;
``revolve``: Revolve's first sweep over all N steps in fast memory). Its backward walks the intervals
last to first, prefetching the previous interval's start, and runs Revolve inside each: untaped
advances under no_grad, and for each step a re-tape under enable_grad followed by
``torch.autograd.grad`` w.r.t. (state, x_t, params), accumulating parameter gradients, which the
Function returns for the parameters it received as inputs. So ``.backward()`` and
``torch.autograd.grad`` both work, for any N, slots and interval.

NOTE [parameters]: tensors requiring grad that ``step_fn`` takes from outside (parameters, and
non-leaf tensors such as ``wn = w0 * 0.3`` made before the scan) must be inputs of the Function.
If ``params`` is not given they are discovered on step 0, run once with a tape under a
TorchFunctionMode recording each tensor argument that requires grad and was not made in the step
(plus the leaves its graph reaches, the walk stopping at those non-leaf tensors). A re-taped step
must not backpropagate into the graph outside it (shared by all N steps, freed by the first pass),
so it runs with each non-leaf parameter swapped for a detached leaf alias (the same mode) and
differentiates w.r.t. the aliases; their summed gradients are returned for the non-leaf tensors,
and autograd carries them on once, as plain autograd does. The originals are differentiated too:
None, unless a use escaped the swap (inside a custom autograd.Function), which is then counted.

NOTE [RNG]: like torch.utils.checkpoint, recomputation is exact under dropout: every stored
checkpoint carries the RNG state (CPU, plus that of each CUDA device holding the state, inputs or
parameters) at its step; restoring a checkpoint restores those RNGs, and steps re-run in order
consume the same random numbers. Parameter discovery, interval timing and backward run inside
``_fork_rng`` over the same devices, so neither the forward masks nor the caller's RNG stream after
backward are changed by them. Device RNG calls go through the device ops (storage.CudaOps).
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map_only

from varstudy.checkpointing import schedules as sch
from varstudy.errors import VarstudyError
from varstudy.checkpointing.storage import CudaOps, FastTier, MemoryMeter, device_ops, make_tier


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
    device_ops: object | None = None  # CUDA calls (default storage.CudaOps on CUDA); tests: a fake

    def __post_init__(self) -> None:
        if self.strategy not in sch.STRATEGIES:
            raise VarstudyError(f"unknown strategy {self.strategy!r}; valid: {', '.join(sch.STRATEGIES)}")
        if self.slots < 1:
            raise VarstudyError(f"slots must be >= 1; got {self.slots}")
        if self.interval is not None and self.interval < 1:
            raise VarstudyError(f"interval must be >= 1 or None; got {self.interval}")


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


def _rng_ops(cfg: ScanConfig, device: torch.device, tensors) -> list:
    """Device ops whose RNG a step may use: ``device``'s (``cfg.device_ops`` stands in for it),
    then those of the other CUDA devices holding ``tensors`` (NOTE [RNG])."""
    main = device_ops(device, cfg.device_ops)
    others = {t.device for t in tensors if t is not None and t.is_cuda} - {device}
    return ([main] if main is not None else []) + [CudaOps(d) for d in sorted(others, key=str)]


def _get_rng(ops: list) -> tuple[torch.Tensor, ...]:
    return (torch.get_rng_state(),) + tuple(o.get_rng_state() for o in ops)


def _set_rng(ops: list, states) -> None:
    torch.set_rng_state(states[0])
    for o, state in zip(ops, states[1:]):
        o.set_rng_state(state)


@contextmanager
def _fork_rng(ops: list, enabled: bool = True):
    """torch.random.fork_rng for the CPU and the devices of ``ops`` (get/set_rng_state each)."""
    saved = _get_rng(ops) if enabled else None
    try:
        yield
    finally:
        if enabled:
            _set_rng(ops, saved)


class _Runner:
    """Holds one scan's step function, schedule and storage between forward and backward."""

    def __init__(self, step, n, n_state, cfg, stats, meter, device, rng_ops):
        self.step, self.n, self.n_state, self.cfg = step, n, n_state, cfg
        self.stats, self.meter, self.rng_ops = stats, meter, rng_ops
        self.ops = device_ops(device, cfg.device_ops)  # storage NOTE [device ops]
        self.fast = FastTier(meter)
        self.slow = None
        self.inputs = None
        self.params: tuple[torch.Tensor, ...] = ()
        self._box = [None]  # the slow tier, closed by the finalizer if backward never runs
        self._finalizer = weakref.finalize(self, _close_quietly, self.fast, self._box)

    # -- RNG-carrying checkpoints -------------------------------------------------------------
    def pack(self, state):
        return tuple(state) + (_get_rng(self.rng_ops) if self.cfg.preserve_rng else ())

    def unpack(self, packed):
        if self.cfg.preserve_rng:
            _set_rng(self.rng_ops, packed[self.n_state:])
        return tuple(packed[:self.n_state])

    # -- stepping ------------------------------------------------------------------------------
    def x(self, i):
        return None if self.inputs is None else self.inputs[i]

    def run(self, a, b, state, ys=None):
        """Untaped steps a..b-1 from x_a; returns x_b and appends outputs to ``ys`` if given."""
        for i in range(a, b):
            state, y = self.step(i, state, self.x(i))
            if ys is not None:
                ys.append(y)
        return state

    def choose_interval(self, state0) -> int:
        cfg = self.cfg
        if cfg.strategy == "revolve":
            return self.n
        if cfg.interval is not None:
            return cfg.interval
        with _fork_rng(self.rng_ops):
            times = []
            for _ in range(3):
                self.sync()  # on GPU time the kernels, not their launches
                t0 = time.perf_counter()
                self.run(0, 1, state0)
                self.sync()
                times.append(time.perf_counter() - t0)
        probe = self.make_slow(2, self.pack(state0))
        try:
            for key in (0, 1):
                probe.put(key, self.pack(state0))
            probe.wait_writes()
        finally:
            probe.close()
        t_f, t_w = sorted(times)[1], min(probe.write_times_s)
        return sch.choose_interval(t_f, t_w)

    def sync(self) -> None:
        if self.ops is not None:
            self.ops.synchronize()

    def make_slow(self, n_keys, template):
        cfg = self.cfg
        return make_tier(cfg.tier, n_keys=n_keys, template=template, disk_dir=cfg.disk_dir,
                         transfer_delay_s=cfg.transfer_delay_s, max_pending=cfg.max_pending,
                         timeout_s=cfg.timeout_s, meter=self.meter, write_fn=cfg.write_fn,
                         ops=self.ops)


def _close_quietly(fast, slow_box):
    fast.close()
    if slow_box[0] is not None:
        try:
            slow_box[0].close()
        except VarstudyError:
            pass


# -- forward -------------------------------------------------------------------------------------
def _forward(r: _Runner, state0):
    """Run all N steps untaped, storing checkpoints; returns (ys list, final state)."""
    interval = r.choose_interval(state0)
    r.stats.interval = interval
    chunks = sch.intervals(r.n, interval)
    if len(chunks) > 1:
        r.slow = r._box[0] = r.make_slow(len(chunks) - 1, r.pack(state0))
    ys, state = [], state0
    for k, (a, b) in enumerate(chunks[:-1]):
        r.slow.put(k, r.pack(state))
        r.stats.slow_writes += 1
        state = r.run(a, b, state, ys)
    a, b = chunks[-1]
    state = _exec(r, sch.split_forward(sch.revolve_ops(b - a, r.cfg.slots))[0], a, state, ys=ys)
    r.fast.put("live", r.pack(state))  # x_{N-1}: the first op of the reverse sweep re-tapes it
    state = r.run(b - 1, b, state, ys)
    r.stats.forward_steps += r.n
    return ys, state


def _exec(r: _Runner, ops, base, cur, *, ys=None, grads=None):
    """Execute schedule ops on steps base + local; ``grads`` is the _Grads of a reverse sweep."""
    pos = 0
    for op in ops:
        if op.kind == "store":
            r.fast.put(("slot", base + op.step), r.pack(cur))
        elif op.kind == "advance":
            if pos != op.step:
                raise VarstudyError(f"schedule advances from step {op.step} but state is at {pos}")
            cur = r.run(base + op.step, base + op.stop, cur, ys)
            pos = op.stop
            if ys is None:
                r.stats.recompute_steps += op.stop - op.step
        elif op.kind == "load":
            cur = r.unpack(r.fast.get(("slot", base + op.step), free=op.free))
            pos = op.step
        elif op.kind == "reverse":
            if pos != op.step:
                raise VarstudyError(f"schedule reverses step {op.step} but state is at {pos}")
            grads.reverse_step(base + op.step, cur)
            pos = None
    return cur


# -- backward ------------------------------------------------------------------------------------
class _Grads:
    """Adjoint accumulator: gradient of the current state, of inputs and of parameters."""

    def __init__(self, r: _Runner, grad_ys, grad_final):
        self.r = r
        self.grad_ys = grad_ys
        self.g_state = list(grad_final)
        self.g_params = [None] * len(r.params)
        need_x = r.inputs is not None and r.inputs.requires_grad
        self.g_inputs = torch.zeros_like(r.inputs) if need_x else None
        # NOTE [parameters]: non-leaf parameters are swapped for leaf aliases in each re-tape
        self.alias = {j: p.detach().requires_grad_() for j, p in enumerate(r.params)
                      if p.grad_fn is not None}
        self.swap = _Closures(swap={id(r.params[j]): a for j, a in self.alias.items()})
        self.targets = list(range(len(r.params))) + list(self.alias)  # g_params index per wrt

    def reverse_step(self, i: int, cur) -> None:
        """Re-tape step i from x_i and backpropagate the current adjoint through it."""
        r = self.r
        with torch.enable_grad(), (self.swap if self.alias else nullcontext()):
            st = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in cur)
            x = r.x(i)
            if self.g_inputs is not None:
                x = x.detach().requires_grad_()
            new, y = r.step(i, st, x)
        outs, gouts = [], []
        for out, g in zip(new + (y,), self.g_state + [self._gy(i)]):
            if out is not None and g is not None and out.requires_grad:
                outs.append(out)
                gouts.append(g)
        wrt = [t for t in st if t.requires_grad] + ([x] if self.g_inputs is not None else [])
        wrt += list(r.params) + list(self.alias.values())  # NOTE [parameters]: originals too
        got = torch.autograd.grad(outs, wrt, gouts, allow_unused=True) if outs else [None] * len(wrt)
        r.stats.retaped_steps += 1
        self._accumulate(i, st, got)

    def _gy(self, i):
        return None if self.grad_ys is None else self.grad_ys[i]

    def _accumulate(self, i, st, got) -> None:
        got = list(got)
        self.g_state = [got.pop(0) if t.requires_grad else None for t in st]
        if self.g_inputs is not None:
            gx = got.pop(0)
            if gx is not None:
                self.g_inputs[i] = gx
        for j, g in zip(self.targets, got):
            self.g_params[j] = _add(self.g_params[j], g)


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _backward(r: _Runner, grads: _Grads) -> None:
    """Reverse intervals last to first, prefetching the previous interval's start state."""
    chunks = sch.intervals(r.n, r.stats.interval)
    with _fork_rng(r.rng_ops, enabled=r.cfg.preserve_rng):
        for k in range(len(chunks) - 1, -1, -1):
            a, b = chunks[k]
            ops = sch.revolve_ops(b - a, r.cfg.slots)
            head, tail = sch.split_forward(ops)
            if k > 0:
                r.slow.prefetch(k - 1)
            if k == len(chunks) - 1:
                cur = r.unpack(r.fast.get("live", free=True))
                _exec_tail(r, tail, a, cur, b - a - 1, grads)
            else:
                cur = r.unpack(r.slow.get(k))
                cur = _exec(r, head, a, cur)
                _exec_tail(r, tail, a, cur, b - a - 1, grads)
        if r.slow is not None:
            r.stats.stall_s += r.slow.stall_s


def _exec_tail(r, tail, base, cur, pos, grads):
    """Run the reverse-sweep ops; the current state starts at local step ``pos``."""
    first, rest = tail[0], tail[1:]
    if first.kind != "reverse" or first.step != pos:
        raise VarstudyError(f"reverse sweep must start by reversing step {pos}; got {first}")
    grads.reverse_step(base + first.step, cur)
    _exec(r, rest, base, None, grads=grads)


# -- autograd Function and public API ------------------------------------------------------------
class _Scan(torch.autograd.Function):
    """forward(runner, inputs, *state0, *params) -> (ys, *final_state)."""

    @staticmethod
    def forward(ctx, runner, inputs, *tensors):
        r = runner
        r.inputs = inputs
        state0 = tuple(t.detach() for t in tensors[:r.n_state])
        try:
            ys, final = _forward(r, state0)
        except BaseException:
            _close_quietly(r.fast, r._box)
            raise
        ctx.runner = r
        ys = torch.stack(ys) if ys and ys[0] is not None else torch.empty(0)
        r.has_ys = ys.numel() > 0
        return (ys,) + tuple(final)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys, *grad_final):
        r = ctx.runner
        grads = _Grads(r, grad_ys if r.has_ys else None, grad_final)
        try:
            _backward(r, grads)
            if r.slow is not None:
                r.slow.close()
        finally:
            _close_quietly(r.fast, r._box)
            r.stats.fast_peak_bytes = max(r.stats.fast_peak_bytes, r.meter.peak_bytes)
        g_state = [g if ctx.needs_input_grad[2 + j] else None for j, g in enumerate(grads.g_state)]
        return (None, grads.g_inputs, *g_state, *grads.g_params)


class _Closures(TorchFunctionMode):
    """Finds (``found``) or swaps (``swap``: id -> alias) the tensors a step takes from outside."""

    def __init__(self, inside=(), swap=None) -> None:
        super().__init__()
        self.made, self.found, self.swap = list(inside), [], swap  # made: keeps their ids unique
        self.inside = {id(t) for t in inside}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = tree_map_only(torch.Tensor, self._visit, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if self.swap is None:
            made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.made += made
            self.inside.update(map(id, made))
        return out

    def _visit(self, t: torch.Tensor) -> torch.Tensor:
        if self.swap is not None:
            return self.swap.get(id(t), t)
        if t.requires_grad and id(t) not in self.inside and all(t is not f for f in self.found):
            self.found.append(t)
        return t


def _discover_params(step, state0, x0, rng_ops) -> tuple[torch.Tensor, ...]:
    """Tensors requiring grad that step 0 takes from outside (NOTE [parameters])."""
    with torch.enable_grad(), _fork_rng(rng_ops):
        st = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in state0)
        x = None if x0 is None else x0.detach()
        with _Closures(inside=st + ((x,) if x is not None else ())) as mode:
            new, y = step(0, st, x)
    found = mode.found
    seen = {t.grad_fn for t in found if t.grad_fn is not None}  # the walk stops at non-leaves
    stack = [o.grad_fn for o in new + (y,) if o is not None and o.grad_fn]
    exclude = {id(t) for t in st}
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) not in exclude and all(var is not f for f in found):
            found.append(var)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return tuple(found)


def _plain(step, state, n, inputs):
    """Reference: plain autograd over the loop (strategy ``store_all``)."""
    ys = []
    for i in range(n):
        state, y = step(i, state, None if inputs is None else inputs[i])
        ys.append(y)
    return (torch.stack(ys) if ys and ys[0] is not None else torch.empty(0)), state


def _scan(step, state0, inputs, n, params, cfg, stats, meter=None):
    """Shared driver: step(i, state_tuple, x_i) -> (state_tuple, y or None)."""
    if n < 1:
        raise VarstudyError(f"scan needs at least 1 step; got {n}")
    stats = stats if stats is not None else ScanStats()
    if cfg.strategy == "store_all" or not torch.is_grad_enabled():
        return _plain(step, state0, n, inputs)
    x0, device = None if inputs is None else inputs[0], state0[0].device
    if params is None:
        params = _discover_params(step, state0, x0, _rng_ops(cfg, device, state0 + (x0,)))
    params = tuple(params)
    needs = [t.requires_grad for t in state0 + params] + [inputs is not None and inputs.requires_grad]
    if not any(needs):
        return _plain(step, state0, n, inputs)
    meter = meter if meter is not None else MemoryMeter()
    r = _Runner(step, n, len(state0), cfg, stats, meter, device,
                _rng_ops(cfg, device, state0 + (x0,) + params))
    r.params = params
    out = _Scan.apply(r, inputs, *state0, *params)
    return out[0], tuple(out[1:])


def checkpointed_scan(step_fn, state0, inputs, *, strategy: str = "multistage", slots: int = 4,
                      interval: int | None = None, tier: str = "host", params=None,
                      config: ScanConfig | None = None, stats: ScanStats | None = None,
                      meter: MemoryMeter | None = None, **kw):
    """Scan ``step_fn`` over ``inputs`` with exact gradients in bounded fast memory.

    Args: step_fn(state, x_t) -> (new_state, y_t); state0: tensor (B, H) or tuple of tensors
    (LSTM (h, c)); inputs: (N, *x_shape); strategy: ``store_all`` | ``revolve`` | ``multistage``;
    slots: fast checkpoint slots s; interval: slow-tier interval I (None: ceil(T_w / t_f),
    measured); tier: ``host`` | ``disk``; meter: a MemoryMeter receiving fast-tier bytes (wrap
    forward and backward in ``meter.track_saved()`` to add the re-taped steps); params: tensors
    step_fn takes from outside that need gradients, leaf or not (None: discovered, NOTE
    [parameters]); config overrides all of these; extra keywords go to :class:`ScanConfig`
    (transfer_delay_s, disk_dir, max_pending, timeout_s, preserve_rng, write_fn, device_ops).
    Returns (ys of shape (N, *y_shape), final state shaped like state0).
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
    """Apply ``modules`` (a sequence of nn.Module, each (B, *d) -> (B, *d)) to x with checkpointing."""
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

    _, final = _scan(step, (x,), None, len(modules), params, cfg, stats, meter)
    return final[0]
