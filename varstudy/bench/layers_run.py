"""The layer benchmark's run (heavy part of :mod:`varstudy.bench.layers`)."""

from __future__ import annotations

import platform
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from varstudy.progress import tqdm

from varstudy import cli
from varstudy import io as vio
from varstudy.errors import VarstudyError
from varstudy.randomized.layers import RandomizedLinear, derandomize, randomize
from varstudy.randomized.memory import saved_bytes
from varstudy.randomized.planfile import check_plan_layers, load_plan
from varstudy.models import load_model, resolve_device
from varstudy.bench.layers import LayerBenchConfig
from varstudy.randomized.sketches import rows_for


def _device(name: str) -> torch.device:
    return torch.device(resolve_device(name))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _configure(model, family: str, ratio: float, seed: int, plans: dict | None = None) -> None:
    """Make the model exact, then convert it to (family, ratio), or to a plan's per-layer ratios
    when ``family`` is a plan's label ("<family>:<file stem>", NOTE [plans] below)."""
    derandomize(model)
    if family in (plans or {}):
        randomize(model, plan=plans[family], seed=seed)
    elif family != "exact":
        randomize(model, ratio=ratio, sketch=family, seed=seed)


def plan_configs(paths) -> dict[str, tuple[float, str]]:
    """NOTE [plans]: each plan.json is one more configuration, labelled "<family>:<file stem>"
    with its nominal ratio (the uniform ρ of equal bytes): {label: (ratio, path)}."""
    from varstudy.randomized.plan import load_plan

    out = {}
    for path in paths:
        family, _, nominal = load_plan(path)
        out[f"{family}:{Path(path).stem}"] = (float(nominal or 1.0), str(path))
    return out


AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _autocast(device: torch.device, name: str):
    """torch.autocast for ``name`` ("none": off) on ``device``'s type."""
    import contextlib

    if name == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST[name])


