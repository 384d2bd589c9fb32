"""Gradient accumulation: one minibatch as m micro-batches whose gradients add up to its own.

A minibatch of B examples is cut into m consecutive micro-batches (sizes differing by at most
one, ``torch.tensor_split``), each run forward and backward on its own, the parameters' ``.grad``
summing over them, so the saved activations of only one micro-batch are live at a time.

NOTE [accumulation weights]: the training loss is a mean over its loss terms, so the micro-batch
losses must be weighted, not summed, to give the minibatch's gradient. With T terms in the
minibatch and T_j in micro-batch j, L = (1/T) Σ_t l_t = Σ_j (T_j / T) L_j, L_j the mean over
micro-batch j's terms; so backward of w_j L_j with w_j = T_j / T accumulates exactly ∇L (up to
float rounding). The terms are the examples for a sequence-level loss (``labels`` (B,), or
floating-point labels (B, C): a per-example regression or multi-label loss averages B·C terms,
C per example), and the labelled tokens for a token-level loss (integer ``labels`` (B, L): the
entries other than ``IGNORE_INDEX``, which Hugging Face models' cross-entropy skips). A
micro-batch without terms contributes no gradient and is skipped (its mean would be 0/0). With
B divisible by m and a sequence-level loss every w_j is 1/m. Dropout draws fresh masks per
micro-batch, so only with dropout off is the accumulated gradient the minibatch's exactly.

``trim`` applies dynamic padding (:func:`varstudy.batching.trim_padding`) to each micro-batch:
it is cut after its own longest sequence, which changes nothing but rounding (attention masks
the columns cut) and stores fewer rows than the minibatch's padded width.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from varstudy.batching import trim_padding
from varstudy.errors import VarstudyError

IGNORE_INDEX = -100  # labels Hugging Face's token-level cross-entropy skips


def loss_terms(batch: dict[str, Tensor]) -> Tensor:
    """Number of loss terms per example, (B,) int64 (NOTE [accumulation weights]): 1 each for
    a sequence-level loss, the labelled tokens for integer ``labels`` of shape (B, L, ...)."""
    labels = batch["labels"]
    if labels.dim() < 2 or labels.is_floating_point():
        return torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)
    return (labels != IGNORE_INDEX).reshape(labels.shape[0], -1).sum(1)


def _micro_batch_count(batch: dict[str, Tensor], m: int) -> int:
    sizes = {t.shape[0] for t in batch.values() if isinstance(t, Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise VarstudyError(f"the minibatch's tensors disagree on the number of examples: "
                            f"{sorted(sizes)}; valid choices: tensors (B, ...) with one B")
    b = sizes.pop()
    if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= b:
        raise VarstudyError(f"micro-batches {m!r} is out of range for a minibatch of {b} "
                            f"examples; valid: 1 <= micro-batches <= {b}")
    return b


def split(batch: dict[str, Tensor], m: int, *,
          trim: bool = False) -> list[tuple[dict[str, Tensor], float]]:
    """``batch`` (tensors (B, ...), with ``labels``) as m micro-batches with their loss weights
    (NOTE [accumulation weights]): [(micro-batch, w_j)], Σ w_j = 1, micro-batches without loss
    terms left out; m = 1 gives ``[(batch, 1.0)]`` (trimmed with ``trim``). Tensors are views
    (no copy); ``trim``: each micro-batch cut after its longest sequence (dynamic padding). A
    sequence-level loss needs no device read; a token-level one reads the label counts."""
    b = _micro_batch_count(batch, m)
    if m == 1:
        return [(_trimmed(batch) if trim else batch, 1.0)]
    labels = batch["labels"]
    if labels.dim() < 2 or labels.is_floating_point():
        counts = [b // m + (j < b % m) for j in range(m)]  # torch.tensor_split's sizes
    else:
        counts = [int(c.sum()) for c in torch.tensor_split(loss_terms(batch), m)]
    total = sum(counts)
    if total == 0:
        raise VarstudyError("the minibatch has no loss terms (every label is "
                            f"{IGNORE_INDEX}); valid choices: a minibatch with a labelled "
                            "token or example")
    pieces = {k: torch.tensor_split(v, m) for k, v in batch.items()}
    out = []
    for j, n in enumerate(counts):
        if n:
            micro = {k: parts[j] for k, parts in pieces.items()}
            out.append((_trimmed(micro) if trim else micro, n / total))
    return out


def _trimmed(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Dynamic padding of one micro-batch; token-level labels (B, L) are cut with the inputs."""
    width = batch["attention_mask"].shape[1]
    out = trim_padding(batch)
    labels = batch["labels"]
    if labels.dim() == 2 and labels.shape[1] == width:
        out["labels"] = labels[:, :out["attention_mask"].shape[1]]
    return out


def accumulate(model, batch: dict[str, Tensor], m: int, *, trim: bool = False,
               context: Callable | None = None) -> Tensor:
    """One accumulated forward + backward of ``model`` (a Hugging Face model returning
    ``.loss``) on ``batch`` in m micro-batches (:func:`split`): the parameters' ``.grad`` gain
    ∇ of the minibatch's mean loss (NOTE [accumulation weights]); returns that loss (a detached
    0-dim tensor; reading it is the caller's host sync). ``context()``: a context manager each
    micro-batch's forward runs in (e.g. a checkpointing block; the backward follows it)."""
    total = None
    for micro, weight in split(batch, m, trim=trim):
        with context() if context is not None else contextlib.nullcontext():
            loss = model(**micro).loss
        scaled = loss if weight == 1.0 else loss * weight
        scaled.backward()
        total = scaled.detach() if total is None else total + scaled.detach()
    return total

