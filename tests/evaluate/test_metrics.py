"""Metrics equal hand computations on fixed predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convlens.decision import probabilities
from convlens.evaluate.metrics import (
    compute_metrics,
    expected_calibration_error,
    least_confident_correct,
    predict_labels,
    threshold_table,
    worst_mistakes,
)

# Two classes: y and p(class 1). Threshold 0.5 -> pred [0, 1, 1, 0, 1, 0]:
# TP = {2, 4}, FP = {1}, FN = {3}, TN = {0, 5}.
Y2 = np.array([0, 0, 1, 1, 1, 0])
P1 = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.2])


def _binary() -> dict:
    probs = np.stack([1 - P1, P1], axis=1)
    return compute_metrics(Y2, probs, ["cat", "dog"])


def test_binary_metrics_by_hand() -> None:
    m = _binary()
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["dog"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                     "f1": pytest.approx(2 / 3), "support": 3}
    assert m["per_class"]["cat"]["precision"] == pytest.approx(2 / 3)  # TN / (TN + FN)
    assert m["per_class"]["cat"]["recall"] == pytest.approx(2 / 3)  # TN / (TN + FP)
    assert m["macro"]["f1"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    # Pairs (positive, negative) ranked correctly: 0.8 > 3, 0.4 > 2, 0.9 > 3 of 9.
    assert m["roc_auc"] == pytest.approx(8 / 9)
    p_true = [0.9, 0.4, 0.8, 0.4, 0.9, 0.8]
    assert m["loss"] == pytest.approx(-np.mean(np.log(p_true)))
    assert m["roc"]["fpr"][0] == 0.0 and m["roc"]["tpr"][-1] == 1.0


def test_threshold_table_by_hand() -> None:
    rows = {r["threshold"]: r for r in threshold_table(Y2, P1)}
    # 0.3: pred [0, 1, 1, 1, 1, 0] -> TP 3, FP 1, FN 0.
    assert rows[0.3]["precision"] == pytest.approx(3 / 4) and rows[0.3]["recall"] == 1.0
    assert rows[0.3]["accuracy"] == pytest.approx(5 / 6) and rows[0.3]["positives"] == 4
    # 0.9: pred [0, 0, 0, 0, 1, 0] -> TP 1, FP 0, FN 2.
    assert rows[0.9]["precision"] == 1.0 and rows[0.9]["recall"] == pytest.approx(1 / 3)
    assert rows[0.9]["f1"] == pytest.approx(0.5)
    assert set(rows) == {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}


def test_custom_threshold_changes_predictions() -> None:
    probs = np.stack([1 - P1, P1], axis=1)
    assert predict_labels(probs, 0.5).tolist() == [0, 1, 1, 0, 1, 0]
    assert predict_labels(probs, 0.35).tolist() == [0, 1, 1, 1, 1, 0]
    m = compute_metrics(Y2, probs, ["cat", "dog"], threshold=0.35)
    assert m["accuracy"] == pytest.approx(5 / 6) and m["threshold"] == 0.35


def test_multiclass_metrics_by_hand() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    probs = np.array([
        [0.7, 0.2, 0.1],  # 0 ok
        [0.2, 0.5, 0.3],  # 0 -> 1
        [0.1, 0.8, 0.1],  # 1 ok
        [0.1, 0.3, 0.6],  # 1 -> 2
        [0.1, 0.1, 0.8],  # 2 ok
        [0.2, 0.2, 0.6],  # 2 ok
        [0.6, 0.3, 0.1],  # 2 -> 0
    ])
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 2]]
    # class c: TP 2, FP 1 (the b->c), FN 1 (the c->a).
    assert m["per_class"]["c"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["recall"] == pytest.approx(2 / 3)
    # class a: TP 1, FP 1, FN 1 -> 0.5 each; b likewise.
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.5)
    assert m["macro"]["recall"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert m["weighted"]["recall"] == pytest.approx(4 / 7)  # weighted recall is accuracy
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.2, 0.8, 0.3, 0.8, 0.6, 0.1])))
    assert m["roc_auc"] is not None and 0 < m["roc_auc"] <= 1
    assert "thresholds" not in m


def test_missing_class_has_zero_support_and_no_auc() -> None:
    y = np.array([0, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["per_class"]["c"]["support"] == 0 and m["accuracy"] == 1.0 and m["roc_auc"] is None


def test_probabilities_match_torch_sigmoid_and_softmax() -> None:
    z1 = np.array([[-100.0], [-2.5], [0.0], [3.0], [80.0]], dtype=np.float32)
    p = probabilities(z1, "sigmoid")
    assert p.shape == (5, 2)
    np.testing.assert_allclose(p[:, 1], torch.sigmoid(torch.from_numpy(z1))[:, 0].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    zc = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    q = probabilities(zc)  # several units: softmax
    np.testing.assert_allclose(q, torch.softmax(torch.from_numpy(zc), dim=1).numpy(), rtol=1e-6, atol=1e-7)
    assert not np.isnan(q).any()


def test_expected_calibration_error_by_hand() -> None:
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 0, 1, 1])
    # bin 9: accuracy 0.5, confidence 0.95 -> 0.45; bin 5: accuracy 1, confidence 0.55 -> 0.45.
    assert expected_calibration_error(conf, correct) == pytest.approx(0.45)
    m = _binary()
    assert 0 <= m["calibration"]["ece"] <= 1
    assert len(m["calibration"]["mean_predicted"]) == len(m["calibration"]["fraction_positive"])


def test_worst_mistakes_and_least_confident() -> None:
    probs = np.stack([1 - P1, P1], axis=1)
    # Mistakes: index 1 (true 0, p0 = 0.4) and index 3 (true 1, p1 = 0.4): tie keeps index order.
    assert worst_mistakes(Y2, probs) == [1, 3]
    assert worst_mistakes(Y2, probs, k=1) == [1]
    # Correct: p_true 0.9, 0.8, 0.9, 0.8 at 0, 2, 4, 5 -> lowest first.
    assert least_confident_correct(Y2, probs) == [2, 5, 0, 4]


def test_metrics_are_json_safe_and_empty_input() -> None:
    import json

    json.dumps(_binary())
    m = compute_metrics(np.zeros(0, dtype=np.int64), np.zeros((0, 2)), ["a", "b"])
    assert m["accuracy"] is None and m["num_samples"] == 0
    with pytest.raises(ValueError, match="probabilities must be"):
        compute_metrics(Y2, np.zeros((6, 3)), ["a", "b"])
    assert math.isclose(sum(_binary()["per_class"][c]["support"] for c in ("cat", "dog")), 6)
