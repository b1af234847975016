from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convlens.data.check import skipped_message
from convlens.data.prepare import prepare_dataset
from convlens.data.preprocess import Preprocessing
from convlens.data.split import read_split_csv, write_split_csv
from convlens.errors import ConfigError, DataError
from tests.data.conftest import MAX_PIXELS, make_class_dataset, tree_hashes

PIXEL_KEYS = ("channels", "mean", "std", "resize", "max_pixels")


def _prep(root: Path, tmp_path: Path, image_size: int | tuple[int, int] = 12, **kw):
    """prepare_dataset with the Preprocessing built from keywords (channels 0 = detected)."""
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    pixels = {k: kw.pop(k) for k in PIXEL_KEYS if k in kw}
    channels = pixels.pop("channels", 0)
    prep = Preprocessing(size=size, channels=channels or 3, **pixels)
    return prepare_dataset(root, prep, detect_channels=channels == 0, cache_dir=tmp_path / "cache", workers=1,
                           progress=False, **kw)


def test_prepare_skips_unusable_and_splits(zoo: Path, tmp_path: Path) -> None:
    before = tree_hashes(zoo)
    data = _prep(zoo, tmp_path, max_pixels=MAX_PIXELS)
    assert data.classes == ["cats", "dogs"]
    assert sorted(Path(e.path).name for e in data.skipped) == ["huge.png", "text.jpg", "tiny.png", "truncated.jpg", "zero.jpg"]
    assert {e.kind for e in data.skipped} == {"zero_bytes", "truncated", "not_image", "too_small", "too_large"}
    assert skipped_message(data.skipped) == f"skipped 5 unusable files; run `convlens check {zoo}` for details"
    n = len(data.train) + len(data.val)
    assert n == 15 and data.test is None
    assert data.train.images.shape == (len(data.train), 12, 12, 3)
    assert data.train.labels.dtype == np.int64
    # the label-conflict pair (same bytes) sits on one side
    side = {p: s for p, _, s in data.split_rows}
    assert side["cats/conflict.jpg"] == side["dogs/good3.jpg"]
    assert [r[0] for r in data.split_rows] == sorted(side)
    # rows hold exactly what Preprocessing.load gives
    prep = Preprocessing(size=(12, 12))
    for i, rel in enumerate(data.val.paths):
        np.testing.assert_array_equal(data.val.images[i], prep.load(zoo / rel))
    assert tree_hashes(zoo) == before, "preparing never writes into the dataset"


def test_presplit_layout_used_as_is(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_class_dataset(root / "train", {"a": 4, "b": 4})
    make_class_dataset(root / "val", {"a": 2, "b": 2}, start=10)
    make_class_dataset(root / "test", {"a": 1, "b": 1}, start=20)
    data = _prep(root, tmp_path, val_fraction=0.5, test_fraction=0.3)
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 2)
    assert all(p.startswith("val/") for p in data.val.paths)
    assert data.layout == "presplit"


def test_test_fraction_and_split_file_reuse(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 20, "b": 20})
    data = _prep(root, tmp_path, test_fraction=0.2, val_fraction=0.2)
    assert data.test is not None and len(data.test) > 0
    assert len(data.train) + len(data.val) + len(data.test) == 40
    csv = tmp_path / "run" / "split.csv"
    write_split_csv(csv, data.split_rows)
    assert read_split_csv(csv) == data.split_rows
    # a reused split wins over a new seed
    again = _prep(root, tmp_path, test_fraction=0.2, seed=7, split_file=csv)
    assert again.split_rows == data.split_rows
    assert _prep(root, tmp_path, test_fraction=0.2, seed=7).split_rows != data.split_rows


def test_grayscale_dataset_gets_one_channel(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 3, "b": 3}, gray=True)
    data = _prep(root, tmp_path)
    assert data.preprocessing.channels == 1 and data.train.images.shape[-1] == 1
    assert _prep(root, tmp_path, channels=3).preprocessing.channels == 3
    with pytest.raises(ConfigError, match="mean needs 1 or 1"):
        _prep(root, tmp_path, mean=(0.5, 0.5, 0.5))
    rgb = _prep(make_class_dataset(tmp_path / "rgb", {"a": 3, "b": 3}), tmp_path, mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
    assert rgb.preprocessing.mean == (0.4, 0.5, 0.6) and rgb.preprocessing.channels == 3


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _prep(tmp_path / "nope", tmp_path)
    one = make_class_dataset(tmp_path / "one", {"a": 3})
    with pytest.raises(DataError, match="at least 2 class"):
        _prep(one, tmp_path)
    empty = make_class_dataset(tmp_path / "empty", {"a": 3, "b": 0})
    (empty / "b").mkdir(exist_ok=True)
    (empty / "b" / "junk.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="'b' has no usable training images"):
        _prep(empty, tmp_path)
    ok = make_class_dataset(tmp_path / "ok", {"a": 3, "b": 3})
    with pytest.raises(ConfigError):
        _prep(ok, tmp_path, val_fraction=1.0)
    with pytest.raises(ConfigError):
        _prep(ok, tmp_path, channels=2)
    with pytest.raises(ConfigError):
        _prep(ok, tmp_path, resize="stretch")
    with pytest.raises(ConfigError):
        _prep(ok, tmp_path, image_size=0)


def test_rectangular_size(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 3, "b": 3})
    data = _prep(root, tmp_path, image_size=(10, 14))
    assert data.train.images.shape[1:] == (10, 14, 3) and data.preprocessing.size == (10, 14)
