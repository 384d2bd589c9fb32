"""RandomizedLinear and randomize(): exactness of forward/dX/db, seeds, sharing, conversion."""

import copy

import pytest
import torch
from torch import nn

from varstudy.errors import VarstudyError
from varstudy.randomized.layers import RandomizedLinear, derandomize, randomize, reseed
from varstudy.randomized.sketches import SKETCHES

FAMILIES = list(SKETCHES)


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                         nn.Linear(10, 3)).to(dtype)


def grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()], x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_exact_grads_equal_linear_in_dtype(family, dtype):
    """A layer kept in ``dtype`` (no autocast): output, dX and db equal nn.Linear's bit for bit;
    dW is finite, nonzero and in ``dtype``."""
    lin = nn.Linear(6, 5).to(dtype)
    rl = RandomizedLinear.from_linear(copy.deepcopy(lin), ratio=0.3, sketch=family)
    x, y = torch.randn(2, 7, 6).to(dtype), torch.randn(2, 7, 5).to(dtype)
    got = []
    for layer in (lin, rl):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out * y).sum().backward()
        got.append((out, xi.grad, layer.bias.grad))
    for a, b in zip(*got):
        assert b.dtype == dtype and torch.equal(a, b)
    assert rl.weight.grad.dtype == dtype and torch.isfinite(rl.weight.grad).all()
    assert rl.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype,unit", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
def test_low_precision_ratio_one_gradient_equals_linear_within_rounding(dtype, unit):
    """rows-wor at k = n permutes the rows (scale 1), so Ĝ = G in exact arithmetic. Each of Ĝ and
    nn.Linear's dW is a float32 sum over the n rows rounded once to ``dtype`` (unit roundoff u),
    so each is within u|G| + γ_n(1 + u)|Y|ᵀ|X| of the float64 G = YᵀX, γ_n = n·2⁻²⁴/(1 − n·2⁻²⁴).
    """
    lin = nn.Linear(6, 5).to(dtype)
    rl = RandomizedLinear.from_linear(copy.deepcopy(lin), ratio=1.0, sketch="rows-wor")
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 9, 6, generator=gen).to(dtype), torch.randn(3, 9, 5, generator=gen)
    y = y.to(dtype)
    x64, y64 = x.double().reshape(-1, 6), y.double().reshape(-1, 5)
    g = y64.T @ x64
    n = x64.shape[0]
    gamma = n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    bound = unit * g.abs() + gamma * (1 + unit) * (y64.abs().T @ x64.abs())
    for layer in (lin, rl):
        (layer(x) * y).sum().backward()
        assert layer.weight.grad.dtype == dtype
        assert ((layer.weight.grad.double() - g).abs() <= bound).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_input_and_bias_grads_exact(family):
    lin = nn.Linear(6, 5).double()
    rl = RandomizedLinear.from_linear(copy.deepcopy(lin), ratio=0.2, sketch=family)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    y = torch.randn(3, 4, 5, dtype=torch.float64)
    for layer in (lin, rl):
        xi = x.clone().requires_grad_(True)
        (layer(xi) * y).sum().backward()
        layer.xgrad = xi.grad
    assert torch.allclose(lin.xgrad, rl.xgrad, rtol=0, atol=1e-12)
    assert torch.allclose(lin.bias.grad, rl.bias.grad, rtol=0, atol=1e-12)


def test_noncontiguous_and_leading_dims():
    lin = nn.Linear(6, 5).double()
    rl = RandomizedLinear.from_linear(lin, ratio=1.0, sketch="rows-wor")
    x = torch.randn(6, 4, 3, dtype=torch.float64).permute(2, 1, 0)  # (3, 4, 6), not contiguous
    assert not x.is_contiguous()
    y = torch.randn(3, 4, 5, dtype=torch.float64)
    (rl(x) * y).sum().backward()
    exact = y.reshape(-1, 5).T @ x.reshape(-1, 6)
    assert torch.allclose(rl.weight.grad, exact, atol=1e-12)


