"""Exact checkpointing of a Hugging Face encoder's layer stack (BERT, RoBERTa, MPNet).

API::

    with checkpoint_encoder(model, strategy="revolve", slots=2):
        loss = model(**batch).loss        # input_ids (B, L), attention_mask (B, L), labels (B,)
        loss.backward()                   # the gradients of plain autograd, dropout included

Strategies (``ENCODER_STRATEGIES``): ``none`` (the model as it is), ``torch``
(``torch.utils.checkpoint`` per layer, non-reentrant: the reference), ``revolve``
(:func:`~varstudy.checkpointing.sequence.checkpointed_sequential` over the L layers with s fast
slots) and ``multistage`` (the same with every ``interval`` layers a state (B, L, H) to the slow
``tier``). The context manager replaces the encoder's ``forward`` for its duration and restores
it on exit, also on error; parameters, module names and the state_dict never change. Only the
forward pass must run inside the block: the backward may follow it (the scan and torch's
checkpoint keep what they need). Memory over the step: ``meter`` receives the checkpointed states
and :func:`varstudy.randomized.peak.peak_saved_bytes` follows the saved tensors, re-tapes
included (not those of the ``torch`` strategy's recomputation, NOTE [release] there).

NOTE [layer stack]: the encoder's own forward still runs: it builds every argument its layers
take (BERT/RoBERTa: the extended attention mask (B, 1, L, L) or None, position ids, cache
arguments; MPNet: the relative position bias (B, heads, L, L), a non-leaf tensor that the scan
finds as a parameter, NOTE [parameters] in :mod:`~varstudy.checkpointing.closures`) and returns
its usual output type. Only its loop is redirected: for one call, ``encoder.layer`` is shadowed
by a one-element list (an instance attribute, found before ``nn.Module.__getattr__`` consults
``_modules``) whose single entry applies all L layers through the chosen strategy. This relies on
what the three encoders' loops do: call layer i as ``layer(hidden_states, *args, **kwargs)`` with
the same ``args``/``kwargs`` for every i, and feed its output (a tensor for BERT/RoBERTa, a
tuple whose [0] is the hidden state for MPNet, ``ENCODERS``) to layer i + 1. Per-layer outputs
(``output_hidden_states``, ``output_attentions``) are refused: under recomputation they would be
recorded without gradient or more than once.

NOTE [sketch seeds]: a RandomizedLinear draws its sketch from ``derive_seed(seed, layer_id,
calls)`` and counts the calls that draw (grad enabled). Left alone, torch's recomputation draws
at call c + 1 while the original autograd node keeps seed c: the backward pairs S_c (regenerated
from the node's seed) with the recomputed S_{c+1}ᵀX, a wrong gradient, and the counters advance
twice per step. Revolve and multistage happen to draw right: their forward is untaped (no draw)
and each layer is re-taped once, at c. To make every strategy exact by construction, each layer
runs inside a ``_Step`` that records the counters of its RandomizedLinear modules at its
first call in the step (where plain autograd draws), rewinds them to those values before every
later call (Revolve advances, re-tapes, torch's recomputation) and afterwards sets each to the
larger of its value then and before the call. So every taped run of layer i draws the sketches
plain autograd draws, and after the step the counters are those of a plain step, whether the
first call was taped (torch) or untaped (revolve, multistage). This needs each RandomizedLinear
in one layer only: under revolve/multistage a second layer would record its start before any
draw, so a shared one is refused. Dropout masks are replayed from saved RNG states (NOTE [RNG] in
:mod:`~varstudy.checkpointing.rng`; ``torch.utils.checkpoint``'s ``preserve_rng_state``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from varstudy.checkpointing.meter import MemoryMeter
from varstudy.checkpointing.sequence import ScanConfig, ScanStats, checkpointed_sequential
from varstudy.errors import VarstudyError
from varstudy.randomized.layers import RandomizedLinear

ENCODER_STRATEGIES = ("none", "torch", "revolve", "multistage")
# model_type -> whether a layer returns a tuple (hidden state first) rather than a tensor
ENCODERS = {"bert": False, "roberta": False, "mpnet": True}
_PER_LAYER_OUTPUTS = ("output_hidden_states", "output_attentions")


@dataclass(frozen=True)
class EncoderStack:
    """Where a model's layer stack lives: ``encoder.layer`` is an nn.ModuleList of L layers."""

    name: str  # qualified name of the encoder module, e.g. "bert.encoder"
    encoder: nn.Module
    layers: nn.ModuleList
    returns_tuple: bool


