"""The injectable seam for every CUDA call of the checkpointing system.

NOTE [device ops]: the host tier's CUDA path, interval timing and the device RNG make their
device calls through a small ops object (:class:`CudaOps` by default; tests pass a fake, so
these paths run on CPU). ``put`` records a *ready* event on the caller's stream; the worker waits
for it (the write clock starts there, so T_w is the transfer alone), issues non_blocking copies
into the pinned pool on a side stream, records a *done* event and waits for it: the worker, never
the caller, blocks on the GPU, the write time includes the copy, and an asynchronous CUDA error
surfaces in the write's future like any other failure. Reads copy back on the side stream the
same way; ``get`` marks the tensors as used by the caller's stream (``record_stream``) so the
allocator does not reuse them early. The source of a write stays referenced (and counted by the
meter) until its done event has completed.

An ops object answers: ``stream()``, ``current_stream()``, ``use_stream(stream)`` (a context),
``event()`` (with ``record(stream)`` and ``synchronize()``), ``synchronize()``,
``pinned_empty(shape, dtype)``, ``copy_(dst, src)``, ``to(src, device)``,
``record_stream(t, stream)``, ``get_rng_state()`` and ``set_rng_state(state)``.
"""

from __future__ import annotations

import torch


class CudaOps:
    """The CUDA calls of the host tier, interval timing and the RNG, for one device."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def stream(self):
        """A new CUDA stream on the device."""
        return torch.cuda.Stream(self.device)

    def current_stream(self):
        """The device's current stream."""
        return torch.cuda.current_stream(self.device)

    def use_stream(self, stream):
        """A context manager that makes ``stream`` current."""
        return torch.cuda.stream(stream)

    def event(self):
        """A new CUDA event."""
        return torch.cuda.Event()

    def synchronize(self) -> None:
        """Wait for every stream of the device."""
        torch.cuda.synchronize(self.device)

    def pinned_empty(self, shape, dtype) -> torch.Tensor:
        """An uninitialised host tensor in pinned memory (pageable without CUDA)."""
        return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())

    def copy_(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` into ``dst`` without blocking the host."""
        dst.copy_(src, non_blocking=True)

    def to(self, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A copy of ``src`` on ``device``, without blocking the host."""
        return src.to(device, non_blocking=True, copy=True)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        """Tell the caching allocator that ``stream`` uses the CUDA tensor ``t``."""
        if t.is_cuda:
            t.record_stream(stream)

    def get_rng_state(self) -> torch.Tensor:
        """The device's CUDA RNG state."""
        return torch.cuda.get_rng_state(self.device)

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore the device's CUDA RNG state."""
        torch.cuda.set_rng_state(state, self.device)


def device_ops(device: torch.device | str, ops=None):
    """``ops`` if given, else :class:`CudaOps` for a CUDA device, else None (plain CPU path)."""
    if ops is not None:
        return ops
    return CudaOps(device) if torch.device(device).type == "cuda" else None
