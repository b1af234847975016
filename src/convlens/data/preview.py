"""``convlens preview``: the tutorial's 3x3 grid of training images titled by class, or nine
augmentations of one image (to see what ``--rotation``/``--flip`` really do)."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np

from convlens import files as cio
from convlens.config import figure_format
from convlens.data.decode import DEFAULT_MAX_PIXELS
from convlens.data.preprocess import Preprocessing
from convlens.data.scan import scan
from convlens.data.split import DEFAULT_SEED, assign_subsets
from convlens.errors import ConfigError, DataError, ImageError

GRID = 9


def _pick(root: str | os.PathLike[str], n: int, seed: int, prep: Preprocessing,
          min_side: int) -> list[tuple[np.ndarray, str]]:
    """Up to ``n`` decoded training images (unusable files are skipped), chosen with ``seed``."""
    index = scan(root)
    entries = index.entries
    sides = assign_subsets([e.rel for e in entries], [e.class_name for e in entries], None,
                           [e.subset for e in entries], seed=seed)
    train = [e for e, s in zip(entries, sides, strict=True) if s == "train"] or entries
    order = list(train)
    random.Random(seed).shuffle(order)
    out: list[tuple[np.ndarray, str]] = []
    for e in order:
        try:
            out.append((prep.load(e.path, min_side=min_side), e.class_name))
        except ImageError:
            continue  # a broken file is simply not shown
        if len(out) == n:
            break
    if not out:
        raise DataError(f"no usable images to preview; run `convlens check {index.root}`. Received: {str(root)!r}")
    return out


def render_grid(images: list[np.ndarray], titles: list[str], suptitle: str | None = None) -> object:
    """A 3x3 matplotlib Figure (Agg canvas, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 10))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 3)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            img = images[k]
            ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                      vmin=0, vmax=255)
            ax.set_title(titles[k])
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def write_preview(dir: str | os.PathLike[str], out: str | os.PathLike[str] = "grid.png", *,
                  augment: bool = False, seed: int = DEFAULT_SEED, image_size: int = 300,
                  rotation: float = 0.1, flip: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                  min_side: int = 8) -> Path:
    """Write the grid to ``out`` (atomically); return its path."""
    out = Path(out)
    fmt = figure_format(out)
    if not 8 <= image_size <= 2048:
        raise ConfigError(f"image_size must be between 8 and 2048. Received: image_size={image_size}")
    prep = Preprocessing(size=(image_size, image_size), channels=3, max_pixels=max_pixels)
    if augment:
        import torch

        from convlens.data.augment import build_augmentation

        (img, name), = _pick(dir, 1, seed, prep, min_side)
        aug = build_augmentation(flip=flip, rotation=rotation, image_size=image_size)
        batch = torch.from_numpy(np.repeat(img[None], GRID, axis=0))
        if aug is not None:
            y = aug(batch, generator=torch.Generator().manual_seed(seed))
            batch = y.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        images = list(batch.contiguous().numpy())
        titles = [name] * GRID
        sup = f"{GRID} augmentations (flip={flip}, rotation={rotation} = +-{rotation * 360:g} degrees)"
    else:
        picked = _pick(dir, GRID, seed, prep, min_side)
        images, titles, sup = [p[0] for p in picked], [p[1] for p in picked], None
    fig = render_grid(images, titles, sup)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100)  # type: ignore[attr-defined]
    cio.write_bytes(out, buf.getvalue())
    print(f"wrote {out}")
    return out