def test_ratio_one_permutation_equals_exact_model():
    model = mlp(dtype=torch.float64)
    x = torch.randn(4, 9, 6, dtype=torch.float64)
    ref_p, ref_x = grads(model, x)
    randomize(model, ratio=1.0, sketch="rows-wor")
    got_p, got_x = grads(model, x)
    for a, b in zip(ref_p + [ref_x], got_p + [got_x]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_fresh_sketch_per_call_and_per_layer_without_sharing():
    """Unlike one reused generator state: two calls, and two identical layers, differ."""
    torch.manual_seed(0)
    twin = nn.Linear(6, 6)
    model = nn.Sequential(twin, copy.deepcopy(twin))
    randomize(model, ratio=0.3, sketch="gaussian", seed=7, share=False)
    x = torch.randn(20, 6)
    y = torch.randn(20, 6)
    first = [torch.autograd.grad((m(x) * y).sum(), m.weight)[0] for m in model]
    second = torch.autograd.grad((model[0](x) * y).sum(), model[0].weight)[0]
    assert not torch.equal(first[0], first[1])   # across layers
    assert not torch.equal(first[0], second)     # across calls


def weight_grads(model, x, y, calls):
    """Weight gradients of the first layer for ``calls`` calls on the same tensor objects."""
    return [torch.autograd.grad((model(x) * y).sum(), model[0].weight)[0] for _ in range(calls)]


@pytest.mark.parametrize("family", FAMILIES)
def test_same_input_tensor_gets_a_fresh_sketch_every_call(family):
    """Sharing on (the default): a tensor fed again (fixed features) never reuses a sketch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    randomize(model, ratio=0.3, sketch=family, seed=3)
    x, y = torch.randn(40, 6), torch.randn(40, 4)
    grads = weight_grads(model, x, y, 20)
    assert len({tuple(g.flatten().tolist()) for g in grads}) == 20


def probe(seed=0):
    """A linear probe on fixed features: its one layer reads the caller's tensor itself."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 3))


@pytest.mark.parametrize("build", [probe, mlp], ids=lambda f: f.__name__)
def test_reseed_repeats_a_fresh_conversion_on_a_reused_tensor(build):
    x, y = torch.randn(30, 6), torch.randn(30, 3)
    model = build()
    randomize(model, ratio=0.3, seed=1)
    first = weight_grads(model, x, y, 4)
    reseed(model, 2)
    again = weight_grads(model, x, y, 4)
    fresh = build()
    randomize(fresh, ratio=0.3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(again, weight_grads(fresh, x, y, 4)))
    assert not any(torch.equal(a, b) for a, b in zip(first, again))
    reseed(model, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, weight_grads(model, x, y, 4)))


class QKV(nn.Module):
    """Three linear layers reading one tensor, loss = Σ ⟨layer(x), Y_layer⟩."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)
        ys = torch.randn(3, 24, 4, generator=torch.Generator().manual_seed(5))
        self.register_buffer("ys", ys)

    def forward(self, x):
        return sum((m(x).reshape(-1, 4) * y).sum() for m, y in zip(self.children(), self.ys))


@pytest.mark.parametrize("family", ["gaussian", "rows-norm"])
def test_qkv_share_one_sketch_per_forward_and_draw_anew_next_forward(family):
    """One stored SᵀX per forward, drawn from the query's seed; the next forward on the same
    tensor draws the query's next seed: Ĝ_m = (SᵀY_m)ᵀ(SᵀX) with that S for all three."""
    from varstudy.randomized.layers import derive_seed
    from varstudy.randomized.memory import saved_bytes

    model = QKV()
    randomize(model, ratio=0.5, sketch=family, seed=9)
    x = torch.randn(3, 8, 6)
    sk, k = SKETCHES[family], 12
    for call in range(3):
        loss, report = saved_bytes(model, x, model=model)
        state_bytes = k * (8 + 4) if family == "rows-norm" else 0
        assert report.total == k * 6 * 4 + state_bytes  # one sketch for the three layers
        got = torch.autograd.grad(loss, [m.weight for m in model.children()])
        seed = derive_seed(9, 0, call)  # the query's (layer 0's) seed at this call
        sx, state = sk.sketch(x.reshape(-1, 6), k, seed)
        for g, y in zip(got, model.ys):
            assert torch.allclose(g, sk.apply(y, k, seed, state).T @ sx, atol=1e-5)


def test_same_base_seed_same_gradients():
    x = torch.randn(5, 8, 6)
    runs = []
    for _ in range(2):
        model = mlp()
        randomize(model, ratio=0.25, sketch="srht", seed=123)
        runs.append(grads(model, x)[0] + grads(model, x)[0])  # two steps each
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    model = mlp()
    randomize(model, ratio=0.25, sketch="srht", seed=124)
    assert not torch.equal(grads(model, x)[0][0], runs[0][0])
    reseed(model, 123)
    assert torch.equal(grads(model, x)[0][0], runs[0][0])


