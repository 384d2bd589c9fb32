"""RNG states a scan saves and restores, so recomputation is exact under dropout.

NOTE [RNG]: like torch.utils.checkpoint, recomputation is exact under dropout: every stored
checkpoint carries the RNG state (CPU, plus that of each CUDA device holding the state, inputs or
parameters) at its step; restoring a checkpoint restores those RNGs, and steps re-run in order
consume the same random numbers. Parameter discovery, interval timing and backward run inside
:func:`fork_rng` over the same devices, so neither the forward masks nor the caller's RNG stream
after backward are changed by them; a forward pass started again after a step named a missing
parameter (NOTE [parameters]) starts from the RNG states saved before its first try. Device RNG
calls go through the device ops (NOTE [device ops] in :mod:`varstudy.checkpointing.device`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from varstudy.checkpointing.device import CudaOps, device_ops


def rng_ops(device: torch.device, tensors, ops=None) -> list:
    """Device ops whose RNG a step may use: ``device``'s (``ops`` stands in for it), then those
    of the other CUDA devices holding ``tensors`` (None entries skipped)."""
    main = device_ops(device, ops)
    others = {t.device for t in tensors if t is not None and t.is_cuda} - {device}
    return ([main] if main is not None else []) + [CudaOps(d) for d in sorted(others, key=str)]


def get_rng(ops: list) -> tuple[torch.Tensor, ...]:
    """(CPU RNG state, then each device's of ``ops``)."""
    return (torch.get_rng_state(),) + tuple(o.get_rng_state() for o in ops)


def set_rng(ops: list, states) -> None:
    """Restore what :func:`get_rng` returned for the same ``ops``."""
    torch.set_rng_state(states[0])
    for o, state in zip(ops, states[1:]):
        o.set_rng_state(state)


@contextmanager
def fork_rng(ops: list, enabled: bool = True):
    """torch.random.fork_rng for the CPU and the devices of ``ops`` (get/set_rng_state each)."""
    saved = get_rng(ops) if enabled else None
    try:
        yield
    finally:
        if enabled:
            set_rng(ops, saved)
