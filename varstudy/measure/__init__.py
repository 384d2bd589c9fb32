"""Measurement engine: ``python -m varstudy.measure``; API ``run(MeasureConfig()) -> DataFrame``,
``measure_now(model, batches, families, ratios) -> DataFrame`` for a model in the user's loop.

For each measured training step and each of ``num_batches`` random minibatches, it captures
(X, Y) of every selected ``nn.Linear`` of the exact model (:mod:`varstudy.randomized.capture`), then per
weight tensor and per (family, ratio): the sketch variance given the batch (closed form, and
Monte Carlo on a chosen subset), the minibatch sampling variance (per-example Gram trick,
finite-population correction with N = dataset size), their ratio, and the seed paper's numbers
(:mod:`varstudy.randomized.variance`). Conventions: a sample is one example, loss = mean over the batch,
variance = E‖ĝ − Eĝ‖²_F of a weight tensor, model totals = sums over layers (ARCHITECTURE.md).

NOTE [determinism / distribution]: minibatch b at training step t draws its B example indices
from ``derive_seed(seed, t, b, 0)`` (uniform without replacement) and its Monte Carlo sketch
seeds from ``derive_seed(seed, t, b, 1, layer, family, ratio)``; so rows of a batch depend only
on (config, t, b). Dropout (``dropout=True``) draws from torch's global RNG, seeded per
batch with ``derive_seed(seed, t, b, 3)`` and per training segment with ``derive_seed(seed,
start, 2**32, 3)``. A distributed run can give batch b to rank b % world; a resumed run can skip
batches already in ``chunks/step_<t>.csv`` (one chunk per measured step, appended per batch,
assembled into the final tables at the end). Training batches use ``derive_seed(seed, t, 2**32,
0)``; the classifier head is initialised from ``seed``.

NOTE [durable results / resume]: a run writes into ``out/.measure.staging/`` and its files move
into ``out`` only once it has finished (NOTE [staged results] in :mod:`varstudy.io`): a run that
fails or is killed at any point leaves a finished ``out`` byte for byte, and its partial state
in the staging folder. Every finished batch is appended to its step's chunk with one
write + fsync; ``env.json`` is published last, so its presence marks a complete run. Nothing
changes before the model, the data and the layer patterns are loaded and checked, and only
while the run holds the folder's lock (NOTE [one run per folder] in :mod:`varstudy.io`); only
the run's own files are replaced (other files in ``out`` stay). ``resume=True`` (``--resume``)
continues the staging folder (else a copy of the finished run's), refuses a config.json that
differs (except ``progress``/``resume``/``out``), drops from the chunks a trailing partial line
and every batch that is incomplete or holds a row that fails :func:`finished_rows`' checks (a
line cut or edited in the middle, a batch appended twice), and measures only the missing
batches. Training over
steps is resumed from a checkpoint, not replayed: after training up to each measured step
t > 0, the model and AdamW state are saved atomically to ``state/train.pt`` (one file, replaced;
the run measures step t only after that), and resume loads it; steps before t are complete by
then. The tables of a resumed run equal those of an uninterrupted one (bit for bit on CPU).

Output directory ``out`` (default ``results/measure/default``): ``layers.csv``, ``summary.csv``,
``scopes.csv``, ``config.json`` (resolved config), ``env.json`` (versions, device, threads, wall
time), ``chunks/``, ``state/`` (training checkpoint). Schema (variances in squared gradient units, i.e. (loss/weight)²):

layers.csv, one row per (train_step, batch, layer, family, ratio):
  train_step (optimizer updates done), batch (index b), layer (module name, or "model" for the
  sum over layers), layer_kind (roles.layer_kind; "model"), layer_index (encoder layer; NaN),
  d_in, d_out, batch_size (B), n_rows (token rows n the sketch sees: B·L, or B for pooler and
  classifier; with ``padding="dynamic"`` L is the minibatch's longest example), family, ratio (ρ), k (sketch rows), grad_sq_norm (‖g_B‖²), var_sampling
  (Var[g_B] estimate, FPC), var_sketch (closed form E‖Ĝ−G‖² given the batch), var_sketch_mc,
  var_sketch_mc_se (Monte Carlo mean and SE; NaN when not drawn), mc_draws (0 when not drawn),
  alpha (a/s), paper_ratio ((s−a)/(n·p−a)), paper_bound ((α+1)/α), paper_ratio_plotted,
  paper_bound_plotted (1+α, the inverted-α figure), ratio_sketch_sampling (var_sketch /
  var_sampling); live_rows (the rows rows-live and rows-adaptive draw among: real, and at
  position 0 in a first-token layer; NA for the other families), first_token (1 when the
  one-time probe, NOTE [first-token layers] in varstudy.randomized.support, found the layer
  first-token only, else 0; NA when no such family was measured, so the probe did not run),
  var_sketch_one_row (rows-live / rows-adaptive: the variance with one sampled row, the
  constant ``python -m varstudy.plan`` models their variance in k from, also where the layer
  stores its rows exactly; NaN for the others). Model rows: d_in, d_out, n_rows, k NaN; variances summed; alpha = Σa/Σs,
  paper_ratio = Σ(s−a)/Σ(n·p−a); var_sketch_mc only when every layer was drawn.
summary.csv, one row per (train_step, layer incl. "model", family, ratio):
  train_step, layer, layer_kind, layer_index, family, ratio, k, n_batches,
  var_sketch_{mean,ci_low,ci_high}, var_sampling_{mean,ci_low,ci_high}, var_total
  (= var_sketch_mean + var_sampling_mean, law of total variance), ratio_{mean,ci_low,ci_high}
  (of the per-batch ratio_sketch_sampling), var_sketch_mc_mean (over batches with MC),
  var_sketch_mc_se (Monte Carlo SE of that mean). CIs: t-intervals over batches at ``level``.
scopes.csv, one row per (train_step, family, ratio, scope in encoder, head, all):
  n_layers, n_batches, var_sketch_{mean,ci_low,ci_high} and var_sampling_{...} (per-batch sums
  over the scope's layers), ratio_{mean,ci_low,ci_high} (per-batch Σ sketch / Σ sampling: the
  absolute view), layer_ratio_{min,q1,median,q3,max} (over the scope's layers of each layer's
  var_sketch_mean / var_sampling_mean: the relative view). NOTE [scopes] in varstudy.roles.

Modules: ``config`` (MeasureConfig, schema; light), ``engine`` (one minibatch -> rows,
``measure_now``), ``chunks`` (what a finished batch is), ``runner`` (``run``), ``tables``
(summary.csv, scopes.csv, the report), ``command`` (the command line).
"""

from __future__ import annotations

from varstudy.lazy import exports

_API = {
    "MeasureConfig": "config", "LAYER_COLUMNS": "config", "SUMMARY_COLUMNS": "config",
    "SCOPE_COLUMNS": "config", "INT_COLUMNS": "config", "TRAIN_BATCH": "config",
    "batch_indices": "engine", "layer_rows": "engine", "model_rows": "engine",
    "measure_batch": "engine", "measure_now": "engine", "exact_view": "engine", "typed": "engine",
    "rows_per_batch": "chunks", "finished_rows": "chunks",
    "run": "runner", "train": "runner", "prepare": "runner", "assemble": "runner",
    "mc_layer_names": "runner",
    "summarize": "tables", "scope_summary": "tables", "format_summary": "tables",
    "main": "command", "parse": "command",
}
__all__ = sorted(_API)

__getattr__, __dir__ = exports(__name__, _API)
