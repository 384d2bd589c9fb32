"""RandomizedLinear under torch.autocast (CPU bfloat16/float16 here; CUDA runs the same code).

NOTE [mixed precision] in varstudy.randomized.layers: the forward, dX and db equal nn.Linear's under
autocast, the stored sketch is in the autocast dtype, and Ĝ stays unbiased up to a stated
rounding bound (``rounding_bound``), checked draw by draw and by Monte Carlo.
"""

import copy
from contextlib import nullcontext

import pytest
import torch
from scipy.stats import norm
from torch import nn

from varstudy.randomized.layers import RandomizedLinear, derive_seed, randomize
from varstudy.randomized.memory import saved_bytes
from varstudy.randomized.sketches import SKETCHES

# rows-adaptive's draws depend on per-layer statistics that every backward updates, so the same S
# cannot be rebuilt from the registry's instance here; it stores and applies its rows through
# rows-norm's gather-and-scale (tested below in bf16), and its unbiasedness is tested with its
# statistics in tests/test_informed.py.
FAMILIES = [f for f in SKETCHES if f != "rows-adaptive"]
ALPHA = 1e-3          # family-wise false-alarm rate of the Monte Carlo test
U = 2.0 ** -8         # unit roundoff of bfloat16 (8 significant bits, round to nearest)


