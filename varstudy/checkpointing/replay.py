"""The replay machinery behind :func:`~varstudy.checkpointing.sequence.checkpointed_scan`.

NOTE [design]: the whole scan is one ``torch.autograd.Function`` (:class:`Scan`). Its forward runs
the N steps without a tape, keeping checkpoints as the schedule says (strategy ``multistage``:
interval starts go to a slow tier asynchronously every I steps, the last interval keeps Revolve's
slots in fast memory; ``revolve``: Revolve's first sweep over all N steps in fast memory). Its
backward walks the intervals last to first, prefetching the previous interval's start, and runs
Revolve inside each: untaped advances under no_grad, and for each step a re-tape under
enable_grad followed by ``torch.autograd.grad`` w.r.t. (state, x_t, params), accumulating
parameter gradients, which the Function returns for the parameters it received as inputs. So
``.backward()`` and ``torch.autograd.grad`` both work, for any N, slots and interval.

A step here is ``step(i, state_tuple, x_i) -> (state_tuple, y_i or None)``; schedules
(:mod:`~varstudy.checkpointing.schedules`) name local steps of one interval, executed on
``base + local``. Every stored checkpoint carries its RNG states (NOTE [RNG]); parameters that are
non-leaf tensors are swapped for leaf aliases in each re-tape (NOTE [parameters]).
"""

from __future__ import annotations

import time
import weakref
from contextlib import nullcontext

import torch

from varstudy.checkpointing import schedules as sch
from varstudy.checkpointing.closures import Closures, checked_call
from varstudy.checkpointing.device import device_ops
from varstudy.checkpointing.rng import fork_rng, get_rng, set_rng
from varstudy.checkpointing.storage import FastTier, make_tier
from varstudy.errors import VarstudyError


class Runner:
    """Holds one scan's step function, schedule and storage between forward and backward.

    ``check``: the steps whose first call is checked for missing non-leaf parameters (NOTE
    [parameters]); ``rng_ops``: the devices whose RNG checkpoints carry (NOTE [RNG]).
    """

    def __init__(self, step, n, n_state, cfg, stats, meter, device, rng_ops, params=(),
                 check=()):
        self.step, self.n, self.n_state, self.cfg = step, n, n_state, cfg
        self.stats, self.meter, self.rng_ops = stats, meter, rng_ops
        self.ops = device_ops(device, cfg.device_ops)  # NOTE [device ops]
        self.fast = FastTier(meter)
        self.slow = None
        self.inputs = None
        self.has_ys = False
        self.params: tuple[torch.Tensor, ...] = tuple(params)
        self.unchecked = set(check)
        self._box = [None]  # the slow tier, closed by the finalizer if backward never runs
        self._finalizer = weakref.finalize(self, close_quietly, self.fast, self._box)

    # -- RNG-carrying checkpoints -------------------------------------------------------------
    def pack(self, state):
        """The state to store: its tensors, plus the RNG states when dropout must replay."""
        return tuple(state) + (get_rng(self.rng_ops) if self.cfg.preserve_rng else ())

    def unpack(self, packed):
        """The state from a stored one, restoring the RNG states it carries."""
        if self.cfg.preserve_rng:
            set_rng(self.rng_ops, packed[self.n_state:])
        return tuple(packed[:self.n_state])

    # -- stepping ------------------------------------------------------------------------------
    def x(self, i):
        """Input ``i`` of the scan (None for a scan without inputs)."""
        return None if self.inputs is None else self.inputs[i]

    def call(self, i, state, x):
        """One step; the first call of a step in ``unchecked`` is checked (NOTE [parameters])."""
        if i in self.unchecked:
            self.unchecked.discard(i)
            return checked_call(self.step, i, state, x, self.params)
        return self.step(i, state, x)

    def run(self, a, b, state, ys=None):
        """Untaped steps a..b-1 from x_a; returns x_b and appends outputs to ``ys`` if given."""
        for i in range(a, b):
            state, y = self.call(i, state, self.x(i))
            if ys is not None:
                ys.append(y)
        return state

    def choose_interval(self, state0) -> int:
        """Steps between slow-tier stores: all N for Revolve, else the given interval or ⌈T_w / t_f⌉
        measured on the first state."""
        cfg = self.cfg
        if cfg.strategy == "revolve":
            return self.n
        if cfg.interval is not None:
            return cfg.interval
        with fork_rng(self.rng_ops):
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
        """Synchronize the device (so interval timings are honest)."""
        if self.ops is not None:
            self.ops.synchronize()

    def make_slow(self, n_keys, template):
        """The slow tier (host or disk) for ``n_keys`` states shaped like ``template``."""
        cfg = self.cfg
        return make_tier(cfg.tier, n_keys=n_keys, template=template, disk_dir=cfg.disk_dir,
                         transfer_delay_s=cfg.transfer_delay_s, max_pending=cfg.max_pending,
                         timeout_s=cfg.timeout_s, meter=self.meter, write_fn=cfg.write_fn,
                         ops=self.ops)


