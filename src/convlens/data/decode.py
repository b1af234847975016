"""The one image decoder that check, cache, prediction and serving all use.

Images are recognised by content (Pillow's ``Image.open``), never by extension or by a header
guess, and fully decoded: a truncated JPEG fails here, not halfway through an epoch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convlens.errors import ImageError

# Pillow's own decompression-bomb threshold; configurable per call.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MIN_SIDE = 1

# Formats convlens reads, with the extensions that honestly name them. MPO is the multi-picture
# JPEG that many cameras write; Pillow reads its first picture.
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (".jpg", ".jpeg", ".mpo"),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "BMP": (".bmp", ".dib"),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
}
SUPPORTED_FORMATS = tuple(FORMAT_EXTENSIONS)

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class ImageInfo:
    """What decoding learned about one file: its format, mode, size and any warnings."""

    path: str
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    frames: int = 1
    orientation: int = 1
    grayscale: bool = False
    warnings: list[str] = field(default_factory=list)  # kinds: ext_mismatch, mode, exif, animated


def _name(src: Any) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<image>")


def decode(
    src: str | os.PathLike[str] | IO[bytes],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    draft_size: tuple[int, int] | None = None,
    keep_gray: bool = False,
) -> tuple[Image.Image, ImageInfo]:
    """Fully decode one image to an upright RGB (or ``L`` with ``keep_gray``) Pillow image.

    ``draft_size`` (width, height) lets the JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT
    when the picture is much larger than needed: the result is still at least that large.
    Raises :class:`ImageError` with a ``kind`` for every unusable file.
    """
    name = _name(src)
    info = ImageInfo(path=name)
    if isinstance(src, (str, os.PathLike)):
        try:
            if os.path.getsize(src) == 0:
                raise ImageError(name, "zero_bytes", "file is empty (0 bytes)")
        except OSError as e:
            raise ImageError(name, "unreadable", f"cannot read file ({e.strerror or e})") from e
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies below; let Pillow's bomb warning become an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src)
    except UnidentifiedImageError as e:
        raise ImageError(name, "not_image", "not an image (no known image format in its content)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, "too_large", f"image exceeds the pixel limit ({e})") from e
    except OSError as e:
        raise ImageError(name, "unreadable", f"cannot read file ({e})") from e
    try:
        out, info = _decode_opened(img, info, name, max_pixels, min_side, draft_size, keep_gray)
    except BaseException:
        img.close()
        raise
    if out is not img or info.frames > 1:
        # Single-frame files close their handle after load(); multi-frame ones keep it open.
        if out is img:
            out = img.copy()
        img.close()
    return out, info


def _decode_opened(
    img: Image.Image,
    info: ImageInfo,
    name: str,
    max_pixels: int,
    min_side: int,
    draft_size: tuple[int, int] | None,
    keep_gray: bool,
) -> tuple[Image.Image, ImageInfo]:
    fmt = img.format or ""
    info.format, info.mode = fmt, img.mode
    info.width, info.height = img.size
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(name, "unsupported", f"unsupported image format {fmt or 'unknown'}; convert it to JPEG or PNG")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(name, "too_large", f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} (possible decompression bomb)")
    if min(w, h) < min_side:
        raise ImageError(name, "too_small", f"{w}x{h} is smaller than the minimum side of {min_side} pixels")

    ext = Path(name).suffix.lower()
    if ext and ext not in FORMAT_EXTENSIONS[fmt]:
        info.warnings.append("ext_mismatch")
    info.frames = int(getattr(img, "n_frames", 1) or 1)
    if info.frames > 1:
        info.warnings.append("animated")
        img.seek(0)
    # Before load() (TIFF applies and drops its orientation while loading), except for PNG:
    # its getexif() loads the pixels itself, and the broken-EXIF handler would then swallow
    # a corrupt image stream (a later load() does not raise again).
    if fmt != "PNG":
        _read_orientation(img, info)
    if draft_size and fmt in ("JPEG", "MPO"):
        # Square-safe request: whatever the EXIF rotation, both sides stay >= the target.
        side = max(draft_size)
        img.draft(img.mode, (side, side))
    try:
        img.load()
    except OSError as e:
        msg = str(e)
        kind = "truncated" if "truncated" in msg.lower() or "broken data stream" in msg.lower() else "corrupt"
        raise ImageError(name, kind, f"{kind} image data ({msg})") from e
    except (SyntaxError, ValueError, IndexError, EOFError, TypeError) as e:
        raise ImageError(name, "corrupt", f"corrupt image data ({e})") from e

    if fmt == "PNG":
        _read_orientation(img, info)

    if info.orientation != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    info.grayscale = mode in GRAYSCALE_MODES or (mode == "P" and _palette_is_gray(img))
    if mode != "RGB":
        info.warnings.append("mode")
    return to_rgb(img, keep_gray=keep_gray and info.grayscale), info


def _read_orientation(img: Image.Image, info: ImageInfo) -> None:
    try:
        info.orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only means "no orientation"
        info.orientation = 1
    if info.orientation not in range(1, 9):
        info.orientation = 1
    if info.orientation != 1:
        info.warnings.append("exif")


def _palette_is_gray(img: Image.Image) -> bool:
    pal = img.getpalette() or []
    rgb = np.asarray(pal[: (len(pal) // 3) * 3], dtype=np.int16).reshape(-1, 3)
    return bool(len(rgb)) and bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def to_rgb(img: Image.Image, keep_gray: bool = False) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (or ``L``), the one way convlens does it.

    Transparent pixels are composited over white (their stored colour is often garbage);
    16-bit and 32-bit images are scaled down to 8 bits rather than clipped.
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = np.clip(arr, 0.0, 1.0 if arr.max(initial=0) <= 1.0 else 255.0)
            arr = arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0)
        else:
            top = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
            arr = arr.astype(np.float64) * (255.0 / top)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
        mode = "RGB"
    if keep_gray:
        return img if mode == "L" else img.convert("L")
    return img if mode == "RGB" else img.convert("RGB")
