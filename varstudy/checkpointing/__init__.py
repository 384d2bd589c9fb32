"""Exact backprop through long sequences in bounded fast memory.

API (``from varstudy.checkpointing import ...``; names load lazily, so importing the package
imports no torch)::

    ys, final = checkpointed_scan(step_fn, state0, inputs, strategy="multistage", slots=4,
                                  tier="host")          # step_fn(state, x_t) -> (state, y_t)
    loss(ys, final).backward()                          # the gradients of plain autograd
    out = checkpointed_sequential(blocks, x, strategy="revolve", slots=3)
    with checkpoint_encoder(model, strategy="revolve", slots=2):   # a BERT/RoBERTa/MPNet model
        model(**batch).loss.backward()                             # plain autograd's gradients

Strategies (``STRATEGIES``): ``store_all`` (plain autograd, the reference), ``revolve`` (binomial
Revolve over all N steps with s fast slots) and ``multistage`` (every I steps a state goes to a
slow tier asynchronously during the forward pass; backward reverses the intervals last to first,
prefetching the previous interval's start while running Revolve(I, s) inside the current one).

Tiers: the *fast* tier is device memory (:class:`FastTier`: Revolve's slots, the live state);
the *slow* tiers (registry ``TIERS``, :func:`make_tier`) are :class:`HostTier` (a preallocated
host pool, pinned and filled on a side CUDA stream on GPU) and :class:`DiskTier` (a private
directory, removed afterwards, also on error). Slow tiers write and read on one worker thread
with a bounded queue, time out instead of hanging, and raise a failed transfer in the caller.
:class:`MemoryMeter` counts fast-tier bytes: held states, in-flight transfers and (inside
``track_saved``) autograd's saved tensors.

Hugging Face encoders (:mod:`~varstudy.checkpointing.encoder`): ``checkpoint_encoder`` runs the
layer stack of a BERT/RoBERTa/MPNet model through ``checkpointed_sequential`` (``revolve``,
``multistage``) or ``torch.utils.checkpoint`` per layer (``torch``) while its block runs; the
encoder's own forward still builds the mask and MPNet's position bias, dropout is replayed, and
randomized layers draw the sketches of a plain step (NOTE [layer stack], NOTE [sketch seeds]).

Schedules (:mod:`~varstudy.checkpointing.schedules`): Revolve's op list comes from the
``checkpoint-schedules`` package (its forward count equals the proven optimum F(n, s)); the
multistage plan adds the interval arithmetic. Cost model, in units of one forward step t_f
(ARCHITECTURE.md): beta(s, t) = C(s + t, s); Revolve advances F(n, s) = t n - beta(s + 1, t - 1)
for beta(s, t - 1) < n <= beta(s, t); interval I = ceil(T_w / t_f) for a write time T_w, so a
write finishes while the next interval computes; time per step (``model_cost_per_step``):
store_all 1 + t_b, Revolve F(n, s)/n + t_b, multistage 1 + (sum of the intervals' F(I, s), less
the last interval's first sweep)/n + t_b, flat in N.

NOTEs cited from the code: [design] (replay: one autograd Function), [parameters] (closures:
tensors a step takes from outside, non-leaf ones included), [RNG] (rng: exact replay under
dropout), [async tiers] (storage), [device ops] (device: the injectable CUDA seam), [layer
stack] and [sketch seeds] (encoder).

Modules: ``sequence`` (public API: ScanConfig, ScanStats, checkpointed_scan,
checkpointed_sequential), ``replay`` (the Function, forward and reverse sweeps), ``closures``,
``rng``, ``schedules``, ``storage`` (tiers), ``meter``, ``device``, ``encoder``, ``workloads`` (IMDB
GRU/LSTM classifier, 2-D wave equation, tanh RNN). Benchmark: ``python -m varstudy.bench
checkpoint``.
"""

from __future__ import annotations

from varstudy.lazy import exports

_API = {
    "checkpointed_scan": "sequence", "checkpointed_sequential": "sequence",
    "ScanConfig": "sequence", "ScanStats": "sequence",
    "FastTier": "storage", "HostTier": "storage", "DiskTier": "storage", "make_tier": "storage",
    "TIERS": "storage",
    "MemoryMeter": "meter", "state_bytes": "meter",
    "CudaOps": "device", "device_ops": "device",
    "STRATEGIES": "schedules", "Op": "schedules", "beta": "schedules",
    "revolve_ops": "schedules", "revolve_advances": "schedules",
    "revolve_repetition": "schedules", "count_advances": "schedules",
    "choose_interval": "schedules", "intervals": "schedules",
    "model_cost_per_step": "schedules",
    "checkpoint_encoder": "encoder", "find_encoder": "encoder", "EncoderStack": "encoder",
    "ENCODER_STRATEGIES": "encoder",
    "RNNClassifier": "workloads", "WaveStepper": "workloads", "tanh_rnn": "workloads",
    "load_imdb": "workloads",
}
__all__ = sorted(_API)

__getattr__, __dir__ = exports(__name__, _API)
