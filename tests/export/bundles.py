"""Helpers shared by the export and serve tests: small bundles and synthetic image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from convlens.bundle import BundleMeta, save_bundle
from convlens.data.preprocess import Preprocessing


def make_bundle(path: Path, *, model: str = "tiny", classes: tuple[str, ...] = ("cats", "dogs"),
                size: int = 32, seed: int = 0, resize: str = "squash", channels: int = 3,
                layers: list[dict[str, Any]] | None = None, **prep: Any) -> Path:
    """Save a freshly initialised (seeded) model as a bundle at ``path``."""
    import torch

    from convlens.models import build_from_spec, create

    torch.manual_seed(seed)
    if layers is not None:
        m = build_from_spec(layers, len(classes), channels, (size, size))
    else:
        m = create(model, len(classes), channels)
    with torch.no_grad():  # non-trivial biases, so a lost bias would show in the comparison
        for p in m.parameters():
            if p.ndim == 1:
                p.uniform_(-0.5, 0.5)
    meta = BundleMeta(arch=m.arch, classes=list(classes),
                      preprocessing=Preprocessing(size=(size, size), channels=channels, resize=resize, **prep),
                      output_activation=m.output_activation, metrics={"val_accuracy": 0.75, "epochs": 1})
    return save_bundle(path, m, meta)


def write_images(folder: Path, n: int, *, seed: int = 0, size: tuple[int, int] = (40, 30),
                 fmt: str = "PNG", bright: bool | None = None) -> list[Path]:
    """``n`` random RGB images (optionally mostly bright or mostly dark) in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        lo, hi = (0, 256) if bright is None else ((140, 256) if bright else (0, 116))
        a = rng.integers(lo, hi, size=(size[1], size[0], 3), dtype=np.uint8)
        p = folder / f"img{i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        Image.fromarray(a).save(p, format=fmt)
        paths.append(p)
    return paths


def png_bytes(width: int = 24, height: int = 20, seed: int = 0) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def pixel_bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's header).

    Built from a real 8x8 PNG by rewriting the IHDR size fields and their CRC, so the file is
    valid up to the point where a decoder would start allocating.
    """
    import struct
    import zlib

    data = bytearray(png_bytes(8, 8))
    # Signature (8 bytes), then the IHDR chunk: length (4), b"IHDR" (4), data (13), CRC (4).
    assert data[12:16] == b"IHDR"
    data[16:20] = struct.pack(">I", width)
    data[20:24] = struct.pack(">I", height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)
