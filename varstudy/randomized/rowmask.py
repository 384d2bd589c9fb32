"""The attention mask of the model's current forward call, for sketches that draw real rows only
(NOTE [real rows] in :mod:`varstudy.randomized.sketches`).

``install(model)`` registers one forward pre-hook on the top-level model that keeps the
``attention_mask`` (B, L) it is called with; a randomized layer whose input has n = B·L token rows
reads it flattened to (n,) through :meth:`RowMask.rows` (the pooler and the classifier, with B
rows, get None: every row real). ``remove(model)`` undoes it (``derandomize`` calls it).
"""

from __future__ import annotations

from torch import Tensor, nn

_ATTR = "_varstudy_row_mask"


class RowMask:
    """Holds the attention mask of the forward call in progress (None without one)."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None
        self.handle = None

    def hook(self, module, args, kwargs) -> None:
        """Forward pre-hook: keep the ``attention_mask`` the model is called with (None without
        one)."""
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, Tensor) else None

    def rows(self, n: int) -> Tensor | None:
        """The mask as (n,) when it has n entries (token rows), else None."""
        mask = self.mask
        return None if mask is None or mask.numel() != n else mask.reshape(-1)


def install(model: nn.Module) -> RowMask:
    """The model's RowMask, registering its forward pre-hook on first use."""
    holder = getattr(model, _ATTR, None)
    if holder is None:
        holder = RowMask()
        holder.handle = model.register_forward_pre_hook(holder.hook, with_kwargs=True)
        object.__setattr__(model, _ATTR, holder)  # not a submodule, not in the state_dict
    return holder


def remove(model: nn.Module) -> None:
    """Drop the model's RowMask hook, if any."""
    holder = getattr(model, _ATTR, None)
    if holder is not None:
        holder.handle.remove()
        object.__delattr__(model, _ATTR)
