"""The memory-saving frontier (issue 15 items 3 and 4): the study on tiny-bert + synthetic data,
the engine's plan argument, the selection functions on a hand-made table, the figure."""

import contextlib
import json
import math
from unittest import mock

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from analysis import figures  # noqa: E402
from analysis.figures_frontier import choose, frontier_points, pareto, within_tau  # noqa: E402
from varstudy import study  # noqa: E402
from varstudy.study import StudyConfig, frontier_study, frontier_variance  # noqa: E402

TINY = dict(model="tiny-bert", task="synthetic", families=("gaussian", "rows"), ratios=(0.5,),
            batch_size=8, max_length=16, slots=(1, 2), num_batches=2, frontier_ratio=0.5,
            repeats=2, warmup_steps=0, accumulation=(2, 4), progress=False)
ACCUMULATED = [f"accumulate m={m}{what}" for m in (2, 4)
               for what in ("", " + torch", " + rows 0.5", " + rows plan (absolute)")]


MC_DRAWS = 16  # NOTE [combined variance]: more draws than the default, for a tighter check


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    config = StudyConfig(out=str(out), **TINY)
    with mock.patch.object(frontier_variance, "MC_DRAWS", MC_DRAWS):
        table = study.frontier(config).set_index("config")
    return config, table, out / "frontier"


def test_one_row_per_configuration(run):
    config, table, folder = run
    names = [s.name for s in study.setups(config)]
    assert names == ["exact", "torch", "revolve s=1", "revolve s=2", "gaussian 0.5", "rows 0.5",
                     "rows plan (absolute)", "rows plan (relative)", "revolve s=2 + rows 0.5",
                     "torch + rows 0.5", *ACCUMULATED]
    assert list(table.index) == names
    on_disk = pd.read_csv(folder / "frontier.csv")
    assert list(on_disk.columns) == list(study.FRONTIER_COLUMNS) and len(on_disk) == len(names)
    assert (on_disk.repeats == 2).all() and (on_disk.step_ms > 0).all()
    saved = json.loads((folder / "config.json").read_text())
    assert saved["study"] == "frontier" and saved["slots"] == [1, 2]
    assert saved["configurations"] == names and len(saved["load_avg_before"]) == 3
    assert {"plans_s", "variance_s", "memory_s", "timing_s", "total_s"} <= set(saved["wall_s"])
    for objective in ("absolute", "relative"):
        plan = json.loads((folder / f"plan_rows_{objective}.json").read_text())
        assert plan["objective"] == objective and plan["nominal_ratio"] == 0.5


def test_exact_is_the_unit_and_adds_no_variance(run):
    _, table, _ = run
    exact = table.loc["exact"]
    assert exact.peak_ratio == exact.forward_ratio == exact.time_ratio == 1.0
    assert exact.peak_phase == "forward" and exact.peak_bytes == exact.forward_bytes
    assert exact.var_ratio_all == 0 and exact.var_sampling_all > 0


def test_checkpointing_saves_memory_without_variance(run):
    _, table, _ = run
    ckpt = table[table.kind == "checkpoint"]
    assert len(ckpt) == 3
    assert (ckpt.peak_ratio < 1).all() and (ckpt.forward_ratio < 1).all()
    for scope in ("encoder", "head", "all"):
        assert (ckpt[f"var_sketch_{scope}"] == 0).all() and (ckpt[f"var_ratio_{scope}"] == 0).all()
    assert (ckpt.peak_phase == "backward").all()
    # NOTE [torch checkpoint peak]: the recomputed layer's saved tensors are counted
    torch_row = table.loc["torch"]
    assert torch_row.peak_method == "reentrant replay" and torch_row.peak_bytes > \
        torch_row.forward_bytes
    assert (table.loc[["revolve s=1", "revolve s=2"], "peak_held_bytes"] > 0).all()
    assert table.loc["revolve s=1", "peak_bytes"] <= table.loc["revolve s=2", "peak_bytes"]


