"""Reading results and writing figures: the I/O shared by every figure entry point.

``load`` reads one CSV under ``results/`` and checks its columns (missing -> MissingResultsError,
bad -> VarstudyError, both one line); ``save`` writes ``<name>.png`` and a byte-stable
``<name>.pdf``; ``config`` reads the resolved config written next to a result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from varstudy.errors import VarstudyError

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
                "workload", "device", "basis", "scope", "objective", "label", "config", "unit"}


def load(results: Path, relpath: str, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read ``results/relpath`` and check its columns; MissingResultsError when absent,
    VarstudyError when empty, unparsable, lacking a column or holding a non-number where a
    number belongs."""
    path = Path(results) / relpath
    if not path.is_file():
        raise MissingResultsError(f"missing input {path} (not produced yet?)")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise VarstudyError(f"{path} is not a readable CSV ({' '.join(str(err).split())}); "
                            "valid choices: rerun the command that writes it") from None
    df = df.rename(columns={old: new for old, new in COLUMN_ALIASES.items()
                            if old in df and new not in df})
    try:
        tables.require_columns(df, required, str(path))
    except VarstudyError as err:
        raise VarstudyError(f"{err}; valid choices: rerun the command that writes it") from None
    if df.empty:
        raise VarstudyError(f"{path} has a header but no rows; valid choices: rerun the command "
                            "that writes it")
    for col in required:
        if col not in TEXT_COLUMNS and not pd.api.types.is_numeric_dtype(df[col]):
            bad = pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()
            row = int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else 0
            raise VarstudyError(f"{path} column {col} holds a non-numeric value "
                                f"{df[col].iloc[row]!r} (row {row + 2}); valid choices: numbers "
                                "(rerun the command that writes it)")
    return df


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
    """Write ``out/name.png`` and ``out/name.pdf``; return both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=SAVE_DPI)
    fig.savefig(paths[1], metadata={"CreationDate": None})  # byte-stable PDFs across rebuilds
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
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / name
    path.write_text(text)
    return path




def most_common(df: pd.DataFrame, column: str):
    """The most frequent value of ``column`` (None when the column is absent)."""
    return df[column].value_counts().idxmax() if column in df else None
