"""convlens: from a folder of images to a trained, explained, exported and served classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from convlens.predict import Classifier

__all__ = ["__version__", "load"]


def load(path: Any, device: str = "auto", precision: str = "auto") -> Classifier:
    """Load a model bundle (``model.convlens``) or an ONNX file as a ready classifier.

    ``precision``: ``auto`` (bf16 where the hardware has it natively, else fp32), ``bf16``, ``fp32``.
    """
    from convlens.predict import load as _load

    return _load(path, device=device, precision=precision)
