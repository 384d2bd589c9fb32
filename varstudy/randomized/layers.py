"""Randomized linear layers: keep a sketch SᵀX for backward instead of the input X.

``RandomizedLinear`` is an ``nn.Linear`` (same parameters, same state_dict keys) whose forward is
exact and whose backward returns

* dX = Y W          (exact),
* db = Σ_rows Y     (exact),
* dW = (SᵀY)ᵀ(SᵀX)  (unbiased: E[S Sᵀ] = I),

with Y = ∂L/∂out flattened to n rows (all leading dims, padding tokens included) and S an n × k
sketch from :mod:`varstudy.randomized.sketches`, k = clamp(round(ratio·n), min_rows, n).

NOTE [fresh sketches, one seed]: every forward call draws a new S from the integer seed
``derive_seed(base_seed, layer_id, call_index)``; backward regenerates the same S from that seed on
the tensor's device. Sketches therefore differ across calls and across layers, and a model
converted with the same base seed reproduces its gradients exactly. ``reseed`` rewinds the
counters (and empties the sketch cache).

NOTE [shared sketches]: layers that read the very same input tensor (Q, K and V of attention) and
use the same family, k and compute dtype share one stored ``SᵀX`` through a :class:`SketchCache`,
so autograd keeps ρ·X once instead of 3ρ·X. Sharing holds only among the sibling layers of one
forward pass: the entry records which layers have used it, each layer uses an entry at most once,
and a layer that meets an entry it already used (the same tensor fed again: a reused batch, fixed
features, a layer applied twice) draws a fresh sketch from its own seed and replaces the entry.
Siblings use the seed of the layer that drew the entry. A first-token layer of ``rows-live`` or
``rows-adaptive`` draws among its first-token rows only, which would bias a sibling's estimate,
so it never shares (varstudy.randomized.informed). The cache references the input only
weakly and drops its entry when the input dies; ``reseed`` empties it, so a reseeded model
repeats the gradients of a fresh conversion with that seed.

NOTE [mixed precision]: under ``torch.autocast`` the layer follows autocast's rule for
``nn.Linear``: the output is ``F.linear`` run under autocast (equal to nn.Linear's), and x, W and
the sketch are in the autocast dtype (float64 inputs are left alone, as autocast does). The stored
``SᵀX`` is in that dtype (half the bytes of float32), backward runs with autocast off on explicit
casts (dX = Y W in the autocast dtype, Ĝ = (SᵀY)ᵀ(SᵀX) from the same S), and each gradient is
returned in its input's dtype. The fp32 weight itself is saved, not a cast copy.

NOTE [finite check]: ``finite_check()`` (opt-in, off by default) makes every RandomizedLinear
verify that its input, output and output gradient hold no NaN/Inf and raise a VarstudyError
naming the layer. Each check is a host sync, so it is for debugging; when off, the hot path only
reads one module-level flag.
"""

from __future__ import annotations

import re
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varstudy.errors import VarstudyError
from varstudy.randomized import rowmask
from varstudy.randomized.compact import EXACT_ROWS, CompactLinear
from varstudy.randomized.informed import first_token_live
from varstudy.randomized.seeds import derive_seed
from varstudy.randomized.sketches import Sketch, get_sketch, rows_for

_CHECK_FINITE = False


def set_finite_check(enabled: bool) -> bool:
    """Turn the opt-in NaN/Inf check (NOTE [finite check]) on or off; returns the old setting."""
    global _CHECK_FINITE
    old, _CHECK_FINITE = _CHECK_FINITE, bool(enabled)
    return old


@contextmanager
def finite_check(enabled: bool = True):
    """Context manager form of :func:`set_finite_check`."""
    old = set_finite_check(enabled)
    try:
        yield
    finally:
        set_finite_check(old)


