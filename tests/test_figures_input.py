"""analysis.figures never publishes a damaged table: a cut-short, holed or incomplete input is
a one-line error naming the file and writes nothing; small tables draw or refuse in one line;
``all`` builds the other figures and exits non-zero (synthetic results, CPU, tiny frames)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from analysis import figures, tables  # noqa: E402
from analysis.results import load  # noqa: E402
from tests.test_figures import synthetic_results  # noqa: E402,F401 - the fixture
from varstudy.errors import VarstudyError  # noqa: E402

RUNS = Path("study") / "accuracy" / "runs.csv"
MEMORY = Path("study") / "memory" / "memory.csv"
NO_INPUTS = {"checkpoint_vs_n", "checkpoint_vs_ratio",  # synthetic results lack these: skipped
             "variance_ratio_over_training_mpnet",
             "sampler_limit",  # no limit columns (tests/test_samplers_engine.py draws it)
             "time_to_accuracy",  # no accuracy evals.csv (tests/test_time_to_accuracy.py)
             "three_epochs"}  # no 3-epoch study (tests/test_figures_epochs.py)
ACCURACY_OUTPUTS = ("accuracy_vs_ratio.png", "accuracy_vs_ratio.pdf", "paired_diff.csv",
                    "paired_diff.md", "paired_diff.tex", "accuracy_table.md")


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _run(res: Path, out: Path, *names: str) -> int:
    return figures.main([*names, "--results", str(res), "--out", str(out)])


def _nothing_written(out: Path, names=ACCURACY_OUTPUTS) -> None:
    assert not any((out / n).exists() for n in names)
    assert not list(out.glob(".tmp-*"))  # no staging folder left behind


# --------------------------------------------------------------------------------------------
# A damaged input: one line naming the file, nothing written
# --------------------------------------------------------------------------------------------


def test_truncated_csv_is_refused_and_nothing_is_written(synthetic_results, tmp_path, capsys):
    path = synthetic_results / RUNS
    text = path.read_text()
    path.write_text(text[:-7])  # an interrupted write: the last line lost its end
    out = tmp_path / "figs"
    assert _run(synthetic_results, out, "accuracy_vs_ratio") == 2
    [line] = _error_lines(capsys)
    assert line.startswith("error: accuracy_vs_ratio skipped: ")
    assert str(path) in line and "truncated" in line and "valid choices" in line
    assert f"line {text.count(chr(10))}" in line
    _nothing_written(out)


def test_a_short_line_is_refused_not_padded_with_nan(synthetic_results, tmp_path):
    path = synthetic_results / RUNS
    lines = path.read_text().splitlines(keepends=True)
    width = lines[0].count(",") + 1
    lines[4] = ",".join(lines[4].split(",")[:5]) + "\n"  # a line cut inside, then more lines
    path.write_text("".join(lines))
    with pytest.raises(VarstudyError, match=rf"line 5 has 5 of the header's {width} fields"):
        load(synthetic_results, str(RUNS), ("family",))


def test_an_empty_cell_is_refused(synthetic_results, tmp_path, capsys):
    runs = pd.read_csv(synthetic_results / RUNS)
    runs.loc[7, "best_value"] = np.nan
    runs.to_csv(synthetic_results / RUNS, index=False)
    out = tmp_path / "figs"
    assert _run(synthetic_results, out, "accuracy_vs_ratio") == 2
    [line] = _error_lines(capsys)
    assert f"{synthetic_results / RUNS} column best_value has an empty or NaN cell (row 9)" \
        in line and "valid choices" in line
    _nothing_written(out)


def test_allowed_empty_cells_pass(tmp_path):
    """An exact run's ratio is empty by convention (1.0 or empty); elsewhere it is refused."""
    df = pd.DataFrame(dict(family=["exact", "rows"], ratio=[np.nan, 0.1], seed=[0, 0]))
    df.to_csv(tmp_path / "runs.csv", index=False)
    assert len(load(tmp_path, "runs.csv", ("family", "ratio"))) == 2
    df.assign(family="rows", seed=[0, 1]).to_csv(tmp_path / "runs.csv", index=False)
    with pytest.raises(VarstudyError, match="runs.csv column ratio has an empty or NaN cell "
                                            r"\(row 2\)"):
        load(tmp_path, "runs.csv", ("family", "ratio"))


def _drop(relpath: Path, rows):
    def damage(res: Path) -> None:
        df = pd.read_csv(res / relpath)
        df[~rows(df)].to_csv(res / relpath, index=False)
    return damage


