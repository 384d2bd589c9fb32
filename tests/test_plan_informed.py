"""Plans of the samplers that know where the gradient is (``rows-live``, ``rows-adaptive``):
their variance in k, first-token layers costed at min(k, B) rows, plans applied, refusals."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from varstudy import measure as M
from varstudy import plan as command
from varstudy.errors import VarstudyError
from varstudy.measure import measure_now
from varstudy.models import load_model
from varstudy.randomized import plan as P
from varstudy.randomized.capture import capture
from varstudy.randomized.layers import RandomizedLinear, randomize
from varstudy.randomized.memory import saved_bytes
from varstudy.randomized.sketches import SKETCHES

FAMILIES = ("rows-live", "rows-adaptive")
B, L = 4, 12
FIRST = {f"bert.encoder.layer.1.{n}" for n in
         ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")}


def _batches(count=3):
    """Minibatches of tiny-bert with no padding: every batch has the same live rows."""
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1000, 2000, (B, L), generator=gen),
             "attention_mask": torch.ones(B, L, dtype=torch.long),
             "labels": torch.randint(0, 2, (B,), generator=gen)} for _ in range(count)]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """tiny-bert measured by measure_now under both families at ρ = 0.25, and per family a plan
    at uniform 0.25's bytes written to plan_<family>.json."""
    root = tmp_path_factory.mktemp("informed")
    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    batches = _batches()
    layers = measure_now(model, batches, FAMILIES, (0.25,))
    plans = {}
    for family in FAMILIES:
        stats = command.stats_from_layers(layers, family)
        uniform = P.uniform(stats, family, 0.25)
        plan = P.plan_budget(stats, family, uniform.total_stored, uniform_ratio=0.25)
        data = command.to_json(plan, stats, nominal_ratio=0.25)
        (root / f"plan_{family}.json").write_text(json.dumps(data))
        plans[family] = (plan, uniform, stats, data)
    return root, model, batches, layers, plans


def test_the_measure_run_records_live_rows_and_first_token_layers(made):
    _, _, _, layers, _ = made
    rows = layers[(layers.layer != "model")]
    assert set(rows[rows.first_token == 1].layer) == FIRST
    first = rows[rows.layer.isin(FIRST)]
    assert (first.live_rows == B).all() and (first.k == B).all() and (first.var_sketch == 0).all()
    assert (first.var_sketch_one_row > 0).all()
    tokens = rows[~rows.layer.isin(FIRST) & (rows.n_rows == B * L)]
    assert (tokens.live_rows == B * L).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_predicted_variance_is_the_closed_form_at_the_planned_rows(made, family):
    """Each layer's predicted variance equals the mean over the batches of the family's own
    variance at the plan's k, computed here from captured (X, Y) (not from the plan's model)."""
    _, model, batches, layers, plans = made
    plan, _, _, _ = plans[family]
    from varstudy.measure.informed import profile_stats
    from varstudy.randomized.informed import RowsAdaptive

    model.eval()
    caps = [capture(model, b, names=list(plan.ratios)) for b in batches]
    for name, ratio in plan.ratios.items():
        k = plan.k[name]
        got = []
        for i, cap in enumerate(caps):
            x, y = cap.layers[name]
            live = torch.ones(x.shape[:2]) if x.dim() == 3 else torch.ones(1, x.shape[0])
            if name in FIRST:
                live = torch.zeros_like(live)
                live[:, 0] = 1
            xf, yf = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
            if ratio == P.EXACT or (name in FIRST and k >= B):
                got.append(0.0)
            elif family == "rows-live":
                got.append(float(SKETCHES["rows-live"].variance(xf, yf, k, live)))
            else:  # the profile of the other batches (leave one out), as measure_now's
                rest = [c for j, c in enumerate(caps) if j != i]
                profile = _profile(rest, name, live)
                sketch = RowsAdaptive(stats=profile_stats(profile))
                got.append(float(sketch.variance(xf, yf, k, live)))
        assert plan.var[name] == pytest.approx(np.mean(got), rel=1e-9, abs=1e-300), name


