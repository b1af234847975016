"""Whole-batch augmentation on the training device with kornia, plus mixup / cutmix.

The tutorial's ``RandomFlip("horizontal")`` and ``RandomRotation(0.1)`` keep Keras's meaning:
the rotation factor is a fraction of a full turn (0.1 -> +-36 degrees) and the corners are
filled by reflection (Keras's default ``fill_mode="reflect"``). The flip runs on the uint8
batch before float conversion (a quarter of the bytes to move); everything else runs on
0-255 floats in NCHW. Random draws come from the caller's ``torch.Generator``: the same
generator state gives the same augmentation on any device, and the global RNG is untouched.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from convlens.config import check_range
from convlens.errors import ConfigError


class Augmenter(nn.Module):
    """``aug(x_uint8_nhwc, generator=None) -> float32 NCHW`` in the 0-255 range."""

    def __init__(self, *, flip: bool, rotation: float, crop_scale: float, color_jitter: float,
                 erasing: float, image_size: int | tuple[int, int]) -> None:
        super().__init__()
        import kornia.augmentation as K

        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size = (int(size[0]), int(size[1]))
        self.flip = bool(flip)
        self.rotation = rotation
        self.degrees = rotation * 360.0
        self.crop = (K.RandomResizedCrop(size=self.image_size, scale=(crop_scale, 1.0), p=1.0)
                     if crop_scale < 1.0 else None)
        self.rotate = (K.RandomAffine(degrees=self.degrees, padding_mode="reflection", p=1.0)
                       if rotation > 0 else None)
        self.jitter_rgb = (K.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, p=1.0)
                           if color_jitter > 0 else None)
        # Saturation has no meaning for one channel.
        self.jitter_gray = (K.ColorJitter(brightness=color_jitter, contrast=color_jitter, p=1.0)
                            if color_jitter > 0 else None)
        self.erase = K.RandomErasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0, p=erasing) if erasing > 0 else None

    def extra_repr(self) -> str:
        return f"flip={self.flip}, rotation={self.rotation} (+-{self.degrees:g} deg)"

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            return self._apply(x)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []
        # kornia draws from the global RNG: run it on a private copy seeded from ``generator``.
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            if x.is_cuda:
                with torch.cuda.device(x.device):
                    torch.cuda.manual_seed(seed)
            return self._apply(x)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.dtype != torch.uint8:
            raise ConfigError(f"augmentation expects a uint8 N x H x W x C batch. Received: dtype={x.dtype}, shape={tuple(x.shape)}")
        n = x.shape[0]
        if self.crop is None and tuple(x.shape[1:3]) != self.image_size:
            x = random_crop(x, self.image_size)
        if self.flip:
            mask = (torch.rand(n) < 0.5).to(x.device).view(n, 1, 1, 1)
            x = torch.where(mask, x.flip(2), x)
        out = x.permute(0, 3, 1, 2).to(torch.float32)  # NCHW view of NHWC memory: channels_last
        if self.crop is not None:
            out = self.crop(out)
        if self.rotate is not None:
            out = self.rotate(out)
        jitter = self.jitter_gray if out.shape[1] == 1 else self.jitter_rgb
        if jitter is not None:
            out = jitter(out / 255.0).clamp_(0.0, 1.0) * 255.0
        if self.erase is not None:
            out = self.erase(out)
        return out


def random_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An independent random ``size`` crop of each image of an ``N x H x W x C`` batch (any dtype),
    drawn from the global RNG (the augmenter forks it). One gather, no per-image loop."""
    n, h, w = x.shape[:3]
    ch, cw = size
    if ch > h or cw > w:
        raise ConfigError(f"random crop {size} is larger than the batch's images {(h, w)}. Received: shape={tuple(x.shape)}")
    top = torch.randint(0, h - ch + 1, (n, 1), device=x.device)
    left = torch.randint(0, w - cw + 1, (n, 1), device=x.device)
    rows = (top + torch.arange(ch, device=x.device))[:, :, None]  # N x ch x 1
    cols = (left + torch.arange(cw, device=x.device))[:, None, :]  # N x 1 x cw
    return x[torch.arange(n, device=x.device)[:, None, None], rows, cols]


def build_augmentation(*, flip: bool = True, rotation: float = 0.0, crop_scale: float = 1.0,
                       color_jitter: float = 0.0, erasing: float = 0.0,
                       image_size: int | tuple[int, int] = 128, random_crops: bool = False) -> Augmenter | None:
    """An :class:`Augmenter`, or ``None`` when every augmentation is off.

    Batches larger than ``image_size`` (a ``decode_size`` cache) get a random ``image_size`` crop
    per image (``random_crops`` keeps the augmenter even when nothing else is on), unless the
    random resized crop (``crop_scale < 1``) already makes ``image_size`` images.
    """
    rotation, crop_scale = check_range("rotation", rotation), check_range("crop_scale", crop_scale)
    color_jitter, erasing = check_range("color_jitter", color_jitter), check_range("erasing", erasing)
    if not (flip or rotation or crop_scale < 1.0 or color_jitter or erasing or random_crops):
        return None
    return Augmenter(flip=flip, rotation=rotation, crop_scale=crop_scale, color_jitter=color_jitter,
                     erasing=erasing, image_size=image_size)


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one of the two per batch, 50/50 when both are on) on an NCHW float batch.

    ``y`` is one-hot or soft targets (any float shape with the batch first, e.g. ``(N, K)`` or
    ``(N, 1)`` for a sigmoid model); the returned targets are mixed in the same proportion as the
    pixels (for cutmix: the pasted box's exact area).
    """
    mixup_alpha, cutmix_alpha = check_range("mixup", mixup_alpha), check_range("cutmix", cutmix_alpha)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return x, y
    if not y.is_floating_point():
        raise ConfigError(f"mix_batch needs one-hot or soft float targets. Received: dtype={y.dtype}")
    if x.ndim != 4 or y.shape[0] != x.shape[0]:
        raise ConfigError(f"mix_batch needs an N x C x H x W batch and N targets. Received: {tuple(x.shape)}, {tuple(y.shape)}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    rng = np.random.default_rng(seed)  # Beta draws: NumPy's sampler takes an explicit seed
    n = x.shape[0]
    perm = torch.from_numpy(rng.permutation(n)).to(x.device)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    if use_cutmix:
        h, w = x.shape[2], x.shape[3]
        r = math.sqrt(1.0 - lam)
        ch, cw = int(h * r), int(w * r)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
    else:
        x = x * lam + x[perm] * (1.0 - lam)
    return x, y * lam + y[perm] * (1.0 - lam)
