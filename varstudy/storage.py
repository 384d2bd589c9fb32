"""Storage tiers for checkpointed states: fast (device), host (preallocated pool), disk (directory).

A *state* is a tuple of tensors (model state + RNG state). Slow tiers (host, disk) write and read
asynchronously: ``put`` returns at once, ``prefetch`` starts a read, ``get`` waits for it.

NOTE [async tiers]: one worker thread per tier (or, for the host tier on CUDA, a side CUDA stream)
does the transfers. The number of writes in flight is bounded by a semaphore (``max_pending``), so a
slow link stalls the caller instead of growing a queue. The worker never blocks on the caller, so it
cannot deadlock; every wait has a timeout. A transfer that fails stores its exception in its future;
the next ``put``/``get``/``close`` in the caller raises it as :class:`VarstudyError`. ``close`` (also
called on error) waits for the worker and removes every file the disk tier wrote.

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
import weakref
from contextlib import contextmanager
from typing import Callable

import torch

from varstudy.errors import VarstudyError

State = tuple[torch.Tensor, ...]
TIERS = ("host", "disk")


def state_bytes(state: State) -> int:
    """Bytes of the tensors of a state (views counted by their own size)."""
    return sum(t.numel() * t.element_size() for t in state)


class MemoryMeter:
    """Thread-safe counter of live fast-tier bytes and their peak.

    Executors add the states they hold in device memory; :meth:`track_saved` also counts tensors
    saved for backward by autograd (saved_tensors_hooks, deduplicated by (data_ptr, nbytes),
    parameters excluded), recomputation in backward included when backward runs inside it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_now = 0
        self.peak_bytes = 0
        self._live: dict[tuple[int, int], int] = {}

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_now += nbytes
            self.peak_bytes = max(self.peak_bytes, self.bytes_now)

    def sub(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_now -= nbytes

    def _release(self, key: tuple[int, int]) -> None:
        with self._lock:
            self._live[key] -= 1
            if self._live[key] == 0:
                del self._live[key]
                self.bytes_now -= key[1]

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or t.device.type == "meta":
            return t
        key = (t.data_ptr(), t.numel() * t.element_size())
        with self._lock:
            self._live[key] = self._live.get(key, 0) + 1
            if self._live[key] == 1:
                self.bytes_now += key[1]
                self.peak_bytes = max(self.peak_bytes, self.bytes_now)
        holder = _Saved(t)
        weakref.finalize(holder, self._release, key)
        return holder

    @contextmanager
    def track_saved(self):
        """Count autograd saved tensors as fast-tier bytes while the block runs."""
        unpack = lambda h: h.t if isinstance(h, _Saved) else h  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(self._pack, unpack):
            yield self


class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class FastTier:
    """Fast slots in device memory: key -> state, bytes reported to a :class:`MemoryMeter`."""

    def __init__(self, meter: MemoryMeter | None = None) -> None:
        self.meter = meter or MemoryMeter()
        self._slots: dict[object, State] = {}

    def put(self, key: object, state: State) -> None:
        self.discard(key)
        self._slots[key] = state
        self.meter.add(state_bytes(state))

    def get(self, key: object, *, free: bool = False) -> State:
        if key not in self._slots:
            raise VarstudyError(f"fast tier has no state {key!r}; stored: {sorted(map(str, self._slots))}")
        state = self._slots[key]
        if free:
            self.discard(key)
        return state

    def discard(self, key: object) -> None:
        old = self._slots.pop(key, None)
        if old is not None:
            self.meter.sub(state_bytes(old))

    def close(self) -> None:
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
            raise VarstudyError(f"max_pending must be >= 1; got {max_pending}")
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
        fut = self._pool.submit(self._timed_write, key, state)
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

    def _timed_write(self, key: int, state: State) -> None:
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

    On CUDA the pool is pinned and copies run on a side CUDA stream ordered by events (no host sync);
    on CPU a plain preallocated pool is filled by the worker thread.
    """

    name = "host"

    def __init__(self, n_keys: int, template: State, **kw) -> None:
        super().__init__(**kw)
        self.device = template[0].device
        self.cuda = self.device.type == "cuda"
        pin = self.cuda and torch.cuda.is_available()
        self.pool = [tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in template)
                     for _ in range(max(n_keys, 0))]
        self.devices = [t.device for t in template]
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._events: dict[int, tuple] = {}

    def put(self, key: int, state: State) -> None:
        if not self.cuda:
            return super().put(key, state)
        ready = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for dst, src in zip(self.pool[key], state):
                dst.copy_(src, non_blocking=True)
                if src.device.type == "cuda":
                    src.record_stream(self.stream)

    def prefetch(self, key: int) -> None:
        if not self.cuda:
            return super().prefetch(key)
        if key in self._events:
            return
        with torch.cuda.stream(self.stream):
            out = tuple(p.to(d, non_blocking=True) for p, d in zip(self.pool[key], self.devices))
            self._events[key] = (out, self.stream.record_event())

    def get(self, key: int) -> State:
        if not self.cuda:
            return super().get(key)
        self.prefetch(key)
        out, done = self._events.pop(key)
        main = torch.cuda.current_stream(self.device)
        main.wait_event(done)
        for t in out:
            if t.device.type == "cuda":
                t.record_stream(main)
        return out

    def _write(self, key: int, state: State) -> None:
        for dst, src in zip(self.pool[key], state):
            dst.copy_(src)

    def _read(self, key: int) -> State:
        return tuple(p.to(d, copy=True) for p, d in zip(self.pool[key], self.devices))

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
            raise VarstudyError(f"disk tier root {root!r} is not a directory")
        self.dir = tempfile.mkdtemp(prefix="varstudy-ckpt-", dir=root)
        self.write_fn = write_fn or torch.save
        self.devices: dict[int, list[torch.device]] = {}

    def path(self, key: int) -> str:
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
              write_fn: Callable | None = None, **kw) -> _AsyncTier:
    """Build a slow tier by name (registry: ``TIERS``)."""
    if name == "host":
        return HostTier(n_keys, template, **kw)
    if name == "disk":
        return DiskTier(disk_dir, write_fn=write_fn, **kw)
    raise VarstudyError(f"unknown storage tier {name!r}; valid: {', '.join(TIERS)}")
