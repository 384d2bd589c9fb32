"""The engine: one minibatch of the exact model -> its layers.csv rows; ``measure_now``.

Schema and conventions: :mod:`varstudy.measure` (package docstring).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import pandas as pd
import torch

from varstudy.batching import pad_batches
from varstudy.errors import VarstudyError
from varstudy.measure.config import INT_COLUMNS, LAYER_COLUMNS, MeasureConfig
from varstudy.measure.informed import (STRUCTURE_FAMILIES, WARM_BATCHES, Informed, cache_norms,
                                       limit_columns, live_rows, profiles, structured, wanted,
                                       wtacrs_sketch)
from varstudy.randomized.support import first_token_layers
from varstudy.roles import layer_index, layer_kind
from varstudy.randomized import variance as V
from varstudy.names import BASE_SKETCH_NAMES
from varstudy.randomized.capture import capture, select_layers
from varstudy.randomized.layers import derive_seed
from varstudy.randomized.sketches import SKETCHES, rows_for


WARM_TAG = 5  # derive_seed key of rows-adaptive's warm batches


def batch_indices(num_examples: int, cfg: MeasureConfig, step: int, b: int) -> torch.Tensor:
    """The B example indices of batch ``b`` at step ``step`` (NOTE [determinism / distribution])."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, b, 0))
    return torch.randperm(num_examples, generator=gen)[:cfg.batch_size]


def layer_rows(cfg: MeasureConfig, name: str, pos: int, x, y, grad, population: float,
               mc: bool, step: int, b: int, mask=None, informed: Informed | None = None
               ) -> list[dict]:
    """Rows of one layer of one batch: every (family, ratio). x (B, L, d_in) or (B, d_in);
    ``mask`` (B, L), the attention mask, gives the real rows of the row-real families;
    ``informed``: what rows-live and rows-adaptive need (varstudy.measure.informed)."""
    x, y, grad = upcast(x, y, grad)
    informed = informed or Informed()
    m = V.moments(x, y, grad)
    row_mask = real_row_mask(cfg, name, x, y, mask)
    if row_mask is not None:
        m = dataclasses.replace(m, real=int(row_mask.sum()))
    sampling = V.sampling_from_norms(V.per_example_sq_norms(x, y), m.a, population, m.a_err)
    base = dict(train_step=step, batch=b, layer=name, layer_kind=layer_kind(name),
                layer_index=layer_index(name), d_in=x.shape[-1], d_out=y.shape[-1],
                batch_size=x.shape[0], n_rows=m.n, grad_sq_norm=m.a,
                var_sampling=sampling.var_batch, _s=m.s, _a=m.a, _q=m.n * m.p - m.a)
    rows = []
    planned = planned_ratios(cfg.plan).get(name, "exact") if cfg.plan else None
    ks = {ratio: rows_for(m.n, ratio if planned is None else planned if planned != "exact"
                          else 1.0, cfg.min_rows) for ratio in cfg.ratios}
    limit = limit_columns(x, y, grad, ks.values())
    probed = wanted(cfg.families)
    live = live_rows(name, x, y, mask, informed) if probed else None
    for ratio, k in ks.items():
        paper = V.paper_quantities(m, k)
        for fam in cfg.families:
            stored, mask_mc, sketch, one_row = k, row_mask, fam, math.nan
            if planned == "exact":
                var = 0.0
            elif fam in STRUCTURE_FAMILIES:
                var, stored, sketch, one_row = structured(fam, name, m, k, x, y, live, informed)
                mask_mc = live
            elif fam == "wta-crs":
                sketch = wtacrs_sketch(cfg.wtacrs_cache, x, y, informed.cache_norms.get(name))
                var = float(sketch.variance(x.reshape(-1, x.shape[-1]),
                                            y.reshape(-1, y.shape[-1]), k))
            else:
                var = V.closed_form(fam, m, k)
            mc_mean = mc_se = math.nan
            if mc and cfg.mc_draws > 0 and planned != "exact":
                seed = derive_seed(cfg.seed, step, b, 1, pos, V.family_key(fam),
                                   round(ratio * 1e6))
                mc_mean, mc_se = V.mc_sketch_variance(sketch, x, y, stored, cfg.mc_draws, seed,
                                                      mask=mask_mc)
            rows.append(dict(base, family=fam, ratio=ratio, k=stored, var_sketch=var,
                             var_sketch_mc=mc_mean, var_sketch_mc_se=mc_se,
                             mc_draws=cfg.mc_draws if mc else 0, **paper,
                             ratio_sketch_sampling=_div(var, sampling.var_batch), **limit[k],
                             live_rows=int(live.sum()) if fam in STRUCTURE_FAMILIES else None,
                             first_token=int(name in informed.first_token) if probed else None,
                             var_sketch_one_row=one_row))
    return rows


