"""Image fixtures for the data tests, made in tmp_path (from a real photo when ../shared is
present, generated otherwise)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED

REAL = SHARED / "cats_and_dogs_filtered" / "train"


def photo(i: int = 0, size: tuple[int, int] = (32, 24)) -> Image.Image:
    """A small RGB image: a downscaled real photo when available, else a generated one."""
    cls = "cats" if i % 2 == 0 else "dogs"
    src = REAL / cls / f"{cls[:-1]}.{i // 2}.jpg"
    if src.exists():
        with Image.open(src) as im:
            return im.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([xx * 255 // max(1, size[0] - 1), yy * 255 // max(1, size[1] - 1),
                     np.full_like(xx, (i * 37) % 256)], axis=-1)
    noise = rng.integers(0, 40, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> sha256 of its bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def make_class_dataset(root: Path, classes: dict[str, int], size: tuple[int, int] = (16, 12),
                       gray: bool = False, start: int = 0) -> Path:
    """root/<class>/img_NNN.png with distinct content."""
    k = start
    for c, n in classes.items():
        for j in range(n):
            img = photo(k, size)
            # Make every image unique even when the photo source repeats.
            arr = np.asarray(img).copy()
            arr[0, 0] = [k % 256, (k // 256) % 256, 7]
            img = Image.fromarray(arr, "RGB")
            if gray:
                img = img.convert("L")
            save(img, root / c / f"img_{start + j:03d}.png")
            k += 1
    return root


# The bad-file zoo: relative path -> expected (status, kind or warning kinds).
EXPECTED = {
    "cats/good1.jpg": ("ok", None),
    "cats/good2.jpg": ("ok", None),
    "cats/zero.jpg": ("unusable", "zero_bytes"),
    "cats/truncated.jpg": ("unusable", "truncated"),
    "cats/text.jpg": ("unusable", "not_image"),
    "cats/tiny.png": ("unusable", "too_small"),
    "cats/huge.png": ("unusable", "too_large"),
    "cats/png_named.jpg": ("warning", ["ext_mismatch"]),
    "cats/cmyk.jpg": ("warning", ["mode"]),
    "cats/exif_rotated.jpg": ("warning", ["exif"]),
    "cats/conflict.jpg": ("ok", None),
    "dogs/good3.jpg": ("ok", None),
    "dogs/gray16.png": ("warning", ["mode"]),
    "dogs/rgba.png": ("warning", ["mode"]),
    "dogs/palette.gif": ("warning", ["mode"]),
    "dogs/animated.gif": ("warning", ["animated", "mode"]),
    "dogs/image.bmp": ("ok", None),
    "dogs/image.tiff": ("ok", None),
    "dogs/image.webp": ("ok", None),
    "dogs/nested/deeper.jpg": ("ok", None),
}
MAX_PIXELS = 5_000  # huge.png (100 x 100) exceeds it; everything else is at most 64 x 64


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """A two-class dataset holding every kind of good, odd and broken file."""
    root = tmp_path / "zoo"
    c, d = root / "cats", root / "dogs"
    save(photo(0), c / "good1.jpg", "JPEG")
    save(photo(2), c / "good2.jpg", "JPEG")
    (c / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    photo(14, (64, 64)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    (c / "truncated.jpg").write_bytes(data[: len(data) * 6 // 10])
    (c / "text.jpg").write_text("this is not a picture\n")
    save(photo(4, (1, 1)), c / "tiny.png", "PNG")
    save(photo(6, (100, 100)), c / "huge.png", "PNG")
    save(photo(8), c / "png_named.jpg", "PNG")
    save(photo(10).convert("CMYK"), c / "cmyk.jpg", "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    save(photo(12), c / "exif_rotated.jpg", "JPEG", exif=exif.tobytes())
    (c / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (c / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (c / "._good1.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
    save(photo(1), d / "good3.jpg", "JPEG")
    (c / "conflict.jpg").write_bytes((d / "good3.jpg").read_bytes())  # same image, other class
    arr16 = (np.asarray(photo(3).convert("L"), dtype=np.uint16) * 257)
    save(Image.fromarray(arr16), d / "gray16.png", "PNG")
    save(photo(5).convert("RGBA"), d / "rgba.png", "PNG")
    save(photo(7).convert("P", palette=Image.Palette.ADAPTIVE), d / "palette.gif", "GIF")
    frames = [photo(9).convert("P"), photo(11).convert("P")]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    save(photo(13), d / "image.bmp", "BMP")
    save(photo(15), d / "image.tiff", "TIFF")
    save(photo(17), d / "image.webp", "WEBP", lossless=True)
    save(photo(19), d / "nested" / "deeper.jpg", "JPEG")
    (d / "desktop.ini").write_text("[.ShellClassInfo]\n")
    return root
