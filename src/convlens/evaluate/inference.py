"""The model's outputs on uint8 images, through ``convlens predict``'s own backends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from convlens.decision import probabilities

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from convlens.infer.bundle import BundleMeta


@contextlib.contextmanager
def _torch_backend(model: torch.nn.Module, device: str, precision: str) -> Iterator[Any]:
    """``convlens predict``'s own backend (:class:`convlens.infer.TorchBackend`) over the caller's
    model, whose layout is put back afterwards (a bundle is saved from contiguous weights)."""
    import torch

    from convlens.infer import TorchBackend

    contiguous = all(p.is_contiguous() for p in model.parameters() if p.ndim == 4)
    backend = TorchBackend(model, device, precision)
    try:
        yield backend
    finally:
        if contiguous and backend.channels_last:
            model.to(memory_format=torch.contiguous_format)


def predict_logits(model: torch.nn.Module, images: Any, prep: Any, batch_size: int = 64,
                   device: str = "cpu", precision: str = "auto") -> np.ndarray:
    """Logits ``(N, out_units)`` in float32 for uint8 ``N x H x W x C`` images, through
    ``convlens predict``'s own backend: the same normalisation, layout, precision and forward pass."""
    with _torch_backend(model, device, precision) as backend:
        return backend_logits(backend, images, prep, batch_size)


def backend_logits(backend: Any, images: Any, prep: Any, batch_size: int = 64) -> np.ndarray:
    """Logits ``(N, out_units)`` of uint8 images through any :class:`convlens.infer.Backend`
    (torch, or the onnx engine's), in batches of ``batch_size``."""
    outs = [backend.image_logits(np.asarray(images[start:start + batch_size]), prep)
            for start in range(0, len(images), batch_size)]
    if not outs:
        return np.zeros((0, 1), dtype=np.float32)
    return np.concatenate(outs).astype(np.float32)


def backend_outputs(backend: Any, images: Any, prep: Any, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits and pooled features of uint8 images through any backend's ``image_outputs`` (one
    pass each batch), in batches of ``batch_size``."""
    logits, pooled = [], []
    for start in range(0, len(images), batch_size):
        z, f = backend.image_outputs(np.asarray(images[start:start + batch_size]), prep)
        logits.append(np.asarray(z, dtype=np.float32))
        pooled.append(np.asarray(f, dtype=np.float32))
    if not logits:
        return np.zeros((0, 1), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(logits), np.concatenate(pooled)


def predict_outputs(model: torch.nn.Module, images: Any, prep: Any, batch_size: int = 64, device: str = "cpu",
                    precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, out_units)`` and pooled features ``(N, C)`` (float32) in one pass of
    :meth:`ConvlensModel.forward_pooled`, with :func:`predict_logits`'s backend, normalisation,
    layout and precision: the features novelty is measured in, from the pass the report uses."""
    with _torch_backend(model, device, precision) as backend:
        return backend_outputs(backend, images, prep, batch_size)


def predict_probabilities(model: torch.nn.Module, meta: BundleMeta, images: Any, batch_size: int = 64,
                          device: str = "cpu", precision: str = "auto") -> np.ndarray:
    """Class probabilities ``(N, num_classes)`` for uint8 images, as ``convlens predict`` computes them
    (``precision="auto"`` as the bundle narrows it: :meth:`BundleMeta.inference_precision`)."""
    logits = predict_logits(model, images, meta.preprocessing, batch_size, device, meta.inference_precision(precision))
    return probabilities(logits, meta.output_activation)
