"""Revolve schedule optimality and the multistage cost model (ARCHITECTURE.md)."""

import functools

import pytest

from varstudy.checkpointing import schedules as sch
from varstudy.errors import VarstudyError


@functools.lru_cache(maxsize=None)
def _dp_optimum(n: int, s: int) -> int:
    """Brute-force minimal untaped advances to reverse n steps with s slots (x_0 in a slot)."""
    if n == 1:
        return 0
    if s == 1:
        return (n - 1) + _dp_optimum(n - 1, 1)
    return min(m + _dp_optimum(n - m, s - 1) + _dp_optimum(m, s) for m in range(1, n))


TABLE = [(10, 2, 20), (20, 3, 45), (50, 5, 122), (1, 1, 0), (2, 1, 1), (5, 5, 4), (7, 3, 9),
         (100, 5, 316), (3000, 5, 24995), (10000, 5, 112868)]


@pytest.mark.parametrize("n,s,expected", TABLE, ids=[f"n{n}-s{s}" for n, s, _ in TABLE])
def test_closed_form_table(n, s, expected):
    assert sch.revolve_advances(n, s) == expected


@pytest.mark.parametrize("n,s,expected", TABLE, ids=[f"n{n}-s{s}" for n, s, _ in TABLE])
def test_revolve_schedule_forward_count_is_optimal(n, s, expected):
    assert sch.count_advances(sch.revolve_ops(n, s)) == expected


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_closed_form_matches_brute_force(s):
    for n in range(1, 40):
        assert sch.revolve_advances(n, s) == _dp_optimum(n, s), (n, s)


@pytest.mark.parametrize("n,s", [(1, 1), (2, 1), (9, 2), (30, 3), (64, 4)])
def test_schedule_is_executable_and_respects_slots(n, s):
    """Simulate the ops: every step reversed once, last to first, never more than s slots."""
    slots, pos, reversed_steps = set(), 0, []
    head, tail = sch.split_forward(sch.revolve_ops(n, s))
    for op in head + tail:
        if op.kind == "store":
            assert op.step == pos
            slots.add(op.step)
            assert len(slots) <= s
        elif op.kind == "advance":
            assert op.step == pos
            pos = op.stop
        elif op.kind == "load":
            assert op.step in slots
            pos = op.step
            if op.free:
                slots.discard(op.step)
        elif op.kind == "reverse":
            assert op.step == pos
            reversed_steps.append(op.step)
            pos = None
    assert reversed_steps == list(range(n - 1, -1, -1))


def test_paper_cost_model_numbers():
    """PAPERS.md: s=5, transfer/compute ratio 5: Revolve 4.16 (N=100), 9.33 (N=3000); async ~2.75-2.80."""
    assert sch.model_cost_per_step("revolve", 100, 5) == pytest.approx(4.16, abs=0.005)
    assert sch.model_cost_per_step("revolve", 3000, 5) == pytest.approx(9.33, abs=0.005)
    interval = sch.choose_interval(1.0, 5.0)
    assert interval == 5
    ms = [sch.model_cost_per_step("multistage", n, 5, interval) for n in (100, 3000)]
    assert ms[0] == pytest.approx(2.76, abs=0.01) and ms[1] == pytest.approx(2.80, abs=0.01)


def test_intervals_and_errors():
    assert sch.intervals(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert sch.choose_interval(2e-3, 1e-3) == 1
    with pytest.raises(VarstudyError, match="valid choices: store_all, revolve, multistage"):
        sch.model_cost_per_step("bogus", 10, 2)
    with pytest.raises(VarstudyError, match="s >= 1"):
        sch.revolve_ops(10, 0)
