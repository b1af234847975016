from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.cli import main
from convlens.data.digits import MARKER, ensure_digits_dataset
from convlens.data.preview import write_preview
from convlens.data.scan import scan
from convlens.errors import ConfigError, DataError
from tests.data.conftest import make_class_dataset


def test_preview_grid_and_augment(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"cats": 6, "dogs": 6}, size=(32, 24))
    (root / "cats" / "broken.jpg").write_bytes(b"nope")
    out = write_preview(root, tmp_path / "grid.png", image_size=32)
    with Image.open(out) as im:
        assert im.size == (1000, 1000) and im.format == "PNG"
        a = np.asarray(im.convert("L"))
    out2 = write_preview(root, tmp_path / "aug.png", augment=True, image_size=32, rotation=0.1)
    with Image.open(out2) as im:
        b = np.asarray(im.convert("L"))
    assert a.std() > 5 and not np.array_equal(a, b)
    assert main(["preview", str(root), "--out", str(tmp_path / "cli.png"), "--image-size", "32", "--augment"]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="--out"):
        write_preview(root, tmp_path / "grid.gif")


def test_preview_with_no_usable_images(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="no usable images"):
        write_preview(root, tmp_path / "g.png")


def test_digits_dataset(tmp_path: Path) -> None:
    root = ensure_digits_dataset(tmp_path / "digits")
    idx = scan(root)
    assert idx.classes == [str(i) for i in range(10)] and len(idx.entries) == 1797
    with Image.open(idx.entries[0].path) as im:
        assert im.size == (8, 8) and im.mode == "L"
    assert (root / MARKER).is_file()
    mtime = idx.entries[0].path.stat().st_mtime_ns
    assert ensure_digits_dataset(root) == root and idx.entries[0].path.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".digits-")], "no temp folder left"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="not a convlens digits dataset"):
        ensure_digits_dataset(foreign)
    assert (foreign / "keep.txt").read_text() == "user data"


def test_digits_on_a_full_disk_is_one_error_and_leaves_nothing(small_disk) -> None:
    from convlens.errors import DiskFullError

    disk = small_disk("256k")
    with pytest.raises(DiskFullError, match=r"the disk filled while writing .*CONVLENS_CACHE_DIR=DIR$"):
        ensure_digits_dataset(disk / "digits")
    assert list(disk.iterdir()) == []