def upcast(x, y, grad):
    """NOTE [low-precision capture]: X and Y of a float16/bfloat16 model are cast to float32
    (exactly: float32 holds every such value) before any statistic, and the model's own weight
    gradient, rounded to 8 or 11 significant bits, is dropped: a = ‖YᵀX‖² is recomputed from X
    and Y in float64 (varstudy.randomized.variance.moments). Every moment of a layer then comes
    from one (X, Y), so the differences of large terms in the closed forms and in the sampling
    variance cancel as they do in exact arithmetic (the model's gradient made them negative,
    NOTE [never negative]). The statistics are those of the low-precision model's X and Y;
    the Monte Carlo sketches run in float32."""
    if x.dtype.itemsize >= 4 and y.dtype.itemsize >= 4:
        return x, y, grad
    return x.float(), y.float(), None


def real_row_mask(cfg: MeasureConfig, name: str, x, y, mask):
    """The (n,) real-row mask of a token layer when a row-real family is measured, else None.

    NOTE [real rows] (sketches): the row-real families are unbiased only when the padding rows
    carry no gradient; that is checked here (exactly zero Y on every padding row)."""
    if mask is None or x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]) or not any(
            getattr(SKETCHES[f], "uses_mask", False) for f in cfg.families):
        return None
    rows = mask.reshape(-1).to(x.device)
    pad = y.reshape(-1, y.shape[-1])[rows == 0]
    if pad.numel() and bool(pad.abs().max() > 0):
        raise VarstudyError(f"layer {name} has a non-zero output gradient on padding rows, so "
                            "the row-real families (rows-real, rows-wor-real) would be biased; "
                            "valid choices: the other families, or a model whose loss ignores "
                            "padding (masked attention, [CLS] pooling)")
    return rows


@functools.lru_cache(maxsize=4)
def planned_ratios(plan: str) -> dict:
    """{layer: ρ or "exact"} of a plan.json (NOTE [integer rows] in varstudy.randomized.plan:
    at a minibatch of n rows a planned layer keeps k = rows_for(n, ρ) rows)."""
    from varstudy.randomized.plan import load_plan

    return load_plan(plan)[1]


def model_rows(rows: list[dict]) -> list[dict]:
    """Model totals (sums over layers) per (family, ratio) of one batch's layer rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["ratio"]), []).append(r)
    out = []
    for (fam, ratio), g in groups.items():
        tot = {c: sum(r[c] for r in g) for c in
               ("grad_sq_norm", "var_sampling", "var_sketch", "_s", "_a", "_q", "var_limit",
                "var_limit_split", "rows_y_zero")}
        drawn = all(r["mc_draws"] > 0 for r in g)
        alpha = _div(tot["_a"], tot["_s"])
        paper_ratio = _div(tot["_s"] - tot["_a"], tot["_q"])
        out.append(dict(
            train_step=g[0]["train_step"], batch=g[0]["batch"], layer="model",
            layer_kind="model", layer_index=None, d_in=None, d_out=None,
            batch_size=g[0]["batch_size"], n_rows=None, family=fam, ratio=ratio, k=None,
            grad_sq_norm=tot["grad_sq_norm"], var_sampling=tot["var_sampling"],
            var_sketch=tot["var_sketch"],
            var_sketch_mc=sum(r["var_sketch_mc"] for r in g) if drawn else math.nan,
            var_sketch_mc_se=(math.sqrt(sum(r["var_sketch_mc_se"] ** 2 for r in g)) if drawn
                              else math.nan),
            mc_draws=min(r["mc_draws"] for r in g), alpha=alpha, paper_ratio=paper_ratio,
            paper_bound=_div(alpha + 1, alpha), paper_ratio_plotted=paper_ratio,
            paper_bound_plotted=1 + alpha,
            ratio_sketch_sampling=_div(tot["var_sketch"], tot["var_sampling"]),
            var_limit=tot["var_limit"], var_limit_split=tot["var_limit_split"],
            rows_y_zero=tot["rows_y_zero"]))
    return out


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b and not math.isnan(b) else math.nan


def measure_batch(model, encoded: dict, cfg: MeasureConfig, names: list[str],
                  mc_names: set[str], step: int, b: int, population: float,
                  informed: Informed | None = None, cache_model=None) -> pd.DataFrame:
    """Capture batch ``b`` of step ``step`` and return its layers.csv rows; ``cache_model``
    (``--wtacrs-cache-model``) fills wta-crs's cache from its capture of the same batch."""
    cap, mask = capture_batch(model, encoded, cfg, names, step, b)
    if cache_model is not None:
        stale, _ = capture_batch(cache_model, encoded, cfg, names, step, b)
        informed = dataclasses.replace(informed or Informed(),
                                       cache_norms=cache_norms(stale, names))
    mc = {n for n in mc_names if b < cfg.mc_batches}
    return rows_of(cap, cfg, names, mc, step, b, population, mask, informed)