def _profile(caps, name, live):
    """Mean ‖y_l‖ per position over the live rows of ``caps`` (None for a 2-D layer)."""
    if caps[0].layers[name][0].dim() != 3:
        return None
    norms = sum((c.layers[name][1].float().norm(dim=-1) * live).sum(0) for c in caps)
    count = live.sum(0) * len(caps)
    fill = norms.sum() / count.sum()
    return torch.where(count > 0, norms / count.clamp(min=1), fill)


@pytest.mark.parametrize("family", FAMILIES)
def test_first_token_layers_are_costed_at_min_k_b_rows(made, family):
    """Uniform ρ = 0.5 keeps k = 24 > B rows: a first-token layer stores B rows (and its index),
    and no plan gives one more than B rows."""
    _, _, _, _, plans = made
    plan, _, stats, data = plans[family]
    by = {s.name: s for s in stats}
    uniform = P.uniform(stats, family, 0.5)
    state = P.VARIANCE_STATE[family]
    for name in FIRST:
        s = by[name]
        assert s.first_token and s.m == B and s.unit == name
        assert uniform.k[name] == B and uniform.ratios[name] == 1.0 and uniform.var[name] == 0
        assert uniform.stored[name] == B * (s.d + P.VARIANCE_STATE["rows-live"])
        assert plan.k[name] <= B and data["layers"][name]["m"] == B
        if plan.k[name] == B:
            assert plan.ratios[name] == 1.0 and plan.var[name] == 0.0
        else:
            assert plan.stored[name] == plan.k[name] * (s.d + state)
    key = "bert.encoder.layer.1.attention.self.key"
    assert uniform.k[key] == 24 and uniform.stored[key] == 24 * (by[key].d + state)


@pytest.mark.parametrize("family", FAMILIES)
def test_randomize_with_a_plan_stores_what_the_plan_costs(made, family):
    """Saved bytes of every converted layer at the reference batch: the plan's stored numbers
    × 4, plus what it leaves uncosted (rows-live's one 4-byte scale per sketch, rows-adaptive's
    B·L-byte live mask); first-token layers keep their B rows."""
    root, _, batches, _, plans = made
    plan, _, _, data = plans[family]
    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    randomize(model, plan=str(root / f"plan_{family}.json"), seed=1)
    first = {n for n, m in model.named_modules() if isinstance(m, RandomizedLinear)
             and m.first_token}
    assert first == {n for n in FIRST if plan.ratios[n] != P.EXACT}
    _, report = saved_bytes(lambda: model(**batches[0]).loss, model=model)
    for name, entry in data["layers"].items():
        if plan.stored[name] == 0:  # shares its unit's sketch
            continue
        got = report.for_modules([name])
        if entry["ratio"] == P.EXACT:  # its own input at most (the classifier's: tanh's)
            assert got <= plan.stored[name] * 4, name
            continue
        sampled_adaptive = family == "rows-adaptive" and not (name in FIRST and entry["k"] == B)
        extra = int(entry["n"]) if sampled_adaptive else 4  # else rows-live's path: one scale
        assert got == plan.stored[name] * 4 + extra, name


@pytest.mark.parametrize("family", FAMILIES)
def test_measure_and_finetune_take_a_plan_of_the_family(made, family, tmp_path):
    """measure_now with the plan measures its prediction on the same batches; finetune trains
    with it."""
    from varstudy import finetune

    root, model, batches, _, plans = made
    plan, _, _, _ = plans[family]
    path = root / f"plan_{family}.json"
    got = measure_now(model, batches, plan=str(path))
    assert set(got.family) == {family}
    mean = got[got.layer != "model"].groupby("layer").var_sketch.mean()
    for name, var in plan.var.items():
        assert mean[name] == pytest.approx(var, rel=1e-9, abs=1e-300)
    argv = ["--model", "tiny-bert", "--task", "synthetic", "--max-steps", "1", "--out", "none",
            "--plan", str(path)]
    assert finetune.main(argv) == 0


