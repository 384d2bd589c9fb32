"""Plans used, not only predicted: the plan command on a measure run, ``randomize(plan=...)``
storing the planned bytes, and ``measure --plan`` measuring the predicted variance."""

import json

import pandas as pd
import pytest
import torch

from varstudy import measure as M
from varstudy import plan as command
from varstudy.errors import VarstudyError
from varstudy.models import load_model
from varstudy.randomized.compact import CompactLinear
from varstudy.randomized.layers import RandomizedLinear, derandomize, randomize
from varstudy.randomized.memory import saved_bytes

BASE = ["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4", "--max-length",
        "16", "--num-batches", "3", "--mc-draws", "0", "--no-progress"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A measure run of tiny-bert (rows at 0.25), and plans made from it."""
    root = tmp_path_factory.mktemp("plan")
    assert M.main(BASE + ["--families", "rows,rows-wor", "--ratios", "0.25", "--out",
                          str(root / "run")]) == 0
    plans = {}
    for name, extra in {"budget": ["--budget", "0.25"],
                        "relative": ["--budget", "0.25", "--objective", "relative"],
                        "target": ["--target-ratio", "2"]}.items():
        out = root / f"{name}.json"
        assert command.main(["--from", str(root / "run"), "--family", "rows", "--out",
                             str(out)] + extra) == 0
        plans[name] = json.loads(out.read_text())
    return root, plans


def test_plan_json_holds_every_layer_and_respects_the_budget(planned):
    root, plans = planned
    layers = pd.read_csv(root / "run" / "layers.csv")
    names = set(layers.layer) - {"model"}
    for name in ("budget", "relative"):
        plan = plans[name]
        assert set(plan["layers"]) == names and plan["family"] == "rows"
        stored = sum(e["k"] * e["d"] for e in _units(plan).values())
        assert stored == plan["total"]["stored_numbers"]
        assert plan["nominal_ratio"] == 0.25
    b = plans["budget"]
    assert b["total"]["stored_numbers"] <= _uniform_numbers(root)


def _units(plan):
    """One entry per storage unit (Q, K, V share one): its k and width."""
    return {e["unit"]: e for e in plan["layers"].values()}


def _uniform_numbers(root):
    """Numbers stored by uniform rows at 0.25 in the measured run: Σ over units k·d_in."""
    layers = pd.read_csv(root / "run" / "layers.csv")
    rows = layers[(layers.family == "rows") & (layers.layer != "model") & (layers.batch == 0)]
    kinds_shared = rows.layer_kind.isin(["key", "value"])
    return int((rows[~kinds_shared].k * rows[~kinds_shared].d_in).sum())


def test_randomize_with_a_plan_stores_the_planned_bytes(planned):
    """Saved bytes of the converted linears = the plan's stored numbers × 4 (float32), to the
    byte, at the reference batch shape (Q/K/V one sketch; exact layers store X)."""
    root, plans = planned
    plan = plans["budget"]
    model, tok = load_model("tiny-bert", dropout=False, seed=0)
    conversion = randomize(model, plan=plan, seed=1)
    exact = {n for n, e in plan["layers"].items() if e["ratio"] == "exact"}
    assert set(conversion.names) == set(plan["layers"]) - exact
    for name, entry in plan["layers"].items():
        module = model.get_submodule(name)
        assert isinstance(module, RandomizedLinear) == (entry["ratio"] != "exact")
        if entry["ratio"] != "exact":
            assert module.ratio == entry["ratio"]
    batch = dict(input_ids=torch.randint(1000, 2000, (4, 16)),
                 attention_mask=torch.ones(4, 16, dtype=torch.long),
                 labels=torch.tensor([0, 1, 0, 1]))
    linears = list(plan["layers"])
    _, report = saved_bytes(lambda: model(**batch).loss, model=model)
    sketched = sum(e["k"] * e["d"] * 4 for e in _units(plan).values() if e["ratio"] != "exact")
    got = report.for_modules([n for n in linears if n not in exact])
    assert got == sketched
    # exact layers store their own input only: the pooler's is a view of B of the B·L rows, and
    # it keeps B·d numbers, as the plan charges (the classifier's input, the pooler's tanh output,
    # is saved by the tanh anyway), so the conversion stores at most the plan's numbers
    pooler = plan["layers"]["bert.pooler.dense"]
    assert pooler["ratio"] == "exact" and pooler["k"] == pooler["n"] == 4
    assert report.for_modules(["bert.pooler.dense"]) == pooler["k"] * pooler["d"] * 4
    assert report.for_modules(linears) <= plan["total"]["stored_numbers"] * 4
    assert all(isinstance(model.get_submodule(n), CompactLinear) for n in exact)
    assert derandomize(model).names and not any(
        isinstance(m, (RandomizedLinear, CompactLinear)) for m in model.modules())


def test_compact_linear_equals_nn_linear_and_stores_only_its_input():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 3)
    compact = CompactLinear.from_linear(linear)
    assert compact.weight is linear.weight and compact.bias is linear.bias
    hidden = torch.randn(4, 16, 8, requires_grad=True)
    grads, outs, saved = [], [], []
    for module in (linear, compact):
        def step():
            out = module((2 * hidden)[:, 0])  # a view of 4 of the 64 rows, as BERT's pooler
            outs.append(out.detach())
            return out.square().sum()
        loss, report = saved_bytes(step, model=torch.nn.ModuleDict(dict(m=module)))
        grads.append(torch.autograd.grad(loss, (hidden, linear.weight, linear.bias)))
        saved.append(report.for_modules(["m"]))
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert saved == [4 * 16 * 8 * 4, 4 * 8 * 4]  # nn.Linear keeps the whole storage alive
    x = torch.randn(4, 8)
    assert torch.equal(compact(x), linear(x))  # a compact input is used as it is


def test_measure_with_a_plan_measures_the_prediction(planned, tmp_path):
    """On the batches the plan was made from, the measured sketch variance of every layer is the
    predicted one (closed forms; same batches, so equal up to rounding); exact layers add none."""
    root, plans = planned
    plan_path = root / "budget.json"
    assert M.main(BASE + ["--plan", str(plan_path), "--out", str(tmp_path / "m")]) == 0
    layers = pd.read_csv(tmp_path / "m" / "layers.csv")
    assert set(layers.family) == {"rows"} and set(layers.ratio) == {0.25}
    got = layers[layers.layer != "model"].groupby("layer").var_sketch.mean()
    for name, entry in plans["budget"]["layers"].items():
        assert got[name] == pytest.approx(entry["var_sketch"], rel=1e-9, abs=1e-300)
        k = layers[layers.layer == name].k
        assert (k == entry["k"]).all()
    scopes = pd.read_csv(tmp_path / "m" / "scopes.csv").set_index("scope")
    assert scopes.loc["all", "var_sketch_mean"] == pytest.approx(
        plans["budget"]["total"]["var_sketch"], rel=1e-9)


def test_plans_beat_uniform_on_their_objective(planned):
    _, plans = planned
    b, r = plans["budget"], plans["relative"]
    assert b["total"]["var_sketch"] <= r["total"]["var_sketch"] * (1 + 1e-12)
    assert r["total"]["relative"] <= b["total"]["relative"] * (1 + 1e-12)
    t = plans["target"]
    assert t["total"]["var_sketch"] <= 2 * t["total"]["var_sampling"] * (1 + 1e-9)


@pytest.mark.parametrize("argv, words", [
    (["--budget", "0.1", "--target-ratio", "1"], "exactly one of"),
    ([], "exactly one of"),
    (["--budget", "2"], "(0, 1]"),
    (["--target-ratio", "1", "--family", "nope"], "invalid choice"),
    (["--budget", "0.1", "--per-layer"], "--per-layer applies"),
])
def test_plan_command_bad_input(argv, words, planned, capsys):
    root, _ = planned
    code = command.main(["--from", str(root / "run")] + argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err


def test_plan_from_a_folder_without_layers_csv(tmp_path, capsys):
    assert command.main(["--from", str(tmp_path), "--budget", "0.1"]) == 2
    assert "no layers.csv" in capsys.readouterr().err


def test_randomize_refuses_a_plan_for_another_model(planned):
    _, plans = planned
    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    bad = dict(plans["budget"], layers={"nope.dense": {"ratio": 0.5}})
    with pytest.raises(VarstudyError, match="lacks"):
        randomize(model, plan=bad)
    with pytest.raises(VarstudyError, match="valid choices: a number in"):
        randomize(model, plan=dict(plans["budget"], layers={"classifier": {"ratio": 3}}))


def test_finetune_and_study_train_a_plan(planned, tmp_path):
    """A plan is one more configuration of the accuracy study, paired by seed with exact."""
    from varstudy import study
    from varstudy.study import StudyConfig

    root, plans = planned
    config = StudyConfig(model="tiny-bert", task="synthetic", families=(), ratios=(0.5,),
                         seeds=(0,), batch_size=4, max_length=16, max_steps=2,
                         eval_examples=8, plans=(str(root / "budget.json"),),
                         out=str(tmp_path), progress=False)
    runs, _ = study.accuracy(config)
    row = runs[runs.scope == "plan:budget"].iloc[0]
    sketched = sum(e["ratio"] != "exact" for e in plans["budget"]["layers"].values())
    assert row.family == "rows" and row.ratio == 0.25 and row.n_converted == sketched
    assert set(runs.scope) == {"none", "plan:budget"}


def test_finetune_refuses_a_plan_with_exact_or_a_bad_file(planned, tmp_path, capsys):
    from varstudy import finetune

    root, _ = planned
    base = ["--model", "tiny-bert", "--task", "synthetic", "--max-steps", "1", "--out", "none"]
    assert finetune.main(base + ["--sketch", "exact", "--plan", str(root / "budget.json")]) == 2
    assert "conflicts with --sketch exact" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert finetune.main(base + ["--plan", str(tmp_path / "bad.json")]) == 2
    assert "cannot be read as JSON" in capsys.readouterr().err


def test_budgets_write_one_plan_per_objective_and_a_frontier(planned, tmp_path):
    root, _ = planned
    out = tmp_path / "plans"
    assert command.main(["--from", str(root / "run"), "--family", "rows", "--budgets",
                         "0.25,0.5", "--out", str(out)]) == 0
    table = pd.read_csv(out / "frontier.csv")
    assert len(table) == 4 and set(table.objective) == {"absolute", "relative"}
    assert (table.var_sketch_planned <= table.var_sketch_uniform * (1 + 1e-12)).all()
    rel = table[table.objective == "relative"]
    assert (rel.relative_planned <= rel.relative_uniform * (1 + 1e-12)).all()
    files = sorted(p.name for p in out.glob("plan_*.json"))
    assert files == ["plan_absolute_0.25.json", "plan_absolute_0.5.json",
                     "plan_relative_0.25.json", "plan_relative_0.5.json"]
    assert json.loads((out / "plan_relative_0.5.json").read_text())["nominal_ratio"] == 0.5
