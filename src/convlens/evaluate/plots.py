"""Figures as PNG bytes (matplotlib, no pyplot: safe in threads and without a display)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def png_bytes(fig: Figure) -> bytes:
    """Any figure as PNG bytes, drawn like the report's (for other pages: compare, audit)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def curves_png(history: Sequence[dict[str, Any]]) -> bytes:
    """Loss and accuracy per epoch (train and validation) from ``metrics.csv`` rows."""
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [int(r["epoch"]) for r in history]
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        for prefix, style, label in (("train_", "-o", "training"), ("val_", "-s", "validation")):
            vals = [r.get(prefix + key) for r in history]
            pts = [(e, float(v)) for e, v in zip(epochs, vals, strict=True) if v is not None and v == v]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, markersize=3, label=label)
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    return png_bytes(fig)


def confusion_png(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """Confusion matrix: colours are row-normalised (recall), cells show the counts."""
    cm = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    side = min(14.0, max(4.0, 0.55 * n + 2.5))
    fig = Figure(figsize=(side, side * 0.85))
    ax = fig.subplots()
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), labels=list(classes), rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    if n <= 25:  # beyond that the numbers are unreadable; the colours still tell the story
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9 if n <= 10 else 7,
                        color="white" if norm[i, j] > 0.5 else "black")
    return png_bytes(fig)


def calibration_png(calibration: dict[str, Any]) -> bytes:
    """Reliability diagram: observed frequency against mean predicted probability per bin; with
    an ``uncalibrated`` entry (a temperature-scaled model) the curve before scaling too."""
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    ece, before = calibration.get("ece"), calibration.get("uncalibrated")
    if before:
        ax.plot(before.get("mean_predicted", []), before.get("fraction_positive", []), "-s", color="#b0b0b0",
                label=f"before temperature (ECE {before.get('ece', float('nan')):.3f})")
    ax.plot(calibration.get("mean_predicted", []), calibration.get("fraction_positive", []), "-o",
            label="model" if not before else f"T = {calibration.get('temperature', 1.0):.2f}"
            + (f" (ECE {ece:.3f})" if ece is not None else ""))
    kind = calibration.get("kind", "probability")
    ax.set(xlabel=f"mean predicted {kind}", xlim=(0, 1), ylim=(0, 1),
           ylabel="observed frequency" if kind.startswith("p(") else "observed accuracy",
           title="calibration" + (f" (ECE {ece:.3f})" if ece is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return png_bytes(fig)


def roc_png(roc: dict[str, Any], auc: float | None, positive: str) -> bytes:
    """ROC curve of a two-class model."""
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.plot(roc["fpr"], roc["tpr"], label=f"AUC {auc:.3f}" if auc is not None else None)
    ax.set(xlabel="false positive rate", ylabel=f"true positive rate ({positive})", title="ROC")
    ax.grid(alpha=0.3)
    if auc is not None:
        ax.legend(loc="lower right")
    return png_bytes(fig)


def gallery_png(images: Sequence[np.ndarray], captions: Sequence[str], ncols: int = 4,
                title: str | None = None) -> bytes:
    """A grid of uint8 ``H x W x C`` images with a caption under each."""
    n = len(images)
    ncols = max(1, min(ncols, n)) if n else 1
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(2.6 * ncols, 2.9 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, cap in zip(axes, images, captions, strict=False):
        a = np.asarray(img)
        if a.ndim == 3 and a.shape[2] == 1:
            ax.imshow(a[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(a, interpolation="nearest" if max(a.shape[:2]) < 64 else "antialiased")
        ax.set_title(cap, fontsize=8)
    if n == 0:
        axes[0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    if title:
        fig.suptitle(title)
    return png_bytes(fig)


def lr_find_png(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                suggestion: float | None) -> bytes:
    """Loss against learning rate (log axis) with the suggested learning rate marked."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax.plot(lrs, losses, alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, label="smoothed loss")
    if suggestion is not None:
        ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested lr {suggestion:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss",
           title="learning-rate finder")
    finite = [v for v in smoothed if np.isfinite(v)]
    if finite:  # keep the divergence at the end from squashing the interesting part
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-8), min(hi, lo + 4 * (finite[0] - lo + 1e-8)) + 0.05)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return png_bytes(fig)
