"""varstudy: study memory-efficient backpropagation, measured and reproducible.

Two independent systems and the commands that drive them:

* ``varstudy.randomized``: randomized backprop through linear layers. ``sketches`` (families,
  closed-form variances), ``layers`` (``RandomizedLinear``, ``randomize``), ``capture`` (X, Y of
  every linear layer), ``variance`` (estimators), ``memory`` (saved-bytes accounting), ``plan``
  (variance-budgeted per-layer ratios), ``online`` (re-planning them during training).
* ``varstudy.checkpointing``: exact backprop through long sequences in bounded memory.
  ``schedules`` (Revolve), ``storage`` (device, host and disk tiers, asynchronous), ``sequence``
  (``checkpointed_scan``, ``checkpointed_sequential``), ``workloads``.
* Shared: ``models`` (shipped MiniLM, MPNet-base, tiny configs, local Hugging Face folders),
  ``data`` (shipped movie reviews, synthetic, GLUE files), ``metrics``, ``io`` (durable result
  files), ``distributed``, ``cli`` (one command-line convention), ``errors``.
* Commands (``python -m varstudy.<command>``): ``measure`` (the variance decomposition engine),
  ``finetune``, ``study``, ``plan``, ``bench``; ``varstudy.hf`` holds the Trainer callback.

Data flows one way: model + data -> capture (X, Y per layer) -> estimators -> tidy DataFrame ->
``results/*.csv`` -> ``analysis`` -> figures/. Nothing in varstudy imports ``analysis``.

The public names below are imported on first use, so ``import varstudy`` (and every command's
``--help``) is fast and loads torch only when a name that needs it is touched.
"""

from __future__ import annotations

from varstudy.lazy import exports

__version__ = "0.2.0"

_API = {
    "VarstudyError": "varstudy.errors",
    "RandomizedLinear": "varstudy.randomized.layers",
    "randomize": "varstudy.randomized.layers",
    "derandomize": "varstudy.randomized.layers",
    "reseed": "varstudy.randomized.layers",
    "SKETCHES": "varstudy.randomized.sketches",
    "get_sketch": "varstudy.randomized.sketches",
    "saved_bytes": "varstudy.randomized.memory",
    "plan_budget": "varstudy.randomized.plan",
    "plan_target": "varstudy.randomized.plan",
    "OnlinePlanner": "varstudy.randomized.online",
    "checkpointed_scan": "varstudy.checkpointing.sequence",
    "checkpointed_sequential": "varstudy.checkpointing.sequence",
    "ScanConfig": "varstudy.checkpointing.sequence",
    "load_model": "varstudy.models",
    "load_dataset": "varstudy.data",
    "MeasureConfig": "varstudy.measure",
    "measure_now": "varstudy.measure",
}

__all__ = sorted([*_API, "__version__"])

__getattr__, _dir = exports(__name__, _API)


def __dir__() -> list[str]:
    return __all__
