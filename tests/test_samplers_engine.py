"""The engine's limit columns and the structure-aware families (varstudy.measure.informed), and the
first-token probe (varstudy.randomized.support)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm
from transformers import BertConfig, BertForTokenClassification

from varstudy.measure import measure_now
from varstudy.models import load_model
from varstudy.randomized.support import first_token_layers

LAST = ("attention.self.query", "attention.output.dense", "intermediate.dense",
        "output.dense")


def _batches(n=3, b=4, length=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (b, length), generator=gen)
        mask = torch.ones(b, length, dtype=torch.long)
        mask[0, 6:] = 0
        mask[2, 8:] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask,
                    "labels": torch.randint(0, 2, (b,), generator=gen)})
    return out


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta"])
def test_probe_finds_the_last_layers_position_wise_linears_of_a_first_token_classifier(name):
    model, _ = load_model(name, num_labels=2, seed=0)
    prefix = "bert" if name == "tiny-bert" else "roberta"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert first_token_layers(model) == [f"{prefix}.encoder.layer.1.{s}" for s in LAST]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


def test_probe_finds_none_where_every_position_reads_the_loss():
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, num_labels=3)
    model = BertForTokenClassification(config)

    def token_loss(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                 batch["labels"].repeat_interleave(8))
    assert first_token_layers(model, loss=token_loss) == []


@pytest.fixture(scope="module")
def measured():
    model, _ = load_model("tiny-bert", num_labels=2, seed=0)
    rows = measure_now(model, _batches(), families=("rows", "rows-real", "rows-live",
                                                    "rows-adaptive"), ratios=(0.25, 0.5))
    return rows[rows.layer != "model"]


def test_first_token_layers_are_exact_and_store_b_rows(measured):
    last = measured[measured.layer.str.contains("layer.1.") &
                    measured.layer.str.endswith(LAST)]
    assert last.layer.nunique() == 4
    for fam in ("rows-live", "rows-adaptive"):
        got = last[last.family == fam]
        assert (got.var_sketch == 0).all() and (got.k == 4).all()  # B = 4 <= k
    # rows whose output gradient is 0: padding (6 of 40) and, there, every non-first row
    assert (last.rows_y_zero == 4 * 10 - 4).all()
    first = measured[measured.layer.str.contains("layer.0.attention.self.query")]
    assert (first.rows_y_zero == 6).all()


def test_limit_columns_bound_the_with_replacement_samplers(measured):
    for fam in ("rows", "rows-real", "rows-adaptive"):  # rows-adaptive: where it samples
        got = measured[(measured.family == fam) & (measured.var_sketch > 0)]
        assert len(got) > 0 and (got.var_sketch >= got.var_limit * (1 - 1e-9)).all(), fam
    assert (measured.var_limit_split <= measured.var_limit * (1 + 1e-12)).all()
    tokens = measured[measured.n_rows == 40]
    real = tokens[tokens.family == "rows-real"].set_index(["batch", "layer", "ratio"])
    rows = tokens[tokens.family == "rows"].set_index(["batch", "layer", "ratio"])
    assert (real.var_sketch <= rows.var_sketch * (1 + 1e-12)).all()


def test_engine_closed_forms_of_the_new_families_match_monte_carlo(tmp_path):
    """measure with Monte Carlo on three layers (a first-token layer among them): each closed
    form within z SE of its Monte Carlo mean, Bonferroni over the checks at family-wise 1e-3."""
    from varstudy.measure import MeasureConfig, run

    cfg = MeasureConfig(model="tiny-bert", dataset="synthetic", batch_size=4, max_length=16,
                        num_batches=2, families=("rows-live", "rows-adaptive"),
                        ratios=(0.25,), mc_draws=300, mc_batches=1, progress=False,
                        mc_layers=r"layer\.0\.intermediate|layer\.1\.attention\.self\.key",
                        out=str(tmp_path / "m"))
    layers = run(cfg)
    mc = layers[(layers.mc_draws > 0) & (layers.layer != "model")]
    assert len(mc) == 4
    z = norm.isf(1e-3 / (2 * len(mc)))
    for r in mc.itertuples():
        assert abs(r.var_sketch_mc - r.var_sketch) <= z * r.var_sketch_mc_se, r.layer
    assert math.isfinite(layers.var_limit.sum())


def test_sampler_limit_figure_and_table_from_a_measure_run(tmp_path):
    from analysis.figures import main as figures_main
    from varstudy.measure import MeasureConfig, run

    run(MeasureConfig(model="tiny-bert", dataset="synthetic", batch_size=4, max_length=16,
                      num_batches=2, families=("rows", "rows-live", "rows-adaptive"),
                      ratios=(0.25, 0.5), mc_draws=0, progress=False,
                      out=str(tmp_path / "results" / "measure" / "default")))
    out = tmp_path / "figures"
    assert figures_main(["sampler_limit", "--results", str(tmp_path / "results"),
                         "--out", str(out)]) == 0
    import pandas as pd
    table = pd.read_csv(out / "sampler_limit.csv")
    rows = table[table.family == "rows"]
    assert (rows.gap_closed == 0).all() and (rows.rows_over_family == 1).all()
    enc = table[(table.scope == "encoder") & (table.family == "rows-live")]
    # the first-token layers are exact under rows-live: it closes part of the gap
    assert (enc.gap_closed > 0).all() and (enc.rows_over_family > 1).all()
    assert "gap closed" in (out / "sampler_limit.md").read_text()
    assert (out / "sampler_limit.png").stat().st_size > 1000
