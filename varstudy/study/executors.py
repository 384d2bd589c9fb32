"""Where the accuracy grid's runs run (issue 26): one after another in this process (``local``,
the default) or as Ray tasks on a cluster (``ray``).

Either way the driver alone writes the study folder: an executor only yields ``(job, outcome)``
as runs finish, and :mod:`varstudy.study.accuracy_study` saves each finished run as before
(NOTE [accuracy tables / resume] in :mod:`varstudy.study`), so ``--resume``, the folder lock,
the tables and ``analysis`` do not depend on the executor.

NOTE [same numbers anywhere]: a run's results depend only on its fine-tuning config (family,
ratio, scope, seed, threads): :func:`varstudy.finetune.training.train` seeds everything it
draws, and builds its model, data and optimizer afresh. A Ray task therefore gets the same
config the local loop would run, with ``num_threads`` = ``cpus_per_run``; the tables are written
in the grid's order whatever order the runs finish in. Tested: the same tiny grid, local and on a
local Ray cluster, gives identical tables apart from the timing columns.

NOTE [faults]: a Ray task that raises, or whose worker process dies, is retried ``retries``
times by Ray (``max_retries``, ``retry_exceptions``); a run that still fails is yielded as a
:class:`Failure` (one line with its configuration), and the grid goes on. Ctrl-C in the driver
cancels the runs not yet finished; every finished run is already saved. The local executor runs
in the driver's process: an error there stops the study as it always did (finished runs saved,
``--resume`` continues).
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from varstudy.errors import VarstudyError

EXECUTORS = ("local", "ray")
RAY_DEFAULTS = dict(cpus_per_run=1, gpus_per_run=0.0, retries=2)
RAY_OPTIONS = ("address", "cpus_per_run", "gpus_per_run", "retries")
INSTALL_RAY = 'pip install -e ".[cluster]" (or pip install ray)'


@dataclass(frozen=True)
class Job:
    """One run of the grid: its position (the tables' order), its key and its config."""

    index: int
    key: tuple  # (family, ratio, scope, seed)
    config: Any  # FinetuneConfig


@dataclass(frozen=True)
class Done:
    """A finished run: the fine-tuning tables, where it ran (``host``; ``gpu_ids``: the GPUs
    Ray gave the task, empty on CPU)."""

    result: Any  # FinetuneResult
    host: str
    gpu_ids: str = ""


@dataclass(frozen=True)
class Failure:
    """A run that failed on every attempt."""

    attempts: int
    error: str

    def line(self, job: Job) -> str:
        """The one line that reports ``job``'s failure: its configuration and the cause."""
        family, ratio, scope, seed = job.key
        return (f"run family={family} ratio={ratio:g} scope={scope} seed={seed} failed "
                f"{self.attempts} time(s): {self.error}")


def check_options(config) -> None:
    """Refuse Ray-only options with the local executor, bad values, and ``ray`` without Ray
    installed (one line each; imports nothing heavy)."""
    if config.executor not in EXECUTORS:
        raise VarstudyError(f"unknown executor {config.executor!r}; valid choices: "
                            f"{', '.join(EXECUTORS)}")
    given = [name for name in RAY_OPTIONS if getattr(config, name) is not None]
    if config.executor == "local":
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise VarstudyError(f"{flags} appl{'ies' if len(given) == 1 else 'y'} to --executor "
                                f"ray only; valid choices: --executor ray, or leave "
                                f"{'it' if len(given) == 1 else 'them'} out (local runs use "
                                f"--num-threads)")
        return
    cpus, gpus, retries = (ray_option(config, n) for n in ("cpus_per_run", "gpus_per_run",
                                                            "retries"))
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise VarstudyError(f"cpus_per_run must be an integer >= 1, got {cpus!r}")
    if config.num_threads is not None and config.num_threads != cpus:
        raise VarstudyError(f"with --executor ray each run uses --cpus-per-run threads "
                            f"({cpus}); --num-threads {config.num_threads} differs; valid "
                            f"choices: leave --num-threads out, or the same number")
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 64:
        raise VarstudyError(f"gpus_per_run must be a number in [0, 64] (a fraction shares a "
                            f"GPU), got {gpus!r}")
    if gpus > 0 and config.device == "cpu":
        raise VarstudyError(f"--gpus-per-run {gpus:g} with --device cpu; valid choices: "
                            f"--device auto or cuda, or --gpus-per-run 0")
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 100:
        raise VarstudyError(f"retries must be an integer in [0, 100], got {retries!r}")
    if importlib.util.find_spec("ray") is None:
        raise VarstudyError(f"--executor ray needs Ray, which is not installed; install it: "
                            f"{INSTALL_RAY}, or use --executor local")


def ray_option(config, name: str):
    """An option of the Ray executor, its default where not given."""
    value = getattr(config, name)
    return RAY_DEFAULTS[name] if value is None else value


def threads_per_run(config) -> int | None:
    """torch's CPU threads in each run: ``cpus_per_run`` on Ray, else ``num_threads``."""
    return ray_option(config, "cpus_per_run") if config.executor == "ray" else \
        config.num_threads


def run_one(config) -> Done:
    """Fine-tune one run of the grid where this is called; the default ``run`` of the
    executors (a module-level function, so Ray pickles it by reference)."""
    from varstudy.finetune.training import train

    return Done(train(config), socket.gethostname(), _gpu_ids())


def _gpu_ids() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ",".join(str(i) for i in ray.get_gpu_ids())
    except ImportError:
        pass
    return ""


class Local:
    """Run the jobs one after another in this process."""

    name = "local"

    def __init__(self, run: Callable = run_one):
        self.run = run

    def describe(self) -> dict:
        """The executor and this machine's host name (for env.json)."""
        return {"executor": "local", "hosts": [socket.gethostname()]}

    def results(self, jobs: list[Job]) -> Iterator[tuple[Job, Done | Failure]]:
        """``(job, Done)`` for each job in order, run here; an error stops the study."""
        for job in jobs:
            yield job, self.run(job.config)

    def close(self) -> None:
        """Nothing to release."""


class Ray:
    """Run every job as one Ray task (``num_cpus`` = cpus_per_run, ``num_gpus`` =
    gpus_per_run, ``retries`` retries), on the cluster at ``address`` or on a local one started
    here (and shut down by :meth:`close`). Connects in the constructor."""

    name = "ray"

    def __init__(self, config, run: Callable = run_one):
        import ray

        self.ray, self.run = ray, run
        self.cpus = ray_option(config, "cpus_per_run")
        self.gpus = float(ray_option(config, "gpus_per_run"))
        self.retries = ray_option(config, "retries")
        self.address = config.address
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=config.address, include_dashboard=False,
                         logging_level="ERROR", configure_logging=True)
            except (ConnectionError, ValueError, RuntimeError) as err:
                why = " ".join(str(err).split())[:200]
                raise VarstudyError(
                    f"cannot start or reach the Ray cluster at {config.address or '(local)'} "
                    f"({why}); valid choices: the address `ray start --head` printed "
                    f"(host:6379), auto (the cluster this machine joined), or no --address (a "
                    f"local cluster)") from None
        self._pending: dict = {}

    def describe(self) -> dict:
        """The executor and the cluster: its resources and nodes (for env.json)."""
        ray = self.ray
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return {"executor": "ray", "address": self.address or "local cluster",
                "cpus_per_run": self.cpus, "gpus_per_run": self.gpus, "retries": self.retries,
                "ray": ray.__version__,
                "cluster_resources": {k: v for k, v in ray.cluster_resources().items()
                                      if not k.startswith("node:")},
                "nodes": [{"host": n.get("NodeManagerHostname"),
                           "cpus": n.get("Resources", {}).get("CPU", 0),
                           "gpus": n.get("Resources", {}).get("GPU", 0)} for n in nodes]}

    def results(self, jobs: list[Job]) -> Iterator[tuple[Job, Done | Failure]]:
        """Submit every job, then ``(job, Done | Failure)`` in the order they finish."""
        ray = self.ray
        task = ray.remote(self.run).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.retries,
            retry_exceptions=True, name="varstudy-run")
        self._pending = {task.remote(job.config): job for job in jobs}
        while self._pending:
            ready, _ = ray.wait(list(self._pending), num_returns=1)
            job = self._pending.pop(ready[0])
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # failed on every attempt
                outcome = Failure(self.retries + 1, _first_line(err))
            yield job, outcome

    def close(self) -> None:
        """Cancel the runs not finished (Ctrl-C, an error in the driver); shut down the local
        cluster this executor started."""
        for ref in self._pending:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # already finished or gone: nothing to cancel
                pass
        self._pending = {}
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def _first_line(err: BaseException) -> str:
    """The cause of a Ray error in one line: the original exception where Ray kept it."""
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:200]}"
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def executor(config, run: Callable = run_one) -> Local | Ray:
    """The executor ``config.executor`` names (:func:`check_options` first)."""
    check_options(config)
    return Ray(config, run) if config.executor == "ray" else Local(run)
