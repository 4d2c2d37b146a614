"""Evaluation metrics, numpy only (no sklearn / scipy dependency).

``compute_metrics(metric_names, predictions, labels)``:

* ``predictions`` are logits ``[N, C]`` (classification: argmax over the last axis) or ``[N]`` /
  ``[N, 1]`` scores (regression, and any 1-column output).
* ``accuracy``: fraction of argmax predictions equal to the label.
* ``f1``: binary F1 with positive class 1 (0.0 when there are no true or predicted positives).
* ``matthews``: Matthews correlation coefficient, multi-class (Gorodkin's R_K) form; 0.0 when its
  denominator is 0 (constant predictions or labels), as sklearn does.
* ``pearson``: Pearson correlation; 0.0 when either side is constant.
* ``spearman``: Pearson correlation of the average ranks (ties get the mean of their ranks).
"""

from __future__ import annotations

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


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    pred = np.asarray(pred).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if pred.size == 0:
        return 0.0
    return float(np.mean(pred == labels))


def f1_binary(pred: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    pred = np.asarray(pred).reshape(-1) == positive
    labels = np.asarray(labels).reshape(-1) == positive
    tp = float(np.sum(pred & labels))
    fp = float(np.sum(pred & ~labels))
    fn = float(np.sum(~pred & labels))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews(pred: np.ndarray, labels: np.ndarray) -> float:
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if pred.size == 0:
        return 0.0
    classes = np.union1d(pred, labels)
    p = np.searchsorted(classes, pred)
    t = np.searchsorted(classes, labels)
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (t, p), 1.0)
    t_sum = cm.sum(axis=1)
    p_sum = cm.sum(axis=0)
    n_correct = np.trace(cm)
    n = cm.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n * n - np.dot(p_sum, p_sum)
    cov_ytyt = n * n - np.dot(t_sum, t_sum)
    denom = cov_ytyt * cov_ypyp
    if denom == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(denom))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.size < 2:
        return 0.0
    xc = x - x.mean()
    yc = y - y.mean()
    denom = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    if denom == 0:
        return 0.0
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values.
    new_run = np.concatenate(([True], xs[1:] != xs[:-1]))
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate((starts[1:], [len(xs)]))  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty_like(x)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


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
        if name not in VALID_METRICS:
            raise ValueError(f"unknown metric {name!r}; valid: {', '.join(VALID_METRICS)}")
        if name in CLASSIFICATION_METRICS:
            cls_pred = _class_predictions(preds)
            cls_labels = labels.reshape(-1).astype(np.int64)
            if name == "accuracy":
                out[name] = accuracy(cls_pred, cls_labels)
            elif name == "f1":
                out[name] = f1_binary(cls_pred, cls_labels)
            else:
                out[name] = matthews(cls_pred, cls_labels)
        else:
            reg_pred = _regression_predictions(preds)
            reg_labels = labels.reshape(-1).astype(np.float64)
            out[name] = (pearson if name == "pearson" else spearman)(reg_pred, reg_labels)
    return out


def primary_metric(metric_names: list[str]) -> str:
    """The metric to select / report on: matthews > f1 > pearson > spearman > accuracy."""
    if not metric_names:
        raise ValueError("primary_metric needs at least one metric name")
    for name in _PRIMARY_ORDER:
        if name in metric_names:
            return name
    return metric_names[0]