def test_randomize_shares_parameters_and_state_dict_keys():
    model = mlp()
    keys = list(model.state_dict())
    weight = model[2].weight
    summary = randomize(model, ratio=0.5, include=r"^[02]$")
    assert summary.names == ["0", "2"] and isinstance(model[2], RandomizedLinear)
    assert type(model[4]) is nn.Linear and model[2].weight is weight
    assert list(model.state_dict()) == keys
    assert "0" in str(summary) and len(summary.to_frame()) == 2
    back = derandomize(model)
    assert len(back) == 2 and type(model[2]) is nn.Linear and model[2].weight is weight


def test_exclude_pattern():
    model = mlp()
    assert randomize(model, exclude="4").names == ["0", "2"]


@pytest.mark.parametrize("kwargs,match", [
    ({"sketch": "normal"}, "unknown sketch 'normal'; valid choices: gaussian"),
    ({"ratio": 0.0}, r"ratio must be in \(0, 1\]"),
    ({"ratio": 1.5}, r"ratio must be in \(0, 1\]"),
    ({"ratio": "abc"}, "ratio must be a number"),
    ({"min_rows": 0}, "min_rows must be an integer >= 1"),
    ({"include": "attention"}, "match no nn.Linear; valid names: 0, 2, 4"),
    ({"include": "("}, "invalid layer pattern"),
])
def test_bad_input_leaves_model_unchanged(kwargs, match):
    model = mlp()
    before = [type(m) for m in model]
    with pytest.raises(VarstudyError, match=match):
        randomize(model, **kwargs)
    assert [type(m) for m in model] == before


def test_integer_input_rejected():
    rl = RandomizedLinear(4, 2)
    with pytest.raises(VarstudyError, match="floating-point input, got torch.int64"):
        rl(torch.ones(3, 4, dtype=torch.long))


def test_min_rows_never_zero_gradient():
    rl = RandomizedLinear(4, 2, ratio=0.01, sketch="rows")
    x = torch.randn(3, 4)
    rl(x).sum().backward()
    assert rl.weight.grad.abs().sum() > 0


def test_no_grad_and_frozen_weight_use_plain_linear():
    rl = RandomizedLinear(4, 2)
    with torch.no_grad():
        rl(torch.randn(3, 4))
    rl.weight.requires_grad_(False)
    rl(torch.randn(3, 4))
    assert rl.calls == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_on_device(family):
    lin = nn.Linear(6, 5).cuda()
    rl = RandomizedLinear.from_linear(lin, ratio=0.5, sketch=family)
    x = torch.randn(4, 6, device="cuda", requires_grad=True)
    assert torch.equal(rl(x), lin(x))
    rl(x).sum().backward()
    assert rl.weight.grad.device.type == "cuda"


@pytest.mark.parametrize("family", ["gaussian", "rademacher"])
def test_dense_matrix_drawn_once_per_shared_input_and_released(family, monkeypatch):
    """Q, K, V read one input: one draw in forward, one in backward, none kept afterwards."""
    sketch = SKETCHES[family]
    draws = []
    original = sketch.draw
    monkeypatch.setattr(sketch, "draw", lambda *a, **kw: draws.append(a[:2]) or original(*a, **kw))

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x):
            return (self.query(x) * self.key(x) + self.value(x)).sum()

    model = QKV()
    randomize(model, ratio=0.5, sketch=family)
    model(torch.randn(3, 8, 6)).backward()
    assert draws == [(24, 12), (24, 12)] and sketch._last is None
    assert all(m.weight.grad is not None for m in model.children())


def test_reseed_drops_a_sketch_drawn_before_it():
    """A stale entry the query never used (key called alone) must not leak past reseed."""
    x = torch.randn(3, 8, 6)
    runs = []
    for seed, before in ((1, True), (5, False)):
        torch.manual_seed(0)
        model = QKV()
        randomize(model, ratio=0.5, seed=seed)
        if before:
            model.key(x)
            reseed(model, 5)
        runs.append(torch.autograd.grad(model(x), [m.weight for m in model.children()]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_derive_seed_has_no_shift_collisions():
    """Adding the first key straight to the base made (s, l, c) and (s + 1, l - 1, c) collide,
    so layer l at seed s drew the sketches of layer l - 1 at seed s + 1."""
    from varstudy.randomized.layers import derive_seed

    seeds = {derive_seed(s, l, c) for s in range(40) for l in range(40) for c in range(4)}
    assert len(seeds) == 40 * 40 * 4
    assert derive_seed(1, 1, 0) != derive_seed(2, 0, 0)
    assert all(0 <= x < 2**63 for x in seeds)
    assert derive_seed(3, 5) == derive_seed(3, 5)  # a pure function
