"""Checkpointing schedules for reversing a chain of N steps: store-all, Revolve, multistage.

A schedule is a flat list of :class:`Op` (``store``/``advance``/``reverse``/``load``/``end_forward``)
on *local* step indices ``0..n-1`` of one chain; :mod:`varstudy.checkpointing.replay` executes it.

* **Revolve** (binomial, Griewank & Walther 2000): the op list is translated from
  ``checkpoint_schedules.MultistageCheckpointSchedule(n, s, 0)`` (all snapshots in RAM = plain
  binomial Revolve). We evaluated the package: its forward-advance count equals the proven optimum
  F(n, s) (tests/test_schedules.py), and it builds a 10,000-step schedule in ~0.1 s, so we drive the
  executor from it instead of writing our own. Its ``Revolve`` class (H-Revolve dynamic program) is
  also optimal but ~100x slower to build (0.8 s at n=1000), so we do not use it.
* **Multistage (asynchronous, two-level)**: the chain is cut into intervals of I steps; interval
  starts go to a slow tier asynchronously during the forward pass, and each interval is reversed with
  Revolve(I, s). checkpoint-schedules' ``TwoLevelCheckpointSchedule`` is the synchronous version of
  this plan; asynchrony (prefetch, bounded write queue) lives in :mod:`varstudy.checkpointing.storage`, so here we
  only need the interval arithmetic, written below.

Cost model (ARCHITECTURE.md, "Asynchronous multistage checkpointing"), in units of one forward step:
beta(s, t) = C(s + t, s); F(n, s) = t n - beta(s + 1, t - 1) for beta(s, t-1) < n <= beta(s, t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from varstudy.errors import VarstudyError

OP_KINDS = ("store", "advance", "reverse", "load", "end_forward")
STRATEGIES = ("store_all", "revolve", "multistage")


@dataclass(frozen=True)
class Op:
    """One schedule action on local steps of a chain.

    kind: ``store`` (copy current state x_step into a fast slot), ``advance`` (run steps
    step..stop-1 without a tape; current becomes x_stop), ``reverse`` (re-tape step ``step`` from
    current x_step and backpropagate through it), ``load`` (current = copy of slot x_step; ``free``
    drops the slot), ``end_forward`` (end of the first sweep; ops before it can run in the forward pass).
    """

    kind: str
    step: int = 0
    stop: int = 0
    free: bool = False


def beta(s: int, t: int) -> int:
    """Number of steps reversible with s snapshots and at most t advances per step: C(s+t, s)."""
    if s < 0 or t < 0:
        return 0
    return math.comb(s + t, s)


def revolve_repetition(n: int, s: int) -> int:
    """The t with beta(s, t-1) < n <= beta(s, t)."""
    _check_ns(n, s)
    t = 0
    while beta(s, t) < n:
        t += 1
    return t


def revolve_advances(n: int, s: int) -> int:
    """Proven minimal number of forward advances F(n, s) = t n - beta(s+1, t-1).

    Counts every untaped forward step, the first sweep included; the n taped steps of the reverse
    sweep are not counted. E.g. F(10,2)=20, F(20,3)=45, F(50,5)=122.
    """
    t = revolve_repetition(n, s)
    return t * n - beta(s + 1, t - 1)


def _check_ns(n: int, s: int) -> None:
    if n < 1 or s < 1:
        raise VarstudyError(f"schedule of n={n} steps with s={s} slots; valid choices: n >= 1 "
                            "and s >= 1")


@lru_cache(maxsize=256)
def _revolve_ops_cached(n: int, s: int) -> tuple[Op, ...]:
    if n == 1:
        return (Op("end_forward"), Op("reverse", 0))
    import checkpoint_schedules as cs

    ops: list[Op] = []
    for action in cs.MultistageCheckpointSchedule(n, s, 0):
        if isinstance(action, cs.EndReverse):
            break
        ops.extend(_translate(action, cs))
    return tuple(ops)


def _translate(action, cs) -> list[Op]:
    """Map one checkpoint_schedules action onto our ops."""
    if isinstance(action, cs.Forward):
        out = [Op("store", action.n0)] if action.write_ics else []
        if action.write_adj_deps:
            if action.n1 - action.n0 != 1:
                raise VarstudyError(f"taped forward over {action.n1 - action.n0} steps is not "
                                    "supported; valid: 1 step")
            return out  # the taped step is re-run by the following reverse op
        return out + [Op("advance", action.n0, action.n1)]
    if isinstance(action, cs.Reverse):
        return [Op("reverse", action.n0)]
    if isinstance(action, (cs.Copy, cs.Move)):
        return [Op("load", action.n, free=isinstance(action, cs.Move))]
    if isinstance(action, cs.EndForward):
        return [Op("end_forward")]
    raise VarstudyError(f"unknown checkpoint_schedules action {action!r}; valid: Forward, "
                        "Reverse, Copy, Move, EndForward")


def revolve_ops(n: int, s: int) -> tuple[Op, ...]:
    """Binomial Revolve schedule reversing n steps with s fast slots (slot count includes x_0)."""
    _check_ns(n, s)
    return _revolve_ops_cached(n, min(s, max(n - 1, 1)))


def count_advances(ops: tuple[Op, ...] | list[Op]) -> int:
    """Untaped forward steps in a schedule (the quantity F(n, s) minimises)."""
    return sum(op.stop - op.step for op in ops if op.kind == "advance")


def split_forward(ops: tuple[Op, ...]) -> tuple[tuple[Op, ...], tuple[Op, ...]]:
    """(ops of the first sweep, ops of the reverse sweep), split at ``end_forward``."""
    for i, op in enumerate(ops):
        if op.kind == "end_forward":
            return ops[:i], ops[i + 1:]
    raise VarstudyError("schedule has no end_forward op; valid schedules come from revolve_ops")


def choose_interval(step_time_s: float, transfer_time_s: float) -> int:
    """Slow-tier interval I = ceil(T_w / t_f), at least 1 (store as often as the link allows)."""
    if step_time_s <= 0:
        raise VarstudyError(f"step time {step_time_s} s is not positive; valid choices: > 0 s")
    return max(1, math.ceil(transfer_time_s / step_time_s - 1e-9))


def intervals(n: int, interval: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering 0..n-1 in chunks of ``interval`` steps (last may be short)."""
    if interval < 1:
        raise VarstudyError(f"interval {interval} is below 1 step; valid choices: >= 1")
    return [(a, min(a + interval, n)) for a in range(0, n, interval)]


def model_cost_per_step(strategy: str, n: int, slots: int, interval: int = 1,
                        reverse_cost: float = 1.0) -> float:
    """Modelled time per step in units of one forward step t_f (ARCHITECTURE.md cost model).

    store_all: 1 + t_b. revolve: F(n, s)/n + t_b (first sweep included in F).
    multistage: 1 + [sum over non-last intervals F(I, s) + F(I_last, s) - (I_last - 1)] / n + t_b
    (the last interval's first sweep happens during the forward pass, from the live state).
    ``reverse_cost`` is t_b / t_f (re-tape + adjoint of one step).
    """
    if strategy == "store_all":
        return 1.0 + reverse_cost
    if strategy == "revolve":
        return revolve_advances(n, slots) / n + reverse_cost
    if strategy == "multistage":
        chunks = intervals(n, interval)
        last = chunks[-1][1] - chunks[-1][0]
        extra = sum(revolve_advances(b - a, slots) for a, b in chunks[:-1])
        extra += revolve_advances(last, slots) - (last - 1)
        return 1.0 + extra / n + reverse_cost
    raise VarstudyError(f"unknown strategy {strategy!r}; valid choices: {', '.join(STRATEGIES)}")
