from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.data.cache import CachedImages, build_cache, default_cache_dir
from convlens.data.preprocess import Preprocessing
from convlens.data.scan import scan
from convlens.errors import DataError
from tests.data.conftest import make_class_dataset, photo, save

SIZE = (12, 10)


def _build(root: Path, cache: Path, **kw):
    kw.setdefault("size", SIZE)
    return build_cache(scan(root).entries, root, cache_dir=cache, workers=1, progress=False, **kw)


def _expected(root: Path, rel: str, channels: int, resize: str = "squash") -> np.ndarray:
    return Preprocessing(size=SIZE, channels=channels, resize=resize).load(root / rel)


def test_pixels_match_preprocessing_and_are_memory_mapped(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 3, "b": 3}, size=(40, 30))
    save(photo(50, (40, 30)), root / "b" / "big.jpg", "JPEG")
    for resize in ("squash", "crop", "pad"):
        c = _build(root, tmp_path / "cache", resize=resize)
        assert isinstance(c.array, np.memmap) and c.array.dtype == np.uint8
        assert c.channels == 3 and c.array.shape[1:] == (*SIZE, 3)
        for rel, row in c.rows.items():
            np.testing.assert_array_equal(c.array[row], _expected(root, rel, 3, resize))


def test_rebuild_only_what_changed(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 4, "b": 4})
    cache = tmp_path / "cache"
    first = _build(root, cache)
    assert (first.decoded, first.reused) == (8, 0)
    again = _build(root, cache)
    assert (again.decoded, again.reused) == (0, 8) and again.path == first.path

    # change one file's content (new size/mtime), add one, remove one
    changed = root / "a" / "img_000.png"
    save(photo(77, (16, 12)).convert("RGB").rotate(90), changed)
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))
    save(photo(78, (16, 12)), root / "b" / "new.png")
    (root / "b" / "img_003.png").unlink()
    third = _build(root, cache)
    assert third.decoded == 2 and third.reused == 6
    assert "b/img_003.png" not in third.rows and "b/new.png" in third.rows
    np.testing.assert_array_equal(third.array[third.rows["a/img_000.png"]], _expected(root, "a/img_000.png", 3))
    for rel, row in third.rows.items():
        np.testing.assert_array_equal(third.array[row], _expected(root, rel, 3))
    assert not first.path.exists(), "the superseded array is removed"

    # a removal alone decodes nothing
    (root / "b" / "new.png").unlink()
    fourth = _build(root, cache)
    assert fourth.decoded == 0 and "b/new.png" not in fourth.rows

    # another setting gets its own array; the old one stays valid
    other = _build(root, cache, size=(8, 8))
    assert other.decoded == 7 and other.array.shape[1:3] == (8, 8)
    assert _build(root, cache).decoded == 0


def test_grayscale_auto_and_forced_channels(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "gray", {"a": 3, "b": 3}, gray=True)
    c = _build(root, tmp_path / "cache")
    assert c.channels == 1 and c.array.shape[-1] == 1
    for rel, row in c.rows.items():
        np.testing.assert_array_equal(c.array[row], _expected(root, rel, 1))
    again = _build(root, tmp_path / "cache")
    assert again.decoded == 0 and again.channels == 1

    forced = _build(root, tmp_path / "cache", channels=3)
    assert forced.channels == 3
    for rel, row in forced.rows.items():
        np.testing.assert_array_equal(forced.array[row], _expected(root, rel, 3))

    # A colour image joins the grayscale dataset: auto becomes 3 channels, all rows exact.
    save(photo(90, (16, 12)), root / "a" / "colour.png")
    mixed = _build(root, tmp_path / "cache")
    assert mixed.channels == 3
    for rel, row in mixed.rows.items():
        np.testing.assert_array_equal(mixed.array[row], _expected(root, rel, 3))

    rgb = make_class_dataset(tmp_path / "rgb", {"a": 2, "b": 2})
    one = _build(rgb, tmp_path / "cache", channels=1)
    assert one.channels == 1
    for rel, row in one.rows.items():
        np.testing.assert_array_equal(one.array[row], _expected(rgb, rel, 1))


def test_unusable_files_are_recorded_not_cached(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 2, "b": 2})
    (root / "a" / "bad.jpg").write_bytes(b"not an image")
    c = _build(root, tmp_path / "cache")
    assert "a/bad.jpg" not in c.rows and c.records["a/bad.jpg"].kind == "not_image"
    assert _build(root, tmp_path / "cache").records["a/bad.jpg"].kind == "not_image"


