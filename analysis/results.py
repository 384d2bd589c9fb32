"""Reading results and writing figures: the I/O shared by every figure entry point.

``load`` reads one CSV under ``results/`` and checks it (missing -> MissingResultsError; cut
short, lacking a column, a non-number or an empty cell where a value belongs, or rows missing
(:data:`SCHEMAS`) -> VarstudyError; each one line naming the file); ``save`` writes
``<name>.png`` and a byte-stable ``<name>.pdf``, ``write_text`` a table, each atomically
(:mod:`varstudy.io`); ``config`` reads the resolved config written next to a result.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from varstudy.errors import VarstudyError
from varstudy.io import atomic_write_bytes, atomic_write_text

from analysis import tables
from analysis.style import SAVE_DPI

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
FIGURES = ROOT / "figures"


# Older or alternative spellings of a column, read as the name the figures use.
COLUMN_ALIASES = {"sketch": "family", "dataset": "task", "rho": "ratio"}


class MissingResultsError(VarstudyError):
    """A figure's input file is not in the results directory (yet)."""


# Columns the figures read as text; every other required column must be numeric.
TEXT_COLUMNS = {"layer", "layer_kind", "family", "task", "model", "metric", "strategy",
                "workload", "device", "basis", "scope", "objective", "label", "config", "unit",
                "kind"}
RERUN = "valid choices: rerun the command that writes it"


@dataclass(frozen=True)
class Schema:
    """What one kind of input file holds beyond its columns (NOTE [complete inputs] in
    :func:`analysis.tables.require_complete`): ``keys`` name a series and every series has
    one row per value of ``over``, on the rows ``grid_rows`` keeps (all by default);
    ``empty_ok`` lists (columns, where) pairs: those required columns may have empty cells on
    the rows ``where`` marks (anywhere when None); ``check`` returns what else is wrong, or
    None."""

    keys: tuple[str, ...] = ()
    over: tuple[str, ...] = ()
    grid_rows: Callable[[pd.DataFrame], pd.Series] | None = None
    empty_ok: tuple[tuple[tuple[str, ...], Callable[[pd.DataFrame], pd.Series] | None], ...] = ()
    check: Callable[[pd.DataFrame], str | None] | None = None


def _exact_rows(df: pd.DataFrame) -> pd.Series:  # the exact baseline: ratio 1.0 or empty
    return df["family"] == "exact" if "family" in df else pd.Series(False, index=df.index)


def _one_batch(df: pd.DataFrame) -> pd.Series:  # one minibatch: no interval
    return df["n_batches"] < 2 if "n_batches" in df else pd.Series(False, index=df.index)


def _skipped(df: pd.DataFrame) -> pd.Series:  # a benchmark point skipped, with its reason
    return df["skipped"].notna() if "skipped" in df else pd.Series(False, index=df.index)


def _validation_metrics(df: pd.DataFrame) -> pd.Series:  # test metrics: at new bests only
    return ~df["metric"].astype(str).str.startswith("test_")


def _runs_check(df: pd.DataFrame) -> str | None:
    families = set(df["family"]) if "family" in df else set()
    if "exact" not in families:
        return "has no exact runs to pair with; valid choices: a study that includes 'exact'"
    if families == {"exact"}:
        return ("has only exact runs, no configuration to compare; valid choices: run the "
                "study's grid (python -m varstudy.study accuracy)")
    return None


def _both_scopes(df: pd.DataFrame) -> str | None:
    """A recipe measure run feeds the scope summaries: it needs encoder and head layers."""
    from varstudy.roles import layer_scope

    scopes = set(df.loc[df["layer"] != tables.MODEL_ROW, "layer"].map(layer_scope)) \
        if "layer" in df else set()
    lacking = [s for s in ("encoder", "head") if s not in scopes]
    if lacking:
        return (f"has no {' or '.join(lacking)} layers, so its scope summaries are undefined; "
                "valid choices: a measure run over every linear layer (no --layers)")
    return None