def autocast(dtype=torch.bfloat16):
    return torch.autocast("cpu", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_exact_grads_equal_linear_under_autocast(family, dtype):
    lin = nn.Linear(6, 5)
    rl = RandomizedLinear.from_linear(copy.deepcopy(lin), ratio=0.5, sketch=family)
    x, y = torch.randn(2, 7, 6), torch.randn(2, 7, 5)
    got = []
    for layer in (lin, rl):
        xi = x.clone().requires_grad_(True)
        with autocast(dtype):
            out = layer(xi)
        (out.float() * y).sum().backward()
        got.append((out, xi.grad, layer.bias.grad, layer.weight.grad))
    (out, gx, gb, _), (r_out, r_gx, r_gb, r_gw) = got
    assert r_out.dtype == dtype and torch.equal(r_out, out)
    assert r_gx.dtype == torch.float32 and torch.equal(r_gx, gx)
    assert r_gb.dtype == torch.float32 and torch.equal(r_gb, gb)
    assert r_gw.dtype == torch.float32 and r_gw.shape == (5, 6)
    assert torch.isfinite(r_gw).all() and r_gw.abs().sum() > 0


@pytest.mark.parametrize("family", ["gaussian", "rows-norm"])
def test_stored_sketch_is_in_the_autocast_dtype(family):
    """k·d_in·2 bytes under bf16 autocast, half of float32's; Q/K/V still store one sketch."""
    layers = nn.ModuleDict({n: nn.Linear(6, 4) for n in ("query", "key", "value")})
    randomize(layers, ratio=0.5, sketch=family)
    x = torch.randn(3, 8, 6)
    k, state = 12, (12 * (8 + 4) if family == "rows-norm" else 0)  # int64 rows, fp32 scales

    def step(names):
        return sum(layers[n](x).float().sum() for n in names)

    for names in (["query"], ["query", "key", "value"]):
        _, plain = saved_bytes(step, names, model=layers)
        with autocast():
            loss, mixed = saved_bytes(step, names, model=layers)
        assert plain.total == k * 6 * 4 + state and mixed.total == k * 6 * 2 + state
        loss.backward()


@pytest.mark.parametrize("autocast_on", [False, True])
def test_dense_matrix_cache_keyed_on_autocast_dtype(autocast_on, monkeypatch):
    """Q/K/V under autocast: one draw in forward, one in backward, released afterwards."""
    sketch = SKETCHES["gaussian"]
    draws = []
    original = sketch.draw
    monkeypatch.setattr(sketch, "draw", lambda *a, **kw: draws.append(a[:2]) or original(*a, **kw))
    layers = nn.ModuleList(nn.Linear(6, 4) for _ in range(3))
    randomize(layers, ratio=0.5)
    x = torch.randn(3, 8, 6)
    with autocast() if autocast_on else nullcontext():
        loss = sum(m(x).float().square().sum() for m in layers)
    loss.backward()
    assert draws == [(24, 12), (24, 12)] and sketch._last is None
    assert all(m.weight.grad.dtype == torch.float32 for m in layers)


def gamma(m):
    """Bound on the relative error of a float32 sum of m terms."""
    return m * 2.0 ** -24 / (1 - m * 2.0 ** -24)


def factor_bound(st, x, matrix_rounding):
    """Entrywise bound e_A on |fl(SᵀX) − SᵀX| for a sketch stored in bfloat16.

    st = Sᵀ (k, n) in float64; x (n, d) holds bfloat16 values, so the casts of autocast are
    exact. NOTE [low precision] in varstudy.randomized.sketches: the matrix entries are rounded (|S̃ − S| ≤
    v|S|, v = u for gaussian, 0 where the entries are exact: ±1 or 0 with scales applied in
    float32), sums run in float32 (error ≤ γ_n |S̃|ᵀ|X|) and the result is rounded at most
    twice, so  e_A = (1 + u)²(v + γ_n(1 + v)) |S|ᵀ|X| + ((1 + u)² − 1) |SᵀX|.
    """
    r2, v = (1 + U) ** 2, U if matrix_rounding else 0.0
    spread = st.abs() @ x.abs()
    return r2 * (v + gamma(st.shape[1]) * (1 + v)) * spread + (r2 - 1) * (st @ x).abs()


def rounding_bound(st, x, y, matrix_rounding):
    """Entrywise bound on |Ĝ_bf16 − Ĝ*| for one draw; Ĝ* = (SᵀY)ᵀ(SᵀX) in exact arithmetic.

    With A = SᵀX, B = SᵀY and e_A, e_B from :func:`factor_bound`, Ĝ_bf16 = fl(B̃ᵀÃ) (a float32
    sum over k, one rounding) gives
        |Ĝ_bf16 − Ĝ*| ≤ e_Bᵀ(|A| + e_A) + |B|ᵀe_A + (u + γ_k(1 + u)) (|B| + e_B)ᵀ(|A| + e_A).
    """
    e_a, e_b = factor_bound(st, x, matrix_rounding), factor_bound(st, y, matrix_rounding)
    a, b = (st @ x).abs(), (st @ y).abs()
    last = U + gamma(st.shape[0]) * (1 + U)  # the product's float32 sum and one rounding
    return e_b.T @ (a + e_a) + b.T @ e_a + last * (b + e_b).T @ (a + e_a)


@pytest.mark.parametrize("family", [f for f in FAMILIES if not SKETCHES[f].dense])
def test_bf16_sketch_is_the_float32_sketch_rounded_once(family):
    """NOTE [low precision]: n = 4096 rows into k = 4 (long bucket sums, 12 transform stages)
    of a bf16 input give exactly the float32 sketch of the same values, rounded once."""
    x = torch.randn(4096, 3, generator=torch.Generator().manual_seed(2)).bfloat16()
    sk = SKETCHES[family]
    sx = sk.sketch(x, 4, 5)[0]
    assert sx.dtype == torch.bfloat16 and torch.equal(sx, sk.sketch(x.float(), 4, 5)[0].bfloat16())


def bf16_problem(n=40, d_in=6, d_out=5):
    """Rows of varying norm, correlated X and Y, every value exactly representable in bf16."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, d_in, generator=gen) * torch.rand(n, 1, generator=gen).mul(3)
    y = torch.randn(n, d_out, generator=gen) + 0.8 * x[:, :d_out]
    return x.bfloat16().double(), y.bfloat16().double()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_unbiased_under_bf16_storage(family):
    """M draws of the layer's Ĝ under bf16 autocast (sketch stored in bf16).

    Every draw lies within ``rounding_bound`` of the exact-arithmetic Ĝ* with the same S, and the
    mean satisfies |mean Ĝ − G| ≤ z*·√(V_ij/M) + mean_d bound_d, V_ij the closed-form entry
    variance of Ĝ* and z* the Bonferroni level for ALPHA over entries and families (normal
    approximation of the mean of M i.i.d. draws): false-alarm rate ≤ ALPHA, fixed seeds. The
    tolerance is not vacuous: the same mean scaled by 1.15 fails it.
    """
    x, y = bf16_problem()
    n, k, draws, seed = x.shape[0], 20, 300, 11
    sk = SKETCHES[family]
    layer = RandomizedLinear(6, 5, ratio=0.5, sketch=family, seed=seed)
    x_in, y_out, eye = x.float().reshape(5, 8, 6), y.float().reshape(5, 8, 5), torch.eye(n).double()
    got, bounds, exact = [], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster than two on a shared runner
    try:
        for d in range(draws):
            with autocast():
                out = layer(x_in)
            got.append(torch.autograd.grad((out.float() * y_out).sum(), layer.weight)[0].double())
            s = derive_seed(seed, 0, d)  # the layer's seed at call d (layer_id 0)
            st = sk.apply(eye, k, s, sk.sketch(x, k, s)[1])  # Sᵀ (k, n) in float64
            exact.append((st @ y).T @ (st @ x))
            bounds.append(rounding_bound(st, x, y, family == "gaussian"))
    finally:
        torch.set_num_threads(threads)
    got, bounds, exact = torch.stack(got), torch.stack(bounds), torch.stack(exact)
    assert ((got - exact).abs() <= bounds).all()
    g = y.T @ x
    z_crit = norm.isf(ALPHA / (2 * g.numel() * len(FAMILIES)))
    tol = z_crit * (sk.entry_variance(x, y, k) / draws).sqrt() + bounds.mean(0)
    assert ((got.mean(0) - g).abs() <= tol).all()
    assert ((got.mean(0) * 1.15 - g).abs() > tol).any()  # teeth: a 15 % bias would fail


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_bert_trains_one_step_under_bf16_autocast(family):
    from varstudy.models import load_model

    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad(), autocast():
        exact = model(input_ids=ids).logits
    randomize(model, ratio=0.5, sketch=family)
    with autocast():
        out = model(input_ids=ids, labels=labels)
    assert torch.equal(out.logits, exact)  # the forward stays exact under autocast
    out.loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == p.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p.grad).all() for p in params)
    torch.optim.SGD(params, lr=0.5).step()
    with torch.no_grad(), autocast():
        after = model(input_ids=ids, labels=labels).loss
    assert torch.isfinite(after) and after != out.loss
