"""The five stages of ``python -m varstudy.bench gpu`` (module docstring of
:mod:`varstudy.bench.gpu`). Each takes the :class:`Run` and returns an :class:`Outcome`; what it
prints goes to its log (:func:`varstudy.bench.gpu_run.run_stage`)."""

from __future__ import annotations

import math
import os
import re
import statistics
import subprocess
import sys
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from varstudy import cli
from varstudy.bench.gpu import (QUICK_SELECTION, QUICK_TESTS, TEST_SELECTION, TESTS,
                                GpuBenchConfig)
from varstudy.errors import VarstudyError

QUICK_MEASURE = dict(model="tiny-bert", dataset="synthetic", batch_size=4, max_length=16,
                     num_batches=3, families=("gaussian", "rows"), ratios=(0.25,), mc_draws=0)
QUICK_LAYERS = ["--model", "tiny-bert", "--batch-size", "4", "--seq-len", "16", "--families",
                "gaussian,rows", "--ratios", "0.25", "--repeats", "1"]
PEAK_MODELS = {True: ("tiny-bert", 4, 16), False: ("minilm", 32, 128)}  # quick: (model, B, L)
PEAK_CONFIGS = (("exact", 1.0), ("gaussian", 0.1))
HOST_STATE_MIB = {True: 1, False: 64}
MEASURE_IGNORED = ("device", "out", "progress", "num_threads", "resume")
COMPARED = ("var_sketch_mean", "var_sampling_mean")
KEYS = ["train_step", "layer", "family", "ratio"]
FLOOR = 1e-12  # entries below FLOOR x their column's largest are not compared
MIB = 2**20
WAVE_RTOL = 1e-5  # the wave's gradient norm, recomputed (Revolve, multistage) vs taped (store_all)


@dataclass(frozen=True)
class Run:
    """What every stage of the GPU check gets: the config, the device, its output folder and the
    checkout."""
    cfg: GpuBenchConfig
    device: torch.device
    folder: Path  # <out>/<slug>
    repo: Path  # the checkout: tests/ and the committed results/


@dataclass
class Outcome:
    """What a stage reports: ``status`` (passed, failed or skipped), its ``numbers`` and a
    ``note``."""
    status: str = "passed"  # passed, failed or skipped
    numbers: dict = field(default_factory=dict)
    note: str = ""


def _folder(run: Run, name: str) -> Path:
    path = run.folder / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- 1. tests ----------------------------------------------------------------------------------


