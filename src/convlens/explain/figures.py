"""Heat-map overlays and the PNG figures of ``convlens explain`` (matplotlib, no pyplot state).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, so nothing
depends on a display or on pyplot's global figure list, and rendered into memory before one
atomic write.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from convlens.explain import Explanation

DEFAULT_CMAP = "jet"  # the colour map of the tutorial's (and Zhou et al.'s) figures
DEFAULT_ALPHA = 0.5


def _rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"overlay takes a uint8 image. Received: dtype={a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"overlay takes an H x W x 3 (or H x W) image. Received: shape={a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a[:, :, :3]


def resize_heat(heat: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float heat map to ``size_hw`` (height, width)."""
    h, w = size_hw
    if heat.shape == (h, w):
        return heat.astype(np.float32, copy=False)
    img = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F")
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(image_uint8: np.ndarray, heat: np.ndarray, alpha: float = DEFAULT_ALPHA,
            cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Blend ``heat`` (values in [0, 1], resized to the image if needed) over an RGB image.

    Returns uint8 ``H x W x 3``: ``(1 - alpha) * image + alpha * colormap(heat)``.
    """
    from matplotlib import colormaps

    img = _rgb(image_uint8)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1. Received: alpha={alpha}")
    hm = np.clip(np.nan_to_num(resize_heat(np.asarray(heat), img.shape[:2])), 0.0, 1.0)
    colours = colormaps[cmap](hm)[:, :, :3] * 255.0
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * colours
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def thumbnail(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (never upscale) so the longer side is at most ``max_side``."""
    img = _rgb(image)
    h, w = img.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return img
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))


@dataclass
class Panel:
    """One explained image as drawn: thumbnails of it and its overlay, titled from ``of``."""

    name: str
    image: np.ndarray  # uint8 RGB
    overlay: np.ndarray  # uint8 RGB, same size
    of: Explanation

    @property
    def verdict(self) -> str:
        """The label and its probability, or ``unknown`` with the novelty that made it so."""
        e = self.of
        return f"{e.label} (novelty {e.novelty:.3f})" if not e.known else f"{e.label} ({e.probability:.1%})"

    @property
    def caption(self) -> str:
        e, text = self.of, self.verdict
        if e.explained != e.label:
            text += f"\n{e.method} of {e.explained} ({e.explained_probability:.1%})"
        return text


def make_panel(name: str, explanation: Explanation, max_side: int) -> Panel:
    """Thumbnail an explained image and its overlay for drawing."""
    small = thumbnail(explanation.image, max_side)
    return Panel(name, small, overlay(small, explanation.heat), explanation)


def _png(fig: object) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself to the figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # type: ignore[attr-defined]
    return buf.getvalue()


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3):]


def figure_png(panel: Panel) -> bytes:
    """The image and its overlay side by side, titled with the label and probability."""
    from matplotlib.figure import Figure

    h, w = panel.image.shape[:2]
    aspect = w / h
    panel_h = 4.0
    fig = Figure(figsize=(2 * panel_h * aspect + 0.4, panel_h + 1.0), dpi=100, layout="constrained")
    e = panel.of
    shown = ((panel.image, "image"), (panel.overlay, f"{e.method} map of {e.explained}"))
    for ax, (img, text) in zip(fig.subplots(1, 2), shown, strict=True):
        ax.imshow(img)
        ax.set_title(text)
        ax.set_axis_off()
    title = f"{_short(panel.name, 60)}: predicted {panel.verdict}"
    if e.explained != e.label:
        title += f"; map of {e.explained} ({e.explained_probability:.1%})"
    fig.suptitle(title)
    return _png(fig)


def grid_png(panels: Sequence[Panel], max_cols: int = 6) -> bytes:
    """All inputs side by side: each column an image above its overlay, titled like the tutorial."""
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("grid_png needs at least one panel")
    cols = min(len(panels), max_cols)
    rows = math.ceil(len(panels) / cols)
    cell = 2.6
    fig = Figure(figsize=(cols * cell, rows * 2 * cell + 0.3), dpi=100, layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows * 2, cols, squeeze=False))
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
        top.imshow(p.image)
        top.set_title(_short(p.name), fontsize=8)
        bottom.imshow(p.overlay)
        bottom.set_title(p.caption, fontsize=8)
    return _png(fig)
