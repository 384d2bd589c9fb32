"""Benchmark: ``python -m varstudy.bench callback``: what the Trainer callback costs.

Fine-tunes the shipped MiniLM with the Hugging Face ``Trainer`` (rotten_tomatoes, batch B,
fixed length L) with ``varstudy.hf.VarianceCallback`` measuring every ``every`` steps on
``num_batches`` held minibatches, and times, in the same run, every training step (the Trainer's
step without the callback's work) and every measurement. Writes ``results/bench/callback.csv``
(quantity, value, unit: step time, measurement time, their ratio, the overhead on training at
this measuring interval) and ``callback.json`` (config and environment).
"""

from __future__ import annotations

from dataclasses import dataclass

from varstudy import cli
from varstudy import io as vio
from varstudy.cli import option
from varstudy.errors import VarstudyError
from varstudy.names import MODEL_HELP, SKETCH_NAMES

PROG = "python -m varstudy.bench callback"


@dataclass(frozen=True)
class CallbackBenchConfig:
    """What the callback benchmark runs (defaults: the committed run)."""

    model: str = option("minilm", MODEL_HELP)
    batch_size: int = option(16, "B, training and held minibatches")
    max_length: int = option(64, "L, tokens per example (fixed padding)")
    steps: int = option(40, "training steps")
    every: int = option(10, "measure every this many steps")
    num_batches: int = option(4, "held minibatches per measurement")
    families: tuple[str, ...] = option(("gaussian", "rows"), "sketch families measured",
                                       choices=SKETCH_NAMES)
    ratios: tuple[float, ...] = option((0.1,), "ratios measured")
    num_threads: int | None = option(None, "CPU threads (none: PyTorch's default, the "
                                           "machine's cores)")
    seed: int = option(0, "seed of the run")
    out: str = option("results/bench", "output folder")

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length", "steps", "every", "num_batches"):
            if getattr(self, name) < 1:
                raise VarstudyError(f"--{name.replace('_', '-')} must be >= 1, got "
                                    f"{getattr(self, name)}")
        vio.require_out(self.out)
        cli.check_seed("seed", self.seed)


def parser() -> cli.Parser:
    """The command line of ``python -m varstudy.bench callback``, from
    :class:`CallbackBenchConfig`."""
    return cli.config_parser(CallbackBenchConfig, PROG, __doc__.split("\n")[0])


def parse(argv: list[str] | None = None) -> CallbackBenchConfig:
    """The config that the command line ``argv`` asks for."""
    return cli.config_from(CallbackBenchConfig, parser().parse_args(argv))


def run(cfg: CallbackBenchConfig):
    """(table, measurement seconds, step seconds) of one timed Trainer run."""
    import statistics
    import tempfile
    import time

    import pandas as pd
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from varstudy.batching import encode
    from varstudy.data import load_dataset
    from varstudy.hf import VarianceCallback
    from varstudy.models import load_model

    model, tok = load_model(cfg.model, dropout=True, seed=cfg.seed)
    enc = encode(load_dataset("rotten_tomatoes", "train"), tok, cfg.max_length)
    data = [{k: v[i] for k, v in enc.items()} for i in range(len(enc["labels"]))]
    steps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):  # runs before VarianceCallback's (added earlier)
            steps.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=cfg.steps, report_to=[],
                                 per_device_train_batch_size=cfg.batch_size, use_cpu=True,
                                 seed=cfg.seed, save_strategy="no", disable_tqdm=True,
                                 logging_steps=cfg.every, learning_rate=5e-5)
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          data_collator=default_data_collator, callbacks=[StepClock()])
        cb = VarianceCallback(every_n_steps=cfg.every, num_batches=cfg.num_batches,
                              families=cfg.families, ratios=cfg.ratios, out="",
                              at_start=False).attach(trainer)
        trainer.train()
    step, meas = statistics.median(steps[1:]), statistics.median(cb.seconds)
    rows = [("step_time", step, "s"), ("measurement_time", meas, "s"),
            ("measurement_over_step", meas / step, "x"),
            ("measurement_per_batch_over_step", meas / step / cfg.num_batches, "x"),
            ("overhead_at_interval", meas / (cfg.every * step), "fraction"),
            ("measurements", len(cb.seconds), "count"), ("steps", len(steps), "count")]
    return pd.DataFrame(rows, columns=["quantity", "value", "unit"])


def main(argv: list[str] | None = None) -> int:
    """Run the callback benchmark; returns the exit status."""
    def body() -> int:
        cfg = parse(argv)
        cli.set_threads(cfg.num_threads)
        from dataclasses import asdict

        out = vio.check_writable(cfg.out)
        with vio.output_lock(out, ".callback.lock"):
            table = run(cfg)
            vio.atomic_write_csv(out / "callback.csv", table)
            vio.atomic_write_json(out / "callback.json",
                                  dict(config=asdict(cfg), env=vio.env_info("cpu")))
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return 0
    return cli.run_command(body, argv)
