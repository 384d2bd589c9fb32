"""``python -m varstudy.bench gpu``: the GPU check, one command, five stages, one summary.

Stages (``STAGES``), run in this order; each runs even when an earlier one failed (its failure is
recorded and the run goes on), times itself and sends what it prints to ``<stage>.log``:

1. ``tests``: pytest in a subprocess on the device-specific tests (``TESTS``, selected with
   ``-k "cuda or autocast or device"``; ``--quick``: ``QUICK_TESTS`` with ``-k cuda``, about
   7 s on 2 cores) with ``-p no:cacheprovider -q``; passed/failed/skipped counts from its last line.
   On CUDA the subprocess sees only the chosen device (``CUDA_VISIBLE_DEVICES``).
2. ``measure``: the variance decomposition (``varstudy.measure.run``) on the device against a
   CPU reference: max relative difference of ``var_sketch_mean`` and ``var_sampling_mean`` per
   (train_step, layer, family, ratio) over the entries above ``1e-12`` of their column's largest,
   passed when <= ``--rtol``. ``--quick``: tiny-bert, synthetic data, B 4, L 16, 3 batches, two
   families, one ratio, no Monte Carlo, run on the device and on the CPU. Full: the default
   ``python -m varstudy.measure`` config on the device against the committed
   ``results/measure/default/summary.csv`` when its config.json equals the default apart from
   device/out/progress/num_threads/resume and it agrees; else (another config, or results
   measured by older code: the committed run predates the derive_seed fix that changed the
   minibatch draws, and differs from today's CPU run by ~20%) a CPU run of the same config is
   the reference, and a disagreeing committed run is named in the stage's note.
   Why 1e-3 for float32: cuBLAS and the CPU BLAS sum matmuls in different orders (and use
   different attention/softmax kernels), so the float32 activations X and output gradients Y
   differ in their last bits (~1e-7 per operation, compounding over the layers). The closed forms
   are evaluated in float64, but of those float32 captures, and they are quadratic to quartic in
   X and Y; the sampling variance is a difference (mean of per-example squared norms minus the
   squared mean) that cancels where per-example gradients agree, which magnifies a relative
   error. Agreement to ~1e-5 is what we expect (not yet measured on a GPU), 1e-3 leaves
   margin; a real bug (a wrong sketch scaling, a dropped layer, a device-dependent draw) moves
   entries by O(1). TF32 must stay off (the torch default for matmuls; summary.json records the
   flags).
3. ``layers``: ``python -m varstudy.bench layers`` on the device in float32 and under
   ``--autocast bfloat16`` and ``float16`` (``--quick``: tiny-bert, batch 4, seq 16, two families
   x one ratio, one repeat). On the CPU only float32 and bfloat16: CPU float16 autocast covers
   few operators (most run in float32 and are cast back and forth), so its timings and bytes say
   little about the layers.
4. ``peak``: the CUDA peak of whole training steps (``randomized.memory.cuda_peak_bytes``, a
   fresh process: two AdamW steps of MiniLM, B 32, L 128, dropout off, exact and gaussian 0.1;
   ``--quick``: tiny-bert, B 4, L 16) against the accounting: saved-for-
   backward bytes (``saved_bytes`` on the same device) + parameters + gradients + AdamW's two
   moments. Passed when the peak is at least what must be alive at the end of the second
   forward (parameters + moments + saved bytes); the ratio peak / accounting is reported. On
   the CPU the accounting is computed and the stage is skipped (no CUDA).
5. ``checkpoint``: ``python -m varstudy.bench checkpoint --device <device>`` (``--preset
   smoke`` with ``--quick``, else ``quick``), and the pinned host tier on its own: the median
   write time and bandwidth of one state (``HOST_STATE_MIB``), whether its pool is pinned (it
   must be on CUDA) and a round trip equal to the state; multistage_host's stall from the run.
   Also checked: the wave workload's Revolve and multistage fit its budget, and their gradient
   norms equal store_all's up to ``WAVE_RTOL`` (recomputation on the device).

Writes ``<out>/<slug>/`` (slug of ``torch.cuda.get_device_name``, e.g. ``nvidia-h200``, or
``cpu``): a folder per stage, config.json (the resolved options), summary.json (per stage: status,
seconds, key numbers, note; the environment) and summary.md (one screen, also printed).
Exit status: 0 when every stage passed (or, on the CPU, was skipped for want of CUDA), 1 when a
stage failed, 2 on bad input; without a GPU, ``--device cuda`` is one line and status 2.
``--device cpu --quick`` runs the same sequence on the CPU in CI (about 40 s on 2 cores).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from varstudy import cli
from varstudy import io as vio
from varstudy.cli import option
from varstudy.errors import VarstudyError

PROG = "python -m varstudy.bench gpu"
STAGES = ("tests", "measure", "layers", "peak", "checkpoint")
TESTS = ("tests/test_layers.py", "tests/test_mixed_precision.py", "tests/test_device_ops.py",
         "tests/test_memory.py", "tests/test_bench_checkpoint.py")
TEST_SELECTION = "cuda or autocast or device"
QUICK_TESTS = ("tests/test_layers.py", "tests/test_device_ops.py", "tests/test_memory.py")
QUICK_SELECTION = "cuda"
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


@dataclass(frozen=True)
class GpuBenchConfig:
    """What the GPU check runs (defaults: the full check on the default GPU; target: under
    8 minutes on one GPU)."""

    device: str = option("cuda", "the device checked: cuda, cuda:N, cpu or auto (cuda when "
                                 "present)", metavar="DEVICE")
    quick: bool = option(False, "small versions of every stage (the CPU dry run of CI: "
                                "--device cpu --quick)")
    stages: tuple[str, ...] = option(STAGES, "stages to run, in this order", choices=STAGES)
    rtol: float = option(1e-3, "relative tolerance of the device's variances against the CPU's "
                               "(float32; module docstring)")
    test_timeout_s: float = option(600.0, "seconds the pytest subprocess may take")
    peak_timeout_s: float = option(300.0, "seconds each CUDA peak subprocess may take")
    num_threads: int | None = option(None, "CPU threads (none: torch's default, the machine's "
                                           "cores)")
    out: str = option("results/gpu", "output folder; the run writes <out>/<device slug>/")

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        _check(isinstance(self.device, str) and re.fullmatch(DEVICE_PATTERN, self.device)
               is not None, f"unknown device {self.device!r}; valid choices: cuda, cuda:N, cpu, "
                            "auto")
        for stage in self.stages:
            _check(stage in STAGES, f"unknown stage {stage!r}; valid choices: "
                                    f"{', '.join(STAGES)}")
        _check(len(self.stages) > 0, f"--stages is empty; valid choices: {', '.join(STAGES)}")
        cli.check_distinct("--stages", self.stages)
        for name in ("rtol", "test_timeout_s", "peak_timeout_s"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool)
                   and 0 < value < math.inf, f"--{name.replace('_', '-')} {value!r} is out of "
                                             "range; valid choices: finite numbers > 0")
        _check(self.num_threads is None or (isinstance(self.num_threads, int)
                                            and not isinstance(self.num_threads, bool)
                                            and self.num_threads >= 1),
               f"--num-threads {self.num_threads!r} is out of range; valid choices: integers "
               ">= 1 or none")
        vio.require_out(self.out)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise VarstudyError(message)


def slug(name: str) -> str:
    """A folder name for a device name: lower case, runs of other characters as one dash
    ("NVIDIA H200" -> "nvidia-h200"); "device" when nothing is left."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def parser() -> cli.Parser:
    """The command line of ``python -m varstudy.bench gpu``, from :class:`GpuBenchConfig`."""
    return cli.config_parser(GpuBenchConfig, PROG, __doc__.split("\n")[0])


def parse(argv: list[str] | None = None) -> GpuBenchConfig:
    """The config that the command line ``argv`` asks for."""
    return cli.config_from(GpuBenchConfig, parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Run the GPU check's stages; returns the exit status (2 without a CUDA device)."""
    def body() -> int:
        cfg = parse(argv)
        from varstudy.bench.gpu_run import check_device, execute

        device = check_device(cfg.device)  # no CUDA device: one line, before anything runs
        cli.set_threads(cfg.num_threads)
        return execute(cfg, device)
    return cli.run_command(body, argv)
