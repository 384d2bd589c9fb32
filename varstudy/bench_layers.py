"""Layer benchmark: training-step time and saved bytes of the randomized model vs the exact one.

``python -m varstudy.bench layers`` converts every nn.Linear of the shipped MiniLM (batch 32 × 128
tokens by default, dropout off) with each family and ratio, and measures in one run:

* ``time_ratio``: median training-step time (forward + backward, no optimizer) over the exact
  model's. Steps are interleaved across configurations (repeat r runs every configuration once)
  after one warm-up step each, so slow drifts of the machine hit every configuration alike.
* ``saved_ratio``: bytes saved for backward by the whole step over the exact model's
  (``varstudy.memory.saved_bytes``, parameters excluded, storages deduplicated);
* ``linear_saved_ratio``: bytes saved by the linear layers over what the exact linears hold, and
  ``linear_vs_predicted``: bytes saved by the linear layers over the prediction
  Σ_distinct inputs k·d_in·itemsize (+ O(k) index state for rows-norm).

Writes ``results/bench/layers.csv`` and ``layers.json`` (resolved config and environment).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from varstudy.layers import RandomizedLinear, derandomize, randomize
from varstudy.memory import saved_bytes
from varstudy.models import load_model
from varstudy.sketches import SKETCHES, rows_for


@dataclass(frozen=True)
class LayerBenchConfig:
    model: str = "minilm"
    batch_size: int = 32
    seq_len: int = 128
    families: tuple[str, ...] = tuple(SKETCHES)
    ratios: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)
    repeats: int = 3
    threads: int = 2
    device: str = "auto"
    seed: int = 0
    out: str = "results/bench"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _configure(model, family: str, ratio: float, seed: int) -> None:
    if family == "exact":
        derandomize(model)
    else:
        randomize(model, ratio=ratio, sketch=family, seed=seed)


def _step(model, batch) -> float:
    """One forward + backward, seconds (synchronized on CUDA)."""
    device = batch["input_ids"].device
    _sync(device)
    start = time.perf_counter()
    model(**batch).loss.backward()
    _sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _predicted_linear_bytes(model, n_tokens: int, batch_size: int) -> int:
    """Σ over distinct linear inputs of k·d_in·itemsize: Q, K, V share one sketch."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, RandomizedLinear) and not name.endswith((".key", ".value")):
            n = batch_size if ("pooler" in name or "classifier" in name) else n_tokens
            k = rows_for(n, m.ratio, m.min_rows)
            total += k * m.in_features * m.weight.element_size()
            total += k * (8 + 4) if m.sketch.name == "rows-norm" else 0
    return total


def _memory_row(model, batch, linears, exact) -> dict:
    loss, rep = saved_bytes(lambda: model(**batch).loss, model=model)
    del loss
    row = {"saved_mib": rep.total / 2**20, "linear_saved_mib": rep.for_modules(linears) / 2**20,
           "saved_ratio": 1.0, "linear_saved_ratio": 1.0, "linear_vs_predicted": float("nan")}
    if exact is not None:
        freed = exact.saved_only_by(linears)
        n = batch["input_ids"].numel()
        row["saved_ratio"] = rep.total / exact.total
        row["linear_saved_ratio"] = rep.for_modules(linears) / freed
        row["linear_vs_predicted"] = rep.for_modules(linears) / _predicted_linear_bytes(
            model, n, batch["input_ids"].shape[0])
    return row, rep


def run(cfg: LayerBenchConfig) -> pd.DataFrame:
    torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    model, _ = load_model(cfg.model, num_labels=2, dropout=False, seed=cfg.seed, device=device)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = {"input_ids": torch.randint(1000, 20000, (cfg.batch_size, cfg.seq_len), generator=gen),
             "labels": torch.randint(0, 2, (cfg.batch_size,), generator=gen)}
    batch = {k: v.to(device) for k, v in batch.items()}
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    configs = [("exact", 1.0)] + [(f, r) for f in cfg.families for r in cfg.ratios]

    rows, exact = {}, None
    for family, ratio in tqdm(configs, desc="memory + warm-up"):
        _configure(model, family, ratio, cfg.seed)
        rows[family, ratio], rep = _memory_row(model, batch, linears, exact)
        exact = rep if family == "exact" else exact
        _step(model, batch)  # warm-up
    times = {c: [] for c in configs}
    for _ in tqdm(range(cfg.repeats), desc="interleaved steps"):
        for family, ratio in configs:
            _configure(model, family, ratio, cfg.seed)
            times[family, ratio].append(_step(model, batch))
    derandomize(model)

    exact_ms = statistics.median(times["exact", 1.0]) * 1e3
    table = []
    for family, ratio in configs:
        ms = statistics.median(times[family, ratio]) * 1e3
        table.append({"family": family, "ratio": ratio, "step_time_ms": ms,
                      "time_ratio": ms / exact_ms, **rows[family, ratio]})
    frame = pd.DataFrame(table)
    frame.insert(0, "device", torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"cpu ({cfg.threads} threads)")
    return frame


def _environment() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _parse(argv) -> LayerBenchConfig:
    d = LayerBenchConfig()
    p = argparse.ArgumentParser(prog="python -m varstudy.bench layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="model name or local HF directory")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--families", default=",".join(d.families),
                   help=f"comma-separated; valid: {', '.join(SKETCHES)}")
    p.add_argument("--ratios", default=",".join(map(str, d.ratios)))
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--out", default=d.out)
    a = p.parse_args(argv)
    families = tuple(f for f in a.families.split(",") if f)
    unknown = [f for f in families if f not in SKETCHES]
    if unknown:
        p.error(f"unknown sketch {unknown[0]!r}; valid choices: {', '.join(SKETCHES)}")
    try:
        ratios = tuple(float(r) for r in a.ratios.split(","))
    except ValueError:
        p.error(f"--ratios must be comma-separated numbers in (0, 1], got {a.ratios!r}")
    if not all(0 < r <= 1 for r in ratios):
        p.error(f"--ratios must lie in (0, 1], got {a.ratios!r}")
    return LayerBenchConfig(a.model, a.batch_size, a.seq_len, families, ratios, a.repeats,
                            a.threads, a.device, d.seed, a.out)


def main(argv=None) -> int:
    cfg = _parse(argv)
    frame = run(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "layers.csv", index=False, float_format="%.4g")
    (out / "layers.json").write_text(json.dumps(
        {"config": asdict(cfg), "environment": _environment()}, indent=2))
    cols = ["family", "ratio", "step_time_ms", "time_ratio", "saved_ratio",
            "linear_saved_ratio", "linear_vs_predicted"]
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out / 'layers.csv'}")
    return 0
