import math

import numpy as np
import pytest

from lgtm_ds.metrics import average_ranks, compute_metrics, primary_metric


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


def test_average_ranks_ties():
    np.testing.assert_allclose(
        average_ranks(np.array([10.0, 20.0, 10.0, 30.0, 20.0])), [1.5, 3.5, 1.5, 5.0, 3.5]
    )


def test_against_scipy_sklearn_if_available():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3))
    labels = rng.integers(0, 3, size=200)
    x = rng.normal(size=200).round(1)  # ties
    y = x + rng.normal(size=200)
    m = compute_metrics(["pearson", "spearman"], x, y)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert m["pearson"] == pytest.approx(scipy_stats.pearsonr(x, y)[0])
    assert m["spearman"] == pytest.approx(scipy_stats.spearmanr(x, y)[0])
    skm = pytest.importorskip("sklearn.metrics")
    pred = logits.argmax(-1)
    assert compute_metrics(["matthews"], logits, labels)["matthews"] == pytest.approx(
        skm.matthews_corrcoef(labels, pred)
    )
    bl = labels % 2
    bp = np.eye(2)[pred % 2]
    assert compute_metrics(["f1"], bp, bl)["f1"] == pytest.approx(skm.f1_score(bl, pred % 2))


def test_primary_metric_and_errors():
    assert primary_metric(["accuracy"]) == "accuracy"
    assert primary_metric(["accuracy", "f1"]) == "f1"
    assert primary_metric(["matthews"]) == "matthews"
    assert primary_metric(["pearson", "spearman"]) == "pearson"
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        compute_metrics(["bleu"], np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="differ in length"):
        compute_metrics(["accuracy"], np.zeros((3, 2)), np.zeros(2))
