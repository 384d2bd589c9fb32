"""Online re-planning of the samplers that know where the gradient is (``rows-live``,
``rows-adaptive``; NOTE [online statistics of the live families] in varstudy.randomized.online):
each call's estimate of the layer's constant is unbiased for the family's closed form computed
here from (X, Y), the live mask and the q the stored sample was drawn with; inside tiny-bert
against the same closed forms on the captured (X, Y); plans and finetune --replan-every with
both families; refusals."""

import math

import pytest
import torch
from torch import nn

from varstudy.errors import VarstudyError
from varstudy.finetune import FinetuneConfig, run_name, train
from varstudy.measure.informed import profile_stats
from varstudy.models import load_model
from varstudy.randomized import plan as P
from varstudy.randomized.informed import RowsAdaptive
from varstudy.randomized.layers import RandomizedLinear, SketchCache, randomize
from varstudy.randomized.online import (LIVE_FAMILIES, ONLINE_FAMILIES, LayerTracker,
                                        OnlinePlanner, replan_rows)
from varstudy.randomized.rowmask import RowMask
from varstudy.randomized.sketches import SKETCHES, rows_for

Z = 4.5  # two-sided false alarm 7e-6 per comparison (normal approximation, fixed seeds)
B, L, D_IN, D_OUT = 6, 5, 4, 3
DRAWS = 1000


def closed_form(family: str, x, y, live, profile=None) -> float:
    """One call's constant as the tracker adds it, from the closed forms of
    varstudy.randomized.informed: rows-live c·m/(m − 1) with c its variance at one kept row,
    rows-adaptive its variance at one row under the q of ``profile`` (None: uniform)."""
    xf, yf = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    if family == "rows-live":
        m = float(live.sum())
        one = float(SKETCHES["rows-live"].variance(xf, yf, 1, live))
        return one * m / (m - 1) if m > 1 else 0.0
    return float(RowsAdaptive(stats=profile_stats(profile)).variance(xf, yf, 1, live))


def _problem(first_token=False, seed=0):
    """x (B, L, d_in), y (B, L, d_out) zero off the live rows, the attention mask (B, L) with
    padding, and the live mask (position 0 only for a first-token layer)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(B, L, D_OUT, generator=gen, dtype=torch.float64)
    y[:, 0] *= 3
    mask = torch.ones(B, L)
    mask[1, 3:], mask[4, 2:] = 0, 0
    live = mask.clone()
    if first_token:
        live[:, 1:] = 0
    return x, y * live[..., None].double(), mask, live


def _layer(family, ratio, mask, first_token=False, cache=None, layer_id=0):
    lin = nn.Linear(D_IN, D_OUT, dtype=torch.float64)
    layer = RandomizedLinear.from_linear(lin, ratio=ratio, sketch=family, seed=3, min_rows=2,
                                         layer_id=layer_id, cache=cache,
                                         first_token=first_token)
    layer.row_mask = RowMask()
    layer.row_mask.mask = mask
    layer.tracker = LayerTracker(layer.sketch, reference=True, first_token=first_token)
    return layer


def _set_profile(layer, profile):
    """Hold the layer's running ȳ at ``profile`` (None: empty; backward would move it)."""
    if not isinstance(layer.sketch, RowsAdaptive):
        return
    layer.sketch.stats.load_state_dict({} if profile is None else
                                       {"mean": profile.float().clone(),
                                        "seen": torch.ones(L, dtype=torch.bool)})


def _check_mean(values, expected, label):
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert abs(mean - expected) <= Z * sd / math.sqrt(len(values)) + 1e-12 * abs(expected), \
        (label, mean, expected, sd)
    return mean, sd


PROFILE = torch.tensor([3.0, 0.5, 1.0, 2.0, 0.25])
CASES = [  # family, ratio, first-token layer, ȳ held fixed
    ("rows-live", 0.3, False, None),      # k = 9 of 25 live rows among 30
    ("rows-live", 0.1, True, None),       # k = 3 of the B = 6 first-token rows
    ("rows-adaptive", 0.2, False, PROFILE),
    ("rows-adaptive", 0.2, False, None),  # before any statistics: uniform over the live rows
    ("rows-adaptive", 0.1, True, PROFILE),
]