def capture_batch(model, encoded: dict, cfg: MeasureConfig, names: list[str], step: int, b: int,
                  tag: int = 0):
    """(Captured, attention mask or None) of batch ``b`` at ``step``; ``tag`` 0 draws the
    measured batches, another tag an independent set (the warm batches of rows-adaptive)."""
    if tag:
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, b, tag))
        idx = torch.randperm(len(encoded["labels"]), generator=gen)[:cfg.batch_size]
    else:
        idx = batch_indices(len(encoded["labels"]), cfg, step, b)
    batch = next(iter(pad_batches(iter([{k: v[idx] for k, v in encoded.items()}]), cfg.padding)))
    batch = {k: v.to(cfg.device) for k, v in batch.items()}
    with _seeded_rng(cfg, derive_seed(cfg.seed, step, b, 3 + tag)):  # dropout, if kept
        cap = capture(model, batch, names=names)
    return cap, batch.get("attention_mask")


def informed_for(model, encoded: dict, cfg: MeasureConfig, names: list[str], step: int,
                 first_token) -> Informed | None:
    """What rows-live and rows-adaptive need at ``step`` (NOTE [adaptive profile in a
    measurement] in varstudy.measure.informed): the probed first-token layers and, for
    rows-adaptive, the profile of WARM_BATCHES minibatches drawn apart from the measured ones."""
    if not wanted(cfg.families):
        return None
    informed = Informed(frozenset(first_token))
    if "rows-adaptive" in cfg.families:  # a plan of rows-adaptive: its profile as well
        warm = [capture_batch(model, encoded, cfg, names, step, w, tag=WARM_TAG)
                for w in range(WARM_BATCHES)]
        informed.profiles = profiles([c for c, _ in warm], names, [m for _, m in warm],
                                     informed)
    return informed


def rows_of(cap, cfg: MeasureConfig, names: list[str], mc_names: set[str], step: int, b: int,
            population: float, mask=None, informed: Informed | None = None) -> pd.DataFrame:
    """layers.csv rows of one captured minibatch: every selected layer, then the model totals."""
    if cfg.plan:  # NOTE [a plan names exactly its layers] (varstudy.randomized.planfile)
        from varstudy.randomized.planfile import check_plan_layers

        check_plan_layers(planned_ratios(cfg.plan), names, "the measured model")
    rows = []
    for pos, name in enumerate(names):
        x, y = cap.layers[name]
        rows += layer_rows(cfg, name, pos, x, y, cap.grads[name], population, name in mc_names,
                           step, b, mask, informed)
    return typed(pd.DataFrame(rows + model_rows(rows)))