CI = ("ratio_ci_low", "ratio_ci_high")
MC = ((("var_sketch_mc", "var_sketch_mc_se", "layer_index"), None),)  # no Monte Carlo; the head
# Every input file the figures read, by its path under results/ (the first pattern that
# matches); a file no pattern names is only checked for its lines, columns and cells.
SCHEMAS: dict[str, Schema] = {
    "measure/recipe_*/layers.csv": Schema(("family", "ratio", "layer"), ("train_step", "batch"),
                                          empty_ok=MC, check=_both_scopes),
    "measure/*/layers.csv": Schema(("family", "ratio", "layer"), ("train_step", "batch"),
                                   empty_ok=MC),
    "measure/*/summary.csv": Schema(("family", "ratio", "layer"), ("train_step",),
                                    empty_ok=((("layer_index",), None), (CI, _one_batch))),
    "measure/*/scopes.csv": Schema(("family", "ratio", "scope"), ("train_step",),
                                   empty_ok=((CI, _one_batch),)),
    "study/accuracy/runs.csv": Schema(("family", "ratio", "scope"), ("seed",),
                                      check=_runs_check),
    "study/*evals.csv": Schema(("family", "ratio", "scope", "seed", "metric"), ("step",),
                               grid_rows=_validation_metrics),
    "study/memory/memory.csv": Schema(("model", "seq_len", "family", "ratio"), ("batch_size",)),
    "study/throughput/throughput.csv": Schema(("model", "device", "family", "ratio"),
                                              ("batch_size",)),
    "study/throughput/max_batch.csv": Schema((), ("family", "ratio")),
    "*bench/layers.csv": Schema((), ("family", "ratio")),
    "checkpoint/vs_n.csv": Schema(("workload", "strategy"), ("n_steps",),
                                  empty_ok=((("fast_peak_mib", "time_per_step_ms"), _skipped),)),
    "checkpoint/vs_ratio.csv": Schema(("workload", "strategy"), ("ratio",)),
    "study/*frontier/frontier.csv": Schema((), ("config",)),
    "plans/*/frontier.csv": Schema(("family", "objective"), ("budget",)),
    "online/*/plans.csv": Schema(("layer",), ("step",)),
}


def schema(relpath: str) -> Schema:
    """The :data:`SCHEMAS` entry of a file under results/ (an empty Schema when none)."""
    return next((s for pattern, s in SCHEMAS.items() if fnmatch(relpath, pattern)), Schema())


