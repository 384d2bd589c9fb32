"""The checkpointing benchmark's finished rows, kept in ``<out>/parts/`` for ``--resume``
(NOTE [resume] in :mod:`varstudy.bench.checkpoint`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from varstudy import io as vio
from varstudy.bench.checkpoint import WAVE_STRATEGIES, BenchConfig
from varstudy.errors import VarstudyError


class Parts:
    """The rows finished so far, kept in ``<out>/parts/<name>.csv`` (NOTE [resume]).

    ``Parts(folder, cfg, resume=True)`` reads them, before the folder changes: a row whose key is
    not a job of ``cfg``, or repeats an earlier row, is dropped (its job runs again); a file that
    cannot be read as CSV is one line. ``folder=None``: nothing kept, nothing written.
    """

    KEYS = {"vs_n": ("n_steps", "strategy"), "vs_ratio": ("ratio", "strategy"),
            "wave": ("strategy",)}

    def __init__(self, folder: Path | None, cfg: BenchConfig, *, resume: bool = False) -> None:
        self.folder = folder
        self.rows: dict[str, list[dict]] = {name: [] for name in self.KEYS}
        if folder is None or not resume:
            return
        jobs = dict(vs_n={(n, s) for n in cfg.ns for s in cfg.strategies},
                    vs_ratio={(r, s) for r in cfg.ratios for s in ("multistage_host", "revolve")},
                    wave={(s,) for s in WAVE_STRATEGIES})
        for name, keys in self.KEYS.items():
            self.rows[name] = self._read(folder / f"{name}.csv", keys, jobs[name])

    @staticmethod
    def _read(path: Path, keys, jobs) -> list[dict]:
        try:
            frame = vio.read_chunk(path)
        except (ValueError, pd.errors.ParserError) as err:
            raise VarstudyError(f"{path} is damaged ({' '.join(str(err).split())[:120]}); valid "
                                "choices: rerun without --resume (start over), or another "
                                "--out") from None
        rows, seen = [], set()
        if frame is not None and set(keys) <= set(frame.columns):
            for row in frame.to_dict("records"):
                key = tuple(row[k] for k in keys)
                if key in jobs and key not in seen:
                    seen.add(key)
                    rows.append(row)
        return rows

    def kept(self, name: str) -> tuple[list[dict], set]:
        """(a copy of the kept rows of ``name``, their keys)."""
        rows = list(self.rows[name])
        return rows, {tuple(r[k] for k in self.KEYS[name]) for r in rows}

    def append(self, name: str, rows: list[dict]) -> None:
        """Append ``rows`` to the parts file ``<name>.csv`` (nothing without a folder)."""
        if self.folder is not None:
            vio.append_csv(self.folder / f"{name}.csv", pd.DataFrame(rows))
