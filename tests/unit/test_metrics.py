import math

import numpy as np
import pytest

from lgtm_ds.tasks.metrics import compute_metrics, primary_metric


def test_accuracy_from_logits():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])
    labels = np.array([0, 1, 1, 0])
    assert compute_metrics(["accuracy"], logits, labels) == {"accuracy": 0.75}


def test_f1_hand_computed():
    pred = np.array([1, 1, 0, 0, 1, 0])
    labels = np.array([1, 0, 1, 0, 1, 1])
    # tp=2 fp=1 fn=2 -> f1 = 4 / (4 + 1 + 2)
    logits = np.eye(2)[pred]
    m = compute_metrics(["f1", "accuracy"], logits, labels)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["accuracy"] == pytest.approx(3 / 6)


def test_f1_no_positives_is_zero():
    assert compute_metrics(["f1"], np.eye(2)[[0, 0]], np.array([0, 0]))["f1"] == 0.0


def test_matthews_binary_hand_computed():
    pred = np.array([1, 1, 0, 0, 1, 0])
    labels = np.array([1, 0, 1, 0, 1, 1])
    tp, tn, fp, fn = 2, 1, 1, 2
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    m = compute_metrics(["matthews"], np.eye(2)[pred], labels)
    assert m["matthews"] == pytest.approx(expected)


def test_matthews_degenerate_and_perfect():
    assert (
        compute_metrics(["matthews"], np.eye(2)[[1, 1, 1]], np.array([0, 1, 1]))["matthews"] == 0.0
    )
    assert compute_metrics(["matthews"], np.eye(3)[[0, 1, 2]], np.array([0, 1, 2]))[
        "matthews"
    ] == pytest.approx(1.0)


def test_pearson_spearman_hand_computed():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([2.0, 4.0, 6.0, 8.0])
    m = compute_metrics(["pearson", "spearman"], x[:, None], y)
    assert m["pearson"] == pytest.approx(1.0)
    assert m["spearman"] == pytest.approx(1.0)
    m = compute_metrics(["pearson", "spearman"], x, -(y**3))
    assert m["spearman"] == pytest.approx(-1.0)
    assert -1.0 < m["pearson"] < -0.9


def test_spearman_with_ties_and_constant_inputs():
    # average ranks: x -> [1.5, 3.5, 1.5, 5, 3.5], y -> [1, 2, 3, 4, 5]
    x = np.array([10.0, 20.0, 10.0, 30.0, 20.0])
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    rx, ry = np.array([1.5, 3.5, 1.5, 5.0, 3.5]), y
    expected = np.corrcoef(rx, ry)[0, 1]
    assert compute_metrics(["spearman"], x, y)["spearman"] == pytest.approx(expected)
    # undefined correlations (a constant side, fewer than 2 rows) are reported as 0.0
    assert compute_metrics(["pearson", "spearman"], np.ones(4), y[:4]) == {
        "pearson": 0.0,
        "spearman": 0.0,
    }
    assert compute_metrics(["pearson"], np.ones(1), np.ones(1)) == {"pearson": 0.0}


def test_multiclass_matthews_hand_computed():
    """Gorodkin's R_K from the confusion matrix, against sklearn's implementation."""
    pred = np.array([0, 1, 2, 2, 1, 0, 0, 2])
    labels = np.array([0, 1, 1, 2, 1, 2, 0, 2])
    cm = np.zeros((3, 3))
    np.add.at(cm, (labels, pred), 1.0)
    t, p, c, n = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    expected = (c * n - t @ p) / math.sqrt((n * n - p @ p) * (n * n - t @ t))
    m = compute_metrics(["matthews"], np.eye(3)[pred], labels)
    assert m["matthews"] == pytest.approx(expected)


def test_primary_metric_and_errors():
    assert primary_metric(["accuracy"]) == "accuracy"
    assert primary_metric(["accuracy", "f1"]) == "f1"
    assert primary_metric(["matthews"]) == "matthews"
    assert primary_metric(["pearson", "spearman"]) == "pearson"
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        compute_metrics(["bleu"], np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="differ in length"):
        compute_metrics(["accuracy"], np.zeros((3, 2)), np.zeros(2))