def find_encoder(model: nn.Module) -> EncoderStack:
    """The encoder stack of a BERT/RoBERTa/MPNet model (a ``*ForSequenceClassification`` or its
    base model); a VarstudyError for any other model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    valid = f"valid choices: a Hugging Face model of type {', '.join(ENCODERS)}"
    if model_type not in ENCODERS:
        raise VarstudyError(f"{type(model).__name__} (model_type {model_type!r}) has no "
                            f"recognized encoder stack; {valid}")
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise VarstudyError(f"{type(model).__name__} has no encoder.layer ModuleList; {valid}")
    name = next(n for n, m in model.named_modules() if m is encoder)
    return EncoderStack(name, encoder, layers, ENCODERS[model_type])


class _Step(nn.Module):
    """Layer i of one encoder call as a (B, L, H) -> (B, L, H) module (NOTE [sketch seeds])."""

    def __init__(self, layer: nn.Module, args: tuple, kwargs: dict, returns_tuple: bool) -> None:
        super().__init__()
        self.layer, self.args, self.kwargs, self.returns_tuple = layer, args, kwargs, returns_tuple
        self.sketched = [m for m in layer.modules() if isinstance(m, RandomizedLinear)]
        self.start: list[int] | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        before = [m.calls for m in self.sketched]
        if self.start is None:
            self.start = before
        for m, c in zip(self.sketched, self.start):
            m.calls = c
        try:
            out = self.layer(hidden, *self.args, **self.kwargs)
        finally:  # also when torch's recomputation stops early by raising
            for m, c in zip(self.sketched, before):
                m.calls = max(m.calls, c)
        return out[0] if self.returns_tuple else out


class _Stack:
    """Stands in for the whole layer list during one encoder call (NOTE [layer stack])."""

    def __init__(self, stack: EncoderStack, strategy: str, config: ScanConfig | None,
                 stats: ScanStats | None, meter: MemoryMeter | None) -> None:
        self.stack, self.strategy, self.config = stack, strategy, config
        self.stats, self.meter = stats, meter

    def __call__(self, hidden: torch.Tensor, *args, **kwargs):
        _refuse_per_layer_outputs(kwargs)
        steps = [_Step(layer, args, kwargs, self.stack.returns_tuple)
                 for layer in self.stack.layers]
        if self.strategy == "torch":
            for step in steps:
                hidden = (checkpoint(step, hidden, use_reentrant=False)
                          if torch.is_grad_enabled() else step(hidden))
        else:
            self._check_unshared(steps)
            hidden = checkpointed_sequential(steps, hidden, config=self.config, stats=self.stats,
                                             meter=self.meter)
        return (hidden,) if self.stack.returns_tuple else hidden

    def _check_unshared(self, steps: list[_Step]) -> None:
        """Revolve's untaped forward draws no sketch, so a RandomizedLinear that two layers share
        would see its counter unmoved at the second layer's first call (NOTE [sketch seeds])."""
        seen: set[int] = set()
        for i, step in enumerate(steps):
            ids = {id(m) for m in step.sketched}
            if ids & seen:
                raise VarstudyError(f"layer {i} of {self.stack.name} shares a RandomizedLinear "
                                    f"with an earlier layer, whose sketch seeds {self.strategy} "
                                    "cannot replay; valid choices: strategy='torch' or 'none'")
            seen |= ids


def _refuse_per_layer_outputs(kwargs: dict) -> None:
    for key in _PER_LAYER_OUTPUTS:
        if kwargs.get(key):
            raise VarstudyError(f"{key}=True is not available under encoder checkpointing; "
                                f"valid choices: {key}=False, or strategy='none'")


def _check_model(model: nn.Module, stack: EncoderStack) -> None:
    config = getattr(model, "config", None)
    for key in _PER_LAYER_OUTPUTS:
        if getattr(config, key, False):
            raise VarstudyError(f"config.{key} is set, which encoder checkpointing cannot "
                                f"serve; valid choices: config.{key}=False, or strategy='none'")
    if any(getattr(layer, "gradient_checkpointing", False) for layer in stack.layers):
        raise VarstudyError(f"Hugging Face gradient checkpointing is enabled on {stack.name}; "
                            "valid choices: model.activation_checkpointing_disable() first, "
                            "or strategy='none'")
    if "forward" in vars(stack.encoder):
        raise VarstudyError(f"{stack.name} is already checkpointed (its forward is replaced); "
                            "valid choices: one checkpoint_encoder context per model at a time")


@contextmanager
def checkpoint_encoder(model: nn.Module, *, strategy: str = "revolve", slots: int = 2,
                       interval: int | None = None, tier: str = "host",
                       stats: ScanStats | None = None, meter: MemoryMeter | None = None,
                       **scan_kw):
    """Run ``model``'s encoder layers checkpointed while the block runs; yields its EncoderStack.

    Args: strategy: one of ``ENCODER_STRATEGIES``; slots: Revolve's fast slots s (revolve,
    multistage); interval: layers per slow-tier interval I (multistage; None: measured, ceil(T_w /
    t_f)); tier: ``host`` | ``disk`` (multistage); stats: a ScanStats that every encoder call adds
    its counts to; meter: a MemoryMeter receiving the fast-tier bytes (checkpointed states
    (B, L, H) and their RNG states); scan_kw: further :class:`ScanConfig` fields
    (transfer_delay_s, disk_dir, timeout_s, ...). Every argument of the model's forward passes
    through to the layers unchanged (NOTE [layer stack]).
    """
    if strategy not in ENCODER_STRATEGIES:
        raise VarstudyError(f"unknown encoder checkpointing strategy {strategy!r}; valid "
                            f"choices: {', '.join(ENCODER_STRATEGIES)}")
    stack = find_encoder(model)
    if strategy == "none":
        yield stack
        return
    _check_model(model, stack)
    config = None
    if strategy in ("revolve", "multistage"):
        config = ScanConfig(strategy=strategy, slots=slots, interval=interval, tier=tier,
                            **scan_kw)
    encoder, original = stack.encoder, stack.encoder.forward

    def forward(*args, **kwargs):
        _refuse_per_layer_outputs(kwargs)
        vars(encoder)["layer"] = [_Stack(stack, strategy, config, stats, meter)]
        try:
            return original(*args, **kwargs)
        finally:
            del vars(encoder)["layer"]

    encoder.forward = forward
    try:
        yield stack
    finally:
        del encoder.forward