MISSING_ROWS = [  # (name, damage, figure, words of the one line)
    ("a seed of one configuration", _drop(RUNS, lambda d: (d.family == "gaussian")
                                          & (d.ratio == 0.1) & (d.scope == "all")
                                          & (d.seed == 2)),
     "accuracy_vs_ratio", "family gaussian, ratio 0.1, scope all has 2 of the 3 seed values "
                          "the other rows have (missing seed 2)"),
    ("a step of one layer", _drop(Path("measure/over_training/summary.csv"),
                                  lambda d: (d.layer == "classifier") & (d.train_step == 10)),
     "variance_ratio_over_training", "missing rows: family gaussian, ratio 0.1, layer "
                                     "classifier has 2 of the 3 train_step values"),
    ("a batch size of one ratio", _drop(MEMORY, lambda d: (d.ratio == 0.2) & (d.batch_size == 16)),
     "memory_vs_batch", "missing rows: model minilm, seq_len 128, family gaussian, ratio 0.2 "
                        "has 2 of the 3 batch_size values"),
]


@pytest.mark.parametrize("damage, name, words", [c[1:] for c in MISSING_ROWS],
                         ids=[c[0] for c in MISSING_ROWS])
def test_missing_rows_are_refused(synthetic_results, tmp_path, capsys, damage, name, words):
    damage(synthetic_results)
    out = tmp_path / "figs"
    assert _run(synthetic_results, out, name) == 2
    [line] = _error_lines(capsys)
    assert line.startswith(f"error: {name} skipped: ") and words in line, line
    assert "valid choices" in line
    _nothing_written(out, (f"{name}.png", f"{name}.pdf"))


def test_require_complete_on_hand_made_grids():
    grid = pd.DataFrame(dict(family=["exact"] * 3 + ["rows"] * 3, ratio=[np.nan] * 3 + [0.1] * 3,
                             seed=[0, 1, 2] * 2))
    tables.require_complete(grid, ("family", "ratio"), ("seed",))  # NaN keys are one series
    with pytest.raises(VarstudyError, match=r"family rows, ratio 0.1 has 2 of the 3 seed values"
                                            r" the other rows have \(missing seed 1\)"):
        tables.require_complete(grid.drop(index=4), ("family", "ratio"), ("seed",))
    with pytest.raises(VarstudyError, match="has 2 rows for family rows, ratio 0.1, seed 0"):
        tables.require_complete(pd.concat([grid, grid.iloc[[3]]]), ("family", "ratio"),
                                ("seed",))
    tables.require_complete(grid.drop(index=4), ("family", "ratio"), ("absent",))  # no grid


# --------------------------------------------------------------------------------------------
# Whole figures only; `all` goes on
# --------------------------------------------------------------------------------------------


def test_a_figure_failing_after_its_png_leaves_out_untouched(synthetic_results, tmp_path,
                                                               monkeypatch, capsys):
    """variance_by_scope writes its PNG and PDF, then its table fails: nothing is published and
    the previous files stay as they were."""
    out = tmp_path / "figs"
    out.mkdir()
    (out / "variance_by_scope.png").write_bytes(b"old")

    def broken(*args, **kwargs):
        raise KeyError("a bug in the table")

    monkeypatch.setattr(tables, "to_latex", broken)
    assert _run(synthetic_results, out, "variance_by_scope", "variance_vs_ratio") == 2
    [line] = _error_lines(capsys)
    assert line.startswith("error: variance_by_scope skipped: failed with KeyError")
    assert "--debug" in line
    assert (out / "variance_by_scope.png").read_bytes() == b"old"
    assert not (out / "variance_by_scope.pdf").exists() and not (out / "scope_table.md").exists()
    assert (out / "variance_vs_ratio.png").stat().st_size > 1000  # the other one is built
    assert not list(out.glob(".tmp-*"))
    with pytest.raises(KeyError):  # --debug shows the bug's traceback
        figures.main(["variance_by_scope", "--results", str(synthetic_results), "--out",
                      str(out), "--debug"])


def test_all_with_one_truncated_input_builds_the_others(synthetic_results, tmp_path, capsys):
    path = synthetic_results / MEMORY
    path.write_bytes(path.read_bytes()[:-3])
    out = tmp_path / "figs"
    assert _run(synthetic_results, out, "all") == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: memory_vs_batch skipped: ")
    assert str(path) in errors[0] and "truncated" in errors[0]
    assert not (out / "memory_vs_batch.png").exists()
    built = {p.stem for p in out.glob("*.png")}
    assert built == set(figures.FIGURE_ENTRIES) - {"memory_vs_batch", *NO_INPUTS}


# --------------------------------------------------------------------------------------------
# Small tables: each figure draws or refuses in one line
# --------------------------------------------------------------------------------------------


def _shrink(res: Path, relpath: str, keep) -> None:
    df = pd.read_csv(res / relpath)
    df[keep(df)].to_csv(res / relpath, index=False)


