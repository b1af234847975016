"""What prediction and explanation take in: paths, folders and globs, images and their geometry.

``expand_paths`` turns command-line arguments into files (folders through the one scanner,
:mod:`convlens.data.scan`); ``load_input`` turns a path, a PIL image or an array into the
model's uint8 input through the bundle's :class:`Preprocessing`; ``load_original`` gives the
upright photo at full size for drawing; ``tta_views`` are the test-time-augmentation views;
``display``/``display_base``/``print_skipped`` name files in tables. Torch-free.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from convlens.data.decode import decode, to_rgb
from convlens.data.preprocess import Preprocessing, array_image
from convlens.data.scan import is_system_file, list_images
from convlens.errors import ConfigError, ImageError, UserError

# One image as the Python API accepts it.
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]  # noqa: UP007 - runtime alias on 3.10

TTA_MODES = ("flip", "crops")
CROP_FRACTION = 0.875  # side of each TTA crop relative to the model input


class NoMatchError(UserError):
    """A path argument that names no file, folder or glob match."""


# ----------------------------------------------------------------------------- paths
def expand_paths(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], int]:
    """Expand files, folders (recursive) and globs into a sorted, de-duplicated file list.

    Globs are expanded here (``*``, ``?``, ``[...]`` and ``**``), so quoted globs work too.
    Folders are walked by the one scanner (:func:`convlens.data.scan.list_images`); files named
    directly are always tried. Returns ``(files, ignored)`` where ``ignored`` counts non-image
    files passed over in folders. A path that matches nothing raises :class:`NoMatchError`.
    """
    out: list[Path] = []
    seen: set[str] = set()
    ignored = 0

    def add(p: Path) -> None:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(p)

    for raw in paths:
        text = os.path.expanduser(os.fspath(raw))
        p = Path(text)
        if p.is_file():
            add(p)
            continue
        if p.is_dir():  # walked like a folder a glob matches
            matches = [text]
        else:
            matches = sorted(glob.glob(text, recursive=True)) if glob.has_magic(text) else []
        got = 0
        for m in matches:
            mp = Path(m)
            if mp.is_dir():
                files, passed = list_images(mp)
                ignored += len(passed)
            elif mp.is_file() and not is_system_file(mp.name):
                files = [mp]
            else:
                files = []
            for f in files:
                add(f)
            got += len(files)
        if not got and p.is_dir():
            raise NoMatchError(f"folder {text!r} holds no image files; pass image files, folders or globs")
        if not got:
            what = "glob" if glob.has_magic(text) else "path"
            raise NoMatchError(f"{what} {text!r} matches no image file; check the path. Received: {text!r}")
    return out, ignored


# ----------------------------------------------------------------------------- inputs
def name_of(src: Any) -> str | None:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return getattr(src, "filename", None) or None


def as_list(x: Any) -> list[Any]:
    """One input or a sequence of inputs -> a list of single images."""
    if isinstance(x, (str, os.PathLike, Image.Image)):
        return [x]
    if isinstance(x, np.ndarray):
        # N x H x W x C (C in 1, 3, 4) is a batch of images; anything else is one image.
        return list(x) if x.ndim == 4 else [x]
    if isinstance(x, Iterable):
        return list(x)
    raise ConfigError(
        "predict() takes a path, a list of paths, a PIL image or an H x W x 3 uint8 RGB array. "
        f"Received: {type(x).__name__}"
    )


def load_input(src: Any, prep: Preprocessing) -> np.ndarray:
    """One input -> uint8 ``H x W x C`` at the model's size, through the bundle's Preprocessing."""
    if isinstance(src, (str, os.PathLike)):
        return prep.load(src)
    if isinstance(src, Image.Image):
        # A user's Image.open() result is not yet upright; files go through decode(), which is.
        return prep.from_pil(ImageOps.exif_transpose(src) or src)
    if isinstance(src, np.ndarray):
        return prep.from_array(src)
    raise ConfigError(
        "an image must be a path, a PIL image or an H x W x 3 uint8 RGB array. "
        f"Received: {type(src).__name__}"
    )


def resize_uint8(img: np.ndarray, size_hw: tuple[int, int], prep: Preprocessing) -> np.ndarray:
    h, w = size_hw
    gray = img.shape[2] == 1
    pil = Image.fromarray(img[:, :, 0] if gray else img, "L" if gray else "RGB")
    arr = np.asarray(pil.resize((w, h), prep.resample), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def tta_views(batch: np.ndarray, mode: str, prep: Preprocessing) -> list[np.ndarray]:
    """Test-time-augmentation views of a uint8 ``N x H x W x C`` batch at the model size.

    ``flip``: the batch and its horizontal mirror. ``crops``: additionally the four corner
    crops and the centre crop, each ``CROP_FRACTION`` of a side and resized back to the
    input size with the bundle's interpolation, each with its mirror (12 views in all).
    """
    views = [batch]
    if mode == "crops":
        n, h, w, _ = batch.shape
        ch, cw = max(1, round(h * CROP_FRACTION)), max(1, round(w * CROP_FRACTION))
        for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)):
            crops = batch[:, top:top + ch, left:left + cw]
            views.append(np.stack([resize_uint8(c, (h, w), prep) for c in crops]))
    return views + [np.ascontiguousarray(v[:, :, ::-1]) for v in views]


def load_original(src: Any, prep: Preprocessing) -> np.ndarray:
    """The upright original of one input as uint8 RGB at full resolution (for drawing maps on)."""
    if isinstance(src, (str, os.PathLike)):
        img, _ = decode(src, max_pixels=prep.max_pixels)
    elif isinstance(src, Image.Image):
        img = to_rgb(ImageOps.exif_transpose(src) or src)
    else:
        img = to_rgb(array_image(src))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# ----------------------------------------------------------------------------- display
def display(p: str | None, base: str | None = None) -> str:
    """A short name for tables: relative to ``base`` (or the working folder when inside it)."""
    if p is None:
        return "<image>"
    for root in (base, os.getcwd()) if base else (os.getcwd(),):
        try:
            rel = os.path.relpath(p, root)
        except ValueError:  # another drive on Windows
            continue
        if not rel.startswith(".."):
            return rel
    return p


def display_base(paths: Sequence[str | os.PathLike[str] | None]) -> str | None:
    """The common folder of ``paths`` when they are not all under the working folder, else None."""
    real = [os.path.abspath(os.fspath(p)) for p in paths if p is not None]
    if not real:
        return None
    cwd = os.getcwd()
    if all(not os.path.relpath(p, cwd).startswith("..") for p in real):
        return None
    try:
        return os.path.dirname(real[0]) if len(real) == 1 else os.path.commonpath([os.path.dirname(p) for p in real])
    except ValueError:  # mixed drives
        return None


def print_skipped(skipped: Sequence[ImageError], console: Any) -> None:
    """List unreadable files with their reasons (stderr)."""
    if not skipped:
        return
    console.print(f"[yellow]skipped {len(skipped)} unreadable file{'s' if len(skipped) != 1 else ''}:[/]")
    for e in skipped:
        console.print(f"  {display(e.path)}: {e.message}", markup=False, highlight=False)


