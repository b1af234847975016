"""Figures are real PNGs; report.html is self-contained (images embedded, nothing fetched)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
from PIL import Image

from convlens.evaluate import plots
from convlens.evaluate.metrics import compute_metrics
from convlens.evaluate.report import render_report


def _png_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.load()
    return img.size


def _metrics() -> dict:
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.2])
    return compute_metrics(y, np.stack([1 - p1, p1], axis=1), ["cat", "dog <b>"])


def test_every_figure_is_a_png() -> None:
    m = _metrics()
    history = [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "train_acc": 0.5, "val_acc": 0.6},
               {"epoch": 2, "train_loss": 0.5, "val_loss": None, "train_acc": 0.7, "val_acc": None}]
    figs = [
        plots.curves_png(history),
        plots.confusion_png(m["confusion_matrix"], m["classes"]),
        plots.confusion_png(np.eye(30, dtype=int).tolist(), [f"c{i}" for i in range(30)]),
        plots.calibration_png(m["calibration"]),
        plots.roc_png(m["roc"], m["roc_auc"], "dog"),
        plots.gallery_png([np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 1), 200, np.uint8)], ["a", "b"]),
        plots.gallery_png([], []),
        plots.lr_find_png([1e-5, 1e-4, 1e-3], [2.0, 1.0, 5.0], [2.0, 1.5, 3.0], 1e-4),
    ]
    for f in figs:
        w, h = _png_size(f)
        assert w > 50 and h > 50


def test_report_is_self_contained_and_escaped() -> None:
    m = _metrics()
    figures = {"confusion": plots.confusion_png(m["confusion_matrix"], m["classes"]),
               "calibration": plots.calibration_png(m["calibration"])}
    html = render_report(title="run <x>", metrics=m, figures=figures, config_yaml="model: tiny\nlr: 0.001\n",
                         history=[{"epoch": 1, "train_loss": 0.5}], notes=["2 files skipped"])
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(srcs) == 2
    for s in srcs:
        _png_size(base64.b64decode(s))
    assert "run &lt;x&gt;" in html and "dog &lt;b&gt;" in html and "dog <b>" not in html
    assert "model: tiny" in html and "Decision threshold" in html and "2 files skipped" in html
    assert "0.6667" in html  # accuracy card
