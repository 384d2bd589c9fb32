"""Encoding and minibatches: tokenize a dataset, draw minibatches, dynamic padding.

Batching (:func:`encode`, :func:`minibatches`): every sequence is padded to the same
``max_length`` L, so a minibatch of B examples has n = B·L token rows, constant across batches.
With dynamic padding (:func:`trim_padding`, ``padding="dynamic"`` in the commands) each
minibatch is cut after its longest real sequence L_b, so n = B·L_b varies per minibatch. The
sketch acts on all n rows of the minibatch it is given, padding included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch

from varstudy.errors import VarstudyError
from varstudy.names import PADDINGS

if TYPE_CHECKING:
    from varstudy.data import TextDataset


def encode(dataset: TextDataset, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize a dataset, padded and truncated to exactly ``max_length`` tokens.

    Returns:
        ``input_ids`` (N, L) int64, ``attention_mask`` (N, L) int64 (1 = real token),
        ``token_type_ids`` (N, L) if the tokenizer gives them, and ``labels`` (N,) (int64 for
        classification, float32 for regression), with L = max_length. Padding to a fixed L keeps
        n = B·L token rows constant per minibatch; padded rows are part of the sketched X.
    """
    pair = dataset.texts_b is not None
    lowest = tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)
    highest = tokenizer.model_max_length if tokenizer.model_max_length < 1e6 else None
    if not isinstance(max_length, int) or max_length < lowest or (highest and max_length > highest):
        raise VarstudyError(
            f"max_length {max_length!r} is out of range; valid: {lowest} <= max_length"
            + (f" <= {highest}" if highest else "")
        )
    enc = tokenizer(
        list(dataset.texts), None if not pair else list(dataset.texts_b),
        padding="max_length", truncation=True, max_length=max_length, return_tensors="pt",
    )
    out = {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    out["labels"] = torch.as_tensor(dataset.labels)
    return out


def _num_examples(encoded: dict[str, torch.Tensor]) -> int:
    sizes = {t.shape[0] for t in encoded.values()}
    if len(sizes) != 1:
        raise VarstudyError(f"encoded tensors disagree on the number of examples: {sorted(sizes)}")
    return sizes.pop()


def minibatches(
    encoded: dict[str, torch.Tensor], batch_size: int, *, generator: torch.Generator,
    num_batches: int | None = None, drop_last: bool = True, with_ids: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Random minibatches, sampled without replacement within each epoch.

    Sampling model: each epoch draws a fresh uniform permutation of the N examples from
    ``generator`` and cuts it into consecutive chunks of ``batch_size``; so every minibatch is B
    distinct examples drawn uniformly without replacement from N (the finite-population
    correction (1 − (B−1)/(N−1)) assumes exactly this); no example repeats within an epoch.
    With ``drop_last`` the N mod B leftover examples of an epoch are skipped.

    Args:
        encoded: output of :func:`encode`, every tensor with N rows.
        batch_size: B, 1 <= B <= N.
        generator: the only source of randomness (same state -> same batches).
        num_batches: how many to yield, continuing into new epochs; None: one epoch.
        drop_last: skip the last, smaller batch of an epoch.
        with_ids: add the examples' indices into ``encoded`` as ``example_ids`` (B,), for
            samplers with a per-example cache (varstudy.randomized.wtacrs); the draws are the same.

    Yields:
        dicts with the keys of ``encoded``, each tensor (B, ...).
    """
    n = _num_examples(encoded)
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise VarstudyError(f"batch_size {batch_size!r} is out of range; valid: 1 <= B <= {n}")
    if num_batches is not None and num_batches < 0:
        raise VarstudyError(f"num_batches {num_batches!r} is negative; valid: >= 0 or None")
    if not isinstance(generator, torch.Generator):
        raise VarstudyError("minibatches needs generator=torch.Generator (seeded by the caller)")
    per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    total = per_epoch if num_batches is None else num_batches
    produced = 0
    while produced < total:
        order = torch.randperm(n, generator=generator)
        for start in range(0, per_epoch * batch_size, batch_size):
            if produced == total:
                return
            idx = order[start:start + batch_size]
            batch = {k: v[idx] for k, v in encoded.items()}
            yield {**batch, "example_ids": idx} if with_ids else batch
            produced += 1


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dynamic padding: cut a right-padded minibatch after its longest real sequence.

    Every (B, L) tensor keeps its first L_b = max_i Σ_t mask_it columns, so the sketch of a
    randomized layer sees this minibatch's n = B·L_b rows instead of B·max_length; ``labels``
    and other tensors pass unchanged. Call it on the host, before moving the batch to a device
    (reading L_b is a host sync otherwise). The result equals the fixed-length forward up to
    rounding, because attention masks the columns that are cut.
    """
    mask = batch["attention_mask"]
    if mask.shape[1] > 1 and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise VarstudyError("dynamic padding needs right-padded sequences (real tokens first); "
                            "valid choices: a tokenizer with padding_side='right', or "
                            "--padding fixed")
    length = max(int(mask.sum(1).max()), 1)
    width = mask.shape[1]
    return {k: v[:, :length] if v.ndim == 2 and v.shape[1] == width and k != "labels" else v
            for k, v in batch.items()}


def pad_batches(batches: Iterator[dict[str, torch.Tensor]], padding: str):
    """``batches`` unchanged (``"fixed"``) or each trimmed by :func:`trim_padding` (``"dynamic"``)."""
    if padding not in PADDINGS:
        raise VarstudyError(f"unknown padding {padding!r}; valid choices: {', '.join(PADDINGS)}")
    return batches if padding == "fixed" else (trim_padding(b) for b in batches)


def sequential_batches(
    encoded: dict[str, torch.Tensor], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """All examples in order, in batches of ``batch_size`` (the last may be smaller); for
    evaluation."""
    n = _num_examples(encoded)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise VarstudyError(f"batch_size {batch_size!r} is out of range; valid: >= 1")
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in encoded.items()}