def _step(model, batch, autocast: str = "none") -> float:
    """One forward + backward, seconds (synchronized on CUDA)."""
    device = batch["input_ids"].device
    _sync(device)
    start = time.perf_counter()
    with _autocast(device, autocast):
        loss = model(**batch).loss
    loss.backward()
    _sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _predicted_linear_bytes(model, n_tokens: int, batch_size: int,
                            itemsize: int | None = None) -> int:
    """Σ over distinct linear inputs of k·d_in·itemsize: Q, K, V share one sketch (itemsize:
    the autocast dtype's under autocast, else the weight's)."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, RandomizedLinear) and not name.endswith((".key", ".value")):
            n = batch_size if ("pooler" in name or "classifier" in name) else n_tokens
            k = rows_for(n, m.ratio, m.min_rows)
            total += k * m.in_features * (itemsize or m.weight.element_size())
            total += k * (8 + 4) if m.sketch.name == "rows-norm" else 0
    return total


def _memory_row(model, batch, linears, exact, autocast: str = "none") -> dict:
    with _autocast(batch["input_ids"].device, autocast):
        loss, rep = saved_bytes(lambda: model(**batch).loss, model=model)
    del loss
    row = {"saved_mib": rep.total / 2**20, "linear_saved_mib": rep.for_modules(linears) / 2**20,
           "saved_ratio": 1.0, "linear_saved_ratio": 1.0, "linear_vs_predicted": float("nan")}
    if exact is not None:
        freed = exact.saved_only_by(linears)
        n = batch["input_ids"].numel()
        row["saved_ratio"] = rep.total / exact.total
        row["linear_saved_ratio"] = rep.for_modules(linears) / freed
        randomized = [n for n, m in model.named_modules() if isinstance(m, RandomizedLinear)]
        row["linear_vs_predicted"] = rep.for_modules(randomized) / _predicted_linear_bytes(
            model, n, batch["input_ids"].shape[0],
            AUTOCAST[autocast].itemsize if autocast != "none" else None)
    return row, rep


def _load(cfg: LayerBenchConfig):
    """The benchmark's model on its device; a bad --model, or a --seq-len longer than the model
    takes, fails here (one forward of a single sequence)."""
    device = _device(cfg.device)
    model, _ = load_model(cfg.model, num_labels=2, dropout=False, seed=cfg.seed, device=device)
    try:
        with torch.no_grad():
            model(input_ids=torch.full((1, cfg.seq_len), 1000, device=device))
    except (RuntimeError, IndexError) as err:
        limit = getattr(model.config, "max_position_embeddings", "?")
        raise VarstudyError(f"--seq-len {cfg.seq_len} does not fit model {cfg.model!r} "
                            f"({' '.join(str(err).split())[:120]}); valid: a length up to its "
                            f"positions (max_position_embeddings {limit})") from None
    return model


def run(cfg: LayerBenchConfig, parts: Path | None = None, model=None) -> pd.DataFrame:
    """The table; with ``parts`` (a folder), finished work is appended there and skipped.
    ``model``: the one ``_load`` returns (loaded here when None)."""
    model = _load(cfg) if model is None else model
    device = _device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = {"input_ids": torch.randint(1000, 20000, (cfg.batch_size, cfg.seq_len), generator=gen),
             "labels": torch.randint(0, 2, (cfg.batch_size,), generator=gen)}
    batch = {k: v.to(device) for k, v in batch.items()}
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    planned = plan_configs(cfg.plans)
    plans = {label: path for label, (_, path) in planned.items()}
    for path in plans.values():  # before any timing (NOTE [a plan names exactly its layers])
        check_plan_layers(load_plan(path)[1], linears, "the benchmarked model")
    configs = [("exact", 1.0)] + [(f, r) for f in cfg.families for r in cfg.ratios] + [
        (label, ratio) for label, (ratio, _) in planned.items()]

    mem_path, time_path = (parts / "memory.csv", parts / "times.csv") if parts else (None,) * 2
    rows = _done_rows(mem_path)
    timed = _done_rows(time_path)
    times = {c: [timed[c + (r,)]["seconds"] for r in range(cfg.repeats) if c + (r,) in timed]
             for c in configs}
    exact = None
    for family, ratio in tqdm(configs, desc="memory + warm-up", disable=not cfg.progress):
        _configure(model, family, ratio, cfg.seed, plans)
        if (family, ratio) not in rows or family == "exact":
            row, rep = _memory_row(model, batch, linears, exact, cfg.autocast)
            exact = rep if family == "exact" else exact
            if (family, ratio) not in rows:
                rows[family, ratio] = row
                _append(mem_path, dict(family=family, ratio=ratio, **row))
        if len(times[family, ratio]) < cfg.repeats:
            _step(model, batch, cfg.autocast)  # warm-up
    for r in tqdm(range(cfg.repeats), desc="interleaved steps", disable=not cfg.progress):
        for family, ratio in configs:
            if (family, ratio, r) in timed:
                continue
            _configure(model, family, ratio, cfg.seed, plans)
            times[family, ratio].append(_step(model, batch, cfg.autocast))
            _append(time_path, dict(family=family, ratio=ratio, repeat=r,
                                    seconds=times[family, ratio][-1]))
    derandomize(model)

    exact_ms = statistics.median(times["exact", 1.0]) * 1e3
    table = []
    for family, ratio in configs:
        ms = statistics.median(times[family, ratio]) * 1e3
        table.append({"family": family, "ratio": ratio, "step_time_ms": ms,
                      "time_ratio": ms / exact_ms, **rows[family, ratio]})
    frame = pd.DataFrame(table)
    frame.insert(0, "device", torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"cpu ({torch.get_num_threads()} threads)")
    return frame


def _done_rows(path: Path | None) -> dict:
    """Rows of a parts file keyed by (family, ratio[, repeat]); {} when absent."""
    try:
        frame = vio.read_chunk(path) if path is not None else None
    except ValueError as err:  # not UTF-8, not CSV (pandas' errors are ValueErrors)
        raise VarstudyError(f"{path} is damaged ({cli.one_line(err)[:120]}); valid choices: "
                            "rerun without --resume (start over), or another --out") from None
    if frame is None:
        return {}
    keys = [c for c in ("family", "ratio", "repeat") if c in frame.columns]
    return {tuple(r[k] for k in keys): {c: r[c] for c in frame.columns if c not in keys}
            for r in frame.to_dict("records")}


def _append(path: Path | None, row: dict) -> None:
    if path is not None:
        vio.append_csv(path, pd.DataFrame([row]))


def _environment() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


FILES = ("layers.parts", "layers.csv", "layers.json")  # layers.parts: never published
STAGE = "bench-layers"  # <out>/.bench-layers.staging/ (NOTE [staged results] in varstudy.io)


def execute(cfg: LayerBenchConfig) -> int:
    """The benchmark: load, lock, run into the staging folder, publish the tables (module
    docstring of bench.layers)."""
    out = vio.check_writable(cfg.out)
    parts = vio.resume_source(out, files=FILES, name=STAGE) / "layers.parts"
    resuming = cfg.resume and (parts / "config.json").is_file()
    if resuming:
        saved = cli.config_options(vio.read_json(parts / "config.json"), LayerBenchConfig,
                                   f"--resume {parts / 'config.json'}")
        vio.refuse_changed(parts, saved, asdict(cfg),
                           ("out", "resume", "progress"))
    model = _load(cfg)  # before the folder changes: a bad --model leaves it as it was
    with vio.output_lock(out, ".layers.lock"), \
            vio.staged(out, resume=resuming, files=FILES, name=STAGE) as stage:
        parts = stage / "layers.parts"  # NOTE [one run per folder], [staged results] (io)
        if not resuming:
            vio.atomic_write_json(parts / "config.json", asdict(cfg))
        frame = run(cfg, parts, model)
        vio.atomic_write_csv(stage / "layers.csv", frame, float_format="%.4g")
        vio.atomic_write_json(stage / "layers.json", {"config": asdict(cfg),
                                                      "environment": _environment()})
        shutil.rmtree(parts, ignore_errors=True)
    cols = ["family", "ratio", "step_time_ms", "time_ratio", "saved_ratio",
            "linear_saved_ratio", "linear_vs_predicted"]
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out / 'layers.csv'}")
    return 0
