"""finish_run's novelty index: only the training rows the index keeps go through the model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from convlens.config import TrainConfig
from convlens.data.cache import CachedImages
from convlens.data.prepare import Subset
from convlens.engine.run_folder import novelty_index
from convlens.infer.novelty import MAX_REFERENCE, build_index


def test_the_index_computes_only_the_rows_it_keeps_and_equals_the_full_one() -> None:
    n = MAX_REFERENCE + 2000
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    features = rng.normal(size=(n, 8)).astype(np.float32)
    images = CachedImages(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), np.arange(n))
    train = Subset(images, labels, [f"c/{i}.jpg" for i in range(n)], "train")
    prepared = SimpleNamespace(train=train)
    val = rng.normal(size=(40, 8)).astype(np.float32)
    seen: list[int] = []

    def pooled(imgs: CachedImages) -> np.ndarray:  # the model's pass: features of exactly these rows
        seen.append(len(imgs))
        return features[imgs.rows]

    cfg = TrainConfig()
    index = novelty_index(cfg, prepared, None, (None, val), pooled)
    full = build_index(features, labels, train.paths, val, accept=cfg.accept)
    assert seen == [len(full.labels)] and len(full.labels) < n  # ~10,000 of 12,000 rows computed
    np.testing.assert_array_equal(index.reference, full.reference)
    assert index.paths == full.paths and index.threshold == full.threshold and index.k == full.k
    cached = novelty_index(cfg, prepared, features, (None, val), pooled)  # features given: no pass
    assert seen == [len(full.labels)] and cached.paths == full.paths
