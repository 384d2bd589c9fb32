"""Capture (X, Y) of every selected ``nn.Linear`` for one minibatch of the exact model.

A forward hook records each layer's input X and registers a tensor hook on its output that
records Y = ∂(mean loss)/∂out during one backward pass. The loss is the mean over the B
examples of the minibatch (cross-entropy; MSE for a 1-output regression head), so
g_B = YᵀX over all token rows is the minibatch weight gradient (ARCHITECTURE.md).

Shapes: encoder linears see X (B, L, d_in), Y (B, L, d_out); the pooler and the classifier see
(B, d). Padding tokens are included (the randomized layers sketch them too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varstudy.errors import VarstudyError
from varstudy.randomized.layers import RandomizedLinear


@dataclass
class Captured:
    """What one captured minibatch holds.

    layers: module name -> (X, Y), detached, in module order.
    grads: module name -> exact weight gradient dW = YᵀX of the mean loss, (d_out, d_in).
    loss: the mean loss (float).  batch_size: B.
    """

    layers: dict[str, tuple[Tensor, Tensor]]
    grads: dict[str, Tensor]
    loss: float
    batch_size: int


def select_layers(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Names of the nn.Linear modules whose name matches regex ``pattern`` (None: all)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    bad = [n for n in names if isinstance(model.get_submodule(n), RandomizedLinear)]
    if bad:
        raise VarstudyError(f"capture needs the exact model; derandomize first ({bad[0]} is "
                            "a RandomizedLinear)")
    if pattern is None:
        return names
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise VarstudyError(f"invalid layer pattern {pattern!r}: {err}") from None
    chosen = [n for n in names if regex.search(n)]
    if not chosen:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise VarstudyError(f"layer pattern {pattern!r} matches no nn.Linear; valid names: {shown}")
    return chosen


def mean_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean over the B examples of the per-example loss; ``batch`` holds ``labels`` (B,)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = batch["labels"]
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def capture(model: nn.Module, batch: dict[str, Tensor], *, layers: str | None = None,
            names: list[str] | None = None) -> Captured:
    """One forward + backward of the exact model, recording (X, Y) of the selected linears.

    Args:
        model: exact model (no RandomizedLinear); its .grad fields are left untouched.
        batch: tensors (B, ...) on the model's device incl. ``labels``.
        layers: regex on module names (None: every nn.Linear), or ``names`` given directly.
    """
    names = names if names is not None else select_layers(model, layers)
    xs: dict[str, Tensor] = {}
    ys: dict[str, Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(_recorder(n, xs, ys)) for n in names]
    try:
        loss = mean_loss(model, batch)
        weights = [model.get_submodule(n).weight for n in names]
        grads = torch.autograd.grad(loss, weights)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in ys]
    if missing:
        raise VarstudyError(f"layer {missing[0]} got no output gradient (unused in the loss?)")
    _check_finite(names, xs, ys, loss)
    return Captured({n: (xs[n], ys[n]) for n in names}, dict(zip(names, grads)),
                    float(loss.detach()), int(batch["labels"].shape[0]))


def _check_finite(names: list[str], xs: dict, ys: dict, loss: Tensor) -> None:
    """Raise, naming the first layer, when a captured X or Y (or the loss) holds NaN/Inf.

    One host sync for the whole batch (the caller reads the loss anyway).
    """
    flags = torch.stack([torch.isfinite(loss.detach()).all()] + [
        torch.isfinite(xs[n]).all() & torch.isfinite(ys[n]).all() for n in names])
    if bool(flags.all()):
        return
    # The first non-finite input in forward order, else the first output gradient in backward
    # order: the layer nearest to where the NaN/Inf arose.
    order = [("input activations X", n, xs[n]) for n in names] + \
        [("output gradients Y", n, ys[n]) for n in reversed(names)]
    for what, n, t in order:
        if not bool(torch.isfinite(t).all()):
            raise VarstudyError(
                f"non-finite values (NaN/Inf) in the {what} of layer {n}; valid choices: "
                "finite inputs and weights, --dtype float32 or float64, a lower --lr")
    raise VarstudyError("non-finite loss (NaN/Inf) with finite layer activations; valid "
                        "choices: finite labels and weights, --dtype float32 or float64")


def _recorder(name: str, xs: dict, ys: dict):
    def hook(module, inputs, output):
        if name in xs:
            raise VarstudyError(f"layer {name} was called twice in one forward; capture "
                                "supports one call per module")
        xs[name] = inputs[0].detach()
        if output.requires_grad:
            output.register_hook(lambda g: ys.__setitem__(name, g.detach()))
    return hook
