"""GLUE metrics against values computed by hand on small fixtures."""

import math

import numpy as np
import pytest
import torch

from varstudy.errors import VarstudyError
from varstudy.metrics import (
    METRICS, accuracy, compute_metrics, f1, matthews, pearson, spearman, task_metrics,
)

# Binary fixture: labels 1 1 1 1 0 0 0 0 ; predictions 1 1 1 0 1 0 0 0
# -> TP=3 FN=1 FP=1 TN=3.
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0])
PREDS = np.array([1, 1, 1, 0, 1, 0, 0, 0])


def test_accuracy_by_hand():
    assert accuracy(PREDS, LABELS) == 6 / 8


def test_f1_by_hand():
    # precision 3/4, recall 3/4 -> F1 = 2·3 / (2·3 + 1 + 1) = 0.75
    assert f1(PREDS, LABELS) == pytest.approx(0.75)
    # TP=1, FP=2, FN=0 -> 2/(2+2) = 0.5
    assert f1(np.array([1, 1, 1, 0]), np.array([1, 0, 0, 0])) == pytest.approx(0.5)


def test_matthews_by_hand():
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 − 1) / sqrt(4·4·4·4) = 0.5
    assert matthews(PREDS, LABELS) == pytest.approx(0.5)
    assert matthews(LABELS, LABELS) == pytest.approx(1.0)
    assert matthews(1 - LABELS, LABELS) == pytest.approx(-1.0)
    # TP=1 FN=1 FP=0 TN=2: (2 − 0)/sqrt(1·2·2·3) = 2/sqrt(12)
    assert matthews(np.array([1, 0, 0, 0]), np.array([1, 1, 0, 0])) == pytest.approx(
        2 / math.sqrt(12))


def test_matthews_multiclass_matches_formula():
    labels = np.array([0, 1, 2, 0, 1, 2])
    preds = np.array([0, 2, 1, 0, 0, 2])
    # c=3 correct, s=6, t=(2,2,2), p=(3,1,2): (3·6 − 12) / sqrt((36 − 14)(36 − 12))
    assert matthews(preds, labels) == pytest.approx(6 / math.sqrt(22 * 24))


def test_pearson_spearman_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    # y = x² is monotone: Spearman 1; Pearson of (1,2,3,4) with (1,4,9,16)
    y = x**2
    xc, yc = x - x.mean(), y - y.mean()
    assert pearson(x, y) == pytest.approx(xc @ yc / math.sqrt((xc @ xc) * (yc @ yc)))
    assert spearman(x, y) == pytest.approx(1.0)
    # ranks (1,2,3,4) vs (2,1,4,3): Spearman = 1 − 6·Σd²/(n(n²−1)) = 1 − 6·4/60 = 0.6
    assert spearman(x, np.array([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)


@pytest.mark.parametrize("metric", ["matthews", "pearson", "spearman", "f1"])
def test_degenerate_inputs_give_zero_not_nan(metric):
    constant = np.zeros(6, dtype=np.int64)
    labels = np.array([0, 1, 0, 1, 0, 1])
    value = METRICS[metric](constant, labels if metric != "f1" else constant)
    assert value == 0.0


@pytest.mark.parametrize("task, names", [
    ("cola", ["matthews"]), ("sst2", ["accuracy"]), ("glue:mrpc", ["accuracy", "f1"]),
    ("qqp", ["accuracy", "f1"]), ("stsb", ["pearson", "spearman"]), ("mnli", ["accuracy"]),
    ("rte", ["accuracy"]), ("qnli", ["accuracy"]), ("wnli", ["accuracy"]),
    ("rotten_tomatoes", ["accuracy"]), ("imdb", ["accuracy"]),
])
def test_task_metrics(task, names):
    assert task_metrics(task) == names


def test_compute_metrics_accepts_logits_and_tensors():
    logits = torch.tensor([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    out = compute_metrics("mrpc", logits, torch.tensor([1, 0, 0, 0]))
    assert out == {"accuracy": pytest.approx(0.75), "f1": pytest.approx(2 / 3)}
    scores = compute_metrics("stsb", torch.tensor([[1.0], [2.0], [3.0]]), [0.5, 1.0, 4.0])
    assert scores["spearman"] == pytest.approx(1.0)
    assert compute_metrics(["accuracy"], [1, 0], [1, 1]) == {"accuracy": 0.5}


def test_errors_name_valid_choices():
    with pytest.raises(VarstudyError, match="valid tasks: .*cola"):
        task_metrics("squad")
    with pytest.raises(VarstudyError, match="valid metrics: accuracy"):
        compute_metrics(["bleu"], [1], [1])
    with pytest.raises(VarstudyError, match="do not match"):
        compute_metrics("sst2", [1, 0], [1, 0, 1])
    with pytest.raises(VarstudyError, match="no examples"):
        compute_metrics("sst2", [], [])
