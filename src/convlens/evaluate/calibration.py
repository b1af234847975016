"""Temperature scaling: the one owner of how a model's probabilities are calibrated.

A temperature ``T`` divides the logits (``models.tta.TemperatureScaled``, stored as
``BundleMeta.temperature``); it is fitted by minimising the log loss of held-out logits, never
of the validation images the report then measures it on:

- the pretrained head: the out-of-fold logits of the cross-validation that chose its L2
  (:func:`convlens.engine.transfer.select_head`), so calibration costs nothing extra;
- a model trained from scratch: the logits of a small slice of the training split it did not
  train on (:func:`calibration_slice`).

One scalar keeps the decision (argmax, and the sign of a single logit) exactly as it was, so
accuracy is unchanged by construction. Torch-free (numpy + scipy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convlens.decision import activation_for, decide, probabilities
from convlens.evaluate.metrics import expected_calibration_error

MIN_T, MAX_T = 0.05, 20.0  # a fitted temperature outside this range means the held-out logits say nothing
MIN_IMAGES = 20  # fewer held-out images than this: no temperature is fitted (T stays 1)
SLICE_FRACTION = 0.1  # from scratch: the share of the training split held out for calibration...
SLICE_MAX = 500  # ...at most this many images (a temperature is one number: a few hundred fix it)


def log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``logits / temperature`` (sigmoid for one
    unit, softmax otherwise), computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1) / temperature
    y = np.asarray(labels, dtype=np.int64)
    if z.shape[1] == 1:  # -log sigmoid(+-z) = softplus(-+z)
        s = np.where(y == 1, -z[:, 0], z[:, 0])
        return float(np.mean(np.logaddexp(0.0, s)))
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [:data:`MIN_T`, :data:`MAX_T`] minimising :func:`log_loss` of held-out
    ``logits``; 1.0 with fewer than :data:`MIN_IMAGES` rows, a single class present, or no
    mistake among them (then the loss falls all the way to T -> 0: perfectly separated held-out
    images say nothing about how sure the model should be on the next one)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(labels, dtype=np.int64)
    z = np.asarray(logits, dtype=np.float64).reshape(len(y), -1)
    if len(y) < MIN_IMAGES or len(np.unique(y)) < 2:
        return 1.0
    act = activation_for(z.shape[1])
    if (decide(probabilities(z, act), act) == y).all():
        return 1.0
    # log T: the loss is smooth and unimodal in it, and T > 0 holds by construction.
    res = minimize_scalar(lambda u: log_loss(z, y, float(np.exp(u))), bounds=(np.log(MIN_T), np.log(MAX_T)),
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def ece_of(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, threshold: float = 0.5) -> float:
    """Expected calibration error of the predicted class's probability under ``logits / temperature``
    (the report's ECE: :func:`convlens.evaluate.metrics.compute_metrics`)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z.reshape(len(z), -1) / temperature
    probs = probabilities(z, activation_for(z.shape[1]))
    pred = decide(probs, activation_for(z.shape[1]), threshold)
    return expected_calibration_error(probs[np.arange(len(pred)), pred], pred == np.asarray(labels))


def calibration_record(logits: np.ndarray, labels: np.ndarray, temperature: float, source: str) -> dict[str, Any]:
    """What a run records about its temperature: the value, where it was fitted, on how many
    images, and the held-out log loss and ECE before and after."""
    return {"temperature": float(temperature), "fitted_on": source, "images": int(len(labels)),
            "heldout_loss": [log_loss(logits, labels), log_loss(logits, labels, temperature)],
            "heldout_ece": [ece_of(logits, labels), ece_of(logits, labels, temperature)]}


def calibration_slice(labels: np.ndarray, seed: int, fraction: float = SLICE_FRACTION,
                      limit: int = SLICE_MAX) -> np.ndarray:
    """Indices (sorted) of the training rows a from-scratch run holds out to fit its temperature:
    ``fraction`` of each class (at least one image of a class with several), at most ``limit`` in
    all, chosen by ``seed`` (the same run, resumed or not, holds out the same images); empty when
    the slice would have fewer than :data:`MIN_IMAGES`."""
    y = np.asarray(labels, dtype=np.int64)
    total = min(limit, int(round(fraction * len(y))))
    if total < MIN_IMAGES:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = min(len(idx) - 1, max(1, int(round(total * len(idx) / len(y)))))
        if n > 0:
            keep.append(rng.permutation(idx)[:n])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
