"""Fast-tier byte accounting: states a scan holds in device memory, plus autograd's saved tensors.

A *state* is a tuple of tensors (the scan's state, plus the RNG states a checkpoint carries).
:class:`MemoryMeter` is the one counter every tier and the scan report to; its ``peak_bytes``
is the fast-tier peak the benchmark compares across strategies.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Callable

import torch

State = tuple[torch.Tensor, ...]


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
        self._lock = threading.RLock()  # a finalizer may run inside it (gc)
        self.bytes_now = 0
        self.peak_bytes = 0
        self._live: dict[tuple[int, int], int] = {}
        self._listeners: list = []

    def subscribe(self, listener) -> Callable[[], None]:
        """Call ``listener(delta_bytes)`` after every change of ``bytes_now``, under the meter's
        lock (so in order), possibly from a tier's worker thread; returns the unsubscribe call.
        :func:`varstudy.randomized.peak.peak_saved_bytes` listens this way."""
        with self._lock:
            self._listeners.append(listener)
        return lambda: self._unsubscribe(listener)

    def _unsubscribe(self, listener) -> None:
        with self._lock:
            self._listeners = [f for f in self._listeners if f is not listener]

    def _change(self, delta: int) -> None:  # caller holds the lock
        self.bytes_now += delta
        self.peak_bytes = max(self.peak_bytes, self.bytes_now)
        for listener in self._listeners:
            listener(delta)

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more live bytes (thread-safe; updates the peak)."""
        with self._lock:
            self._change(nbytes)

    def sub(self, nbytes: int) -> None:
        """Count ``nbytes`` fewer live bytes (thread-safe)."""
        with self._lock:
            self._change(-nbytes)

    def _release(self, key: tuple[int, int]) -> None:
        with self._lock:
            self._live[key] -= 1
            if self._live[key] == 0:
                del self._live[key]
                self._change(-key[1])

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or t.device.type == "meta":
            return t
        key = (t.data_ptr(), t.numel() * t.element_size())
        with self._lock:
            self._live[key] = self._live.get(key, 0) + 1
            if self._live[key] == 1:
                self._change(key[1])
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
