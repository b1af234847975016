"""The inference core: everything that runs a trained model, shared by ``predict``, ``explain``,
``evaluate``, ``export``, ``serve`` and ``convlens.load``.

- :mod:`~convlens.infer.bundle`: the ``model.convlens`` zip (metadata + weights), read strictly.
- :mod:`~convlens.infer.classifier`: :class:`Classifier` (one forward pass and decision for every
  path), :class:`Prediction`, the torch backend and :func:`load`.
- :mod:`~convlens.infer.onnx_backend`: the torch-free backend over an exported ``.onnx`` file.
- :mod:`~convlens.infer.engine`: which engine runs a bundle (``--engine auto|torch|onnx``) and the
  cache of verified ONNX exports the onnx engine runs.
- :mod:`~convlens.infer.commands`: the ``convlens predict`` and ``convlens explain`` verbs.

Nothing here imports torch at module level: ``convlens predict model.onnx`` runs without it.
"""

from __future__ import annotations

from convlens.infer.classifier import Backend, Classifier, Prediction, TorchBackend, load

__all__ = ["Backend", "Classifier", "Prediction", "TorchBackend", "load"]
