"""Evaluation metrics, as GLUE defines them per task.

* accuracy: fraction of exact matches.
* f1: binary F1 of the positive class 1 (MRPC, QQP): 2·TP / (2·TP + FP + FN).
* matthews: Matthews correlation (CoLA), multiclass form
  (c·s − Σ_k p_k t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²)) with c correct, s total,
  p_k predicted and t_k true counts of class k; binary it is (TP·TN − FP·FN)/sqrt(...).
* pearson, spearman: correlation of scores with gold scores (STS-B); spearman is Pearson of ranks
  (ties get average ranks).

Degenerate inputs give 0.0, never NaN: Matthews with a zero denominator (constant predictions or
labels, the scikit-learn convention), F1 with no positive predictions and no positive labels,
Pearson/Spearman when either side is constant (correlation undefined).

Predictions may be class ids (N,), logits/probabilities (N, C) with C > 1 (argmax is taken), or
scores (N,) / (N, 1) for regression.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats

from varstudy.errors import VarstudyError


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the labels. Shapes (N,), (N,)."""
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of class 1. Shapes (N,), (N,). 0.0 when TP + FP + FN = 0."""
    tp = int(np.sum((predictions == 1) & (labels == 1)))
    fp = int(np.sum((predictions == 1) & (labels != 1)))
    fn = int(np.sum((predictions != 1) & (labels == 1)))
    denom = 2 * tp + fp + fn
    return 2.0 * tp / denom if denom else 0.0


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (multiclass form). Shapes (N,), (N,). 0.0 if undefined."""
    classes, inverse = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    true_idx, pred_idx = inverse[: len(labels)], inverse[len(labels):]
    t = np.bincount(true_idx, minlength=len(classes)).astype(np.float64)
    p = np.bincount(pred_idx, minlength=len(classes)).astype(np.float64)
    c = float(np.sum(true_idx == pred_idx))
    s = float(len(labels))
    denom = (s * s - p @ p) * (s * s - t @ t)
    return float((c * s - p @ t) / np.sqrt(denom)) if denom > 0 else 0.0


def _correlation(fn: Callable, predictions: np.ndarray, labels: np.ndarray) -> float:
    x, y = predictions.astype(np.float64), labels.astype(np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(fn(x, y)[0])


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation. Shapes (N,), (N,). 0.0 if either side is constant."""
    return _correlation(stats.pearsonr, predictions, labels)


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation. Shapes (N,), (N,). 0.0 if either side is constant."""
    return _correlation(stats.spearmanr, predictions, labels)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
REGRESSION_METRICS = frozenset({"pearson", "spearman"})

# GLUE's official metric(s) per task; our own datasets use accuracy.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "rotten_tomatoes": ("accuracy",),
    "imdb": ("accuracy",),
    "synthetic": ("accuracy",),
}


def task_metrics(task: str) -> list[str]:
    """Metric names of a task; "glue:<task>" and "<task>" are both accepted."""
    key = task.split(":", 1)[1] if task.startswith("glue:") else task
    if key not in TASK_METRICS:
        raise VarstudyError(
            f"unknown task {task!r} for metrics; valid tasks: {', '.join(sorted(TASK_METRICS))}"
        )
    return list(TASK_METRICS[key])


def compute_metrics(
    task_or_names: str | Sequence[str], predictions, labels
) -> dict[str, float]:
    """Compute a task's metrics (or the named ones).

    Args:
        task_or_names: a task name (see :func:`task_metrics`) or a list of metric names
            (keys of ``METRICS``).
        predictions: (N,) class ids or scores, (N, 1) scores, or (N, C) logits (argmax taken).
        labels: (N,) gold class ids or scores.

    Returns:
        ``{metric_name: value}`` in the task's order.
    """
    names = task_metrics(task_or_names) if isinstance(task_or_names, str) else list(task_or_names)
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise VarstudyError(
            f"unknown metric name(s) {unknown or names!r}; valid metrics: {', '.join(METRICS)}"
        )
    regression = any(n in REGRESSION_METRICS for n in names)
    preds, gold = _as_arrays(predictions, labels, regression)
    return {n: METRICS[n](preds, gold) for n in names}


def _as_arrays(predictions, labels, regression: bool) -> tuple[np.ndarray, np.ndarray]:
    preds = _to_numpy(predictions)
    gold = _to_numpy(labels).reshape(-1)
    if preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    elif preds.ndim == 2 and not regression:
        preds = preds.argmax(axis=1)
    if preds.ndim != 1 or preds.shape[0] != gold.shape[0]:
        raise VarstudyError(
            f"predictions of shape {tuple(preds.shape)} do not match labels of shape "
            f"{tuple(gold.shape)}; valid: (N,), (N, 1) or (N, C) predictions for N labels"
        )
    if gold.shape[0] == 0:
        raise VarstudyError("no examples to score; valid: at least one prediction and label")
    return preds, gold


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().float().numpy() if values.is_floating_point() \
            else values.detach().cpu().numpy()
    return np.asarray(values)
