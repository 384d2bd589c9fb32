"""Rows that cannot carry a gradient: find them once, so a sampler never stores them.

The weight gradient of a linear layer is G = Σ_l y_l x_lᵀ over its token rows; a row whose output
no loss term reads has y_l = 0 in every minibatch, costs bytes in a sketch and carries nothing.
Two kinds occur in an encoder classifier:

* padding rows (every encoder linear, under masked attention): known from the attention mask,
  the ``rows-real`` families skip them (NOTE [real rows] in :mod:`varstudy.randomized.sketches`);
* structural zeros: a classifier that reads only the first token ([CLS] pooling) reads, from the
  last encoder layer, only the first token's output. That layer's query, attention output and
  both feed-forward linears act on each position separately, so their rows at positions 1.. get
  y = 0 exactly; key and value rows still feed the first token's attention and carry gradient.

NOTE [first-token layers]: :func:`first_token_layers` finds the second kind by a one-time exact
probe, not from the model's class: one forward + backward of the exact model, in eval mode with
the RNG forked, on a random minibatch (B = 3 sequences of 8 tokens, no padding, random labels;
or a batch the caller gives), and names the token layers whose output gradient is exactly zero at
every position but the first, in every example, and non-zero at the first. An exact zero over a
whole row of Y needs no path from that position to the loss (a dense gradient is never exactly
zero by chance), so the probe does not depend on the inputs drawn; a model with no such layer
(token classification, mean pooling) gets an empty list. Such a layer needs only the B first-token
rows of a minibatch of n = B·L: a sampler stores them exactly when B ≤ k, with no variance and
fewer bytes than the sketch (``rows-live``, :mod:`varstudy.randomized.informed`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from varstudy.errors import VarstudyError

PROBE_BATCH, PROBE_LENGTH = 3, 8


def probe_batch(model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """A random minibatch for the probe: token ids below the model's vocabulary, no padding,
    labels among its ``num_labels`` (a Hugging Face model's config gives both)."""
    config = getattr(model, "config", None)
    vocab, labels = getattr(config, "vocab_size", None), getattr(config, "num_labels", None)
    if not isinstance(vocab, int) or not isinstance(labels, int):
        raise VarstudyError(f"cannot build a probe batch for {type(model).__name__} (no "
                            "config.vocab_size / num_labels); valid choices: pass batch=... "
                            "(a dict of tensors with input_ids, attention_mask and labels)")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, max(vocab, 2), (PROBE_BATCH, PROBE_LENGTH), generator=gen)
    return {"input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, max(labels, 1), (PROBE_BATCH,), generator=gen).to(device)}


def first_token_layers(model: nn.Module, batch: dict[str, Tensor] | None = None, *,
                       loss: Callable[[nn.Module, dict], Tensor] | None = None) -> list[str]:
    """Names of the linears whose rows at positions 1.. never carry a gradient (NOTE
    [first-token layers]); the model's parameters, .grad, modes and RNG states are untouched.

    Args:
        model: the exact model (nn.Linear layers).
        batch: tensors (B, L) and labels; None: :func:`probe_batch`.
        loss: (model, batch) -> scalar; None: varstudy's mean cross-entropy over the examples.
    """
    from varstudy.randomized.capture import mean_loss

    batch = probe_batch(model) if batch is None else batch
    loss = loss or mean_loss
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    ys: dict[str, Tensor] = {}

    def recorder(name):
        def hook(module, args, output):
            if output.dim() == 3 and output.requires_grad:
                output.register_hook(lambda g: ys.__setitem__(name, g.detach()))
        return hook

    modes = {m: m.training for m in model.modules()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    handles = [model.get_submodule(n).register_forward_hook(recorder(n)) for n in names]
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            value = loss(model, batch)
            weights = [p for p in model.parameters() if p.requires_grad]
            torch.autograd.grad(value, weights, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes.items():
            m.training = flag
    return [n for n in names if n in ys and _first_token_only(ys[n])]


def _first_token_only(y: Tensor) -> bool:
    """Y (B, L, d_out): zero at every position > 0 of every example, non-zero at position 0."""
    if y.shape[1] < 2:
        return False
    rest_zero = bool((y[:, 1:] == 0).all())
    first_live = bool((y[:, 0] != 0).any(dim=-1).all())
    return rest_zero and first_live
