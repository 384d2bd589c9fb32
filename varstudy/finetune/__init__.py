"""Fine-tuning with randomized linear layers: ``python -m varstudy.finetune [options]``; API
``train(FinetuneConfig(...)) -> FinetuneResult`` (``run(config)``: its one-row run table).

Fine-tunes a sequence-classification model whose ``nn.Linear`` modules (all, or those picked by the
``include``/``exclude`` regexes) are converted to ``RandomizedLinear`` at ratio ρ with one sketch
family, or left exact (``sketch="exact"``), and evaluates on the validation split at intervals.

NOTE [recipe] (paper 1, PAPERS.md): AdamW β = (0.9, 0.98), ε = 1e-6, weight decay 0.1 (not on
biases and LayerNorm weights), linear warm-up over 6% of the steps then linear decay to 0, best
evaluation on validation reported ("best epoch"). The paper's budget (RoBERTa-base, 10 epochs,
max length 512, lr 2e-5) is the ``paper`` preset. The defaults (preset ``cpu``) are a reduced CPU
budget that finishes in a few minutes: MiniLM on rotten_tomatoes, max length 64, batch 32, 200
steps (~0.94 epoch), lr 1e-4 (a short run needs a larger step than 10 epochs do), evaluation
every 50 steps.

Outputs, in ``<out>/<name>/``: ``steps.csv`` (step, loss, lr, time_s: cumulative training wall
time), ``evals.csv`` (step, metric, value; GLUE metric definitions from ``varstudy.metrics``, plus
``eval_loss``; ``test_``-prefixed rows score the test split at each new best validation value),
``run.csv`` (one row: config columns, best/final primary metric, test_at_best, train_time_s,
saved_mib ...; ``num_threads`` is the CPU thread count in effect), ``config.json`` (the resolved
config: the options as given, so that ``--config`` reruns the run, plus the resolved device,
``threads`` in effect, ``world_size``, the converted layers and the budget in steps), and with
``replan_every`` (``--replan-every N``) ``plans.csv``: the run re-plans the per-layer ratios every
N steps within the bytes of uniform ``ratio`` from statistics of the sketches alone
(:mod:`varstudy.randomized.online`); one row per layer and re-plan (the online estimate of its
constant, its ratio and whether it is exact; with ``replan_check`` also the exact constant and
the plan the exact statistics give).

NOTE [durable results / resume]: with ``out`` set, ``checkpoint.pt`` (model, AdamW, scheduler,
RNG states, randomized-layer call counters, step, the steps/evals rows so far; tensors and plain
data only, loaded with ``weights_only``) is written atomically every ``checkpoint_every`` steps
(default: at every evaluation) and deleted when the run ends; ``run.csv`` marks a finished run.
The run writes into ``<out>/.<name>.staging/``, which replaces the run folder ``<out>/<name>``
as a whole only once the run has finished (NOTE [staged results] in :mod:`varstudy.io`): a run
that fails or is killed at any point leaves a finished folder byte for byte. The staging folder
is made only after the data, the model and the checkpoint to resume from are loaded, and while
the run holds the folder's lock (NOTE [one run per folder] in :mod:`varstudy.io`).
``resume=True`` (``--resume``) continues the staging folder an interrupted run left (else a copy
of the finished folder; a finished run is returned as it is), refuses a checkpoint made with a
different config (except ``progress``, ``resume``, ``checkpoint_every``, ``out``), restores it,
replays only the minibatch order up to its step and continues; the tables then equal those of an uninterrupted
run (bit for bit on CPU), except the wall-clock ``time_s``/``train_time_s``.

NOTE [randomness]: every random choice comes from ``seed``: the new head's initialisation
(``load_model``), the minibatch order (a ``torch.Generator``), the sketches (``randomize(seed=)``)
and dropout, which reads torch's global RNG and therefore runs inside ``torch.random.fork_rng``
seeded with ``seed`` (the caller's RNG state is restored afterwards).

NOTE [memory]: ``saved_mib`` is the exact activation memory autograd holds for backward after the
forward of the first training step (``varstudy.randomized.memory.saved_bytes``, parameters excluded);
``saved_linear_mib`` is the part attributed to linear modules. ``peak_cuda_mib`` is the
in-process ``torch.cuda.max_memory_allocated`` over the whole run (NaN on CPU).

NOTE [threads]: ``num_threads`` (``--num-threads``) sets torch's CPU threads for the run (and
:func:`train` restores the caller's count afterwards); none leaves torch's setting alone
(its default: the machine's cores).

Command line (NOTE [one convention] in :mod:`varstudy.cli`): one option per field of
:class:`FinetuneConfig`, ``--preset cpu|paper``, ``--config <run>/config.json``, ``--debug``;
``--epochs`` alone clears ``max_steps``; ``--ratio`` with ``--sketch exact`` is an error.

Modules: ``config`` (FinetuneConfig, PRESETS, ``check``, ``run_name``; light), ``training``
(``build``, the optimizer, ``loop``, ``evaluate``, ``train``), ``checkpoint`` (resume
checkpoints, the run folder), ``tables`` (run/steps/evals tables, ``write``), ``command`` (the
command line).
"""

from __future__ import annotations

from varstudy.lazy import exports

_API = {
    "FinetuneConfig": "config", "PRESETS": "config", "DEVICES": "config",
    "SKETCH_CHOICES": "config", "preset": "config", "check": "config", "run_name": "config",
    "DTYPES": "training", "Setup": "training", "build": "training",
    "make_optimizer": "training", "by_length": "training", "to_device": "training",
    "evaluate": "training", "synchronize": "training", "threads": "training",
    "train": "training", "run": "training", "loop": "training", "evaluations": "training",
    "resolve_device": "training",
    "CHECKPOINT": "checkpoint", "FINAL": "checkpoint", "NOT_COMPARED": "checkpoint",
    "FinetuneResult": "tables", "run_tables": "tables", "write": "tables", "MIB": "tables",
    "main": "command", "parse": "command", "parser": "command",
    "config_from_args": "command",
}
__all__ = sorted(_API)

__getattr__, __dir__ = exports(__name__, _API)
