"""Logits -> probabilities -> a class: the one formula behind predict, evaluate, export and serve.

A model's ``forward`` returns logits; the final activation is never inside the model. One
output unit means two classes with ``p1 = sigmoid(z)``, ``p0 = 1 - p1``, decided by a threshold
on ``p1``; several units mean a softmax, decided by the argmax. Torch-free (numpy only).
"""

from __future__ import annotations

import numpy as np

from convlens.errors import BundleError

OUTPUT_ACTIVATIONS = ("sigmoid", "softmax")


def activation_for(out_units: int) -> str:
    """``"sigmoid"`` for one output unit (two classes), else ``"softmax"``."""
    return "sigmoid" if out_units == 1 else "softmax"


def probabilities(logits: np.ndarray, activation: str | None = None) -> np.ndarray:
    """Logits ``N x out_units`` (or ``N``) -> probabilities ``N x num_classes`` (float64).

    ``activation`` defaults to the one the unit count implies. The tanh form of the sigmoid
    and the max-shifted softmax cannot overflow for any logit.
    """
    z = np.asarray(logits, dtype=np.float64)
    z = z.reshape(len(z), -1)
    activation = activation or activation_for(z.shape[1])
    if activation == "sigmoid":
        if z.shape[1] != 1:
            raise BundleError(f"a sigmoid model must have one output unit. Received: {z.shape[1]} units")
        p1 = 0.5 * (1.0 + np.tanh(0.5 * z[:, 0]))
        return np.stack([1.0 - p1, p1], axis=1)
    if activation not in OUTPUT_ACTIVATIONS:
        raise BundleError(f"output_activation must be 'sigmoid' or 'softmax'. Received: {activation!r}")
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def decide(probs: np.ndarray, activation: str, threshold: float = 0.5) -> np.ndarray:
    """Class indices: ``p1 >= threshold`` for a sigmoid model, else the argmax."""
    probs = np.asarray(probs)
    if activation == "sigmoid":
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)
