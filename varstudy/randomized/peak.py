"""Peak live activation memory over a whole training step (forward and backward).

``saved_bytes`` (:mod:`varstudy.randomized.memory`) sums what the forward pass saves for
backward; with recomputation (checkpointing) the step's peak comes during backward instead.
:func:`peak_saved_bytes` runs ``loss = fn(*args, **kwargs)`` and ``loss.backward()`` under one
``torch.autograd.graph.saved_tensors_hooks`` and follows the *live* saved bytes over time:

* a pack adds a storage's bytes when it is the first live saved reference to that storage
  (deduplicated by storage as in ``saved_bytes``; the model's parameters and buffers excluded);
* the packed object is a small holder with a ``weakref.finalize``: when autograd drops the
  holder, the storage's count of live references drops, and its bytes leave at zero.

NOTE [release]: autograd drops a node's saved tensors right after that node's backward has run
(``release_variables``, unless ``retain_graph``), or when the graph is freed without a backward.
So the live count rises through forward, falls through backward, and ends at 0 for a step whose
graph is gone, with ``retain_graph`` at what stays saved. Recomputation inside backward packs
under the same hooks when it runs outside any hooks of its own (the saved-tensor hooks are part
of the autograd thread-local state captured at ``backward()``): the re-tapes of
:func:`~varstudy.checkpointing.sequence.checkpointed_sequential`, and
``torch.utils.checkpoint(use_reentrant=True)``. ``use_reentrant=False`` keeps its recomputed
tensors under hooks of its own, so only its block inputs (saved through its input saver) are
seen here; its recomputed internals are not (tests/test_peak_memory.py pins this).

NOTE [held bytes]: tensors kept outside autograd (Revolve's slots and live state in the
checkpointing fast tier) are not saved tensors. Pass the scan's
:class:`~varstudy.checkpointing.meter.MemoryMeter` as ``meter`` (one that is not inside
``track_saved``, which would count saved tensors twice): its changes join the timeline as
*held* bytes and live = saved + held. A held state that a re-tape also saves counts in both.

On CUDA (a CUDA ``device``, or a model on one) the report also gives
``torch.cuda.max_memory_allocated`` over the step, peak statistics reset before the forward;
that path goes through a small ops object (``memory_ops``; tests pass a fake).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from varstudy.randomized.memory import _storage_key

PHASES = ("forward", "backward")


@dataclass
class PeakReport:
    """Result of :func:`peak_saved_bytes`. Bytes; ``timeline`` holds (phase, saved, held) after
    every change, in order."""

    peak_bytes: int = 0  # max over the step of saved + held
    peak_phase: str = "forward"  # where that maximum was first reached
    peak_saved_bytes: int = 0  # its saved part
    peak_held_bytes: int = 0  # its held part (NOTE [held bytes])
    forward_bytes: int = 0  # saved bytes live when the forward returned (= saved_bytes' total)
    forward_held_bytes: int = 0
    end_bytes: int = 0  # saved bytes still live after backward (0 unless retained)
    cuda_max_allocated: int | None = None  # torch.cuda.max_memory_allocated over the step
    timeline: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def peak_mib(self) -> float:
        """The peak in MiB."""
        return self.peak_bytes / 2**20

    def phase_peak(self, phase: str, part: str = "live") -> int:
        """Max of ``part`` ("live", "saved" or "held") over the changes of ``phase``."""
        pick = {"live": lambda s, h: s + h, "saved": lambda s, h: s, "held": lambda s, h: h}
        return max((pick[part](s, h) for p, s, h in self.timeline if p == phase), default=0)


class _Holder:
    """What a pack returns: keeps a detached alias (no graph, NOTE [no cycles] in memory.py)."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: Tensor) -> None:
        self.t = t