def _read(path: Path) -> pd.DataFrame:
    """Parse a CSV whose every line is whole: a file cut short (no line end after its last
    line, or a line with fewer fields than the header) is refused, not padded with NaN."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise VarstudyError(f"{path} is not a readable CSV ({err}); {RERUN}") from None
    if not text.strip():
        raise VarstudyError(f"{path} is not a readable CSV (it is empty); {RERUN}")
    if not text.endswith("\n"):
        raise VarstudyError(f"{path} is truncated: its last line (line {text.count(chr(10)) + 1})"
                            f" has no line end (an interrupted write); {RERUN}")
    lines = csv.reader(io.StringIO(text))
    width = len(next(lines))
    for row in lines:
        if row and len(row) != width:
            raise VarstudyError(f"{path} line {lines.line_num} has {len(row)} of the header's "
                                f"{width} fields (a truncated or damaged line); {RERUN}")
    try:
        return pd.read_csv(io.StringIO(text))
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise VarstudyError(f"{path} is not a readable CSV ({' '.join(str(err).split())}); "
                            f"{RERUN}") from None


def _check_cells(df: pd.DataFrame, required: tuple[str, ...], spec: Schema, path: Path) -> None:
    """Numbers where numbers belong, and no empty cell in a required column unless the schema
    (or an exact row's ratio, 1.0 or empty by convention) allows it."""
    for col in required:
        if col not in TEXT_COLUMNS and not pd.api.types.is_numeric_dtype(df[col]):
            bad = pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()
            row = int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else 0
            raise VarstudyError(f"{path} column {col} holds a non-numeric value "
                                f"{df[col].iloc[row]!r} (row {row + 2}); valid choices: numbers "
                                "(rerun the command that writes it)")
    for col in required:
        empty = df[col].isna().to_numpy()
        for cols, where in ((("ratio",), _exact_rows), *spec.empty_ok):
            if col in cols:
                empty = empty & (False if where is None else ~where(df).to_numpy(dtype=bool))
        if empty.any():
            row = int(np.flatnonzero(empty)[0])
            raise VarstudyError(f"{path} column {col} has an empty or NaN cell (row {row + 2}); "
                                "valid choices: a value in every row (rerun the command that "
                                "writes it)")


def load(results: Path, relpath: str, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read ``results/relpath`` and check it; MissingResultsError when absent, else a one-line
    VarstudyError naming the file when it is empty or cut short, lacks a column, holds a
    non-number where a number belongs or an empty cell in a required column, or misses rows
    (its :func:`schema`: every configuration its seeds, every layer its steps)."""
    path = Path(results) / relpath
    if not path.is_file():
        raise MissingResultsError(f"missing input {path} (not produced yet?)")
    df = _read(path)
    df = df.rename(columns={old: new for old, new in COLUMN_ALIASES.items()
                            if old in df and new not in df})
    try:
        tables.require_columns(df, required, str(path))
    except VarstudyError as err:
        raise VarstudyError(f"{err}; {RERUN}") from None
    if df.empty:
        raise VarstudyError(f"{path} has a header but no rows; {RERUN}")
    spec = schema(Path(relpath).as_posix())
    _check_cells(df, tuple(required), spec, path)
    grid = df[spec.grid_rows(df)] if spec.grid_rows is not None else df
    tables.require_complete(grid, spec.keys, spec.over, str(path))
    problem = spec.check(df) if spec.check is not None else None
    if problem:
        raise VarstudyError(f"{path} {problem}")
    return df


def require_rows(df: pd.DataFrame, what: str, valid: str) -> None:
    """Refuse (one line: ``what``, then ``valid choices: valid``) a table left without rows,
    e.g. two inputs that share no configuration, instead of drawing an empty figure."""
    if df.empty:
        raise VarstudyError(f"{what}; valid choices: {valid}")


def config(results: Path, relpath: str) -> dict:
    """The resolved config written next to a result (``{"config": {...}}`` or flat), or {}."""
    import json

    path = Path(results) / relpath
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # the config only labels the figure
        raise VarstudyError(f"{path} is not valid JSON ({err}); valid choices: rerun the "
                            "command that writes it") from None
    return data.get("config", data) if isinstance(data, dict) else {}


def save(fig: Figure, out: Path, name: str) -> list[Path]:
    """Write ``out/name.png`` and ``out/name.pdf``, each atomically; return both paths."""
    paths = [Path(out) / f"{name}.png", Path(out) / f"{name}.pdf"]
    for path, options in zip(paths, (dict(dpi=SAVE_DPI),
                                     dict(metadata={"CreationDate": None}))):  # byte-stable PDF
        buffer = io.BytesIO()
        fig.savefig(buffer, format=path.suffix[1:], **options)
        atomic_write_bytes(path, buffer.getvalue())
    return paths


def outer_labels(axes) -> None:
    """Keep x labels on the bottom row and y labels on the first column of a facet grid."""
    nrows, ncols = axes.shape
    for (i, j), ax in np.ndenumerate(axes):
        if j > 0:
            ax.set_ylabel("")
        if i < nrows - 1 and (i + 1) * ncols + j < axes.size and axes[i + 1, j].get_visible():
            ax.set_xlabel("")


def write_text(out: Path, name: str, text: str) -> Path:
    """Write ``out/name`` atomically; return its path."""
    return atomic_write_text(Path(out) / name, text)


def most_common(df: pd.DataFrame, column: str):
    """The most frequent value of ``column`` (None when the column is absent)."""
    return df[column].value_counts().idxmax() if column in df else None
