"""Benchmark: ``python -m varstudy.bench measure`` — cost of one per-layer variance decomposition.

Three costs on the same model and minibatch, measured side by side (interleaved repeats,
median; one warm-up each):

* ``step``: one exact training step (forward, backward, AdamW update).
* ``decomposition``: what the engine does per minibatch, ``measure.measure_batch`` with no
  Monte Carlo: capture (X, Y) of every linear (forward + backward with hooks), per-example
  Gram norms, sampling variance, closed-form sketch variances for every family × ratio,
  paper quantities, model totals, DataFrame rows.
* ``naive``: Monte Carlo that re-runs forward + backward of the randomized model per sketch
  draw, ``naive_draws`` times (spread over the repeat rounds), for one (family, ratio); the
  per-draw cost is their median, and each draw's model-total error ‖ĝ − g‖² (g from one
  exact backward) gives the coefficient of variation cv. Draws needed for a relative CI half-width h at level ℓ:
  n = ⌈(z_ℓ · cv / h)²⌉. Naive cost of one (family, ratio) = t_exact + n · t_draw, of the grid
  = |families|·|ratios| times the draws (cv assumed equal across the grid). cv is large
  because the model total is dominated by the pooler and classifier (summary.csv), whose
  n = B rows leave k = 1-8 sketch rows. The closed form has no
  Monte Carlo error, so "equal CI width" favours naive MC; the sampling variance, which the
  decomposition also returns, is not charged to naive MC either.
Writes ``results/bench/measure.csv`` (quantity, value, unit) and ``measure.json`` (config).

NOTE [resume]: each finished round's raw times and errors are appended (fsynced) to
``measure.parts.csv`` (round, kind, value); ``--resume`` keeps them and runs the missing rounds
(after a fresh warm-up round); the final tables are written atomically and the parts removed.
A resumed run's medians mix timings from two processes, so they differ from an uninterrupted
run's (as any two runs do); the naive-draw errors are identical (seeded per draw).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from scipy.stats import norm

from varstudy import cli
from varstudy import io as vio
from varstudy.randomized.capture import mean_loss, select_layers
from varstudy.errors import VarstudyError
from varstudy.randomized.layers import derandomize, randomize, reseed
from varstudy.io import env_info
from varstudy.measure import MeasureConfig, batch_indices, measure_batch, prepare
from varstudy.randomized.sketches import SKETCHES


@dataclass(frozen=True)
class BenchConfig:
    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    batch_size: int = 16
    max_length: int = 64
    repeats: int = 5
    naive_family: str = "gaussian"
    naive_ratio: float = 0.1
    naive_draws: int = 20
    half_width: float = 0.10
    level: float = 0.95
    device: str = "auto"
    seed: int = 0
    out: str = "results/bench"
    resume: bool = False


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def setup(cfg: BenchConfig):
    """(measure config, model, encoded data, population): a bad model or data fails here."""
    mcfg = MeasureConfig(model=cfg.model, dataset=cfg.dataset, batch_size=cfg.batch_size,
                         max_length=cfg.max_length, mc_draws=0, seed=cfg.seed,
                         device=cfg.device, progress=False).resolved()
    return (mcfg, *prepare(mcfg))


def bench(cfg: BenchConfig, parts: Path | None = None, loaded=None) -> pd.DataFrame:
    """Run the three measurements; return the tidy (quantity, value, unit) table.
    ``loaded``: what :func:`setup` returns (loaded here when None)."""
    mcfg, model, encoded, population = loaded or setup(cfg)
    names = select_layers(model)
    batch = {k: v[batch_indices(len(encoded["labels"]), mcfg, 0, 0)].to(mcfg.device)
             for k, v in encoded.items()}
    weights = [model.get_submodule(n).weight for n in names]
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the model stays put

    def step():
        mean_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def decomposition():
        measure_batch(model, encoded, mcfg, names, set(), 0, 0, population)

    exact = torch.autograd.grad(mean_loss(model, batch), weights)
    per_round = math.ceil(cfg.naive_draws / cfg.repeats)
    kept = vio.read_chunk(parts) if parts is not None else None
    rows = [] if kept is None else list(kept.itertuples(index=False, name=None))
    done = {r[0] for r in rows}
    for i in range(cfg.repeats + 1):  # round 0 is warm-up; rounds interleave all costs
        if i in done:
            continue
        a, b = timed(step), timed(decomposition)
        c = timed(lambda: torch.autograd.grad(mean_loss(model, batch), weights))
        times, sq = naive_draws(model, batch, weights, exact, cfg, i * per_round,
                                per_round if i else 1)
        if i:
            new = [(i, "step", a), (i, "decomposition", b), (i, "exact_grad", c)] + \
                [(i, "naive_draw", t) for t in times] + [(i, "naive_err", e) for e in sq]
            rows += new
            if parts is not None:
                vio.append_csv(parts, pd.DataFrame(new, columns=["round", "kind", "value"]))
    rows.sort(key=lambda r: r[0])
    of = {k: [v for _, kind, v in rows if kind == k] for k in
          ("step", "decomposition", "exact_grad", "naive_draw", "naive_err")}
    med = statistics.median
    return table(cfg, mcfg, med(of["step"]), med(of["decomposition"]), med(of["exact_grad"]),
                 med(of["naive_draw"]), of["naive_err"])


def naive_draws(model, batch, weights, exact, cfg: BenchConfig, first: int, count: int):
    """``count`` forward + backward passes of the randomized model (draws first..): times and
    model-total ‖ĝ − g‖²."""
    randomize(model, cfg.naive_ratio, cfg.naive_family, seed=cfg.seed)
    times, errs = [], []
    try:
        for d in range(first, first + count):
            reseed(model, 1000 + d)
            grads = []
            times.append(timed(lambda: grads.extend(
                torch.autograd.grad(mean_loss(model, batch), weights))))
            errs.append(sum(float((g.double() - e.double()).square().sum())
                            for g, e in zip(grads, exact)))
    finally:
        derandomize(model)
    return times, errs


def table(cfg, mcfg, t_step, t_dec, t_exact, t_draw, errs) -> pd.DataFrame:
    mean, sd = statistics.fmean(errs), statistics.stdev(errs)
    cv = sd / mean
    z = norm.isf((1 - cfg.level) / 2)
    draws = math.ceil((z * cv / cfg.half_width) ** 2)
    grid = len(mcfg.families) * len(mcfg.ratios)
    naive_one = t_exact + draws * t_draw
    naive_grid = t_exact + grid * draws * t_draw
    rows = [
        ("step_time", t_step, "s"), ("decomposition_time", t_dec, "s"),
        ("decomposition_over_step", t_dec / t_step, "x"),
        ("exact_grad_time", t_exact, "s"), ("naive_draw_time", t_draw, "s"),
        ("naive_cv", cv, "1"), ("naive_var_sketch_mc", mean, "grad^2"),
        ("naive_draws_needed", draws, "draws"), ("naive_time_one_config", naive_one, "s"),
        ("grid_configs", grid, "configs"), ("naive_time_grid", naive_grid, "s"),
        ("speedup_vs_naive_one_config", naive_one / t_dec, "x"),
        ("speedup_vs_naive_grid", naive_grid / t_dec, "x"),
        ("target_decomposition_over_step_max", 3.0, "x"),
        ("target_speedup_vs_naive_min", 30.0, "x"),
        ("load_average_1min", os.getloadavg()[0], "procs"),
    ]
    return pd.DataFrame(rows, columns=["quantity", "value", "unit"])


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m varstudy.bench measure",
                        description=__doc__.split("\n")[0])
    for name, default in asdict(BenchConfig()).items():
        if isinstance(default, bool):
            parser.add_argument("--" + name, action="store_true", help="keep finished rounds "
                                "of an interrupted run in --out (NOTE [resume])")
            continue
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                            help=f"(default: {default})")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")
    return cli.guarded(lambda: _main(BenchConfig(**args)), debug=debug)


def _main(cfg: BenchConfig) -> int:
    if cfg.naive_family not in SKETCHES or cfg.naive_draws < 2 or cfg.repeats < 1:
        raise VarstudyError(f"need naive_family in {', '.join(SKETCHES)}, naive_draws >= 2, "
                            "repeats >= 1")
    if not (0 < cfg.naive_ratio <= 1 and 0 < cfg.half_width < math.inf and 0 < cfg.level < 1):
        raise VarstudyError(f"naive_ratio {cfg.naive_ratio}, half_width {cfg.half_width} or "
                            f"level {cfg.level} is out of range; valid: 0 < naive_ratio <= 1, "
                            "half_width > 0, 0 < level < 1")
    vio.require_out(cfg.out)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    out = vio.check_writable(cfg.out)
    parts, marker = out / "measure.parts.csv", out / "measure.parts.json"
    resuming = cfg.resume and marker.is_file()
    if resuming:
        vio.refuse_changed(marker, vio.read_json(marker), asdict(cfg), ("out", "resume"))
    loaded = setup(cfg)  # before the folder changes: a bad --model leaves it as it was
    with vio.output_lock(out, ".measure.lock"):  # NOTE [one run per folder] (varstudy.io)
        if not resuming:
            vio.remove(parts)
            vio.atomic_write_json(marker, asdict(cfg))
        vio.remove(out / "measure.csv", out / "measure.json")
        result = bench(cfg, parts, loaded)
        vio.atomic_write_csv(out / "measure.csv", result)
        env = env_info(MeasureConfig(device=cfg.device).resolved().device)
        vio.atomic_write_json(out / "measure.json", dict(config=asdict(cfg), env=env))
        vio.remove(parts, marker)
    print(result.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
