"""Online re-planning (NOTE [online statistics] in varstudy.randomized.online): the estimate of
each layer's constant from the sketch itself is unbiased against the exact capture, exact units
store X and give G, and the planner re-plans a model within the bytes of uniform ρ."""

import math

import pytest
import torch
from torch import nn

from varstudy.errors import VarstudyError
from varstudy.models import load_model
from varstudy.randomized import plan as P
from varstudy.randomized.layers import RandomizedLinear, randomize
from varstudy.randomized.memory import saved_bytes
from varstudy.randomized.online import (BASE_FAMILIES, LayerTracker, OnlinePlanner, constant,
                                        replan_rows)
from varstudy.randomized.sketches import get_sketch, moments

Z = 4.5  # two-sided false alarm 7e-6 per comparison (normal approximation, fixed seeds)


@pytest.mark.parametrize("family", BASE_FAMILIES)  # the live ones: test_online_informed.py
def test_estimate_is_unbiased_against_the_closed_form(family):
    """Mean of Ĉ over R sketch draws on one fixed (X, Y) = C from the captured X, Y, within Z
    standard errors of that mean (the sample SD of the R draws)."""
    gen = torch.Generator().manual_seed(7)
    n, d, o, draws = 12, 5, 3, 1500
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, o, generator=gen, dtype=torch.float64)
    lin = nn.Linear(d, o, dtype=torch.float64)
    layer = RandomizedLinear.from_linear(lin, ratio=0.25, sketch=family, seed=3)
    layer.tracker = tracker = LayerTracker(get_sketch(family), reference=True)
    values = []
    for _ in range(draws):
        (layer(x) * y).sum().backward()
        values.append(float(tracker.sum_c))
        assert float(tracker.sum_c_exact) == pytest.approx(
            float(constant(get_sketch(family), *moments(x, y), n)), rel=1e-12)
        tracker.reset()
    exact = float(constant(get_sketch(family), *moments(x, y), n))
    mean = sum(values) / draws
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (draws - 1))
    assert abs(mean - exact) <= Z * sd / math.sqrt(draws), (mean, exact, sd)


def test_an_exact_layer_gives_g_stores_a_compact_input_and_knows_c_exactly():
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(6, 8, 5, generator=gen, dtype=torch.float64)
    x = big[:, 0]  # a view of 6·8 rows, as BERT's pooler reads hidden[:, 0]
    y = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    lin = nn.Linear(5, 3, dtype=torch.float64)
    layer = RandomizedLinear.from_linear(lin, ratio=0.5, sketch="rows")
    layer.set_exact(True)
    layer.tracker = tracker = LayerTracker(get_sketch("rows"))
    out, report = saved_bytes(layer, x, model=layer)
    assert report.total == 6 * 5 * 8 + 6 * 8  # the compact input and its row norms (float64)
    (out * y).sum().backward()
    torch.testing.assert_close(layer.weight.grad, y.T @ x, rtol=1e-13, atol=0)
    exact = float(constant(get_sketch("rows"), *moments(x, y), 6))
    assert float(tracker.sum_c) == pytest.approx(exact, rel=1e-12)
    assert "ratio=exact" in repr(layer)


def _batches(vocab: int, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(5, vocab, (4, 16), generator=gen)
        mask = torch.ones_like(ids)
        mask[:2, 10:] = 0
        yield dict(input_ids=ids, attention_mask=mask,
                   labels=torch.randint(0, 2, (4,), generator=gen))


def _tiny(ratio=0.25, family="rows"):
    model, _ = load_model("tiny-bert", seed=0)
    randomize(model, ratio, family, seed=0)
    return model


def test_online_estimates_match_the_exact_capture_in_a_model():
    """Per layer of tiny-bert, the mean of Ĉ − C over 150 minibatches (one estimate each) is
    within Z standard errors of 0."""
    model = _tiny()
    planner = OnlinePlanner(model, 0.25, every=10**6, reference=True)
    online, exact = {}, {}
    for batch in _batches(model.config.vocab_size, 150, seed=2):
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        for s, e in zip(planner.stats(), planner.stats(exact=True)):
            online.setdefault(s.name, []).append(s.c)
            exact.setdefault(s.name, []).append(e.c)
        for tracker in planner.trackers.values():
            tracker.reset()
    assert len(online) == len(planner.layers)
    for name in online:
        diff = [a - b for a, b in zip(online[name], exact[name])]
        mean = sum(diff) / len(diff)
        sd = math.sqrt(sum((v - mean) ** 2 for v in diff) / (len(diff) - 1))
        assert abs(mean) <= Z * sd / math.sqrt(len(diff)) + 1e-12 * max(exact[name]), name


def test_planner_applies_plans_within_the_budget_and_resumes():
    model = _tiny()
    planner = OnlinePlanner(model, 0.25, every=3, reference=True)
    for batch in _batches(model.config.vocab_size, 6, seed=3):
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        planner.step()
    assert [r.step for r in planner.history] == [3, 6]
    record = planner.history[-1]
    assert record.plan.total_stored <= record.uniform.total_stored * (1 + 1e-12)
    assert record.plan.total_var <= record.uniform.total_var * (1 + 1e-12)
    for name, ratio in record.plan.ratios.items():
        module = planner.layers[name]
        assert module.exact == (ratio == P.EXACT) and module.min_rows >= 2
        if ratio != P.EXACT:
            assert module.ratio == ratio
    rows = replan_rows(record)
    assert len(rows) == len(planner.layers)
    assert all(r["c_exact"] >= 0 and r["ratio_exact_stats"] > 0 for r in rows)
    assert sum(r["var_online_pred"] for r in rows) == pytest.approx(record.plan.total_var)
    assert sum(r["exact_online"] for r in rows) == sum(
        v == P.EXACT for v in record.plan.ratios.values())
    true = {label: sum(r[f"var_{label}"] for r in rows)
            for label in ("online", "exact_stats", "uniform")}
    assert true["exact_stats"] <= true["uniform"] * (1 + 1e-9)
    # a fresh planner on a fresh model resumes the same layers and statistics
    again = _tiny()
    resumed = OnlinePlanner(again, 0.25, every=3, reference=True)
    resumed.load_state_dict(planner.state_dict())
    assert {n: (m.ratio, m.exact) for n, m in resumed.layers.items()} == \
        {n: (m.ratio, m.exact) for n, m in planner.layers.items()}
    assert resumed.steps == 6 and resumed.stats() == planner.stats()
    planner.close()
    assert all(m.tracker is None for m in planner.layers.values())


@pytest.mark.parametrize("kwargs, words", [
    (dict(objective="relative"), "per-example gradients"),
    (dict(every=0), "every must be an integer"),
    (dict(budget=1.5), "ratio must be in (0, 1]"),
])
def test_planner_bad_input(kwargs, words):
    model = _tiny()
    with pytest.raises(VarstudyError, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        OnlinePlanner(model, **{"budget": 0.25, **kwargs})


def test_planner_refuses_an_exact_model_and_real_rows():
    model, _ = load_model("tiny-bert", seed=0)
    with pytest.raises(VarstudyError, match="randomize"):
        OnlinePlanner(model, 0.25)
    with pytest.raises(VarstudyError, match="one family of"):
        OnlinePlanner(_tiny(family="rows-real"), 0.25)
