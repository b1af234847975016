"""convlens: from a folder of images to a trained, explained, exported and served classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from convlens.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from convlens.predict import Classifier

__all__ = ["__version__", "load"]


def load(path: Any, device: str = "auto") -> Classifier:
    """Load a model bundle (``model.convlens``) or an ONNX file as a ready classifier."""
    from convlens.predict import load as _load

    return _load(path, device=device)
