"""The tensors a step takes from outside: finding them, checking them, swapping them in re-tapes.

NOTE [parameters]: tensors requiring grad that ``step_fn`` takes from outside (parameters, and
non-leaf tensors such as ``wn = w0 * 0.3`` made before the scan) must be inputs of the scan's
autograd Function. If ``params`` is not given they are discovered on step 0, run once with a tape
under a TorchFunctionMode recording each tensor argument that requires grad and was not made in
the step (plus the leaves its graph reaches, the walk stopping at those non-leaf tensors). If
``params`` is given (or taken from an ``nn.Module`` step's parameters), the first call of each
distinct step in the forward pass (step 0 of a scan, every module of a sequential) runs under the
same mode, untaped, at no extra step: a non-leaf tensor requiring grad that it uses and that
``params`` lacks (a leaf named in ``params`` used through ``wn``, or a module whose parameters
are used through a non-leaf made outside the step) stops that forward pass, which starts again
with the tensor added (RNG and statistics as before the first try, NOTE [RNG]). A leaf that
``params`` leaves out gets no gradient from the scan, as documented for ``params``.

A re-taped step must not backpropagate into the graph outside it (shared by all N steps, freed by
the first pass), so it runs with each non-leaf parameter swapped for a detached leaf alias (the
same mode) and differentiates w.r.t. the aliases; their summed gradients are returned for the
non-leaf tensors, and autograd carries them on once, as plain autograd does. The originals are
differentiated too: None, unless a use escaped the swap (inside a custom autograd.Function),
which is then counted.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map_only

from varstudy.checkpointing.rng import fork_rng


class Closures(TorchFunctionMode):
    """Finds (``found``) or swaps (``swap``: id -> alias) the tensors a step takes from outside.

    Tensors made in the step that require grad are kept referenced while the mode is active, so
    their ids stay unique; the others can never be found and are not kept.
    """

    def __init__(self, inside=(), swap=None) -> None:
        super().__init__()
        self.made, self.found, self.swap = list(inside), [], swap
        self.inside = {id(t) for t in inside}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = tree_map_only(torch.Tensor, self._visit, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if self.swap is None:
            made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            self.made += made
            self.inside.update(map(id, made))
        return out

    def _visit(self, t: torch.Tensor) -> torch.Tensor:
        if self.swap is not None:
            return self.swap.get(id(t), t)
        if t.requires_grad and id(t) not in self.inside and all(t is not f for f in self.found):
            self.found.append(t)
        return t


def discover_params(step, state0, x0, rng_ops) -> tuple[torch.Tensor, ...]:
    """Tensors requiring grad that step 0 takes from outside (NOTE [parameters])."""
    with torch.enable_grad(), fork_rng(rng_ops):
        st = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in state0)
        x = None if x0 is None else x0.detach()
        with Closures(inside=st + ((x,) if x is not None else ())) as mode:
            new, y = step(0, st, x)
    found = mode.found
    seen = {t.grad_fn for t in found if t.grad_fn is not None}  # the walk stops at non-leaves
    stack = [o.grad_fn for o in new + (y,) if o is not None and o.grad_fn]
    exclude = {id(t) for t in st}
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) not in exclude and all(var is not f for f in found):
            found.append(var)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return tuple(found)


class MissingParams(Exception):
    """A step's first call used non-leaf tensors needing gradients that the scan's parameters
    lack; the driver adds ``tensors`` and starts the forward pass again (NOTE [parameters])."""

    def __init__(self, step: int, tensors: list[torch.Tensor]) -> None:
        super().__init__(f"step {step} uses {len(tensors)} non-leaf tensor(s) made outside it "
                         "that params does not name")
        self.step, self.tensors = step, tensors


def checked_call(step, i: int, state, x, params):
    """``step(i, state, x)``, raising :class:`MissingParams` if it used a non-leaf tensor that
    requires grad, was made outside the step and is not one of ``params``."""
    inside = tuple(state) + ((x,) if x is not None else ())
    with Closures(inside=inside) as mode:
        out = step(i, state, x)
    missing = [t for t in mode.found if t.grad_fn is not None and all(t is not p for p in params)]
    if missing:
        raise MissingParams(i, missing)
    return out
