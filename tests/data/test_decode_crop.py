"""Decode size vs. input size: images are resized to ``decode_size`` and centre-cropped for
evaluation and prediction; training takes random crops of the cached ``decode_size`` images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.data.augment import build_augmentation, random_crop
from convlens.data.loader import to_model_input
from convlens.data.prepare import prepare_dataset
from convlens.data.preprocess import Preprocessing
from convlens.errors import ConfigError


def _gradient(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy * 255 // (h - 1), xx * 255 // (w - 1), (yy + xx) % 256], axis=2).astype(np.uint8)


def test_load_is_the_centre_crop_of_the_decode_size_image(tmp_path: Path) -> None:
    src = tmp_path / "g.png"
    Image.fromarray(_gradient(50, 70)).save(src)
    prep = Preprocessing(size=(16, 16), decode_size=(20, 24))
    full = Preprocessing(size=(20, 24)).load(src)
    got = prep.load(src)
    assert got.shape == (16, 16, 3) and prep.crop_offset() == (2, 4)
    np.testing.assert_array_equal(got, full[2:18, 4:20])
    # The same crop in every path: arrays, batches at decode size, normalize, the torch twin.
    np.testing.assert_array_equal(prep.from_array(_gradient(50, 70)), got)
    np.testing.assert_array_equal(prep.center_crop(full[None])[0], got)
    np.testing.assert_allclose(prep.normalize(full[None]), prep.normalize(got[None]))
    torch.testing.assert_close(to_model_input(torch.from_numpy(full[None].copy()), prep, channels_last=False),
                               to_model_input(torch.from_numpy(got[None].copy()), prep, channels_last=False))


def test_decode_size_round_trips_and_is_checked() -> None:
    prep = Preprocessing(size=(16, 16), decode_size=(18, 18))
    assert Preprocessing.from_dict(prep.to_dict()) == prep and prep.resized_size == (18, 18)
    plain = Preprocessing(size=(16, 16), decode_size=(16, 16))
    assert plain.decode_size is None and "decode_size" not in plain.to_dict()  # older readers
    with pytest.raises(ConfigError, match="decode_size"):
        Preprocessing(size=(16, 16), decode_size=(12, 20))


def test_random_crop_takes_independent_windows() -> None:
    x = torch.from_numpy(np.stack([_gradient(12, 12)] * 64))
    torch.manual_seed(0)
    out = random_crop(x, (8, 8))
    assert out.shape == (64, 8, 8, 3) and out.dtype == torch.uint8
    tops, lefts = out[:, 0, 0, 0].unique(), out[:, 0, 0, 1].unique()
    assert len(tops) > 1 and len(lefts) > 1  # several offsets drawn, not one per batch
    for img in out:  # each is an exact window of the source
        t = int(np.argmax(_gradient(12, 12)[:, 0, 0] == int(img[0, 0, 0])))
        left = int(np.argmax(_gradient(12, 12)[0, :, 1] == int(img[0, 0, 1])))
        assert torch.equal(img, x[0, t:t + 8, left:left + 8])
    with pytest.raises(ConfigError, match="larger"):
        random_crop(x, (16, 16))


def test_augmenter_crops_batches_at_decode_size_to_the_input_size() -> None:
    aug = build_augmentation(flip=False, image_size=16, random_crops=True)
    assert aug is not None
    x = torch.randint(0, 256, (4, 20, 20, 3), dtype=torch.uint8)
    out = aug(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == (4, 3, 16, 16)
    again = aug(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # seeded: reproducible
    assert build_augmentation(flip=False, image_size=16) is None


def test_prepare_caches_at_decode_size(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(_gradient(30 + i, 40)).save(tmp_path / "ds" / c / f"{i}.png")
    data = prepare_dataset(tmp_path / "ds", Preprocessing(size=(16, 16), decode_size=(18, 18)), detect_channels=True,
                           cache_dir=tmp_path / "cache",
                           workers=1, progress=False, val_fraction=0.25)
    assert data.preprocessing.size == (16, 16) and data.preprocessing.decode_size == (18, 18)
    assert np.asarray(data.train.images).shape[1:3] == (18, 18)