def test_accumulation_rows(run):
    """NOTE [accumulated step]: micro-batches of B/m; alone and with torch checkpoint no added
    variance; memory the largest micro-batch's, so below exact's and falling with m; with a
    checkpoint or a sketch below accumulation alone."""
    config, table, _ = run
    acc = table.loc[ACCUMULATED]
    assert (acc.kind == "accumulation").all() and (acc.batch_size == config.batch_size).all()
    assert acc.micro_batches.tolist() == [2] * 4 + [4] * 4
    assert (table.drop(index=ACCUMULATED).micro_batches == 1).all()
    assert (acc.peak_ratio < 1).all() and (acc.repeats == 2).all() and (acc.step_ms > 0).all()
    alone = table.loc[["accumulate m=2", "accumulate m=4"]]
    assert (alone.var_ratio_all == 0).all() and (alone.var_source == "none (exact)").all()
    assert alone.peak_bytes.is_monotonic_decreasing
    for m in (2, 4):
        name = f"accumulate m={m}"
        assert table.loc[f"{name} + torch", "var_ratio_all"] == 0
        assert table.loc[f"{name} + torch", "peak_method"] == "reentrant replay"
        for other in (" + torch", " + rows 0.5", " + rows plan (absolute)"):
            assert table.loc[name + other, "peak_bytes"] < table.loc[name, "peak_bytes"], other
        assert table.loc[f"{name} + rows 0.5", "var_source"] == \
            f"closed form, uniform, per micro-batch (m = {m})"
        assert table.loc[f"{name} + rows plan (absolute)", "var_source"] == \
            f"closed form, planned rows, per micro-batch (m = {m})"
    # uniform rows per micro-batch is stratified sampling: never above the minibatch sketch
    for scope in ("encoder", "head", "all"):
        assert table.loc["accumulate m=2 + rows 0.5", f"var_sketch_{scope}"] <= \
            table.loc["rows 0.5", f"var_sketch_{scope}"] * (1 + 1e-9), scope


def test_accumulated_closed_form_agrees_with_the_monte_carlo(held):
    """NOTE [accumulated variance]: Σ_j w_j² V_j from the engine's closed forms per
    micro-batch against the Monte Carlo of the accumulated gradient itself (z < 4.5 per scope,
    3 comparisons: family-wise false-alarm rate about 2e-5 under the normal approximation)."""
    model, batches = held
    setup = frontier_study.Setup("accumulate m=2 + rows 0.5", "accumulation", family="rows",
                                 ratio=0.5, micro_batches=2)
    sampling = {f"var_sampling_{s}": 1.0 for s in ("encoder", "head", "all")}
    closed = frontier_variance.accumulated(model, setup, batches, math.inf, sampling)
    with mock.patch.object(frontier_variance, "MC_DRAWS", 64):
        mc = frontier_variance.monte_carlo(model, setup, batches, sampling,
                                           frontier_study._checkpointed)
    for scope in ("encoder", "head", "all"):
        se = mc[f"var_sketch_se_{scope}"]
        assert 0 < se < 0.25 * closed[f"var_sketch_{scope}"], scope
        z = (mc[f"var_sketch_{scope}"] - closed[f"var_sketch_{scope}"]) / se
        assert abs(z) < 4.5, (scope, z)
    plain = frontier_variance.accumulated(
        model, frontier_study.Setup("rows 0.5", "sketch", family="rows", ratio=0.5), batches,
        math.inf, sampling)  # m = 1: the engine's closed form on the minibatches themselves
    assert plain["var_source"] == "closed form, uniform, per micro-batch (m = 1)"
    assert 0 < closed["var_sketch_all"] <= plain["var_sketch_all"]  # stratified: never above


