"""Evaluation metrics: scikit-learn and scipy, behind one ``compute_metrics``.

* ``predictions`` are logits ``[N, C]`` (classification: argmax over the last axis) or scores
  ``[N]`` / ``[N, 1]`` (regression).
* ``accuracy``: ``sklearn.metrics.accuracy_score``.
* ``f1``: binary F1 of class 1 (``f1_score`` on ``label == 1``; 0.0 without true or predicted
  positives).
* ``matthews``: ``matthews_corrcoef`` (multi-class form; 0.0 when undefined, as sklearn does).
* ``pearson`` / ``spearman``: ``scipy.stats.pearsonr`` / ``spearmanr``; 0.0 when undefined
  (fewer than 2 rows, or a constant side), to match the classification metrics.
"""

from __future__ import annotations

import warnings

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")
VALID_METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS

# The metric a run is selected / reported on, in order of preference when several are computed.
_PRIMARY_ORDER = ("matthews", "f1", "pearson", "spearman", "accuracy")


def _class_predictions(predictions: np.ndarray) -> np.ndarray:
    p = np.asarray(predictions)
    if p.ndim == 2 and p.shape[1] > 1:
        return p.argmax(axis=-1)
    p = p.reshape(-1)
    if np.issubdtype(p.dtype, np.floating) and not np.all(p == np.round(p)):
        raise ValueError(
            "classification metrics need logits [N, C] or integer class ids [N]; got float scores "
            f"of shape {np.asarray(predictions).shape}"
        )
    return p.astype(np.int64)


def _regression_predictions(predictions: np.ndarray) -> np.ndarray:
    p = np.asarray(predictions, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim != 1:
        raise ValueError(
            f"regression metrics need predictions of shape [N] or [N, 1]; got {p.shape}"
        )
    return p


def _correlation(name: str, x: np.ndarray, y: np.ndarray) -> float:
    from scipy import stats

    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0  # undefined
    fn = stats.pearsonr if name == "pearson" else stats.spearmanr
    return float(fn(x, y)[0])


def _classification_metric(name: str, pred: np.ndarray, labels: np.ndarray) -> float:
    from sklearn import metrics

    with warnings.catch_warnings():  # undefined cases return 0.0, documented above
        warnings.simplefilter("ignore")
        if name == "accuracy":
            return float(metrics.accuracy_score(labels, pred)) if pred.size else 0.0
        if name == "f1":
            return float(metrics.f1_score(labels == 1, pred == 1, zero_division=0.0))
        return float(metrics.matthews_corrcoef(labels, pred)) if pred.size else 0.0


def compute_metrics(
    metric_names: list[str], predictions: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Compute each named metric; see the module docstring for the conventions."""
    labels = np.asarray(labels)
    preds = np.asarray(predictions)
    if preds.shape[0] != labels.reshape(-1).shape[0]:
        raise ValueError(
            f"predictions ({preds.shape[0]} rows) and labels ({labels.reshape(-1).shape[0]}) "
            "differ in length"
        )
    out: dict[str, float] = {}
    for name in metric_names:
        if name in CLASSIFICATION_METRICS:
            out[name] = _classification_metric(
                name, _class_predictions(preds), labels.reshape(-1).astype(np.int64)
            )
        elif name in REGRESSION_METRICS:
            out[name] = _correlation(
                name, _regression_predictions(preds), labels.reshape(-1).astype(np.float64)
            )
        else:
            raise ValueError(f"unknown metric {name!r}; valid: {', '.join(VALID_METRICS)}")
    return out


def primary_metric(metric_names: list[str]) -> str:
    """The metric to select / report on: matthews > f1 > pearson > spearman > accuracy."""
    if not metric_names:
        raise ValueError("primary_metric needs at least one metric name")
    for name in _PRIMARY_ORDER:
        if name in metric_names:
            return name
    return metric_names[0]