@pytest.mark.parametrize("family, ratio, first, profile", CASES,
                         ids=[f"{c[0]}-{c[1]}-{'first' if c[2] else 'tokens'}"
                              f"-{'profile' if c[3] is not None else 'none'}" for c in CASES])
def test_each_calls_estimate_is_unbiased_for_the_closed_form(family, ratio, first, profile):
    """Over R sketch draws on one (X, Y), the mean of the call's estimate is the closed form
    within Z standard errors, and the reference (from X) equals it."""
    x, y, mask, live = _problem(first)
    layer = _layer(family, ratio, mask, first)
    expected = closed_form(family, x, y, live, profile)
    values = []
    for _ in range(DRAWS):
        _set_profile(layer, profile)
        (layer(x) * y).sum().backward()
        values.append(float(layer.tracker.sum_c))
        assert float(layer.tracker.sum_c_exact) == pytest.approx(expected, rel=1e-10)
        assert float(layer.tracker.sum_live) == float(live.sum())
        layer.tracker.reset()
    mean, sd = _check_mean(values, expected, family)
    assert sd > 0 and expected > 0


def test_a_sibling_sharing_the_sample_is_estimated_at_the_drawing_layers_q():
    """Key uses the sample query drew (NOTE [shared sketches]): its estimate is unbiased for the
    closed form at query's q, twice the test's tolerance away from the one at its own q."""
    x, y, mask, live = _problem()
    y_key = torch.randn(y.shape, generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64) * live[..., None].double()
    cache = SketchCache()
    query = _layer("rows-adaptive", 0.2, mask, cache=cache, layer_id=0)
    key = _layer("rows-adaptive", 0.2, mask, cache=cache, layer_id=1)
    own = torch.tensor([0.05, 6.0, 0.1, 0.05, 8.0])
    at_drawer = closed_form("rows-adaptive", x, y_key, live, PROFILE)
    at_own = closed_form("rows-adaptive", x, y_key, live, own)
    values = []
    for _ in range(DRAWS):
        _set_profile(query, PROFILE)
        _set_profile(key, own)
        ((query(x) * y).sum() + (key(x) * y_key).sum()).backward()
        values.append(float(key.tracker.sum_c))
        assert float(key.tracker.sum_c_exact) == pytest.approx(at_drawer, rel=1e-10)
        for layer in (query, key):
            layer.tracker.reset()
    _, sd = _check_mean(values, at_drawer, "key")
    assert abs(at_own - at_drawer) > 2 * Z * sd / math.sqrt(len(values))


@pytest.mark.parametrize("family", LIVE_FAMILIES)
@pytest.mark.parametrize("how", ["first-token-b-rows", "exact-unit"])
def test_a_layer_that_keeps_every_live_row_knows_its_constant_exactly(family, how):
    """A first-token layer at k ≥ B stores its B rows, an exact unit its input: Ĝ = G, and the
    estimate is the closed form itself (rows-adaptive: at the q the layer would draw with now,
    its own ȳ, or uniform before it has one)."""
    first = how == "first-token-b-rows"
    x, y, mask, live = _problem(first)
    layer = _layer(family, 0.5, mask, first)
    layer.set_exact(how == "exact-unit")
    for profile in (None, PROFILE):
        _set_profile(layer, profile)
        (layer(x) * y).sum().backward()
        expected = closed_form(family, x, y, live, profile)
        assert float(layer.tracker.sum_c) == pytest.approx(expected, rel=1e-10)
        assert float(layer.tracker.sum_c_exact) == pytest.approx(expected, rel=1e-10)
        layer.tracker.reset()


# ----------------------------------------------------------------------------------------------
# Inside tiny-bert
# ----------------------------------------------------------------------------------------------