def test_parallel_build_equals_serial(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 30, "b": 30})
    serial = _build(root, tmp_path / "c1")
    parallel = build_cache(scan(root).entries, root, size=SIZE, cache_dir=tmp_path / "c2", workers=2, progress=False)
    assert serial.rows == parallel.rows
    np.testing.assert_array_equal(np.asarray(serial.array), np.asarray(parallel.array))


def test_cached_images_view() -> None:
    base = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1)
    v = CachedImages(base, np.array([7, 2, 3, 4]))
    assert v.shape == (4, 2, 2, 1) and len(v) == 4
    np.testing.assert_array_equal(v[0], base[7])
    np.testing.assert_array_equal(v[1:4], base[2:5])
    np.testing.assert_array_equal(v[np.array([3, 0])], base[[4, 7]])
    np.testing.assert_array_equal(np.asarray(v), base[[7, 2, 3, 4]])


def test_cache_dir_inside_dataset_is_refused(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 1, "b": 1})
    with pytest.raises(DataError, match="outside the dataset"):
        _build(root, root / "cache")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CONVLENS_CACHE_DIR", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "convlens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "convlens"
    monkeypatch.setenv("CONVLENS_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_exif_upright_in_cache(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    exif = Image.Exif()
    exif[0x0112] = 6
    save(photo(3, (40, 20)), root / "a" / "rot.jpg", "JPEG", exif=exif.tobytes())
    save(photo(5, (40, 20)), root / "b" / "x.jpg", "JPEG")
    c = build_cache(scan(root).entries, root, size=(40, 20), resize="crop", cache_dir=tmp_path / "c", workers=1, progress=False)
    up = Preprocessing(size=(40, 20), resize="crop").load(root / "a" / "rot.jpg")
    np.testing.assert_array_equal(c.array[c.rows["a/rot.jpg"]], up)
    assert "exif" in c.records["a/rot.jpg"].info.warnings
    # files.json gives a later build the same record (what decoding learned included) without decoding
    again = build_cache(scan(root).entries, root, size=(40, 20), resize="crop", cache_dir=tmp_path / "c", workers=1,
                        progress=False)
    assert again.decoded == 0
    assert [again.records[r].to_dict() for r in ("a/rot.jpg", "b/x.jpg")] == [
        c.records[r].to_dict() for r in ("a/rot.jpg", "b/x.jpg")]


# ----------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("damage", ["cut short", "another shape"])
def test_an_array_cut_short_is_rebuilt_not_read(tmp_path: Path, damage: str) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 3, "b": 3})
    first = _build(root, tmp_path / "cache")
    path, shape = first.path, first.array.shape
    del first
    if damage == "cut short":  # what a full disk left in an earlier run
        os.truncate(path, path.stat().st_size // 2)
    else:
        np.save(path, np.zeros((2, *shape[1:]), np.uint8))
    again = _build(root, tmp_path / "cache")
    assert again.decoded == 6 and again.reused == 0
    for rel, row in again.rows.items():
        np.testing.assert_array_equal(again.array[row], _expected(root, rel, 3))


FULL_CACHE_SCRIPT = """
import json, sys
from pathlib import Path
from convlens.data.cache import build_cache
from convlens.data.scan import scan
from convlens.errors import DiskFullError
from tests.data.conftest import make_class_dataset

root, cache = Path(sys.argv[1]), Path(sys.argv[2])
make_class_dataset(root, {"a": 4, "b": 4})
build = lambda entries: build_cache(entries, root, size=(64, 64), cache_dir=cache, workers=1, progress=False)
first = build(scan(root).entries)
kept = list(scan(root).entries)
make_class_dataset(root, {"a": 8, "b": 8}, start=100)  # a second array would not fit beside the first
try:
    build(scan(root).entries)
    error = None
except DiskFullError as e:
    error = str(e)
left = sorted(p.name for p in cache.rglob("*") if p.is_file())
again = build(kept)
print(json.dumps({"error": error, "files_after_error": left, "reused": again.reused, "decoded": again.decoded,
                  "same_array": again.path == first.path}))
"""


def test_a_cache_that_does_not_fit_leaves_the_previous_one_in_use(tmp_path: Path, small_disk) -> None:
    """In a subprocess: a memory map written past the disk's end would be a SIGBUS, not an error."""
    import json
    import subprocess
    import sys

    disk = small_disk("256k")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(repo)) if p)}
    done = subprocess.run([sys.executable, "-c", FULL_CACHE_SCRIPT, str(tmp_path / "ds"), str(disk)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["error"] and "\n" not in out["error"], out
    assert "the decode cache (24 images of 64x64x3)" in out["error"] and "CONVLENS_CACHE_DIR" in out["error"]
    assert not [n for n in out["files_after_error"] if n.endswith(".tmp")], out  # no partial array
    assert (out["reused"], out["decoded"], out["same_array"]) == (8, 0, True)
