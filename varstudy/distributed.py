"""torch.distributed glue for ``torchrun``: process group, work split, gathering rows.

``torchrun --nproc_per_node=N -m varstudy.measure ...`` (or ``-m varstudy.finetune``) sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`setup` reads them, picks the backend
(NCCL when the run is on CUDA, gloo otherwise) and binds each rank to GPU ``LOCAL_RANK``. Without
those variables everything here degrades to a single process (rank 0 of 1) and touches nothing.

NOTE [identical tables]: the measurement engine derives every random draw of minibatch b from
(seed, step, b) alone, so handing batch b to rank ``b % world`` and gathering the rows on rank 0
gives exactly the rows a single process computes (same split, same seeds); rank 0 sorts them back
into batch order before writing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from varstudy.errors import VarstudyError


@dataclass(frozen=True)
class Context:
    """This process's place in a torch.distributed run: ``rank``, ``world`` size, ``local_rank``."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """True when more than one process runs."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes the results."""
        return self.rank == 0

    def mine(self, items):
        """This rank's share of ``items``: every world-th item, starting at ``rank``."""
        return list(items)[self.rank::self.world]


def launched() -> bool:
    """True when the process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> tuple[Context, str]:
    """Join the process group when launched by torchrun; returns (context, this rank's device).

    ``device`` is the resolved single-process device ("cpu", "cuda", "cuda:N").
    """
    if not launched():
        return Context(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise VarstudyError(f"LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} "
                                "visible; use --nproc_per_node <= the GPU count")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Context(rank, world, local), device


def gather(ctx: Context, obj):
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere); [obj] without a group."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_module(ctx: Context, module: torch.nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers (exactly, bit for bit)."""
    if ctx.active:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def data_parallel(ctx: Context, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel under torchrun, else ``model`` itself.

    Each rank's randomized layers draw their own sketches; DDP averages the resulting
    (independent, unbiased) weight-gradient estimates, so the variance of the sketch part
    falls like 1/world, like the sampling part.
    """
    if not ctx.active:
        return model
    from torch.nn.parallel import DistributedDataParallel
    cuda = next(model.parameters()).is_cuda
    return DistributedDataParallel(model, device_ids=[ctx.local_rank] if cuda else None)


def mean_scalar(ctx: Context, value: torch.Tensor) -> float:
    """The mean of a scalar tensor over ranks, as a Python float (a host sync)."""
    if ctx.active:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= ctx.world
    return float(value)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or any process that was not launched by one."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier(ctx: Context) -> None:
    """Wait for every process (nothing in a single-process run)."""
    if ctx.active:
        dist.barrier()


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
