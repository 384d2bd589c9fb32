"""Scope totals (measure's scopes.csv) and the variance summaries of a conversion scope, on a
hand-made layers table whose numbers are worked out here."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.summaries import link, variance_summaries
from varstudy.measure.tables import scope_summary

LAYERS = {  # layer: (sketch, sampling) of batch 0; batch 1 doubles sketch, triples sampling
    "bert.encoder.layer.0.attention.self.query": (2.0, 1.0),
    "bert.encoder.layer.0.intermediate.dense": (6.0, 2.0),
    "bert.pooler.dense": (30.0, 10.0),
    "classifier": (10.0, 20.0),
}


def _table():
    rows = []
    for b, (ks, kv) in enumerate([(1.0, 1.0), (2.0, 3.0)]):
        for name, (s, v) in LAYERS.items():
            rows.append(dict(train_step=0, batch=b, layer=name, family="rows", ratio=0.1,
                             var_sketch=s * ks, var_sampling=v * kv))
    return pd.DataFrame(rows)


def test_scope_totals_and_per_layer_spread():
    table = scope_summary(_table(), level=0.9).set_index("scope")
    # encoder: batch 0 sums 8 / 3, batch 1 sums 16 / 9
    enc = table.loc["encoder"]
    assert enc.n_layers == 2 and enc.n_batches == 2
    assert enc.var_sketch_mean == pytest.approx(12.0) and enc.var_sampling_mean == 6.0
    ratios = np.array([8 / 3, 16 / 9])
    half = stats.t.ppf(0.95, 1) * ratios.std(ddof=1) / np.sqrt(2)
    assert enc.ratio_mean == pytest.approx(ratios.mean())
    assert enc.ratio_ci_high == pytest.approx(ratios.mean() + half)
    # per-layer ratio of means: query 3/2, ffn 9/4 -> median 1.875
    assert enc.layer_ratio_median == pytest.approx((1.5 + 2.25) / 2)
    head = table.loc["head"]
    assert head.var_sketch_mean == pytest.approx((40 + 80) / 2)
    assert table.loc["all"].var_sampling_mean == pytest.approx((33 + 99) / 2)
    per_layer = sorted([1.5, 2.25, 45 / 20, 15 / 40])
    assert table.loc["all"].layer_ratio_min == pytest.approx(per_layer[0])
    assert table.loc["all"].layer_ratio_max == pytest.approx(per_layer[-1])
    assert list(table.index) == ["encoder", "head", "all"]


def test_variance_summaries_of_the_conversion_scopes():
    s = variance_summaries(_table()).set_index("scope")
    means = {n: (1.5 * a, 2.0 * b) for n, (a, b) in LAYERS.items()}  # per-layer means
    sk = {n: m[0] for n, m in means.items()}
    sa = {n: m[1] for n, m in means.items()}
    enc = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.intermediate.dense"]
    head = ["bert.pooler.dense", "classifier"]
    total = sum(sa.values())
    a = s.loc["all"]
    assert a.ratio_model == pytest.approx(sum(sk.values()) / total)
    assert a.ratio_head == pytest.approx(sum(sk[n] for n in head) / sum(sa[n] for n in head))
    e = s.loc["encoder"]  # pooler and classifier exact: no sketch variance there
    assert e.ratio_head == 0.0
    assert e.ratio_model == pytest.approx(sum(sk[n] for n in enc) / total)
    assert e.ratio_encoder == a.ratio_encoder
    per = [sk[n] / sa[n] for n in enc] + [0.0, 0.0]
    assert e.layer_median == pytest.approx(np.median(per))
    assert e.layer_mean == pytest.approx(np.mean(per))


def test_link_correlates_each_summary_with_the_accuracy_cost():
    summaries = pd.DataFrame([dict(family="rows", ratio=r, scope="all", ratio_model=1 / r,
                                   ratio_encoder=1 / r, ratio_head=1 / r, layer_median=1 / r,
                                   layer_q3=2 / r, layer_mean=1 / r) for r in (0.5, 0.2, 0.1, 0.05)])
    paired = pd.DataFrame(dict(family="rows", ratio=[0.5, 0.2, 0.1, 0.05], scope="all",
                               diff_mean=[-0.001, -0.004, -0.01, -0.03]))
    out = link(paired, summaries.assign(when="step 0"), n_boot=200)
    assert len(out) == 6 and (out.spearman == -1.0).all() and (out.n_configs == 4).all()
