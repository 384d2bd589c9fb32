"""Memory accounting: bytes saved for backward (exact, any device) and CUDA peak of a step.

``saved_bytes`` runs a function (typically a forward pass that returns a loss) under
``torch.autograd.graph.saved_tensors_hooks`` and records every tensor autograd keeps for backward.
Tensors are deduplicated by storage (views of one buffer count once) and parameters/buffers of the
given model are excluded by default, so the total is the activation memory the backward pass holds.
Each storage is attributed to the innermost module running when it was first saved; ``savers``
lists every module that saved it.

``cuda_peak_bytes`` runs a picklable function in a fresh ``spawn`` subprocess and returns
``torch.cuda.max_memory_allocated`` there, so caches and earlier allocations of the caller do not
leak into the measurement.

Over a whole step (forward and backward, where recomputation puts the peak) the live saved bytes
are followed by :func:`varstudy.randomized.peak.peak_saved_bytes`.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from varstudy.errors import VarstudyError


@dataclass
class SavedBytes:
    """Result of :func:`saved_bytes`. ``by_module`` maps module name ('' = outside any module)."""

    total: int = 0
    by_module: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    storages: dict[tuple, int] = field(default_factory=dict)  # storage key -> bytes
    savers: dict[tuple, set[str]] = field(default_factory=lambda: defaultdict(set))

    @property
    def total_mib(self) -> float:
        """The total in MiB."""
        return self.total / 2**20

    def for_modules(self, names) -> int:
        """Bytes attributed to any of ``names``."""
        return sum(self.by_module.get(n, 0) for n in names)

    def saved_only_by(self, names) -> int:
        """Bytes of the storages that no module outside ``names`` saved.

        With ``names`` the linear layers of an exact model, this is what converting them can free.
        """
        names = set(names)
        return sum(b for key, b in self.storages.items() if self.savers[key] <= names)


def _storage_key(t: Tensor):
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None, 0
    return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()


@contextmanager
def _module_stack(model: nn.Module | None):
    stack: list[str] = []
    handles = []

    def leave(*_) -> None:  # a forward hook must return None to keep the module's output
        stack.pop()

    if model is not None:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, name=name: stack.append(name)))  # returns None: args unchanged
            handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def saved_bytes(fn, *args, model: nn.Module | None = None, include_params: bool = False,
                **kwargs):
    """Run ``fn(*args, **kwargs)`` and account the bytes autograd saves for backward.

    Returns ``(fn's result, SavedBytes)``. Keep the result alive (it holds the graph) until
    you are done; call ``backward`` on it if you want to check the graph is complete.
    """
    report = SavedBytes()
    skip = set()
    if model is not None and not include_params:
        skip = {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}

    with _module_stack(model) as stack:
        def pack(t: Tensor):
            key, nbytes = _storage_key(t)
            if key is None or key in skip:
                return t
            owner = stack[-1] if stack else ""
            report.savers[key].add(owner)
            if key not in report.storages:
                report.storages[key] = nbytes
                report.by_module[owner] += nbytes
                report.total += nbytes
            # NOTE [no cycles]: returning ``t`` itself would keep a saved *output* alive together
            # with its grad_fn (a reference cycle through C++ that gc cannot break: every call
            # leaked the whole graph). A detached alias shares the storage and holds no graph.
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = fn(*args, **kwargs)
    report.by_module, report.savers = dict(report.by_module), dict(report.savers)
    return result, report


def _peak_worker(fn, args, kwargs, queue) -> None:
    try:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        fn(*args, **kwargs)
        torch.cuda.synchronize()
        queue.put(("ok", torch.cuda.max_memory_allocated()))
    except BaseException as err:  # reported to the parent, never swallowed
        queue.put(("error", f"{type(err).__name__}: {err}"))


def cuda_peak_bytes(fn, *args, timeout: float = 600.0, **kwargs) -> int:
    """Peak CUDA bytes allocated by ``fn(*args, **kwargs)`` in an isolated spawn subprocess.

    ``fn`` must be a picklable top-level function that does the whole step (build, forward,
    backward). Raises VarstudyError when CUDA is absent or the child fails.
    """
    if not torch.cuda.is_available():
        raise VarstudyError("cuda_peak_bytes needs a CUDA device, but none is available; "
                            "use saved_bytes for exact CPU accounting")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_worker, args=(fn, args, kwargs, queue))
    proc.start()
    try:
        status, value = queue.get(timeout=timeout)
    except Exception:
        proc.kill()
        raise VarstudyError(f"CUDA peak measurement did not finish within {timeout:g} s") from None
    finally:
        proc.join(timeout=30)
    if status != "ok":
        raise VarstudyError(f"CUDA peak measurement failed in the subprocess: {value}")
    return int(value)