def _one_layer_one_family(res: Path) -> None:
    """Measure runs of one encoder layer, one family, one ratio (``--layers``, one family)."""
    for run in ("default", "over_training", "recipe_step0", "recipe_end"):
        for name in ("layers", "summary", "scopes"):
            if (res / "measure" / run / f"{name}.csv").is_file():
                _shrink(res, f"measure/{run}/{name}.csv",
                        lambda d: (d.family == "gaussian") & (d.ratio == 0.5)
                        & (d.layer == "encoder.layer.0.ffn_in" if "layer" in d
                           else d.scope.isin(["encoder", "all"])))


def _one_seed_only_exact_memory(res: Path) -> None:
    _shrink(res, str(RUNS), lambda d: d.seed == 0)
    _shrink(res, str(MEMORY), lambda d: d.family == "exact")


SMALL = {"one layer, one family, one ratio": _one_layer_one_family,
         "one seed; memory of exact alone": _one_seed_only_exact_memory}
EXPECTED_REFUSALS = {  # figure -> words of its one-line refusal
    "one layer, one family, one ratio": {
        "variance_vs_accuracy": "has no head layers, so its scope summaries are undefined",
    },
    "one seed; memory of exact alone": {
        "memory_vs_batch": "memory table has no randomized family for model minilm",
    },
}


@pytest.mark.parametrize("case", list(SMALL))
def test_small_tables_draw_or_refuse_in_one_line(synthetic_results, tmp_path, capsys, case):
    SMALL[case](synthetic_results)
    out = tmp_path / "figs"
    _run(synthetic_results, out, "all")
    err = capsys.readouterr().err.splitlines()
    refused = {line.split()[1].rstrip(":"): line for line in err
               if line.startswith(("error:", "skipped "))}
    assert len(err) == len(refused)  # every refusal is one line
    expected = EXPECTED_REFUSALS[case]
    assert set(refused) == set(expected) | NO_INPUTS
    for name, words in expected.items():
        assert words in refused[name] and "valid choices" in refused[name], refused[name]
    for name in set(figures.FIGURE_ENTRIES) - set(refused):
        assert (out / f"{name}.png").is_file(), name  # every other figure draws
    for table in [*out.glob("*.md"), *out.glob("*.tex")]:  # rows, not captions: no NaN cell
        rows = [line for line in table.read_text().splitlines() if line.startswith("|")
                or line.endswith("\\\\")]
        assert not [r for r in rows if "nan" in r.lower()], table.name


def test_variance_by_scope_draws_the_scopes_a_run_has(synthetic_results, tmp_path):
    _one_layer_one_family(synthetic_results)
    figures.build(["variance_by_scope"], synthetic_results, tmp_path)
    md = (tmp_path / "scope_table.md").read_text()
    assert "| family | ratio | encoder | all | per-layer median [q1, q3] |" in md
    assert "head" not in md.split("\n")[2]


def test_plan_accuracy_with_one_seed_has_no_nan_cell(synthetic_results, tmp_path):
    _shrink(synthetic_results, str(RUNS), lambda d: d.seed == 0)
    figures.build(["plan_accuracy"], synthetic_results, tmp_path)
    md = (tmp_path / "plan_accuracy.md").read_text()
    assert "[one seed] (n=1)" in md and "nan" not in md


def test_accuracy_figures_refuse_a_study_of_exact_runs_alone(synthetic_results, tmp_path):
    _shrink(synthetic_results, str(RUNS), lambda d: d.family == "exact")
    for name in ("accuracy_vs_ratio", "plan_accuracy", "variance_vs_accuracy"):
        with pytest.raises(VarstudyError, match="has only exact runs, no configuration"):
            figures.build([name], synthetic_results, tmp_path)
    _nothing_written(tmp_path)


def test_variance_vs_accuracy_refuses_measure_runs_of_other_configurations(synthetic_results,
                                                                           tmp_path):
    """The recipe measure runs hold only rows-norm, which the accuracy grid never ran: nothing
    to correlate, so a one-line refusal instead of an empty figure (or a crash)."""
    for run in ("recipe_step0", "recipe_end"):
        _shrink(synthetic_results, f"measure/{run}/layers.csv", lambda d: d.family == "rows-norm")
    with pytest.raises(VarstudyError, match="valid choices") as err:
        figures.build(["variance_vs_accuracy"], synthetic_results, tmp_path)
    assert "\n" not in str(err.value)
    _nothing_written(tmp_path, ("variance_vs_accuracy.png", "variance_accuracy_link.md"))


def test_new_figure_refuses_an_empty_grid():
    from analysis.style import new_figure

    with pytest.raises(VarstudyError, match="nothing to draw: the inputs leave a 0 × 6 grid"):
        new_figure(0, 6)
