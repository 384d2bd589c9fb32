"""The host tier's CUDA path and the scan's device calls, run on CPU through a fake device-ops
object (NOTE [device ops] in varstudy.checkpointing.device): streams, events, non_blocking
copies, synchronize, device RNG.

The fake models asynchrony: a non_blocking copy is queued on the current stream and only happens
(after ``copy_s`` seconds of "transfer") when an event recorded after it is synchronized, or at
``synchronize()``; a tensor made by ``to`` holds NaN until then. So a path that forgets to use the
side stream or to wait for its event reads wrong data, and its write times miss the transfer.
"""

import threading
import time
from contextlib import contextmanager

import pytest
import torch

from varstudy.errors import VarstudyError
from varstudy.checkpointing import HostTier, MemoryMeter, ScanStats, checkpointed_scan, state_bytes


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name, self.queued, self.done = name, [], 0
        self.lock = threading.Lock()

    def enqueue(self, work) -> None:
        with self.lock:
            self.queued.append(work)

    def run_until(self, upto: int) -> None:
        with self.lock:
            while self.done < upto:
                work, self.done = self.queued[self.done], self.done + 1
                work()  # a failure surfaces here, as a CUDA error does at synchronize


class FakeEvent:
    def __init__(self, ops) -> None:
        self.ops, self.stream, self.upto = ops, None, 0

    def record(self, stream) -> None:
        self.stream, self.upto = stream, len(stream.queued)

    def synchronize(self) -> None:
        self.ops.log.append(("event_sync", self.stream.name))
        self.stream.run_until(self.upto)


class FakeCudaOps:
    """Stands in for device.CudaOps; ``log`` records the calls, ``gen`` is the device RNG."""

    def __init__(self, copy_s: float = 0.0, fail_copy: int | None = None, seed: int = 0) -> None:
        self.copy_s, self.fail_copy, self.copies = copy_s, fail_copy, 0
        self.main, self.sides, self.log = FakeStream("main"), [], []
        self.tls = threading.local()
        self.gen = torch.Generator().manual_seed(seed)

    def stream(self):
        self.sides.append(FakeStream(f"side{len(self.sides)}"))
        return self.sides[-1]

    def current_stream(self):
        return getattr(self.tls, "stream", self.main)

    @contextmanager
    def use_stream(self, stream):
        prev, self.tls.stream = self.current_stream(), stream
        try:
            yield
        finally:
            self.tls.stream = prev

    def event(self):
        return FakeEvent(self)

    def synchronize(self) -> None:
        self.log.append("sync")
        for s in [self.main] + self.sides:
            s.run_until(len(s.queued))

    def pinned_empty(self, shape, dtype):
        self.log.append("pin")
        return torch.empty(shape, dtype=dtype)

    def copy_(self, dst, src) -> None:
        self._enqueue(lambda: dst.copy_(src))

    def to(self, src, device):
        out = torch.empty(src.shape, dtype=src.dtype, device=device)
        out.fill_(float("nan") if out.is_floating_point() else 7)
        self._enqueue(lambda: out.copy_(src))
        return out

    def record_stream(self, t, stream) -> None:
        self.log.append(("record_stream", stream.name))

    def get_rng_state(self):
        return self.gen.get_state()

    def set_rng_state(self, state) -> None:
        self.gen.set_state(state)

    def _enqueue(self, copy) -> None:
        k, stream = self.copies, self.current_stream()
        self.copies += 1
        self.log.append(("copy", stream.name))

        def work():
            time.sleep(self.copy_s)
            if k == self.fail_copy:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            copy()

        stream.enqueue(work)


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, generator=g), torch.arange(5))


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- HostTier on the CUDA path -------------------------------------------------------------------
def test_cuda_path_round_trip_uses_side_stream_and_events():
    ops = FakeCudaOps(copy_s=0.01)
    t = HostTier(3, _state(0), ops=ops, timeout_s=5)
    assert ops.log.count("pin") == 6  # pinned pool: 3 states x 2 tensors
    for k in range(3):
        t.put(k, _state(k))
    t.prefetch(2)
    for k in (2, 1, 0):
        assert _same(t.get(k), _state(k))
    t.close()
    assert ("copy", "main") not in ops.log and ops.log.count(("copy", "side0")) == 12
    assert ("event_sync", "main") in ops.log  # the worker waited for the caller's ready event
    assert ops.log.count(("record_stream", "main")) == 6  # reads handed to the caller's stream


def test_cuda_path_times_writes_with_the_copy_and_the_throttle():
    ops = FakeCudaOps(copy_s=0.03)
    t = HostTier(2, _state(0), ops=ops, transfer_delay_s=0.02, timeout_s=5)
    t.put(0, _state(1))
    t.put(1, _state(2))
    t.wait_writes()
    assert len(t.write_times_s) == 2
    assert min(t.write_times_s) >= 2 * 0.03 + 0.02  # two tensors copied, then the throttle
    t.close()


def test_cuda_path_bounds_pending_writes_and_counts_stall_and_meter():
    nbytes = state_bytes(_state(0))
    for max_pending in (1, 2):
        meter = MemoryMeter()
        t = HostTier(2, _state(0), ops=FakeCudaOps(copy_s=0.1), max_pending=max_pending,
                     meter=meter, timeout_s=5)
        t.put(0, _state(0))
        assert meter.bytes_now == nbytes  # the source is held until its copy completes
        t0 = time.perf_counter()
        t.put(1, _state(1))
        waited = time.perf_counter() - t0
        if max_pending == 1:  # the second write waits for the first (2 x 0.1 s of copies)
            assert waited >= 0.15 and t.stall_s >= 0.15
            assert meter.peak_bytes == nbytes
        else:
            assert waited < 0.15 and t.stall_s < 0.15
            assert meter.peak_bytes == 2 * nbytes
        t.wait_writes()
        assert meter.bytes_now == 0
        t.close()