def close_quietly(fast, slow_box) -> None:
    """Close the fast tier and the slow tier (when made), ignoring a slow-tier error already
    reported."""
    fast.close()
    if slow_box[0] is not None:
        try:
            slow_box[0].close()
        except VarstudyError:
            pass


# -- forward -------------------------------------------------------------------------------------
def run_forward(r: Runner, state0):
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
    state = execute(r, sch.split_forward(sch.revolve_ops(b - a, r.cfg.slots))[0], a, state, ys=ys)
    r.fast.put("live", r.pack(state))  # x_{N-1}: the first op of the reverse sweep re-tapes it
    state = r.run(b - 1, b, state, ys)
    r.stats.forward_steps += r.n
    return ys, state


def execute(r: Runner, ops, base, cur, *, ys=None, grads=None):
    """Execute schedule ops on steps base + local; ``grads`` is the Grads of a reverse sweep."""
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
class Grads:
    """Adjoint accumulator: gradient of the current state, of inputs and of parameters."""

    def __init__(self, r: Runner, grad_ys, grad_final):
        self.r = r
        self.grad_ys = grad_ys
        self.g_state = list(grad_final)
        self.g_params = [None] * len(r.params)
        need_x = r.inputs is not None and r.inputs.requires_grad
        self.g_inputs = torch.zeros_like(r.inputs) if need_x else None
        # NOTE [parameters]: non-leaf parameters are swapped for leaf aliases in each re-tape
        self.alias = {j: p.detach().requires_grad_() for j, p in enumerate(r.params)
                      if p.grad_fn is not None}
        self.swap = Closures(swap={id(r.params[j]): a for j, a in self.alias.items()})
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


def run_backward(r: Runner, grads: Grads) -> None:
    """Reverse intervals last to first, prefetching the previous interval's start state."""
    chunks = sch.intervals(r.n, r.stats.interval)
    with fork_rng(r.rng_ops, enabled=r.cfg.preserve_rng):
        for k in range(len(chunks) - 1, -1, -1):
            a, b = chunks[k]
            head, tail = sch.split_forward(sch.revolve_ops(b - a, r.cfg.slots))
            if k > 0:
                r.slow.prefetch(k - 1)
            if k == len(chunks) - 1:
                cur = r.unpack(r.fast.get("live", free=True))
            else:
                cur = execute(r, head, a, r.unpack(r.slow.get(k)))
            _execute_tail(r, tail, a, cur, b - a - 1, grads)
        if r.slow is not None:
            r.stats.stall_s += r.slow.stall_s


def _execute_tail(r, tail, base, cur, pos, grads) -> None:
    """Run the reverse-sweep ops; the current state starts at local step ``pos``."""
    first, rest = tail[0], tail[1:]
    if first.kind != "reverse" or first.step != pos:
        raise VarstudyError(f"reverse sweep must start by reversing step {pos}; got {first}")
    grads.reverse_step(base + first.step, cur)
    execute(r, rest, base, None, grads=grads)


# -- the autograd Function -----------------------------------------------------------------------
class Scan(torch.autograd.Function):
    """``forward(runner, inputs, *state0, *params) -> (ys, *final_state)``."""

    @staticmethod
    def forward(ctx, runner, inputs, *tensors):
        """Run the scan without a tape, storing states by the runner's strategy."""
        r = runner
        r.inputs = inputs
        state0 = tuple(t.detach() for t in tensors[:r.n_state])
        try:
            ys, final = run_forward(r, state0)
        except BaseException:
            close_quietly(r.fast, r._box)
            raise
        ctx.runner = r
        ys = torch.stack(ys) if ys and ys[0] is not None else torch.empty(0)
        r.has_ys = ys.numel() > 0
        return (ys,) + tuple(final)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys, *grad_final):
        """Reverse the scan interval by interval, re-taping each step from its stored state."""
        r = ctx.runner
        grads = Grads(r, grad_ys if r.has_ys else None, grad_final)
        try:
            run_backward(r, grads)
            if r.slow is not None:
                r.slow.close()
        finally:
            close_quietly(r.fast, r._box)
            r.stats.fast_peak_bytes = max(r.stats.fast_peak_bytes, r.meter.peak_bytes)
        g_state = [g if ctx.needs_input_grad[2 + j] else None for j, g in enumerate(grads.g_state)]
        return (None, grads.g_inputs, *g_state, *grads.g_params)