def pytest_counts(text: str) -> dict[str, int]:
    """Counts of pytest's last summary line ("3 passed, 2 skipped, 9 deselected in 1.2s")."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|"
                                                          r"deselected|errors?|xfailed)", ln)]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors", "deselected")}
    for n, word in re.findall(r"(\d+) ([a-z]+)", lines[-1] if lines else ""):
        word = "errors" if word == "error" else word
        if word in counts:
            counts[word] = int(n)
    return counts


def visible_devices(device: torch.device) -> str | None:
    """CUDA_VISIBLE_DEVICES that shows a subprocess only ``device`` (None: leave it as is)."""
    if device.type != "cuda" or device.index is None:
        return None
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in shown.split(",")] if shown else None
    return ids[device.index] if ids and device.index < len(ids) else str(device.index)


def tests(run: Run) -> Outcome:
    """Stage 1: the device tests in a subprocess (a quick selection with ``--quick``)."""
    files, selection = (QUICK_TESTS, QUICK_SELECTION) if run.cfg.quick else \
        (TESTS, TEST_SELECTION)
    missing = [f for f in files if not (run.repo / f).is_file()]
    if missing:
        return Outcome("failed", note=f"test files not found in {run.repo}: {', '.join(missing)}")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-k", selection,
           *files]
    env = dict(os.environ)
    if visible_devices(run.device) is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(run.device)
    print("$", " ".join(cmd), flush=True)
    try:
        done = subprocess.run(cmd, cwd=run.repo, env=env, capture_output=True, text=True,
                              timeout=run.cfg.test_timeout_s)
    except subprocess.TimeoutExpired as err:
        print(err.stdout or "", err.stderr or "")
        return Outcome("failed", note=f"pytest did not finish within {run.cfg.test_timeout_s:g} s")
    print(done.stdout, done.stderr)
    counts = pytest_counts(done.stdout)
    ok = done.returncode == 0 and counts["passed"] > 0
    note = "" if ok else f"pytest exit status {done.returncode}"
    return Outcome("passed" if ok else "failed", dict(counts, selection=selection), note)


# -- 2. measure --------------------------------------------------------------------------------


def compare_summaries(device: pd.DataFrame, reference: pd.DataFrame,
                      floor: float = FLOOR) -> dict:
    """Max relative difference of ``COMPARED`` between two summary.csv tables, per
    (train_step, layer, family, ratio), over the reference entries above ``floor`` x the
    column's largest |value|: n_compared, max_rel_diff, worst (where), unmatched (keys in one
    table only)."""
    a, b = (f.assign(ratio=f["ratio"].round(12)) for f in (device, reference))
    both = a.merge(b, on=KEYS, how="outer", suffixes=("_dev", "_ref"), indicator=True)
    unmatched = int((both["_merge"] != "both").sum())
    both = both[both["_merge"] == "both"]
    result = dict(n_compared=0, max_rel_diff=0.0, worst="", unmatched=unmatched)
    for col in COMPARED:
        ref, dev = both[f"{col}_ref"].astype(float), both[f"{col}_dev"].astype(float)
        keep = ref.abs() > floor * ref.abs().max()
        rel = ((dev - ref).abs() / ref.abs())[keep].fillna(math.inf)  # NaN on the device: inf
        result["n_compared"] += len(rel)
        if len(rel) and rel.max() > result["max_rel_diff"]:
            row = both.loc[rel.idxmax()]
            result["max_rel_diff"] = float(rel.max())
            result["worst"] = f"{col} of {row['layer']} {row['family']} {row['ratio']:g}"
    return result


def committed_reference(repo: Path, config) -> tuple[Path | None, str]:
    """(results/measure/default/summary.csv, "") when that committed run's config.json equals
    ``config`` apart from ``MEASURE_IGNORED``; else (None, why not)."""
    from varstudy.measure import MeasureConfig

    folder = repo / "results" / "measure" / "default"
    if not all((folder / name).is_file() for name in ("config.json", "summary.csv", "env.json")):
        return None, f"no complete run in {folder}"
    try:
        saved = MeasureConfig(**cli.saved_options(folder / "config.json", MeasureConfig))
    except (VarstudyError, TypeError) as err:
        return None, f"{folder}/config.json is not a measure config ({cli.one_line(err)})"
    fixed = {name: getattr(config, name) for name in MEASURE_IGNORED}
    if replace(saved, **fixed).resolved() != replace(config, **fixed).resolved():
        return None, f"{folder}/config.json is not the default config"
    return folder / "summary.csv", ""


def measure(run: Run) -> Outcome:
    """The device's summary.csv against the committed one (full mode, when its config is the
    default and it agrees) or else a CPU run of the same config; a committed reference that
    disagrees is reported (measured by older code) and the CPU run decides."""
    from varstudy.measure import MeasureConfig
    from varstudy.measure import run as measure_run

    base = MeasureConfig(**QUICK_MEASURE) if run.cfg.quick else MeasureConfig()
    base = replace(base, progress=False, num_threads=run.cfg.num_threads)
    folder = _folder(run, "measure")
    measure_run(replace(base, device=str(run.device), out=str(folder / "device")))
    device = pd.read_csv(folder / "device" / "summary.csv")
    ref, why = (None, "quick") if run.cfg.quick else committed_reference(run.repo, base)
    note = ""
    if ref is not None:
        numbers = dict(compare_summaries(device, pd.read_csv(ref)),
                       reference="committed results/measure/default")
        if _agrees(numbers, run.cfg.rtol):
            return Outcome("passed", dict(numbers, rtol=run.cfg.rtol))
        why = note = (f"the committed results/measure/default differs by "
                      f"{numbers['max_rel_diff']:.2g} at {numbers['worst'] or 'its rows'} "
                      "(measured by older code?); compared with a CPU run")
    print(f"reference: a CPU run ({why})")
    measure_run(replace(base, device="cpu", out=str(folder / "cpu")))
    numbers = dict(compare_summaries(device, pd.read_csv(folder / "cpu" / "summary.csv")),
                   reference="a CPU run", rtol=run.cfg.rtol)
    if _agrees(numbers, run.cfg.rtol):
        return Outcome("passed", numbers, note)
    bad = (f"{numbers['unmatched']} rows in one table only" if numbers["unmatched"] else
           f"max relative difference {numbers['max_rel_diff']:.3g} > rtol {run.cfg.rtol:g} at "
           f"{numbers['worst']}")
    return Outcome("failed", numbers, "; ".join(filter(None, (bad, note))))


def _agrees(numbers: dict, rtol: float) -> bool:
    return numbers["unmatched"] == 0 and numbers["n_compared"] > 0 and \
        numbers["max_rel_diff"] <= rtol


# -- 3. layers ---------------------------------------------------------------------------------


def layer_numbers(frame: pd.DataFrame) -> dict:
    """Key numbers of one layers.csv: the exact step's time, the randomized row with the
    fewest saved bytes (its saved and time ratios) and max |linear_vs_predicted - 1|."""
    rand = frame[frame["family"] != "exact"]
    best = rand.loc[rand["saved_ratio"].idxmin()]
    return dict(exact_ms=float(frame.loc[frame["family"] == "exact", "step_time_ms"].iloc[0]),
                best=f"{best['family']} {best['ratio']:g}", saved_ratio=float(best["saved_ratio"]),
                time_ratio=float(best["time_ratio"]),
                predicted_err=float((rand["linear_vs_predicted"] - 1).abs().max()))


def layers(run: Run) -> Outcome:
    """Stage 3: the layer benchmark on the device in float32 and under bf16 and fp16 autocast."""
    from varstudy.bench import layers as bench_layers
    from varstudy.bench.layers_run import execute

    kinds = ("none", "bfloat16") if run.device.type == "cpu" else ("none", "bfloat16", "float16")
    numbers, failed = {}, []
    for kind in kinds:  # each precision runs even when another failed
        name = "float32" if kind == "none" else kind
        try:
            argv = (QUICK_LAYERS if run.cfg.quick else []) + [
                "--device", str(run.device), "--autocast", kind, "--no-progress",
                "--out", str(_folder(run, "layers") / name)]
            execute(bench_layers.parse(argv))
            got = numbers[name] = layer_numbers(pd.read_csv(run.folder / "layers" / name /
                                                            "layers.csv"))
            if got["predicted_err"] > 5e-4:  # layers.csv holds 4 significant digits
                failed.append(f"{name}: linear_vs_predicted is {got['predicted_err']:.3g} "
                              "away from 1 (linear layers' saved bytes vs k d_in itemsize)")
        except (Exception, SystemExit) as err:  # noqa: BLE001 - recorded, the next one runs
            traceback.print_exc()
            failed.append(f"{name}: {type(err).__name__}: {cli.one_line(err)}")
    return Outcome("failed" if failed else "passed", numbers, "; ".join(failed))


# -- 4. peak -----------------------------------------------------------------------------------


def _peak_model(name: str, family: str, ratio: float, batch: int, length: int, device):
    """(model on ``device``, dropout off, converted to ``family`` unless exact; its inputs)."""
    from varstudy.models import load_model
    from varstudy.randomized.layers import randomize

    model, _ = load_model(name, num_labels=2, dropout=False, seed=0, device=device)
    if family != "exact":
        randomize(model, ratio=ratio, sketch=family, seed=0)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(input_ids=torch.randint(1000, 2000, (batch, length), generator=gen),
                  attention_mask=torch.ones(batch, length, dtype=torch.long),
                  labels=torch.randint(0, 2, (batch,), generator=gen))
    return model, {k: v.to(device) for k, v in inputs.items()}


def peak_step(name: str, family: str, ratio: float, batch: int, length: int,
              device: str) -> None:
    """Two whole AdamW training steps (the second holds the moments), for cuda_peak_bytes."""
    torch.cuda.set_device(device)  # max_memory_allocated then reads this device
    model, inputs = _peak_model(name, family, ratio, batch, length, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for _ in range(2):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def accounting(name: str, family: str, ratio: float, batch: int, length: int, device) -> dict:
    """Bytes of one training step by account: saved for backward (on ``device``), parameters,
    buffers, gradients, AdamW's two moments; ``floor_bytes``: what is alive at the end of the
    second forward (everything but the gradients), a lower bound of the peak."""
    from varstudy.randomized.memory import saved_bytes

    model, inputs = _peak_model(name, family, ratio, batch, length, device)
    loss, report = saved_bytes(lambda: model(**inputs).loss, model=model)
    del loss
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return dict(saved_bytes=report.total, param_bytes=params + buffers, grad_bytes=grads,
                adam_bytes=2 * grads, accounted_bytes=report.total + params + buffers + 3 * grads,
                floor_bytes=report.total + params + buffers + 2 * grads)


def peak(run: Run) -> Outcome:
    """Stage 4: the CUDA peak of a training step (fresh subprocess) against the saved-bytes
    accounting plus parameters, gradients and AdamW state."""
    from varstudy.randomized.memory import cuda_peak_bytes

    name, batch, length = PEAK_MODELS[run.cfg.quick]
    rows, low = [], []
    for family, ratio in PEAK_CONFIGS:
        row = dict(model=name, batch=batch, length=length, family=family, ratio=ratio,
                   **accounting(name, family, ratio, batch, length, run.device))
        row["peak_bytes"] = float("nan")
        if run.device.type == "cuda":
            row["peak_bytes"] = cuda_peak_bytes(peak_step, name, family, ratio, batch, length,
                                                str(run.device), timeout=run.cfg.peak_timeout_s)
            if row["peak_bytes"] < row["floor_bytes"]:
                low.append(family)
        row["peak_over_accounted"] = row["peak_bytes"] / row["accounted_bytes"]
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(_folder(run, "peak") / "peak.csv", index=False)
    print(table.to_string(index=False))
    measured = run.device.type == "cuda"  # summary.json holds null, not NaN, where not
    numbers = {r["family"]: dict(saved_mib=r["saved_bytes"] / MIB,
                                 accounted_mib=r["accounted_bytes"] / MIB,
                                 peak_mib=r["peak_bytes"] / MIB if measured else None,
                                 ratio=r["peak_over_accounted"] if measured else None)
               for r in rows}
    if run.device.type != "cuda":
        return Outcome("skipped", numbers, "no CUDA: the accounting only, no peak")
    note = f"peak below the bytes alive at the end of forward for {', '.join(low)}" if low else ""
    return Outcome("failed" if low else "passed", numbers, note)


# -- 5. checkpoint -----------------------------------------------------------------------------


def host_tier_stats(device: torch.device, mib: int, reps: int = 5) -> dict:
    """The host tier alone: median write time and bandwidth of one ``mib``-MiB state (no
    throttle), whether its pool is pinned, and whether a read gives the state back."""
    from varstudy.checkpointing.storage import make_tier

    gen = torch.Generator().manual_seed(0)
    state = (torch.randn(mib * MIB // 4, generator=gen).to(device),)
    tier = make_tier("host", n_keys=reps, template=state, timeout_s=60)
    try:
        for key in range(reps):
            tier.put(key, state)
        tier.wait_writes()
        back = tier.get(reps - 1)
        same = bool(torch.equal(back[0], state[0]))
        pinned = bool(tier.pool[0][0].is_pinned())
    finally:
        tier.close()
    write = statistics.median(tier.write_times_s)
    return dict(host_state_mib=mib, host_write_ms=1e3 * write,
                host_gb_s=mib * MIB / write / 1e9, host_pinned=pinned, host_round_trip=same,
                host_stall_s=tier.stall_s)


def checkpoint(run: Run) -> Outcome:
    """Stage 5: the checkpointing benchmark on the device (pinned host tier)."""
    from varstudy.bench import checkpoint as bench_checkpoint
    from varstudy.bench.checkpoint_run import run as checkpoint_run
    from varstudy.bench.checkpoint_tables import report

    argv = ["--preset", "smoke" if run.cfg.quick else "quick", "--device", str(run.device),
            "--out", str(_folder(run, "checkpoint") / "bench"), "--no-progress"]
    if run.cfg.quick:
        argv += ["--strategies", "store_all,revolve,multistage_host"]
    cfg = bench_checkpoint.parse(argv)
    cli.set_threads(cfg.num_threads)  # quick: 1 thread, as committed (restored after the stage)
    vs_n, vs_ratio, wave, summary, env = checkpoint_run(cfg)
    report(vs_n, vs_ratio, wave, summary, env)
    host = vs_n[vs_n["strategy"] == "multistage_host"].set_index("n_steps")
    n_max = int(host.index.max())
    numbers = dict(t_f_ms=env["t_f_ms"], t_b_ms=env["t_b_ms"], n_max=n_max,
                   multistage_stall_s=float(host.loc[n_max, "stall_s"]),
                   multistage_overhead=float(host.loc[n_max, "overhead_vs_plain"]),
                   wave_within_budget=bool(wave.loc[wave["strategy"] != "store_all",
                                                    "within_budget"].all()),
                   wave_grad_spread=float((wave["grad_norm"].max() - wave["grad_norm"].min())
                                          / wave["grad_norm"].abs().max()),
                   **host_tier_stats(run.device, HOST_STATE_MIB[run.cfg.quick]))
    problems = [what for what, bad in (
        ("the host tier's pool is not pinned", run.device.type == "cuda"
         and not numbers["host_pinned"]),
        ("a state read back from the host tier differs", not numbers["host_round_trip"]),
        ("the wave workload's Revolve/multistage exceed the budget",
         not numbers["wave_within_budget"]),
        (f"the wave workload's gradient norms differ across strategies by "
         f"{numbers['wave_grad_spread']:.2g} (> {WAVE_RTOL:g})",
         not numbers["wave_grad_spread"] <= WAVE_RTOL)) if bad]
    return Outcome("failed" if problems else "passed", numbers, "; ".join(problems))


STAGE_FUNCTIONS = {"tests": tests, "measure": measure, "layers": layers, "peak": peak,
                   "checkpoint": checkpoint}
