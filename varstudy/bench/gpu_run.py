"""The GPU check's run (heavy part of :mod:`varstudy.bench.gpu`): the device, the stages in
order (each logged, timed, its failure recorded), summary.json and the one-screen summary.md."""

from __future__ import annotations

import contextlib
import platform
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

import varstudy
from varstudy import cli
from varstudy import io as vio
from varstudy.bench.gpu import GpuBenchConfig, slug
from varstudy.bench.gpu_stages import STAGE_FUNCTIONS, Outcome, Run
from varstudy.errors import VarstudyError

REPO = Path(varstudy.__file__).resolve().parents[1]  # the checkout: tests/, results/


def check_device(name: str) -> torch.device:
    """The device of ``--device``; no CUDA device (or an index beyond them) is one line."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VarstudyError(f"no CUDA device: --device {name} needs a GPU and torch "
                            f"{torch.__version__} finds none on this machine; valid choices: a "
                            "machine with a GPU, or --device cpu --quick (the CPU dry run)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise VarstudyError(f"no CUDA device {name}: this machine has "
                            f"{torch.cuda.device_count()}; valid choices: cuda, cuda:0 .. "
                            f"cuda:{torch.cuda.device_count() - 1}, cpu")
    return device


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_stage(name: str, run: Run) -> dict:
    """Run one stage with its prints and tracebacks in ``<folder>/<name>.log``; an exception is
    a failed stage (the next one still runs); the thread count is restored afterwards."""
    threads, start = torch.get_num_threads(), time.perf_counter()
    with open(run.folder / f"{name}.log", "w", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            outcome = STAGE_FUNCTIONS[name](run)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - recorded, the next stage runs
            traceback.print_exc()
            outcome = Outcome("failed", note=f"{type(err).__name__}: {cli.one_line(err)}"[:300])
        finally:
            torch.set_num_threads(threads)
    return dict(stage=name, status=outcome.status, seconds=round(time.perf_counter() - start, 1),
                numbers=outcome.numbers, note=outcome.note)


def environment(device: torch.device) -> dict:
    """Versions, device and threads of this run, for ``env.json``."""
    import transformers

    return dict(python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, cuda=torch.version.cuda,
                device=str(device), device_name=device_name(device),
                torch_threads=torch.get_num_threads(),
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                float32_matmul_precision=torch.get_float32_matmul_precision())


def key_numbers(stage: str, n: dict) -> str:
    """The summary.md cell of one stage's numbers (empty when it recorded none)."""
    if not n:
        return ""
    if stage == "tests":
        return f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped " \
               f"(-k \"{n['selection']}\")"
    if stage == "measure":
        return f"max rel diff {n['max_rel_diff']:.2g} (rtol {n['rtol']:g}) over " \
               f"{n['n_compared']} entries vs {n['reference']}"
    if stage == "layers":
        return "; ".join(f"{k}: exact {v['exact_ms']:.3g} ms, {v['best']} saved x"
                         f"{v['saved_ratio']:.2f} time x{v['time_ratio']:.2f}"
                         for k, v in n.items())
    if stage == "peak":
        return "; ".join(f"{k}: saved {v['saved_mib']:.3g} MiB, accounted "
                         f"{v['accounted_mib']:.3g} MiB, " + (
                             "no peak" if v["peak_mib"] is None else
                             f"peak {v['peak_mib']:.3g} MiB (x{v['ratio']:.2f})")
                         for k, v in n.items())
    return f"host tier {n['host_state_mib']} MiB: {n['host_write_ms']:.3g} ms " \
           f"({n['host_gb_s']:.3g} GB/s, pinned {n['host_pinned']}); multistage at N " \
           f"{n['n_max']}: stall {n['multistage_stall_s']:.3g} s, x" \
           f"{n['multistage_overhead']:.2f} plain"


def passed(results: list[dict], device: torch.device) -> bool:
    """Every stage passed, or was skipped for want of CUDA on a CPU run (the peak)."""
    return all(r["status"] == "passed" or (r["status"] == "skipped" and device.type != "cuda")
               for r in results)


def markdown(summary: dict) -> str:
    """summary.md: one line of header, one table row per stage, the failures' notes."""
    results = summary["stages"]
    counts = {s: sum(r["status"] == s for r in results) for s in ("passed", "failed", "skipped")}
    head = (f"# varstudy GPU check: {summary['device_name']} ({summary['device']}"
            f"{', quick' if summary['quick'] else ''}): {counts['passed']} passed, "
            f"{counts['failed']} failed, {counts['skipped']} skipped, "
            f"{summary['wall_s']:.0f} s -> {'OK' if summary['ok'] else 'FAILED'}")
    lines = [head, "", "| stage | status | key numbers | time_s |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['status']} | {key_numbers(r['stage'], r['numbers'])}"
                     f" | {r['seconds']:.1f} |")
    notes = [f"* {r['stage']}: {r['note']}" for r in results if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def execute(cfg: GpuBenchConfig, device: torch.device) -> int:
    """Run the stages into ``<out>/<slug>/``; 0 when :func:`passed`, else 1."""
    name = device_name(device)
    final = vio.check_writable(Path(cfg.out) / slug(name))
    start = time.perf_counter()
    with vio.output_lock(final, ".gpu.lock"), vio.staged(final) as folder:  # NOTE [one run per
        run = Run(cfg, device, folder, REPO)  # folder], [staged results] (varstudy.io)
        vio.atomic_write_json(folder / "config.json", dict(
            command=cli.command_name(GpuBenchConfig), **asdict(cfg), device_resolved=str(
            device), device_name=name))
        results = []
        for i, stage in enumerate(cfg.stages, 1):
            print(f"[{i}/{len(cfg.stages)}] {stage} ...", end=" ", flush=True)
            results.append(run_stage(stage, run))
            r = results[-1]
            print(f"{r['status']} ({r['seconds']:.1f} s){': ' + r['note'] if r['note'] else ''}",
                  flush=True)
        summary = dict(device=str(device), device_name=name, quick=cfg.quick,
                       ok=passed(results, device), wall_s=round(time.perf_counter() - start, 1),
                       stages=results, config=asdict(cfg), env=environment(device))
        text = markdown(summary)
        vio.atomic_write_json(folder / "summary.json", summary)
        vio.atomic_write_text(folder / "summary.md", text)
    print(text, end="")
    print(f"wrote {final}", file=sys.stdout)
    return 0 if summary["ok"] else 1
