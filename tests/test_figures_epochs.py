"""analysis.figures_epochs: per-epoch scores, paired contrasts and the three_epochs figure on a
synthetic 3-epoch study whose answers are known by construction."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from analysis import figures  # noqa: E402
from analysis.figures_epochs import contrasts, epoch_scores, three_epochs  # noqa: E402
from varstudy.errors import VarstudyError  # noqa: E402

SPE, EPOCHS, EVERY = 10, 3, 4  # steps per epoch, epochs, evaluation interval
# per family, its accuracy offset to exact in each epoch: wta-crs loses 0.04 in epoch 1 only
OFFSET = {"exact": (0.0, 0.0, 0.0), "rows": (-0.02, -0.02, -0.02),
          "wta-crs": (-0.04, 0.0, 0.0), "rows-adaptive": (-0.01, -0.01, -0.01)}


def _study(seeds=(0, 1, 2), families=tuple(OFFSET)) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs, evals = [], []
    steps = list(range(EVERY, SPE * EPOCHS + 1, EVERY)) + [SPE * EPOCHS]
    for fam in families:
        ratio = 1.0 if fam == "exact" else 0.3
        scope = "none" if fam == "exact" else "encoder"
        for seed in seeds:
            noise = 0.001 * seed * (1 + (fam == "rows"))  # paired: seeds differ, pairs nearly not
            values = [0.6 + 0.005 * s + OFFSET[fam][int(np.ceil(s / SPE)) - 1] + noise
                      for s in steps]
            evals += [dict(task="t", model="m", family=fam, ratio=ratio, scope=scope, seed=seed,
                           step=s, metric="accuracy", value=v) for s, v in zip(steps, values)]
            runs.append(dict(task="t", model="m", family=fam, ratio=ratio, scope=scope,
                             seed=seed, steps_per_epoch=SPE, total_steps=SPE * EPOCHS,
                             metric="accuracy", best_value=max(values),
                             test_at_best=max(values) - 0.01))
    return pd.DataFrame(runs), pd.DataFrame(evals)


def _write(root: Path, runs: pd.DataFrame, evals: pd.DataFrame) -> Path:
    folder = root / "results" / "study" / "three_epochs" / "accuracy"
    folder.mkdir(parents=True)
    runs.to_csv(folder / "runs.csv", index=False)
    evals.to_csv(folder / "evals.csv", index=False)
    return root / "results"


def test_epoch_scores_take_each_epochs_best_evaluation():
    runs, evals = _study()
    scored = epoch_scores(runs, evals).set_index(["family", "seed"])
    # the last evaluation of epoch e is at step 8, 20 (step 20 ends epoch 2), 30
    for e, step in ((1, 8), (2, 20), (3, 30)):
        want = 0.6 + 0.005 * step + OFFSET["wta-crs"][e - 1] + 0.001 * 2
        assert scored.loc[("wta-crs", 2), f"best_epoch{e}"] == pytest.approx(want)


def test_contrasts_find_the_planted_per_epoch_costs():
    runs, evals = _study()
    table = contrasts(epoch_scores(runs, evals)).set_index(["contrast", "value"])
    assert table.loc[("wta-crs − exact", "best_epoch1"), "diff_mean"] == pytest.approx(-0.04)
    assert table.loc[("wta-crs − exact", "best_epoch2"), "diff_mean"] == pytest.approx(0.0,
                                                                                       abs=1e-12)
    assert table.loc[("wta-crs − rows", "best_epoch3"), "diff_mean"] == pytest.approx(
        0.02 - 0.001, abs=1e-12)  # rows' seed noise has mean 0.002, wta-crs' 0.001
    assert set(table.holm_family) == {"configuration − exact", "sampler − rows"}
    # one Holm family per (score, kind): 3 against exact, 2 against rows
    assert table.xs("best_value", level="value").groupby("holm_family").holm_m.first().to_dict() \
        == {"configuration − exact": 3, "sampler − rows": 2}
    assert (table.n == 3).all()


def test_a_partial_study_pairs_only_the_seeds_both_sides_have(tmp_path: Path):
    runs, evals = _study()
    drop = (runs.family == "wta-crs") & (runs.seed > 0)
    runs = runs[~drop]
    evals = evals[~((evals.family == "wta-crs") & (evals.seed > 0))]
    table = contrasts(epoch_scores(runs, evals))
    wta = table[table.contrast.str.startswith("wta-crs")]
    assert (wta.n == 1).all() and wta.diff_ci_low.isna().all()
    assert not wta.distinguishable_holm.any()
    out = tmp_path / "figs"
    three_epochs(_write(tmp_path, runs, evals), out)
    text = (out / "three_epochs.md").read_text()
    assert "[one seed]" in text and "(n=1)" in text and "wta-crs 1" in text


def test_the_figure_entry_writes_its_files(tmp_path: Path):
    results = _write(tmp_path, *_study())
    out = tmp_path / "figs"
    written = figures.build_one("three_epochs", results, out)
    assert {p.name for p in written} >= {"three_epochs.png", "three_epochs.md",
                                         "three_epochs.csv"}
    md = (out / "three_epochs.md").read_text()
    assert "best in epoch 3" in md and "wta-crs − rows" in md


def test_a_study_without_exact_is_refused_in_one_line():
    runs, evals = _study(families=("rows", "wta-crs"))
    with pytest.raises(VarstudyError, match="no exact runs to pair with; valid choices"):
        contrasts(epoch_scores(runs, evals))