def test_reentrant_replay_of_an_mpnet_encoder_equals_plain_autograd():
    """MPNet's position bias is made once for all layers, a tensor with a graph of its own that
    every layer closes over: the reentrant replay of the torch checkpoint (memory measurement)
    makes it an explicit input, so the bias gets its gradient once per layer (the replay failed
    on the second layer before) and every gradient equals plain autograd's."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from varstudy.checkpointing.encoder import checkpoint_encoder
    from varstudy.randomized.peak import peak_saved_bytes
    from varstudy.study.frontier_study import _reentrant_torch_checkpoint

    torch.manual_seed(0)
    model = MPNetForSequenceClassification(MPNetConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, pad_token_id=1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    batch = dict(input_ids=torch.randint(5, 100, (2, 7)), labels=torch.tensor([0, 1]))
    grads = []
    for replay in (False, True):
        model.zero_grad(set_to_none=True)
        if replay:
            with contextlib.ExitStack() as stack:
                stack.enter_context(_reentrant_torch_checkpoint())
                stack.enter_context(checkpoint_encoder(model, strategy="torch"))
                report = peak_saved_bytes(lambda: model(**batch).loss, model=model)
            assert report.peak_phase == "backward"
        else:
            model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    key = "mpnet.encoder.relative_attention_bias.weight"
    assert grads[1][key].abs().sum() > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-6, msg=name)


def test_sketches_add_variance_and_save_forward_bytes(run):
    _, table, _ = run
    noisy = table[table.kind.isin(["sketch", "plan", "combined"])]
    assert (noisy.var_ratio_all > 0).all() and (noisy.var_ratio_encoder > 0).all()
    assert (noisy.forward_ratio < 1).all() and (noisy.peak_ratio < 1).all()
    assert set(table.loc[table.kind == "plan", "var_source"]) == {"closed form, planned rows"}
    for combo in ("revolve s=2 + rows 0.5", "torch + rows 0.5"):  # less memory than either
        assert table.loc[combo, "peak_bytes"] < table.loc["rows 0.5", "peak_bytes"]
    assert table.loc["revolve s=2 + rows 0.5", "peak_bytes"] < \
        table.loc["revolve s=2", "peak_bytes"]


COMBOS = {"revolve s=2 + rows 0.5": "revolve", "torch + rows 0.5": "torch"}


def test_combined_variance_is_measured_and_agrees_with_the_closed_form(run):
    """NOTE [combined variance]: checkpointing + sketch is measured by Monte Carlo on the real
    checkpointed gradients, independently of the sketch-only row's closed form; checkpointing
    is exact, so the two agree within the Monte Carlo error. z = 4.5 per comparison (6 of
    them: family-wise false-alarm rate about 4e-5 under the normal approximation)."""
    _, table, _ = run
    closed = table.loc["rows 0.5"]
    assert closed.var_source == "closed form, uniform" and np.isnan(closed.var_sketch_se_all)
    for combo, strategy in COMBOS.items():
        row = table.loc[combo]
        assert row.var_source == (f"monte carlo under {strategy} checkpointing, {MC_DRAWS} "
                                  "draws per minibatch")
        for scope in ("encoder", "head", "all"):
            se = row[f"var_sketch_se_{scope}"]
            assert 0 < se < 0.25 * closed[f"var_sketch_{scope}"], (combo, scope)
            z = (row[f"var_sketch_{scope}"] - closed[f"var_sketch_{scope}"]) / se
            assert abs(z) < 4.5, (combo, scope, z)
            assert row[f"var_sampling_{scope}"] == closed[f"var_sampling_{scope}"]
            assert row[f"var_ratio_{scope}"] == pytest.approx(
                row[f"var_sketch_{scope}"] / row[f"var_sampling_{scope}"], rel=1e-12)
    # both recompute exactly and draw the same sketches (the same seed): the same numbers
    columns = [c for c in table.columns if c.startswith(("var_sketch", "var_ratio"))]
    assert (table.loc["torch + rows 0.5", columns] ==
            table.loc["revolve s=2 + rows 0.5", columns]).all()


@pytest.fixture(scope="module")
def held():
    """A tiny-bert model and two held minibatches, as the study makes them."""
    config = StudyConfig(out="-", **TINY)
    model, _, _, batches, _ = frontier_study._inputs(config, "cpu")
    return model, batches


def _scaled_logits(factor):
    """A 'checkpoint' that changes the gradient: the classifier's output scaled by ``factor``."""
    @contextlib.contextmanager
    def block(model, setup):
        classifier = model.classifier  # the randomized one, looked up when the block starts
        forward = classifier.forward
        classifier.forward = lambda x: forward(x) * factor
        try:
            with frontier_study._checkpointed(model, setup):
                yield
        finally:
            del classifier.forward
    return block


def test_combined_measurement_is_the_sketch_only_one_bit_for_bit(held):
    """With the same seed every sketch is the same, so exact recomputation gives the sketch-only
    model's Monte Carlo estimate bit for bit; a checkpoint that changed the gradient (here by
    0.1 %) would not."""
    model, batches = held
    sampling = {f"var_sampling_{s}": 1.0 for s in ("encoder", "head", "all")}
    plain = frontier_study.Setup("rows 0.5", "sketch", family="rows", ratio=0.5)
    setups = [("plain", plain)] + [(s.name, s) for s in frontier_study.setups(
        StudyConfig(out="-", **TINY)) if s.kind == "combined"]
    got = {name: frontier_variance.monte_carlo(model, setup, batches, sampling,
                                               frontier_study._checkpointed)
           for name, setup in setups}
    numbers = {k: {c: v for c, v in g.items() if c != "var_source"} for k, g in got.items()}
    assert numbers["plain"]["var_sketch_all"] > 0
    for combo in COMBOS:
        assert numbers[combo] == numbers["plain"], combo
    broken = frontier_variance.monte_carlo(model, plain, batches, sampling,
                                           _scaled_logits(1.001))
    assert broken["var_sketch_head"] != numbers["plain"]["var_sketch_head"]


