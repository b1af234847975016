"""Tiny generated datasets and configs for fast end-to-end training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from convlens.config import TrainConfig, resolve_train_config


def make_dataset(root: Path, classes: int = 2, per_class: int = 16, size: int = 20, seed: int = 0) -> Path:
    """Class folders of small PNGs; each class has its own dominant colour channel and brightness,
    so a tiny model learns them in a couple of epochs."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 70, (size, size, 3), dtype=np.uint8)
            a[:, :, c % 3] += np.uint8(110 + 40 * (c // 3))
            Image.fromarray(a).save(d / f"img_{i:03d}.png")
    return root


def tiny_config(data: Path, tmp: Path, **overrides: Any) -> TrainConfig:
    """The ``quick`` preset shrunk to 16 px, batch 8, one decoding worker, everything under ``tmp``."""
    values: dict[str, Any] = {
        "data": str(data), "image_size": 16, "batch_size": 8, "epochs": 2, "workers": 1,
        "cache_dir": str(tmp / "cache"), "project": str(tmp / "runs"), "threads": 1,
    }
    values.update(overrides)
    return resolve_train_config("quick", None, values)
