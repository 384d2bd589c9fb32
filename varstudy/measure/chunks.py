"""Chunk files of a run: what counts as a finished, well-formed batch (NOTE [durable results /
resume] in :mod:`varstudy.measure`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from varstudy import io as vio
from varstudy.measure.config import INT_COLUMNS, LAYER_COLUMNS, MeasureConfig
from varstudy.measure.engine import typed


def rows_per_batch(cfg: MeasureConfig, names: list[str]) -> int:
    """layers.csv rows of one batch: every selected layer plus "model", per (family, ratio)."""
    return (len(names) + 1) * len(cfg.families) * len(cfg.ratios)


def finished_rows(path: Path, cfg: MeasureConfig, names: list[str], repair: bool,
                  step: int | None = None):
    """Rows of the complete, well-formed batches in chunk ``path`` (None when there are none).

    A row counts when it has every schema column, each parses as its type (no empty text, no
    ``xyz`` in a number), and it names this ``step``, a batch index below ``num_batches``, a
    selected layer or "model", a configured family and ratio; a batch counts when its rows hold
    every (layer, family, ratio) exactly once. Anything else (a trailing partial line, a line cut
    or edited in the middle, a batch appended twice) drops its whole batch, which is measured
    again; with ``repair`` the chunk is rewritten without it (the kept lines byte for byte).
    """
    if repair:
        vio.trim_partial_line(path)
    lines = vio.whole_lines(path)
    if not lines or lines[0].rstrip("\r\n") != ",".join(LAYER_COLUMNS):
        kept = []  # no schema header: nothing in this chunk can be trusted
    else:
        kept = _valid_batch_lines(lines[1:], cfg, names, step)
    if repair and len(kept) + 1 < len(lines):
        if kept:
            vio.atomic_write_text(path, lines[0] + "".join(kept))
        else:
            vio.remove(path)
    if not kept:
        return None
    return typed(pd.read_csv(io.StringIO(lines[0] + "".join(kept))))


_TEXT = ("layer", "layer_kind", "family")
_REQUIRED = ("train_step", "batch", "batch_size", "mc_draws", "ratio", "grad_sq_norm",
             "var_sampling", "var_sketch")             # never empty
_LAYER_ONLY = ("d_in", "d_out", "n_rows", "k")          # empty on "model" rows only


def _valid_batch_lines(lines: list[str], cfg: MeasureConfig, names: list[str],
                       step: int | None) -> list[str]:
    """The lines of the batches whose every row is valid and that are complete (finished_rows)."""
    expected = {(n, f, r) for n in [*names, "model"] for f in cfg.families for r in cfg.ratios}
    batches: dict[int, list] = {}
    broken = set()
    for line, cells in zip(lines, csv.reader(lines)):
        row = _parse_row(cells)
        if row is None:  # its batch (when the line still names one) is measured again
            if len(cells) > 1 and cells[1].isdigit():
                broken.add(int(cells[1]))
            continue
        key = (row["layer"], row["family"], row["ratio"])
        ok = (key in expected and 0 <= row["batch"] < cfg.num_batches
              and (step is None or row["train_step"] == step))
        if not ok:
            broken.add(row["batch"])
        batches.setdefault(row["batch"], []).append((key, line))
    kept = []
    for b, rows in batches.items():
        keys = [k for k, _ in rows]
        if b not in broken and len(keys) == len(expected) and set(keys) == expected:
            kept += [line for _, line in rows]
    return kept


def _parse_row(cells: list[str]) -> dict | None:
    """One chunk line as {column: value}, or None when a column is missing or does not parse."""
    if len(cells) != len(LAYER_COLUMNS):
        return None
    row = dict(zip(LAYER_COLUMNS, cells))
    model = row["layer"] == "model"
    for c, text in row.items():
        if c in _TEXT:
            if not text.strip():
                return None
            continue
        if text == "":
            if c in _REQUIRED or (c in _LAYER_ONLY and not model):
                return None
            continue
        try:
            value = float(text)
        except ValueError:
            return None
        if c in INT_COLUMNS:
            if not value.is_integer():
                return None
            value = int(value)
        row[c] = value
    return row