def _batches(vocab: int, count: int, seed: int, batch=4, length=16):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(5, vocab, (batch, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[:2, 10:] = 0
        mask[2, 13:] = 0
        yield dict(input_ids=ids, attention_mask=mask,
                   labels=torch.randint(0, 2, (batch,), generator=gen))


def _tiny(family, ratio):
    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    randomize(model, ratio, family, seed=0)
    return model


def _capture(model):
    """Hooks keeping each RandomizedLinear's input X and output gradient Y of the next pass."""
    got, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, RandomizedLinear):
            def hook(mod, args, out, name=name):
                got[name] = [args[0].detach()]
                out.register_hook(lambda g: got[name].append(g.detach()))
            handles.append(module.register_forward_hook(hook))
    return got, handles


def _drawer(name, layers):
    """The layer whose draw ``name`` uses: the first of query, key, value of its block that is
    not a first-token layer (those never share), else itself."""
    block, _, kind = name.rpartition(".")
    if kind not in ("query", "key", "value") or layers[name].first_token:
        return name
    for sibling in ("query", "key", "value"):
        if not layers[f"{block}.{sibling}"].first_token:
            return f"{block}.{sibling}"


def _independent(family, name, layers, x, y, mask, profiles, batch_rows):
    """The call's closed-form constant from the captured X, Y: live rows from the attention
    mask (position 0 in a first-token layer), q from the drawing layer's ȳ before the pass (the
    layer's own where it keeps every live row)."""
    module = layers[name]
    if x.dim() == 3:
        live = mask.float().clone()
        if module.first_token:
            live[:, 1:] = 0
    else:
        live = torch.ones(1, x.shape[0])
    k = rows_for(x.reshape(-1, x.shape[-1]).shape[0], module.ratio, module.min_rows)
    kept_all = module.exact or (module.first_token and x.dim() == 3 and batch_rows <= k)
    profile = profiles[name if kept_all else _drawer(name, layers)]
    return closed_form(family, x, y, live, profile), kept_all


@pytest.mark.parametrize("family", LIVE_FAMILIES)
@pytest.mark.parametrize("ratio", [0.05, 0.25])  # first-token layers sampled (k 3 < B 4), or kept
def test_online_estimates_match_the_closed_form_on_the_captured_batches(family, ratio):
    """Per layer of tiny-bert (padding in the batches, first-token layers probed), over 60
    minibatches: the reference equals the closed form computed here from the captured (X, Y),
    and the mean of estimate − closed form is within Z standard errors of 0 (equal, up to
    float32 rounding, where the layer keeps every live row)."""
    model = _tiny(family, ratio)
    planner = OnlinePlanner(model, ratio, every=10**6, reference=True)
    assert any(m.first_token for m in planner.layers.values())
    got, handles = _capture(model)
    diffs, exact = {}, set()
    for batch in _batches(model.config.vocab_size, 60, seed=2):
        profiles = {n: m.sketch.stats.profile(16, "cpu") if family == "rows-adaptive" else None
                    for n, m in planner.layers.items()}
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        for name, tracker in planner.trackers.items():
            x, y = got[name]
            want, kept_all = _independent(family, name, planner.layers, x, y,
                                          batch["attention_mask"], profiles, 4)
            assert float(tracker.sum_c_exact) == pytest.approx(want, rel=1e-4, abs=1e-12), name
            if kept_all:
                exact.add(name)
                assert float(tracker.sum_c) == pytest.approx(want, rel=1e-4, abs=1e-12), name
            diffs.setdefault(name, []).append(float(tracker.sum_c) - want)
            tracker.reset()
    for handle in handles:
        handle.remove()
    assert len(diffs) == len(planner.layers)
    assert bool(exact) == (ratio == 0.25)  # first-token layers at k 16 >= B 4
    for name, values in diffs.items():
        if name not in exact:
            _check_mean(values, 0.0, name)


@pytest.mark.parametrize("family", LIVE_FAMILIES)
def test_planner_plans_first_token_layers_at_min_k_b_within_the_budget(family, tmp_path):
    """Plans within uniform ρ's bytes from stats shaped as varstudy.plan's (m, first-token
    units, the family's state), applied to the layers; resumed from a saved state_dict, it
    makes the same next plan."""
    model = _tiny(family, 0.25)
    planner = OnlinePlanner(model, 0.25, every=3, reference=True)
    first = {n for n, m in planner.layers.items() if m.first_token}
    for batch in _batches(model.config.vocab_size, 6, seed=3):
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        planner.step()
    record = planner.history[-1]
    assert [r.step for r in planner.history] == [3, 6]
    assert record.plan.total_stored <= record.uniform.total_stored * (1 + 1e-12)
    assert record.plan.total_var <= record.uniform.total_var * (1 + 1e-12)
    for s in record.stats:
        assert s.state == P.VARIANCE_STATE[family] and s.first_token == (s.name in first)
        if s.name in first:
            assert s.m == 4 and s.unit == s.name and record.uniform.k[s.name] == 4
            assert record.plan.k[s.name] <= 4
        elif family == "rows-live" and s.n == 64:
            assert 4 < s.m < 64  # padding rows are not live
    for name, ratio in record.plan.ratios.items():
        module = planner.layers[name]
        assert module.exact == (ratio == P.EXACT)
        if ratio != P.EXACT:
            assert module.ratio == ratio
    rows = replan_rows(record)
    assert sum(r["var_online_pred"] for r in rows) == pytest.approx(record.plan.total_var)
    assert all(r["live_rows"] == 4 for r in rows if r["layer"] in first)
    true = {label: sum(r[f"var_{label}"] for r in rows) for label in ("exact_stats", "uniform")}
    assert true["exact_stats"] <= true["uniform"] * (1 + 1e-9)
    model(**next(_batches(model.config.vocab_size, 1, seed=4))).loss.backward()  # mid-window
    path = tmp_path / "planner.pt"
    torch.save(planner.state_dict(), path)
    again = _tiny(family, 0.25)
    resumed = OnlinePlanner(again, 0.25, every=3, reference=True)
    resumed.load_state_dict(torch.load(path, weights_only=True))  # as a checkpoint loads
    assert {n: (m.ratio, m.exact) for n, m in resumed.layers.items()} == \
        {n: (m.ratio, m.exact) for n, m in planner.layers.items()}
    assert resumed.stats() == planner.stats() and resumed.replan().plan == planner.replan().plan


@pytest.mark.parametrize("family", LIVE_FAMILIES)
def test_finetune_replans_with_the_family(family, tmp_path):
    """finetune --replan-every 2 --replan-check on tiny-bert: re-plans at steps 2 and 4, one
    row per layer each, first-token layers planned over their B live rows."""
    config = FinetuneConfig(
        model="tiny-bert", task="synthetic", sketch=family, ratio=0.25, batch_size=4,
        max_length=16, max_steps=4, eval_every=4, eval_examples=8, lr=1e-3, progress=False,
        num_threads=2, replan_every=2, replan_check=True, out=str(tmp_path))
    result = train(config)
    plans = result.plans
    assert sorted(plans.step.unique()) == [2, 4] and set(plans.family) == {family}
    assert len(plans) == 2 * len(result.config["converted"])
    assert (plans.c_online.notna() & plans.c_exact.notna()).all()
    assert (plans.ratio_online > 0).all() and (plans.ratio_online <= 1).all()
    assert (tmp_path / run_name(config) / "plans.csv").exists()


def test_one_clear_message_for_what_it_cannot_plan():
    """Other families, and two families in one model, are refused in one line naming the valid
    choices, the live families among them."""
    for family in ("rows-real", "wta-crs"):
        with pytest.raises(VarstudyError, match=r"valid choices: one family of .*rows-live, "
                                                r"rows-adaptive") as err:
            OnlinePlanner(_tiny(family, 0.25), 0.25)
        assert "\n" not in str(err.value)
    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    randomize(model, 0.25, "rows-live", include="encoder")
    randomize(model, 0.25, "rows-adaptive", include="pooler|classifier")
    with pytest.raises(VarstudyError, match="rows-adaptive, rows-live: .*one family of"):
        OnlinePlanner(model, 0.25)
    assert set(ONLINE_FAMILIES) >= set(LIVE_FAMILIES)
