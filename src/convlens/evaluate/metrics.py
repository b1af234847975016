"""Classification metrics from probabilities, computed with scikit-learn. Torch-free.

Probabilities come from fp32 logits exactly as prediction computes them
(:func:`convlens.decision.probabilities`: sigmoid for one unit, softmax otherwise), so a file's
probability in a report equals what ``convlens predict`` prints.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from convlens.decision import decide

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.1))


def predict_labels(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Predicted class indices: ``p1 >= threshold`` for two classes, else the argmax."""
    probs = np.asarray(probs)
    return decide(probs, "sigmoid" if probs.shape[1] == 2 else "softmax", threshold)


def _f(x: Any) -> float | None:
    """A JSON-safe float (NaN -> None)."""
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def threshold_table(y_true: np.ndarray, p1: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict[str, Any]]:
    """Precision, recall, F1 and accuracy of the positive class (class 1) at each threshold."""
    rows = []
    for t in thresholds:
        pred = (p1 >= t).astype(np.int64)
        p, r, f, _ = precision_recall_fscore_support(y_true, pred, labels=[1], average=None, zero_division=0)
        rows.append({"threshold": float(t), "precision": float(p[0]), "recall": float(r[0]), "f1": float(f[0]),
                     "accuracy": float(accuracy_score(y_true, pred)), "positives": int(pred.sum())})
    return rows


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return float("nan")
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    # sum over bins of n_b / N * |mean(correct) - mean(confidence)|: |difference of bin sums| / N
    gaps = np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins)
    return float(np.abs(gaps).sum() / len(confidence))


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    threshold: float = 0.5,
    n_bins: int = 10,
) -> dict[str, Any]:
    """All evaluation numbers for labels ``y_true`` and probabilities ``probs (N, C)``.

    Returns a JSON-safe dict: ``accuracy``, ``loss`` (log loss), ``per_class`` (precision,
    recall, F1, support), ``macro`` and ``weighted`` averages, ``confusion_matrix`` (rows =
    true class), ``calibration`` (reliability curve and ECE), and for two classes ``roc_auc``,
    ``roc`` (curve) and ``thresholds`` (table); for more classes a one-vs-rest macro ROC-AUC
    when every class occurs.
    """
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(f"probabilities must be (N, {n_classes}). Received: shape={probs.shape}")
    if len(y) != len(probs):
        raise ValueError(f"{len(y)} labels but {len(probs)} rows of probabilities")
    labels = list(range(n_classes))
    pred = predict_labels(probs, threshold)
    out: dict[str, Any] = {"num_samples": len(y), "classes": list(classes), "threshold": float(threshold)}
    if len(y) == 0:
        out.update(accuracy=None, loss=None, per_class={}, macro={}, weighted={}, confusion_matrix=[])
        return out

    out["accuracy"] = float(accuracy_score(y, pred))
    # float32 rows sum to 1 only within rounding: renormalise in float64 for scikit-learn,
    # which clips to its own epsilon so a confident mistake gives a large but finite loss.
    out["loss"] = float(log_loss(y, probs / probs.sum(axis=1, keepdims=True), labels=labels))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, c in enumerate(classes)}
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        out[avg] = {"precision": float(pa), "recall": float(ra), "f1": float(fa)}
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=labels).tolist()

    present = np.unique(y)
    out["roc_auc"] = None  # unless every class occurs
    if n_classes == 2:
        p1 = probs[:, 1]
        if len(present) == 2:
            out["roc_auc"] = float(roc_auc_score(y, p1))
            fpr, tpr, thr = roc_curve(y, p1)
            out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [_f(t) for t in thr]}
        out["thresholds"] = threshold_table(y, p1)
    elif len(present) == n_classes:
        out["roc_auc"] = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels))
    out["calibration"] = reliability(y, probs, classes, threshold, n_bins)
    return out


def reliability(y_true: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float = 0.5,
                n_bins: int = 10) -> dict[str, Any]:
    """The reliability curve (two classes: of ``p(class 1)``; more: of the top-1 confidence) and
    the ECE of the predicted class's probability."""
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    pred = predict_labels(probs, threshold)
    if len(classes) == 2:
        outcome, score, kind = y, probs[:, 1], f"p({classes[1]})"
    else:
        outcome, score, kind = (pred == y).astype(np.int64), probs.max(axis=1), "top-1 confidence"
    if len(np.unique(outcome)) > 1:
        frac, mean_pred = calibration_curve(outcome, score, n_bins=n_bins, strategy="uniform")
    else:  # one class, or all right or all wrong: calibration_curve needs both outcomes
        frac, mean_pred = np.array([outcome.mean()]), np.array([score.mean()])
    return {"kind": kind, "mean_predicted": mean_pred.tolist(), "fraction_positive": frac.tolist(),
            "ece": expected_calibration_error(probs[np.arange(len(y)), pred], pred == y, n_bins)}


def _lowest_p_true(y_true: np.ndarray, probs: np.ndarray, threshold: float, k: int,
                   correct: bool) -> list[int]:
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs)
    idx = np.flatnonzero((predict_labels(probs, threshold) == y) == correct)
    order = np.argsort(probs[idx, y[idx]], kind="stable")
    return [int(i) for i in idx[order][:k]]


def worst_mistakes(y_true: np.ndarray, probs: np.ndarray, threshold: float = 0.5, k: int = 16) -> list[int]:
    """Indices of the ``k`` misclassified samples with the lowest probability for their true class."""
    return _lowest_p_true(y_true, probs, threshold, k, correct=False)


def least_confident_correct(y_true: np.ndarray, probs: np.ndarray, threshold: float = 0.5, k: int = 16) -> list[int]:
    """Indices of the ``k`` correct samples with the lowest probability for their (true) class."""
    return _lowest_p_true(y_true, probs, threshold, k, correct=True)