def test_cuda_path_copy_error_is_raised_in_the_caller():
    meter = MemoryMeter()
    t = HostTier(2, _state(0), ops=FakeCudaOps(fail_copy=0), meter=meter, timeout_s=5)
    t.put(0, _state(0))
    with pytest.raises(VarstudyError, match="host tier: writing state 0 failed: .*illegal memory"):
        t.wait_writes()
    with pytest.raises(VarstudyError, match="writing state 0 failed"):
        t.close()
    assert meter.bytes_now == 0 and t.pool == []


@pytest.mark.parametrize("fake", [False, True], ids=["cpu", "fake_cuda"])
def test_host_tier_overlaps_compute(fake):
    """N puts with a throttle of d per write, each followed by compute of c: an asynchronous tier
    takes ~N max(c, d) + d, a synchronous one N (c + d) (1.6 s here); the bound is 0.75 of that."""
    n, c, d = 8, 0.1, 0.1
    t = HostTier(n, _state(0), ops=FakeCudaOps() if fake else None, transfer_delay_s=d,
                 max_pending=1, timeout_s=10)
    t0 = time.perf_counter()
    for k in range(n):
        t.put(k, _state(k))
        time.sleep(c)  # compute while the write is in flight
    t.wait_writes()
    wall = time.perf_counter() - t0
    t.close()
    assert n * max(c, d) <= wall < 0.75 * n * (c + d), wall


# -- checkpointed_scan on the CUDA path ----------------------------------------------------------
def _rnn(p_drop=0.0, gen=None):
    g = torch.Generator().manual_seed(0)
    w = (0.5 * torch.randn(5, 5, generator=g)).requires_grad_()
    u = torch.randn(3, 5, generator=g).requires_grad_()

    def step(h, x):
        new = torch.tanh(h @ w + x @ u)
        if p_drop:  # dropout drawn from the (fake) device RNG
            new = new * (torch.rand(new.shape, generator=gen) > p_drop) / (1 - p_drop)
        return new, new.pow(2).sum(-1)

    return step, [w, u]


def _loss_grads(run, step, params, n=23):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(n, 2, 3, generator=g, requires_grad=True)
    h0 = torch.randn(2, 5, generator=g, requires_grad=True)
    ys, hT = run(step, h0, xs)
    loss = (ys * torch.linspace(0, 1, ys.numel()).view_as(ys)).sum() + hT.pow(2).sum()
    return loss.detach(), torch.autograd.grad(loss, params + [xs, h0])


def _plain(step, h0, xs):
    ys, h = [], h0
    for x in xs:
        h, y = step(h, x)
        ys.append(y)
    return torch.stack(ys), h


def _assert_same(a, b):
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interval", [None, 4])
def test_multistage_on_cuda_path_matches_autograd(interval):
    """Default interval (None: measured from write_times_s) and a fixed one using the slow tier."""
    step, params = _rnn()
    loss_ref, ref = _loss_grads(_plain, step, params)
    ops, stats = FakeCudaOps(), ScanStats()
    loss, got = _loss_grads(lambda s, h, x: checkpointed_scan(
        s, h, x, strategy="multistage", slots=2, interval=interval, device_ops=ops, stats=stats,
        timeout_s=10), step, params)
    assert torch.equal(loss, loss_ref)
    _assert_same(got, ref)
    assert stats.interval >= 1 and ops.log.count("pin") > 0
    if interval is not None:
        assert stats.slow_writes == 5 and ("copy", "side0") in ops.log


def test_interval_timing_synchronizes_around_each_timed_step():
    step, params = _rnn()
    ops = FakeCudaOps()

    def logged(h, x):
        ops.log.append("step")
        return step(h, x)

    checkpointed_scan(logged, torch.zeros(2, 5, requires_grad=True), torch.randn(6, 2, 3),
                      strategy="multistage", params=params, device_ops=ops, timeout_s=10)
    assert ops.log[:9] == ["sync", "step", "sync"] * 3


@pytest.mark.parametrize("kw", [dict(strategy="revolve", slots=2),
                                dict(strategy="multistage", slots=2, interval=4),
                                dict(strategy="multistage", slots=2)],
                         ids=["revolve", "ms", "ms_auto"])
def test_device_rng_dropout_matches_autograd_and_is_left_alone(kw):
    """Dropout from the device RNG: parameter discovery and interval timing must not shift the
    forward masks, recomputation must replay them, backward must leave the device RNG as is."""
    ops = FakeCudaOps(seed=5)
    step, params = _rnn(p_drop=0.3, gen=ops.gen)
    loss_ref, ref = _loss_grads(_plain, step, params)
    ops.gen.manual_seed(5)
    after_forward = []

    def run(s, h, x):
        out = checkpointed_scan(s, h, x, device_ops=ops, timeout_s=10, **kw)  # params discovered
        after_forward.append(ops.gen.get_state())
        return out

    loss, got = _loss_grads(run, step, params)
    assert torch.equal(loss, loss_ref)  # same masks in the forward pass
    _assert_same(got, ref)               # and replayed in the recomputation
    assert torch.equal(ops.gen.get_state(), after_forward[0])
