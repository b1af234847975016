"""Test bundles built directly from registry models (random weights, no trainer needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from convlens.bundle import BundleMeta, save_bundle
from convlens.data.preprocess import Preprocessing


def make_model(name: str = "tiny", num_classes: int = 2, in_channels: int = 3, seed: int = 0,
               **kwargs: object) -> torch.nn.Module:
    from convlens.models import create

    torch.manual_seed(seed)
    return create(name, num_classes, in_channels, **kwargs).eval()


def make_meta(model: torch.nn.Module, classes: Sequence[str], size: int = 32, channels: int = 3,
              resize: str = "squash", threshold: float = 0.5, **prep: object) -> BundleMeta:
    return BundleMeta(
        arch=model.arch, classes=list(classes),
        preprocessing=Preprocessing(size=(size, size), channels=channels, resize=resize, **prep),
        output_activation=model.output_activation, threshold=threshold,
    )


def make_bundle(path: Path, name: str = "tiny", classes: Sequence[str] = ("cat", "dog"), size: int = 32,
                channels: int = 3, resize: str = "squash", seed: int = 0, model: torch.nn.Module | None = None,
                **prep: object) -> Path:
    """Save a bundle of a freshly initialised registry model."""
    model = model if model is not None else make_model(name, len(classes), channels, seed)
    save_bundle(path, model, make_meta(model, classes, size, channels, resize, **prep))
    return path


def independent_probs(model: torch.nn.Module, prep: Preprocessing, path: str | Path) -> np.ndarray:
    """Preprocessing.load -> normalize -> model -> sigmoid/softmax, written out separately."""
    x = torch.from_numpy(prep.normalize(prep.load(path)[None]))
    with torch.no_grad():
        z = model(x).double()
    if z.shape[1] == 1:
        p1 = torch.sigmoid(z[:, 0])
        return torch.stack([1 - p1, p1], 1).numpy()
    return torch.softmax(z, 1).numpy()


def set_logit(model: torch.nn.Module, x: torch.Tensor, target: float) -> None:
    """Shift the dense bias of a one-unit model so that ``model(x) == target`` (a confident model)."""
    dense = model.gap_linear_head()
    with torch.no_grad():
        z = float(model(x)[0, 0])
        dense.bias += target - z