def test_measure_now_with_a_plan_uses_each_layers_rows(tmp_path):
    """The engine's plan path: each layer keeps its planned k (exact layers: no variance), the
    plan's predicted variance is the measured one on the minibatches it was made from, and a
    plan file rewritten at the same path is read afresh."""
    from varstudy.measure.engine import measure_now
    from varstudy.models import load_model
    from varstudy.plan import stats_from_layers, to_json
    from varstudy.randomized import plan as P

    model, _ = load_model("tiny-bert")
    gen = torch.Generator().manual_seed(0)
    batches = [dict(input_ids=torch.randint(1000, 2000, (4, 8), generator=gen),
                    labels=torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    stats = stats_from_layers(measure_now(model, batches, ("rows",), (0.25,)), "rows")
    plan = P.plan_budget(stats, "rows", P.uniform(stats, "rows", 0.25).total_stored)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(to_json(plan, stats, nominal_ratio=0.25)))
    got = measure_now(model, batches, plan=str(path))
    layers = got[got.layer != "model"]
    assert set(got.family) == {"rows"} and set(got.ratio) == {0.25}
    assert any(r == "exact" for r in plan.ratios.values())
    for name, g in layers.groupby("layer"):
        assert (g.k == plan.k[name]).all(), name
        if plan.ratios[name] == "exact":
            assert (g.var_sketch == 0).all(), name
        assert g.var_sketch.mean() == pytest.approx(plan.var[name], rel=1e-9, abs=1e-30), name
    uniform = P.uniform(stats, "rows", 0.5)
    path.write_text(json.dumps(to_json(uniform, stats, nominal_ratio=0.5)))
    again = measure_now(model, batches, plan=str(path))
    again = again[again.layer != "model"]
    assert set(again.ratio) == {0.5}
    assert all(k == uniform.k[name] for name, k in zip(again.layer, again.k))


# --------------------------------------------------------------------------------------------
# Selection on a hand-made table (answers worked out by hand in the comments)
# --------------------------------------------------------------------------------------------

HAND = pd.DataFrame([
    # config, kind, peak_ratio, time_ratio, var_ratio_all
    ("exact", "exact", 1.00, 1.00, 0.0),
    ("torch", "checkpoint", 0.55, 1.30, 0.0),
    ("revolve s=1", "checkpoint", 0.30, 2.00, 0.0),
    ("revolve s=2", "checkpoint", 0.40, 1.60, 0.0),
    ("revolve s=3", "checkpoint", 0.45, 1.70, 0.0),  # dominated by s=2 (smaller and faster)
    ("rows 0.5", "sketch", 0.70, 0.95, 0.5),
    ("rows 0.1", "sketch", 0.45, 0.90, 3.0),
    ("gaussian 0.1", "sketch", 0.45, 1.50, 4.0),  # dominated by rows 0.1 in all three
    ("rows plan", "plan", 0.46, 0.92, 0.8),
    ("revolve s=2 + rows 0.1", "combined", 0.20, 1.55, 3.0),
    ("torch + rows 0.1", "combined", 0.24, 1.25, 3.0),
], columns=["config", "kind", "peak_ratio", "time_ratio", "var_ratio_all"])


def test_pareto_sets_by_hand():
    points = frontier_points(HAND).set_index("config")
    exact_options = {"exact", "torch", "revolve s=1", "revolve s=2", "revolve s=3"}
    assert set(points.index[points.exact_option]) == exact_options
    assert set(points.index[points.pareto_exact]) == exact_options - {"revolve s=3"}
    assert set(points.index[~points.pareto_all]) == {"revolve s=3", "gaussian 0.1"}


def test_pareto_ties_and_missing_values():
    df = pd.DataFrame(dict(a=[1.0, 1.0, 2.0, np.nan], b=[1.0, 1.0, 0.5, 0.1]))
    # equal rows do not dominate each other; a NaN row is never on the front
    assert pareto(df, ["a", "b"]).tolist() == [True, True, True, False]


def test_choose_by_hand():
    got = choose(frontier_points(HAND)).set_index(["budget", "criterion"])
    # 75 %: exact options torch 1.30, s=1 2.00, s=2 1.60, s=3 1.70 -> torch; within τ = 1 also
    # rows 0.5 (0.95, var 0.5) and the plan (0.92, var 0.8) -> the plan
    assert got.loc[(0.75, "exact"), "config"] == "torch"
    assert got.loc[(0.75, "variance"), "config"] == "rows plan"
    assert got.loc[(0.75, "variance"), "time_ratio"] == 0.92
    # 50 %: s=1, s=2, s=3 -> s=2 (1.60); within τ: the plan (0.46, 0.92); rows 0.1 is too noisy
    assert got.loc[(0.5, "exact"), "config"] == "revolve s=2"
    assert got.loc[(0.5, "variance"), "config"] == "rows plan"
    # 25 %: no exact option (s=1 is 0.30); the combinations add 3 × sampling > τ
    assert pd.isna(got.loc[(0.25, "exact"), "config"])
    assert pd.isna(got.loc[(0.25, "variance"), "config"])
    assert math.isnan(got.loc[(0.25, "exact"), "peak_ratio"])
    loose = choose(frontier_points(HAND), budgets=(0.25,), tau=5.0).set_index("criterion")
    assert loose.loc["variance", "config"] == "torch + rows 0.1"  # 1.25 beats 1.55


def test_choose_by_scope_by_hand():
    """The τ criterion by the encoder total as well as the model total: a plan that keeps the
    head exact is within τ by the model total (0.8) but not by its encoder's 5.6."""
    assert set(choose(frontier_points(HAND)).criterion) == {"exact", "variance"}  # no encoder
    hand = HAND.assign(var_ratio_encoder=HAND.var_ratio_all.where(HAND.config != "rows plan",
                                                                  5.6))
    points = frontier_points(hand)
    got = choose(points).set_index(["budget", "criterion"])
    assert got.loc[(0.75, "variance"), "config"] == "rows plan"
    # 75 %: by the encoder only rows 0.5 (0.95×, 0.5) adds variance within τ; it beats torch
    assert got.loc[(0.75, "encoder variance"), "config"] == "rows 0.5"
    assert got.loc[(0.75, "encoder variance"), "var_ratio"] == 0.5
    # 50 %: rows 0.5 (peak 0.70) does not fit; the plan is out by its encoder: revolve s=2
    assert got.loc[(0.5, "variance"), "config"] == "rows plan"
    assert got.loc[(0.5, "encoder variance"), "config"] == "revolve s=2"
    assert pd.isna(got.loc[(0.25, "encoder variance"), "config"])
    assert within_tau(points) == {"variance": ["rows 0.5", "rows plan"],
                                  "encoder variance": ["rows 0.5"]}


def test_figure_and_table_from_a_frontier_csv(tmp_path):
    res = tmp_path / "results" / "study" / "frontier"
    res.mkdir(parents=True)
    HAND.assign(model="minilm", task="rotten_tomatoes", batch_size=32, seq_len=128,
                device="cpu", repeats=3, forward_ratio=HAND.peak_ratio,
                var_ratio_encoder=HAND.var_ratio_all / 2,
                var_ratio_head=HAND.var_ratio_all * 2).to_csv(res / "frontier.csv", index=False)
    (res / "config.json").write_text(json.dumps({"load_avg_after": [3.5, 3.0, 2.5]}))
    out = tmp_path / "figs"
    assert figures.main(["frontier", "--results", str(tmp_path / "results"),
                         "--out", str(out)]) == 0
    for ext in ("png", "pdf"):
        assert (out / f"frontier.{ext}").stat().st_size > 1000
    md = (out / "frontier_table.md").read_text()
    assert "| 75 % | torch: peak 0.55, time 1.30× | rows plan: peak 0.46, time 0.92×, variance " \
           "0.8× sampling |" in md
    assert "| 25 % | none fits | none fits |" in md
    assert "load average at the end 3.5" in md
    # the encoder totals are half the model's here: rows 0.5 (0.25) and the plan (0.4) fit both
    assert "| 75 % | torch: peak 0.55, time 1.30× | rows plan: peak 0.46, time 0.92×, variance " \
           "0.8× sampling | rows plan: peak 0.46, time 0.92×, variance 0.4× sampling |" in md
    assert ("within τ = 1 × sampling, by the model total: rows 0.5, rows plan; by the encoder "
            "total: rows 0.5, rows plan.") in md
    assert md.count("| yes |") >= 1 and "revolve s=3" in md