def measure_now(model, batches, families=None, ratios=(0.05, 0.1, 0.2, 0.5), *,
                population: float = math.inf, layers: str | None = None, min_rows: int = 1,
                train_step: int = 0, plan: str | None = None) -> pd.DataFrame:
    """Decompose the gradient variance of ``model`` as it is now, on ``batches``.

    For a plain PyTorch loop (and the Trainer callback, :mod:`varstudy.hf`): each batch (a dict of
    tensors (B, ...) with ``labels``; moved to the model's device) is captured with the exact
    gradients, dropout off, and turned into layers.csv rows (schema in :mod:`varstudy.measure`)
    for every selected linear layer and (family, ratio), plus the "model" totals; ``batch`` is
    the position in ``batches`` and ``train_step`` the given step. ``population`` is the N of the
    finite-population correction (inf: none). A randomized model is measured through its exact
    layers (NOTE [exact view]); the model's modules, mode, gradients and RNG states are as before.

    ``plan`` (a plan.json path of ``python -m varstudy.plan``): as ``measure --plan``, the plan's
    family with each layer's planned rows (its "exact" layers: no sketch variance); it must name
    exactly the selected layers (NOTE [a plan names exactly its layers]); ``families`` and
    ``ratios`` are then the plan's family and nominal ratio. The file is read afresh at every
    call. X and Y of a low-precision model: NOTE [low-precision capture].
    """
    if plan is not None:
        from varstudy.randomized.plan import load_plan

        planned_ratios.cache_clear()  # the path may name a plan rewritten since the last read
        family, _, nominal = load_plan(plan)
        families, ratios = (family,), (nominal or 1.0,)
    cfg = MeasureConfig(families=tuple(families or BASE_SKETCH_NAMES), ratios=tuple(ratios),
                        min_rows=min_rows, mc_draws=0, layers=layers, out="-",
                        plan=None if plan is None else str(plan))
    device = next(model.parameters()).device
    frames = []
    with exact_view(model):
        names = select_layers(model, layers)
        if not wanted(cfg.families):
            for b, batch in enumerate(batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                frames.append(rows_of(capture(model, batch, names=names), cfg, names, set(),
                                      train_step, b, population, batch.get("attention_mask")))
        else:  # NOTE [adaptive profile in a measurement]: the other batches' (leave one out)
            first = frozenset(first_token_layers(model))
            caps = []
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                caps.append((capture(model, batch, names=names), batch.get("attention_mask")))
            for b, (cap, mask) in enumerate(caps):
                informed = Informed(first)
                rest = [c for i, c in enumerate(caps) if i != b]
                informed.profiles = profiles([c for c, _ in rest], names,
                                             [m for _, m in rest], informed)
                frames.append(rows_of(cap, cfg, names, set(), train_step, b, population, mask,
                                      informed))
    if not frames:
        raise VarstudyError("measure_now got no batches; valid choices: one or more minibatches "
                            "(dicts of tensors with 'labels')")
    return typed(pd.concat(frames, ignore_index=True))


@contextlib.contextmanager
def exact_view(model):
    """NOTE [exact view]: within the block, ``model`` is exact and in eval mode (no dropout);
    every RandomizedLinear is swapped for an nn.Linear sharing its parameters and put back
    afterwards (same objects, call counters untouched), the train/eval flags are restored, and
    the CPU and CUDA RNG states are forked, so the training run goes on as if never measured."""
    from torch import nn

    from varstudy.randomized.layers import RandomizedLinear, _swap

    swapped = {n: m for n, m in model.named_modules() if isinstance(m, RandomizedLinear)}
    modes = {m: m.training for m in model.modules()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            for name, module in swapped.items():
                plain = nn.Linear.__new__(nn.Linear)
                nn.Module.__init__(plain)
                plain.in_features, plain.out_features = module.in_features, module.out_features
                plain.weight, plain.bias = module.weight, module.bias
                _swap(model, name, plain)
            model.eval()
            yield model
        finally:
            for name, module in swapped.items():
                _swap(model, name, module)
            for m, flag in modes.items():
                m.training = flag


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """layers.csv columns in schema order, integer columns as nullable Int64."""
    frame = frame[list(LAYER_COLUMNS)].copy()
    for c in INT_COLUMNS:
        frame[c] = frame[c].astype("Int64")
    return frame


def _seeded_rng(cfg: MeasureConfig, seed: int):
    """torch's global RNG (read by dropout only) forked and seeded; restored afterwards."""
    if not cfg.dropout:
        return contextlib.nullcontext()
    cuda = [torch.device(cfg.device).index or 0] if cfg.device.startswith("cuda") else []

    @contextlib.contextmanager
    def forked():
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            yield
    return forked()
