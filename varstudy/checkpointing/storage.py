"""Storage tiers for checkpointed states: fast (device), host (preallocated pool), disk (directory).

A *state* is a tuple of tensors (model state + RNG state). Slow tiers (registry ``TIERS``: host,
disk) write and read asynchronously: ``put`` returns at once, ``prefetch`` starts a read, ``get``
waits for it.

NOTE [async tiers]: one worker thread per tier does the transfers, on every device. The number of
writes in flight is bounded by a semaphore (``max_pending``), so a slow link stalls the caller
instead of growing a queue. The worker never blocks on the caller, so it cannot deadlock; every wait
has a timeout. A transfer that fails stores its exception in its future; the next
``put``/``get``/``wait_writes``/``close`` in the caller raises it as :class:`VarstudyError`.
``close`` (also called on error) waits for the worker and removes every file the disk tier wrote.

On CUDA (or with an ``ops`` object given) the host tier's transfers go through the device-ops seam
(NOTE [device ops] in :mod:`varstudy.checkpointing.device`); byte counts go to a
:class:`~varstudy.checkpointing.meter.MemoryMeter`.

``transfer_delay_s`` is an ARTIFICIAL THROTTLE: the worker sleeps that long per write and per read,
modelling a link of known speed so the compute/transfer ratio can be swept on one machine.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import tempfile
import threading
import time
from typing import Callable

import torch

from varstudy.checkpointing.device import device_ops
from varstudy.checkpointing.meter import MemoryMeter, State, state_bytes
from varstudy.errors import VarstudyError

TIERS = ("host", "disk")


class FastTier:
    """Fast slots in device memory: key -> state, bytes reported to a :class:`MemoryMeter`."""

    def __init__(self, meter: MemoryMeter | None = None) -> None:
        self.meter = meter or MemoryMeter()
        self._slots: dict[object, State] = {}

    def put(self, key: object, state: State) -> None:
        """Store ``state`` under ``key`` (replacing an earlier one), counting its bytes."""
        self.discard(key)
        self._slots[key] = state
        self.meter.add(state_bytes(state))

    def get(self, key: object, *, free: bool = False) -> State:
        """The state stored under ``key``; ``free`` also discards it. A missing key is a
        VarstudyError."""
        if key not in self._slots:
            raise VarstudyError(f"fast tier has no state {key!r}; stored: {sorted(map(str, self._slots))}")
        state = self._slots[key]
        if free:
            self.discard(key)
        return state

    def discard(self, key: object) -> None:
        """Drop the state under ``key``, if any."""
        old = self._slots.pop(key, None)
        if old is not None:
            self.meter.sub(state_bytes(old))

    def close(self) -> None:
        """Drop every stored state."""
        for key in list(self._slots):
            self.discard(key)

    def __len__(self) -> int:
        return len(self._slots)


class _AsyncTier:
    """Shared machinery: one worker thread, bounded writes, futures carrying errors."""

    name = "async"

    def __init__(self, *, transfer_delay_s: float = 0.0, max_pending: int = 1,
                 timeout_s: float = 60.0, meter: MemoryMeter | None = None) -> None:
        if max_pending < 1:
            raise VarstudyError(f"max_pending {max_pending} is below 1; valid choices: >= 1")
        self.delay = float(transfer_delay_s)
        self.timeout_s = float(timeout_s)
        self.meter = meter or MemoryMeter()
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix=f"varstudy-{self.name}")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._writes: dict[int, cf.Future] = {}
        self._reads: dict[int, cf.Future] = {}
        self._failed: list[tuple[int, cf.Future]] = []
        self.write_times_s: list[float] = []
        self.stall_s = 0.0
        self._closed = False

    # -- caller side -------------------------------------------------------------------------
    def put(self, key: int, state: State) -> None:
        """Start writing ``state`` under ``key``; blocks only while max_pending writes are in flight."""
        self._raise_failed()
        t0 = time.perf_counter()
        if not self._slots.acquire(timeout=self.timeout_s):
            raise VarstudyError(f"{self.name} tier: write queue timed out: no write finished "
                                f"within {self.timeout_s:.3g} s")
        self.stall_s += time.perf_counter() - t0
        nbytes = state_bytes(state)
        self.meter.add(nbytes)  # the source stays alive in fast memory until written
        fut = self._pool.submit(self._timed_write, key, state, self._source_ready())
        self._writes[key] = fut
        fut.add_done_callback(lambda f: self._write_done(key, f, nbytes))

    def _write_done(self, key: int, fut: cf.Future, nbytes: int) -> None:
        self.meter.sub(nbytes)
        self._slots.release()
        if not fut.cancelled() and fut.exception() is not None:
            self._failed.append((key, fut))
        else:
            self._writes.pop(key, None)  # keep only pending and failed writes

    def prefetch(self, key: int) -> None:
        """Start reading ``key`` (after its write completes) so a later :meth:`get` does not wait."""
        self._raise_failed()
        if key not in self._reads:
            self._reads[key] = self._pool.submit(self._timed_read, key)

    def get(self, key: int) -> State:
        """The state stored under ``key``, as fresh tensors on the compute device."""
        self.prefetch(key)
        t0 = time.perf_counter()
        state = self._result(self._reads.pop(key), f"reading state {key}")
        self.meter.sub(state_bytes(state))  # handed over to the caller as its working state
        self.stall_s += time.perf_counter() - t0
        return state

    def wait_writes(self) -> None:
        for key, fut in list(self._writes.items()):
            self._result(fut, f"writing state {key}")

    def close(self) -> None:
        """Wait for the worker, release storage; raises a pending write error after cleanup."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        try:
            self._raise_failed()
        finally:
            self._cleanup()

    # -- helpers -----------------------------------------------------------------------------
    def _raise_failed(self) -> None:
        if self._failed:
            key, fut = self._failed[0]
            self._result(fut, f"writing state {key}")

    def _result(self, fut: cf.Future, what: str):
        try:
            return fut.result(timeout=self.timeout_s)
        except cf.TimeoutError:
            raise VarstudyError(f"{self.name} tier: {what} timed out after {self.timeout_s:.3g} s") from None
        except VarstudyError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller with context
            raise VarstudyError(f"{self.name} tier: {what} failed: {exc!r}") from exc

    def _source_ready(self):
        """Caller side: a token the worker waits on before copying (CUDA: an event)."""
        return None

    def _await_source(self, token) -> None:
        pass

    def _timed_write(self, key: int, state: State, token=None) -> None:
        self._await_source(token)  # not timed: the producer's compute (NOTE [device ops])
        t0 = time.perf_counter()
        self._write(key, state)
        if self.delay:
            time.sleep(self.delay)
        self.write_times_s.append(time.perf_counter() - t0)

    def _timed_read(self, key: int) -> State:
        pending = self._writes.get(key)
        if pending is not None:
            pending.result()  # same worker: already done, re-raises its error
        state = self._read(key)
        self.meter.add(state_bytes(state))  # a prefetched state occupies fast memory
        if self.delay:
            time.sleep(self.delay)
        return state

    def _write(self, key: int, state: State) -> None:
        raise NotImplementedError

    def _read(self, key: int) -> State:
        raise NotImplementedError

    def _cleanup(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HostTier(_AsyncTier):
    """Host memory: a pool preallocated for ``n_keys`` states shaped like ``template``.

    On CUDA (or with ``ops`` given) the pool is pinned and the worker copies on a side stream
    ordered by events (NOTE [device ops]); on CPU the worker fills a plain preallocated pool.
    """

    name = "host"

    def __init__(self, n_keys: int, template: State, *, ops=None, **kw) -> None:
        super().__init__(**kw)
        self.device = template[0].device
        self.ops = device_ops(self.device, ops)
        empty = self.ops.pinned_empty if self.ops is not None else \
            (lambda shape, dtype: torch.empty(shape, dtype=dtype))
        self.pool = [tuple(empty(t.shape, t.dtype) for t in template)
                     for _ in range(max(n_keys, 0))]
        self.devices = [t.device for t in template]
        self.stream = self.ops.stream() if self.ops is not None else None

    def get(self, key: int) -> State:
        state = super().get(key)
        if self.ops is not None:  # read on the side stream, used on the caller's
            main = self.ops.current_stream()
            for t in state:
                self.ops.record_stream(t, main)
        return state

    def _source_ready(self):
        if self.ops is None:
            return None
        ready = self.ops.event()
        ready.record(self.ops.current_stream())
        return ready

    def _await_source(self, token) -> None:
        if token is not None:
            token.synchronize()

    def _write(self, key: int, state: State) -> None:
        if self.ops is None:
            for dst, src in zip(self.pool[key], state):
                dst.copy_(src)
            return
        with self.ops.use_stream(self.stream):
            for dst, src in zip(self.pool[key], state):
                self.ops.copy_(dst, src)
            self._wait_side()

    def _read(self, key: int) -> State:
        if self.ops is None:
            return tuple(p.to(d, copy=True) for p, d in zip(self.pool[key], self.devices))
        with self.ops.use_stream(self.stream):
            out = tuple(self.ops.to(p, d) for p, d in zip(self.pool[key], self.devices))
            self._wait_side()
        return out

    def _wait_side(self) -> None:
        """Worker side: block until the side stream's queued copies are done."""
        done = self.ops.event()
        done.record(self.stream)
        done.synchronize()

    def _cleanup(self) -> None:
        self.pool = []


class DiskTier(_AsyncTier):
    """A private directory (created under ``root``, removed on close, also on error).

    ``write_fn(obj, path)`` defaults to torch.save; tests inject failures through it.
    """

    name = "disk"

    def __init__(self, root: str | None = None, *, write_fn: Callable | None = None,
                 **kw) -> None:
        super().__init__(**kw)
        if root is not None and not os.path.isdir(root):
            self._pool.shutdown()
            raise VarstudyError(f"disk tier root {root!r} is not a directory; valid choices: an "
                                "existing directory, or None (the system's temporary one)")
        self.dir = tempfile.mkdtemp(prefix="varstudy-ckpt-", dir=root)
        self.write_fn = write_fn or torch.save
        self.devices: dict[int, list[torch.device]] = {}

    def path(self, key: int) -> str:
        """The file that holds state ``key``."""
        return os.path.join(self.dir, f"state_{key:08d}.pt")

    def _write(self, key: int, state: State) -> None:
        self.devices[key] = [t.device for t in state]
        tmp = self.path(key) + ".tmp"
        try:
            self.write_fn(tuple(t.detach().cpu() for t in state), tmp)
            os.replace(tmp, self.path(key))
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def _read(self, key: int) -> State:
        data = torch.load(self.path(key), weights_only=True)
        return tuple(t.to(d) for t, d in zip(data, self.devices[key]))

    def _cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def make_tier(name: str, *, n_keys: int, template: State, disk_dir: str | None = None,
              write_fn: Callable | None = None, ops=None, **kw) -> _AsyncTier:
    """Build a slow tier by name (registry: ``TIERS``); ``ops``: the host tier's device ops."""
    if name == "host":
        return HostTier(n_keys, template, ops=ops, **kw)
    if name == "disk":
        return DiskTier(disk_dir, write_fn=write_fn, **kw)
    raise VarstudyError(f"unknown storage tier {name!r}; valid choices: {', '.join(TIERS)}")
