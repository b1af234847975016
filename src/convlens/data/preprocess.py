"""The one preprocessing definition, stored in every model bundle.

Training, evaluation, prediction, export and serving all turn an image into model input
through a :class:`Preprocessing`: decode (EXIF-upright, RGB), resize by a policy, keep uint8,
then scale and normalise. Channel order is always RGB. Torch-free on purpose.

``decode_size`` (optional, larger than ``size``): images are resized to ``decode_size`` and the
centre ``size`` crop is the model input. Training caches the ``decode_size`` images and takes
random ``size`` crops of them; evaluation, prediction, export and serving take the centre crop.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from convlens.config import RESIZE_POLICIES, check_choice
from convlens.data.decode import DEFAULT_MAX_PIXELS, decode, to_rgb
from convlens.errors import ConfigError

MAX_SIDE = 8192  # model inputs (and decode sizes) up to this many pixels a side

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "nearest": Image.Resampling.NEAREST}


def array_image(arr: np.ndarray) -> Image.Image:
    """A uint8 ``H x W x 3`` (RGB), ``H x W x 4`` (RGBA) or ``H x W`` array as a Pillow image."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise ConfigError(f"image arrays must be uint8 (0-255) RGB. Received: dtype={a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ConfigError(f"image arrays must be H x W x 3 RGB or H x W. Received: shape={a.shape}")
    return Image.fromarray(a, "L" if a.ndim == 2 else ("RGBA" if a.shape[2] == 4 else "RGB"))


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become model input. ``size`` is the model input (height, width)."""

    size: tuple[int, int]
    channels: int = 3
    resize: str = "squash"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channel_order: str = "RGB"
    interpolation: str = "bilinear"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # With resize="crop": keep this central fraction of the largest centred box of the target's
    # aspect (ImageNet evaluation's "resize to 256, centre crop 224" is 0.875).
    crop_fraction: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    decode_size: tuple[int, int] | None = None  # resize to this, then centre-crop to ``size``

    def __post_init__(self) -> None:
        check_choice("resize", self.resize, RESIZE_POLICIES)
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3. Received: channels={self.channels}")
        if self.channel_order != "RGB":
            raise ConfigError(f"channel_order must be 'RGB'. Received: channel_order={self.channel_order!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}. "
                              f"Received: interpolation={self.interpolation!r}")
        if not 0 < float(self.crop_fraction) <= 1:
            raise ConfigError(f"crop_fraction must be in (0, 1]. Received: crop_fraction={self.crop_fraction!r}")
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        if min(self.size) < 1 or max(self.size) > MAX_SIDE:
            raise ConfigError(f"image size must be between 1 and {MAX_SIDE} pixels. Received: size={self.size}")
        if self.decode_size is not None:
            d = (int(self.decode_size[0]), int(self.decode_size[1]))
            if d[0] < self.size[0] or d[1] < self.size[1]:
                raise ConfigError(f"decode_size must be at least the input size {self.size}. Received: decode_size={d}")
            object.__setattr__(self, "decode_size", None if d == self.size else d)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    # ---- uint8 stage -------------------------------------------------------------------
    @property
    def resized_size(self) -> tuple[int, int]:
        """The size images are resized to (and cached at) before the centre crop."""
        return self.decode_size or self.size

    def crop_offset(self) -> tuple[int, int]:
        """(top, left) of the centre ``size`` crop in a ``resized_size`` image."""
        (rh, rw), (h, w) = self.resized_size, self.size
        return (rh - h) // 2, (rw - w) // 2

    def center_crop(self, batch: Any) -> Any:
        """The centre ``size`` crop of an ``N x H x W x C`` (or ``H x W x C``) array or tensor at
        ``resized_size``; any other size is returned as it is (already cropped)."""
        if self.decode_size is None or tuple(batch.shape[-3:-1]) != self.decode_size:
            return batch
        top, left = self.crop_offset()
        h, w = self.size
        return batch[..., top:top + h, left:left + w, :]

    def load(self, src: str | os.PathLike[str] | IO[bytes], min_side: int = 1) -> np.ndarray:
        """Decode and resize one file to uint8 ``H x W x C``. Raises ``ImageError``."""
        img, _ = decode(src, max_pixels=self.max_pixels, min_side=min_side, draft_size=self.draft_size,
                        keep_gray=self.channels == 1)
        return self.from_pil(img)

    @property
    def resample(self) -> Image.Resampling:
        """The Pillow resampling filter of ``interpolation``."""
        return INTERPOLATIONS[self.interpolation]

    @property
    def draft_size(self) -> tuple[int, int]:
        """(width, height) a JPEG may be draft-decoded down to without losing resolution."""
        h, w = self.resized_size
        f = self.crop_fraction if self.resize == "crop" else 1.0
        return math.ceil(w / f - 1e-6), math.ceil(h / f - 1e-6)

    def from_pil(self, img: Image.Image) -> np.ndarray:
        """Resize an (upright) Pillow image to uint8 ``H x W x C`` (and centre-crop it to ``size``)."""
        img = to_rgb(img, keep_gray=self.channels == 1)
        if self.channels == 3 and img.mode != "RGB":
            img = img.convert("RGB")
        h, w = self.resized_size
        method = self.resample
        if self.resize == "squash":
            out = img.resize((w, h), method) if img.size != (w, h) else img
        elif self.resize == "crop" and self.crop_fraction < 1:
            iw, ih = img.size
            s = min(iw / w, ih / h) * self.crop_fraction  # source pixels per output pixel
            box = ((iw - w * s) / 2, (ih - h * s) / 2, (iw + w * s) / 2, (ih + h * s) / 2)
            out = img.resize((w, h), method, box=box)
        elif self.resize == "crop":
            out = ImageOps.fit(img, (w, h), method)
        else:  # letterbox onto black, centred
            out = ImageOps.pad(img, (w, h), method, color=0)
        arr = np.asarray(out, dtype=np.uint8)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return np.ascontiguousarray(self.center_crop(arr)) if self.decode_size else arr

    def from_array(self, arr: np.ndarray) -> np.ndarray:
        """Accept an ``H x W x 3`` (RGB) or ``H x W`` uint8 array and resize it."""
        return self.from_pil(array_image(arr))

    # ---- float stage -------------------------------------------------------------------
    @property
    def integer_valued(self) -> bool:
        """Whether normalising leaves uint8 pixels as the integers 0-255 (the tutorial's scale):
        then bf16 and fp16 hold the model input exactly, and it can be made in them directly."""
        return self.scale == 1.0 and all(m == 0.0 for m in self.mean) and all(v == 1.0 for v in self.std)

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """uint8 ``N x H x W x C`` -> float32 ``N x C x H x W``: ``(x * scale - mean) / std``."""
        x = np.asarray(self.center_crop(np.asarray(batch)), dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        x = x * np.float32(self.scale)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "size": list(self.size), "mean": list(self.mean), "std": list(self.std)}
        if self.decode_size is None:
            d.pop("decode_size")  # bundles without a crop stay readable by older versions
        else:
            d["decode_size"] = list(self.decode_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["size"] = tuple(known["size"])
        if known.get("decode_size") is not None:
            known["decode_size"] = tuple(known["decode_size"])
        return cls(**known)