class _Live:
    """Live saved and held bytes, thread-safe (a tier's worker thread reports held bytes)."""

    def __init__(self, skip: set, report: PeakReport) -> None:
        self.skip, self.report = skip, report
        # NOTE: re-entrant, as a garbage collection started inside the lock (an allocation) may
        # run a holder's finalizer, which takes the lock again in the same thread.
        self.lock = threading.RLock()
        self.refs: dict[tuple, int] = {}  # storage key -> live holders
        self.sizes: dict[tuple, int] = {}  # storage key -> bytes
        self.saved = self.held = 0
        self.phase = "forward"
        self.closed = False  # after the step: later releases (the graph dropped) not reported

    def pack(self, t: Tensor):
        key, nbytes = _storage_key(t)
        if key is None or key in self.skip:
            return t
        holder = _Holder(t.detach())
        with self.lock:
            self.refs[key] = self.refs.get(key, 0) + 1
            if self.refs[key] == 1:
                self.sizes[key] = nbytes
                self._change(nbytes, 0)
        weakref.finalize(holder, self.release, key)
        return holder

    @staticmethod
    def unpack(packed):
        return packed.t if isinstance(packed, _Holder) else packed

    def release(self, key: tuple) -> None:
        with self.lock:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                del self.refs[key]
                self._change(-self.sizes.pop(key), 0)

    def held_changed(self, delta: int) -> None:
        with self.lock:
            self._change(0, delta)

    def _change(self, d_saved: int, d_held: int) -> None:  # caller holds the lock
        self.saved += d_saved
        self.held += d_held
        if self.closed:
            return
        r = self.report
        r.timeline.append((self.phase, self.saved, self.held))
        if self.saved + self.held > r.peak_bytes:
            r.peak_bytes, r.peak_phase = self.saved + self.held, self.phase
            r.peak_saved_bytes, r.peak_held_bytes = self.saved, self.held

    def set_phase(self, phase: str) -> tuple[int, int]:
        with self.lock:
            self.phase = phase
            return self.saved, self.held

    def close(self) -> int:
        with self.lock:
            self.closed = True
            return self.saved


class CudaMemoryOps:
    """The two CUDA calls of the peak: reset the statistics, read the maximum (synchronized)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def reset(self) -> None:
        """Reset the device's peak-memory counter."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def max_allocated(self) -> int:
        """The device's peak allocated bytes since the last reset."""
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))


def _memory_ops(device, model: nn.Module | None, ops):
    if ops is not None:
        return ops
    if device is None and model is not None:
        device = next((p.device for p in model.parameters()), None)
    if device is not None and torch.device(device).type == "cuda":
        return CudaMemoryOps(device)
    return None


def peak_saved_bytes(fn, *args, model: nn.Module | None = None, include_params: bool = False,
                     meter=None, backward=None, device=None, memory_ops=None,
                     **kwargs) -> PeakReport:
    """Run one step, ``out = fn(*args, **kwargs)`` then ``backward(out)`` (default
    ``out.backward()``), and report its live saved-for-backward bytes over time.

    Args: model: its parameters and buffers are not counted (unless ``include_params``), as in
    ``saved_bytes``; meter: a checkpointing MemoryMeter whose bytes join as *held* (NOTE [held
    bytes]); device / memory_ops: CUDA peak statistics (module docstring). ``fn`` typically
    returns a scalar loss; its graph is dropped before the report is returned.
    """
    report = PeakReport()
    skip = set()
    if model is not None and not include_params:
        skip = {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}
    live = _Live(skip, report)
    ops = _memory_ops(device, model, memory_ops)
    unsubscribe = meter.subscribe(live.held_changed) if meter is not None else None
    if unsubscribe is not None:
        live.held_changed(meter.bytes_now)  # states the meter held before the step
    try:
        if ops is not None:
            ops.reset()
        with torch.autograd.graph.saved_tensors_hooks(live.pack, live.unpack):
            out = fn(*args, **kwargs)
            report.forward_bytes, report.forward_held_bytes = live.set_phase("backward")
            (backward or _backward)(out)
            report.end_bytes = live.close()
        if ops is not None:
            report.cuda_max_allocated = ops.max_allocated()
    finally:
        live.close()
        if unsubscribe is not None:
            unsubscribe()
    return report


def _backward(out) -> None:
    out.backward()
