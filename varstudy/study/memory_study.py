"""``study memory``: bytes saved for backward per (family, ratio, batch size), and the CUDA
peak of whole training steps on GPU (the ``memory`` item of :mod:`varstudy.study`)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from varstudy import io as vio
from varstudy.study.config import StudyConfig, grid, write_config
from varstudy.study.inputs import convert, model_and_batches

MIB = 2**20


def memory(config: StudyConfig, write: bool = True) -> pd.DataFrame:
    """Saved-for-backward MiB (and CUDA peak MiB on GPU) per (family, ratio, batch size)."""
    from varstudy.finetune.training import threads
    from varstudy.models import resolve_device
    from varstudy.roles import linear_names
    from varstudy.randomized.memory import saved_bytes

    device = resolve_device(config.device)
    with threads(config.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, batches = model_and_batches(config, device, config.batch_sizes)
        linear = linear_names(model)
        rows = []
        for family, ratio in grid(config):
            convert(model, family, ratio)
            for b, batch in batches.items():
                _, report = saved_bytes(lambda: model(**batch).loss, model=model)
                peak = _cuda_peak(config, family, ratio, b) if device == "cuda" else math.nan
                rows.append(dict(task=config.task, model=config.model, family=family,
                                 ratio=ratio, batch_size=b, seq_len=config.max_length,
                                 saved_mib=report.total / MIB,
                                 saved_linear_mib=report.for_modules(linear) / MIB,
                                 peak_cuda_mib=peak, device=device))
    table = pd.DataFrame(rows)
    if write:  # NOTE [staged results] in varstudy.io
        with vio.staged(Path(config.out) / "memory") as folder:
            write_config(config, "memory", folder)
            vio.atomic_write_csv(folder / "memory.csv", table)
    return table


def _cuda_peak(config: StudyConfig, family: str, ratio: float, batch: int) -> float:
    from varstudy.randomized.memory import cuda_peak_bytes

    return cuda_peak_bytes(peak_step, config.model, family, ratio, batch,
                           config.max_length) / MIB


def peak_step(model_name: str, family: str, ratio: float, batch: int, length: int) -> None:
    """Two whole training steps on CUDA (the second holds AdamW state); for cuda_peak_bytes."""
    from varstudy.finetune.training import to_device
    from varstudy.models import load_model

    model, _ = load_model(model_name, dropout=True, seed=0, device="cuda")
    convert(model, family, ratio)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(input_ids=torch.randint(1000, 2000, (batch, length), generator=gen),
                  attention_mask=torch.ones(batch, length, dtype=torch.long),
                  labels=torch.randint(0, 2, (batch,), generator=gen))
    inputs = to_device(inputs, "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for _ in range(2):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