def _require_finite(t: Tensor, layer: str, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise VarstudyError(f"non-finite values (NaN/Inf) in the {what} of layer {layer}; valid "
                            "choices: finite inputs and weights, a lower learning rate, "
                            "float32/float64")


class _Entry:
    __slots__ = ("ref", "version", "key", "sx", "seed", "state", "users", "sketch")


class SketchCache:
    """One-entry cache of the last sketched input, shared by the sibling layers of one model.

    The entry holds the sketch strongly but the input only weakly, and is dropped as soon as the
    input tensor dies. Each layer (``user``) consumes an entry at most once (NOTE [shared
    sketches]), so a tensor fed again gets a fresh sketch.
    """

    def __init__(self) -> None:
        self._entry: _Entry | None = None

    def get(self, x: Tensor, sketch: Sketch, k: int, dtype: torch.dtype, user: int):
        """``(SᵀX, seed, state, drawer)`` stored for ``x`` if ``user`` has not used it yet, else
        None; ``drawer`` is the sketch instance that drew it (its layer's own statistics)."""
        e = self._entry
        if (e is None or e.ref() is not x or e.version != x._version
                or e.key != (sketch.name, k, dtype) or user in e.users):
            return None
        e.users.add(user)
        return e.sx, e.seed, e.state, e.sketch

    def put(self, x: Tensor, sketch: Sketch, k: int, sx: Tensor, seed: int, state,
            user: int) -> None:
        """Replace the entry by ``x``'s sketch ``sx`` (k, d_in), already used by ``user``."""
        def drop(ref) -> None:
            if self._entry is not None and self._entry.ref is ref:
                self._entry = None

        e = _Entry()
        e.ref, e.version, e.key = weakref.ref(x, drop), x._version, (sketch.name, k, sx.dtype)
        e.sx, e.seed, e.state, e.users, e.sketch = sx, seed, state, {user}, sketch
        self._entry = e

    def clear(self) -> None:
        """Drop the entry."""
        self._entry = None


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast gives ``x`` in a linear layer, or None when autocast leaves it alone."""
    device = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _autocast_off(device: str, enabled: bool):
    return torch.autocast(device, enabled=False) if enabled else nullcontext()


class _SketchedLinearFn(torch.autograd.Function):
    """out = x Wᵀ + b; saves (SᵀX, W, state) instead of x. See the module docstring.

    ``ct`` is the autocast dtype or None (NOTE [mixed precision]); ``sx`` is already in it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sx, sketch, k, seed, check, ct, tracker, xstats, *state):
        ctx.save_for_backward(sx, weight, *xstats, *state)
        ctx.sketch, ctx.k, ctx.seed, ctx.check, ctx.ct = sketch, k, seed, check, ct
        ctx.tracker, ctx.n_xstats = tracker, len(xstats)
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        return F.linear(x, weight, bias)  # under the caller's autocast, exactly as nn.Linear

    @staticmethod
    def backward(ctx, grad_out):
        sx, weight, *rest = ctx.saved_tensors
        xstats, state = rest[:ctx.n_xstats], rest[ctx.n_xstats:]
        if ctx.check is not None:
            _require_finite(grad_out, ctx.check, "output gradient")
        gx = gw = gb = None
        with _autocast_off(grad_out.device.type, ctx.ct is not None):
            if ctx.ct is not None:
                grad_out = grad_out.to(ctx.ct)
            if ctx.needs_input_grad[0]:
                w = weight if ctx.ct is None else weight.to(ctx.ct)
                gx = (grad_out @ w).to(ctx.dtypes[0])
            flat = grad_out.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[1]:
                sy = ctx.sketch.apply_in_backward(flat, ctx.k, ctx.seed, tuple(state))
                torch.autograd.Variable._execution_engine.queue_callback(ctx.sketch.release)
                gw = (sy.T @ sx).to(weight.dtype)
                if ctx.tracker is not None:  # NOTE [online statistics] in randomized.online
                    ctx.tracker.add(flat, gw, ctx.sketch, ctx.k, *xstats, sx=sx, sy=sy)
            if ctx.needs_input_grad[2]:
                gb = flat.sum(0).to(ctx.dtypes[1])
        return (gx, gw, gb) + (None,) * (8 + len(state))


class RandomizedLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient is estimated from a sketch of its input.

    Args:
        ratio: compression ratio ρ = k / n in (0, 1].
        sketch: a family name from ``varstudy.randomized.sketches.SKETCHES`` or a Sketch instance.
        min_rows: k_min >= 1, the fewest sketch rows kept for any input.
        seed: base seed; ``layer_id`` separates layers that share it.
        cache: a SketchCache shared with sibling layers, or None to never share.
    Input (..., in_features) of any leading shape and strides; output (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 ratio: float = 0.1, sketch: str | Sketch = "gaussian", min_rows: int = 1,
                 seed: int = 0, layer_id: int = 0, cache: SketchCache | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.ratio, self.min_rows = check_ratio(ratio), check_min_rows(min_rows)
        self.sketch = _for_layer(get_sketch(sketch))
        self.seed, self.layer_id, self.calls = int(seed), int(layer_id), 0
        self.cache, self.name, self.row_mask = cache, None, None
        self.exact, self.tracker, self.first_token = False, None, False

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "RandomizedLinear":
        """A RandomizedLinear sharing ``linear``'s parameter objects (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.ratio = check_ratio(kwargs.get("ratio", 0.1))
        new.min_rows = check_min_rows(kwargs.get("min_rows", 1))
        new.sketch = _for_layer(get_sketch(kwargs.get("sketch", "gaussian")))
        new.seed, new.layer_id = int(kwargs.get("seed", 0)), int(kwargs.get("layer_id", 0))
        new.calls, new.cache = 0, kwargs.get("cache")
        new.name, new.row_mask = kwargs.get("name"), kwargs.get("row_mask")
        new.exact, new.tracker = False, None
        new.first_token = bool(kwargs.get("first_token", False))
        new.training = linear.training
        return new

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise VarstudyError(
                f"RandomizedLinear expects a floating-point input, got {x.dtype}; "
                "valid choices: float32, float16, bfloat16, float64")
        check = (self.name or f"RandomizedLinear#{self.layer_id}") if _CHECK_FINITE else None
        if check is not None:
            _require_finite(x, check, "input")
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # nothing would be stored for dW
        ct = _autocast_dtype(x)
        flat = x.detach().reshape(-1, x.shape[-1])
        flat = flat if ct is None else flat.to(ct)
        sketch = EXACT_ROWS if self.exact else self.sketch
        k = flat.shape[0] if self.exact else rows_for(flat.shape[0], self.ratio, self.min_rows)
        if self.first_token and getattr(sketch, "uses_structure", False) and x.dim() == 3 \
                and x.shape[0] <= k:  # NOTE [first-token layers]: its B live rows, exactly
            sketch, k = get_sketch("rows-live"), x.shape[0]
        sx, seed, state, drawer = self._sketch_input(x, flat, sketch, k, ct is not None)
        tracker = self.tracker
        xstats = () if tracker is None else tracker.forward_stats(
            flat, self._live(x) if tracker.needs_live else None, drawer)
        out = _SketchedLinearFn.apply(x, self.weight, self.bias, sx, sketch, k, seed, check,
                                      ct, tracker, xstats, *state)
        if check is not None:
            _require_finite(out, check, "output")
        return out

    def _sketch_input(self, x: Tensor, flat: Tensor, sketch: Sketch, k: int, autocast: bool):
        """(SᵀX, seed, state, drawer) for this call: a sibling's entry if unused here, else a
        new draw; ``drawer`` is the sketch instance that drew it."""
        seed = derive_seed(self.seed, self.layer_id, self.calls)
        self.calls += 1
        cache = self.cache
        if self.first_token and getattr(sketch, "uses_structure", False):
            cache = None  # it draws among position 0 only: a sibling reusing that is biased
        hit = None if cache is None else cache.get(x, sketch, k, flat.dtype, id(self))
        if hit is not None:
            return hit
        extra = ()
        if getattr(sketch, "uses_structure", False):  # varstudy.randomized.informed
            extra = (self._live(x),)
        elif getattr(sketch, "uses_mask", False):  # NOTE [real rows] in sketches
            extra = (None if self.row_mask is None else self.row_mask.rows(flat.shape[0]),)
        with torch.no_grad(), _autocast_off(x.device.type, autocast):
            sx, state = sketch.sketch(flat, k, seed, *extra)
        if cache is not None:
            cache.put(x, sketch, k, sx, seed, state, id(self))
        return sx, seed, state, sketch

    def _live(self, x: Tensor) -> Tensor:
        """The live rows (B, L) of input x (B, L, d): real under the attention mask and, in a
        first-token layer, at position 0 (varstudy.randomized.informed); (1, n) otherwise."""
        if x.dim() != 3:
            return torch.ones(1, x.reshape(-1, x.shape[-1]).shape[0], device=x.device)
        mask = None if self.row_mask is None else self.row_mask.mask
        live = (mask.to(x.device, torch.float32) if mask is not None
                and tuple(mask.shape) == tuple(x.shape[:2]) else
                torch.ones(x.shape[:2], device=x.device))
        return first_token_live(live) if self.first_token else live

    def set_exact(self, exact: bool) -> None:
        """Store the input itself (Ĝ = G, no sketch variance) or go back to the sketch: what an
        online plan (:mod:`varstudy.randomized.online`) does to a unit it makes exact."""
        self.exact = bool(exact)

    def extra_repr(self) -> str:
        ratio = "exact" if self.exact else f"{self.ratio:g}"
        return (f"{super().extra_repr()}, sketch={self.sketch.name}, ratio={ratio}, "
                f"min_rows={self.min_rows}")


def _for_layer(sketch: Sketch) -> Sketch:
    """The family itself, or a fresh instance of it for a family with per-layer statistics."""
    return sketch.for_layer() if hasattr(sketch, "for_layer") else sketch


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float in (0, 1], else a VarstudyError."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise VarstudyError(f"ratio must be a number in (0, 1], got {ratio!r}") from None
    if not 0.0 < value <= 1.0:
        raise VarstudyError(f"ratio must be in (0, 1], got {ratio!r}")
    return value


def check_min_rows(min_rows: int) -> int:
    """``min_rows`` if it is an integer >= 1, else a VarstudyError."""
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise VarstudyError(f"min_rows must be an integer >= 1, got {min_rows!r}")
    return min_rows


@dataclass(frozen=True)
class Conversion:
    """What ``randomize`` or ``derandomize`` changed: one row per converted nn.Linear."""

    rows: tuple[tuple[str, int, int, str, float], ...]  # (name, in, out, sketch, ratio)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def names(self) -> list[str]:
        """The converted modules' names, in module order."""
        return [r[0] for r in self.rows]

    def to_frame(self):
        """The rows as a DataFrame (module, in_features, out_features, sketch, ratio)."""
        import pandas as pd
        return pd.DataFrame(self.rows, columns=["module", "in_features", "out_features",
                                                "sketch", "ratio"])

    def __str__(self) -> str:
        if not self.rows:
            return "no linear layers converted"
        width = max(len(r[0]) for r in self.rows)
        lines = [f"{len(self.rows)} linear layer(s):"]
        lines += [f"  {n:<{width}}  {i:>5} -> {o:<5}  {s} @ {r:g}" for n, i, o, s, r in self.rows]
        return "\n".join(lines)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _select(model: nn.Module, include: str | None, exclude: str | None) -> list[str]:
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as err:
        raise VarstudyError(f"invalid layer pattern: {err}") from None
    linears = [n for n, m in model.named_modules()
               if type(m) in (nn.Linear, RandomizedLinear, CompactLinear)]
    if not linears:
        raise VarstudyError(f"{type(model).__name__} has no nn.Linear modules to convert")
    chosen = [n for n in linears
              if (inc is None or inc.search(n)) and not (exc and exc.search(n))]
    if not chosen:
        shown = ", ".join(linears[:6]) + (", ..." if len(linears) > 6 else "")
        raise VarstudyError(f"layer patterns include={include!r} exclude={exclude!r} match no "
                            f"nn.Linear; valid names: {shown}")
    return chosen


def randomize(model: nn.Module, ratio: float = 0.1, sketch: str | Sketch = "gaussian", *,
              include: str | None = None, exclude: str | None = None, min_rows: int = 1,
              seed: int = 0, share: bool = True, plan=None,
              first_token: list[str] | None = None) -> Conversion:
    """Convert the nn.Linear modules of ``model`` in place into RandomizedLinear.

    ``include``/``exclude`` are regexes searched in module names. Parameters are shared, not
    copied. Layers are numbered in module order for seed derivation. With ``share``, layers that
    read the same input tensor in one forward pass share one stored sketch (NOTE [shared
    sketches]). ``plan`` (a plan.json path or its dict, from ``python -m varstudy.plan``) gives
    the family and each layer's own ratio instead of ``sketch``/``ratio``: its "exact" layers
    become CompactLinear (exact, storing only their own input: NOTE [compact exact]); it must
    name exactly the linears ``include``/``exclude`` select (NOTE [a plan names exactly its
    layers] in varstudy.randomized.planfile).
    ``first_token``: for the families that know the model's structure (``rows-live``,
    ``rows-adaptive``), the layers whose rows past the first token carry no gradient; None finds
    them by the one-time probe of :func:`varstudy.randomized.support.first_token_layers` (a
    model without a Hugging Face config gets none). Everything is validated before the first
    module is replaced, so a failed conversion leaves the model unchanged.
    """
    min_rows = check_min_rows(min_rows)
    names = _select(model, include, exclude)
    per_layer = {}
    if plan is not None:
        from varstudy.randomized.planfile import EXACT, check_plan_layers, load_plan

        family_name, planned, _ = load_plan(plan)
        check_plan_layers(planned, names)  # NOTE [a plan names exactly its layers]
        family = get_sketch(family_name)
        per_layer = {n: check_ratio(planned[n]) for n in names if planned.get(n, EXACT) != EXACT}
        exact = [n for n in names if planned.get(n) == EXACT]
        names = [n for n in names if n in per_layer]
    else:
        family, ratio = get_sketch(sketch), check_ratio(ratio)
        per_layer, exact = dict.fromkeys(names, ratio), []
    cache = SketchCache() if share else None
    first = set(_first_token(model, family, first_token) if names else ())
    row_mask = rowmask.install(model) if getattr(family, "uses_mask", False) and names else None
    for name in exact:  # NOTE [compact exact] in varstudy.randomized.compact
        _swap(model, name, CompactLinear.from_linear(model.get_submodule(name)))
    new = {name: RandomizedLinear.from_linear(
        model.get_submodule(name), ratio=per_layer[name], sketch=family, min_rows=min_rows,
        seed=seed, layer_id=i, cache=cache, name=name, row_mask=row_mask,
        first_token=name in first) for i, name in enumerate(names)}
    if getattr(family, "uses_examples", False):  # wta-crs: the minibatch's dataset indices
        from varstudy.randomized.wtacrs import install
        holder = install(model)
        for module in new.values():
            module.sketch.examples = holder
    for name, module in new.items():
        _swap(model, name, module)
    return Conversion(tuple((n, m.in_features, m.out_features, family.name, m.ratio)
                            for n, m in new.items()))


def _first_token(model: nn.Module, family: Sketch, given: list[str] | None) -> list[str]:
    """The first-token layers a structure-aware family uses (NOTE [first-token layers])."""
    if not getattr(family, "uses_structure", False):
        return []
    if given is not None:
        return list(given)
    from varstudy.randomized.support import first_token_layers
    if not isinstance(getattr(getattr(model, "config", None), "vocab_size", None), int):
        return []
    return first_token_layers(model)


def derandomize(model: nn.Module) -> Conversion:
    """Replace every RandomizedLinear (and a plan's CompactLinear) of ``model`` by an nn.Linear
    sharing its parameters."""
    rows = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (RandomizedLinear, CompactLinear)):
            plain = nn.Linear.__new__(nn.Linear)
            nn.Module.__init__(plain)
            plain.in_features, plain.out_features = module.in_features, module.out_features
            plain.weight, plain.bias, plain.training = module.weight, module.bias, module.training
            _swap(model, name, plain)
            rows.append((name, module.in_features, module.out_features, "exact", 1.0))
    rowmask.remove(model)
    return Conversion(tuple(rows))


def reseed(model: nn.Module, seed: int) -> None:
    """Set the base seed of every RandomizedLinear, rewind its call counter, empty its cache.

    Afterwards the model draws the sketches of a fresh conversion with base seed ``seed``.
    """
    for module in model.modules():
        if isinstance(module, RandomizedLinear):
            module.seed, module.calls = int(seed), 0
            if module.cache is not None:
                module.cache.clear()
