"""Study drivers: ``python -m varstudy.study {accuracy,memory,throughput,frontier} [--preset
cpu|gpu] ...``; API ``accuracy(StudyConfig(...))``, ``memory(config)``, ``throughput(config)``,
``frontier(config)``.

* ``accuracy``: fine-tune (``varstudy.finetune``) for exact and every (family, ρ, scope), over
  seeds -> ``runs.csv`` (one row per task, family, ratio, scope, seed: the fine-tuning run's row),
  ``summary.csv`` (mean, std, n over seeds of the best validation metric; final_mean, final_std
  of the last evaluation; test_mean, test_std of the test split at the best step),
  ``steps.csv`` / ``evals.csv`` (all runs, tidy), ``config.json``.
* ``memory``: bytes saved for backward by the forward of one training step, per (family, ρ) and
  batch size (exact accounting, ``varstudy.randomized.memory.saved_bytes``), plus the CUDA peak of
  two whole training steps (weights, gradients, AdamW state, activations) in an isolated
  subprocess when on GPU -> ``memory.csv``.
* ``throughput``: examples/s of full training steps (forward, backward, AdamW) at one batch size,
  all configurations in one process on one model, interleaved in a fresh random order per repeat
  after a warm-up; median over repeats and the median of the per-repeat ratio to exact ->
  ``throughput.csv``. Then the largest batch under ``budget_mib``: memory is linear in the batch
  (PAPERS.md), so a least-squares line per (family, ρ) through the memory grid gives
  B_max = ⌊(budget − intercept) / slope⌋ -> ``max_batch.csv`` (basis: saved bytes on CPU, the CUDA
  peak on GPU; ``memory_from`` reuses a memory.csv instead of measuring again). The 1-minute load
  average is recorded with the timings (``load_avg_1m``): on a shared machine it says how noisy
  they are.
* ``frontier`` (issue 15): exact, per-layer torch checkpoint, Revolve over the encoder layers
  (``slots``), uniform sketches, rows plans at the bytes of ``frontier_ratio``, checkpointing
  with rows at that ratio, and gradient accumulation in m micro-batches (``accumulation``; alone,
  with torch checkpoint, with rows and with the plan), on one model and minibatch: peak live
  activation bytes over a whole step, forward-end saved bytes, interleaved step time (ratios to
  exact) and the added gradient variance by scope on held-out minibatches -> ``frontier.csv``, the plans, ``config.json``
  (module docstring of ``frontier_study``).

Family "exact" has ratio 1.0 (and scope "none"). The ``cpu`` preset is the grid run for the
committed results; the ``gpu`` preset is paper 1's scale (RoBERTa-base on GLUE CoLA; needs
``--data-dir`` with GLUE files and a local or downloadable roberta-base). Conversion scopes
(``CONVERSION_SCOPES``): ``all`` linears, or the ``encoder``'s only (pooler and classifier exact).

NOTE [accuracy tables / resume]: the study writes into ``<out>/.accuracy.staging/``, which
replaces ``<out>/accuracy`` only once every run has finished (NOTE [staged results] in
:mod:`varstudy.io`; every study does so): a study that fails or is killed leaves a finished
folder byte for byte. The tables are rewritten (atomically) after every finished run,
``runs.csv`` last: a run counts once its row is there. ``resume`` (``--resume``) continues the
staging folder an interrupted study left, else a copy of the finished folder, keeps the runs
of ``runs.csv`` (keys family, ratio, scope, seed; tables written before scopes existed get scope
"none" for exact, "all" otherwise), drops steps/evals rows of runs missing from it, and runs only
the missing (family, ratio, scope, seed), so a resumed study may also add families, ratios,
scopes or seeds; ``config.json`` then records the study's options and what the tables hold
(``in_tables``, ``seeds_in_tables``). Each fine-tuning run writes no folder of its own.

NOTE [threads]: ``num_threads`` (``--num-threads``) sets torch's CPU threads (none: torch's
default, the machine's cores); ``config.json`` records the count in effect as ``threads``, and
``runs.csv`` per run as ``num_threads``.

Command line (NOTE [one convention] in :mod:`varstudy.cli`): the study, then one option per
field of :class:`StudyConfig`, ``--preset cpu|gpu`` (per study), ``--config
<out>/<study>/config.json``, ``--debug``; ``--epochs`` alone clears ``max_steps``. The inputs
(data, model, batch sizes) are loaded and checked before ``<out>/<study>`` changes, and a study
holds that folder's lock (NOTE [one run per folder] in :mod:`varstudy.io`).

Modules: ``config`` (StudyConfig, PRESETS, CONVERSION_SCOPES, ``check``, the grids, the
fine-tuning config of a run; light), ``inputs`` (data, model, conversion), ``accuracy_study``,
``memory_study``, ``throughput_study`` (with ``max_batch``), ``frontier_study``, ``command`` (the
command line).
"""

from __future__ import annotations

from varstudy.lazy import exports

_API = {
    "StudyConfig": "config", "PRESETS": "config", "STUDIES": "config",
    "CONVERSION_SCOPES": "config", "KEYS": "config", "RUN_KEYS": "config", "preset": "config",
    "check": "config", "grid": "config", "accuracy_grid": "config",
    "finetune_config": "config", "write_config": "config", "VarstudyError": "config",
    "check_inputs": "inputs", "train_data": "inputs", "model_and_batches": "inputs",
    "convert": "inputs",
    "accuracy": "accuracy_study", "summarize": "accuracy_study", "load_partial": "accuracy_study",
    "save_tables": "accuracy_study",
    "memory": "memory_study", "peak_step": "memory_study",
    "throughput": "throughput_study", "max_batch": "throughput_study",
    "frontier": "frontier_study", "setups": "frontier_study",
    "FRONTIER_COLUMNS": "frontier_study",
    "main": "command", "parse": "command", "parser": "command", "run": "command",
}
__all__ = sorted(_API)

__getattr__, __dir__ = exports(__name__, _API)