def test_the_plan_command_on_a_padded_run(tmp_path, capsys):
    """python -m varstudy.plan for both families from a measure run with padding; measure
    --plan measures the rows-adaptive plan; the first-token layers keep B rows."""
    base = ["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
            "--max-length", "16", "--num-batches", "2", "--mc-draws", "0", "--no-progress"]
    assert M.main(base + ["--families", "rows-live,rows-adaptive", "--ratios", "0.25",
                          "--out", str(tmp_path / "run")]) == 0
    for family in FAMILIES:
        out = tmp_path / f"{family}.json"
        assert command.main(["--from", str(tmp_path / "run"), "--family", family,
                             "--budget", "0.25", "--out", str(out)]) == 0
        data = json.loads(out.read_text())
        assert data["family"] == family
        for name in FIRST:
            entry = data["layers"][name]
            assert entry["first_token"] and entry["m"] == 4 and entry["k"] <= 4
        live = data["layers"]["bert.encoder.layer.0.intermediate.dense"]
        if family == "rows-live":  # padding rows are not live
            assert 4 <= live["m"] < live["n"] == 64
        else:  # with replacement: no cap but the exact input
            assert live["m"] is None
    assert M.main(base + ["--plan", str(tmp_path / "rows-adaptive.json"), "--out",
                          str(tmp_path / "m")]) == 0
    layers = pd.read_csv(tmp_path / "m" / "layers.csv")
    assert (layers[layers.layer.isin(FIRST)].k <= 4).all()
    capsys.readouterr()


@pytest.mark.parametrize("argv, words", [
    (["--family", "nope"], "invalid choice"),
    (["--family", "rows-wor-real"], "invalid choice"),
])
def test_plan_command_refuses_an_unknown_family(argv, words, tmp_path, capsys):
    assert command.main(["--from", str(tmp_path), "--budget", "0.1"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "rows-live" in err


def test_bad_input_gives_one_clear_message(made):
    _, _, _, layers, plans = made
    stats = plans["rows-live"][2]
    with pytest.raises(VarstudyError, match="no variance model .* valid choices: gaussian"):
        P.plan_budget(stats, "nope", 1e6)
    with pytest.raises(VarstudyError, match="cannot plan family 'wta-crs'; valid choices"):
        command.stats_from_layers(layers, "wta-crs")
    old = layers.drop(columns=["live_rows", "var_sketch_one_row"])
    with pytest.raises(VarstudyError, match="lacks column.*live_rows.*rerun"):
        command.stats_from_layers(old, "rows-live")
    broken = layers.copy()
    broken.loc[broken.family == "rows-adaptive", "first_token"] = pd.NA
    with pytest.raises(VarstudyError, match="no usable live_rows"):
        command.stats_from_layers(broken, "rows-adaptive")


def test_online_planner_refuses_what_it_cannot_plan_naming_valid_ones():
    """The live families are re-planned online (tests/test_online_informed.py); rows-wor-real,
    whose plan reads real rows, is not."""
    from varstudy.randomized.online import OnlinePlanner

    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    randomize(model, 0.25, "rows-wor-real", include="encoder")
    with pytest.raises(VarstudyError, match="rows-wor-real: .*valid choices: one family of "
                                            "gaussian.*rows-live, rows-adaptive"):
        OnlinePlanner(model, 0.25)


def test_a_first_token_query_shares_no_sketch_with_key_and_value(monkeypatch):
    """With k < B the first-token query samples its position-0 rows; key and value must draw
    their own (shared) sample, or their estimates would be biased."""
    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    randomize(model, 0.05, "rows-live", include="encoder", seed=1)
    seeds = {}
    draw = RandomizedLinear._sketch_input

    def spy(self, x, flat, sketch, k, autocast):
        out = draw(self, x, flat, sketch, k, autocast)
        seeds[self.name] = out[1]
        return out
    monkeypatch.setattr(RandomizedLinear, "_sketch_input", spy)
    model(**_batches(1)[0])
    block = "bert.encoder.layer.1.attention.self."
    assert seeds[block + "key"] == seeds[block + "value"] != seeds[block + "query"]
