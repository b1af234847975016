""":class:`Evaluation`: what ``convlens.evaluate(bundle, dir)`` returns (torch-free)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convlens.display import html_table, img_tag


@dataclass
class Evaluation:
    """The metrics of a bundle on a labelled folder, and where its report was written.

    ``metrics`` is the ``metrics.json`` dict (accuracy, loss, per-class precision/recall/F1,
    macro averages, confusion matrix, calibration, ROC-AUC for two classes, worst mistakes,
    skipped files). In Jupyter the object shows its headline numbers and confusion matrix.
    """

    bundle: Path
    data: Path
    dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    note: str = ""

    @property
    def accuracy(self) -> float | None:
        return self.metrics.get("accuracy")

    @property
    def report_path(self) -> Path:
        """The self-contained ``report.html``."""
        return self.dir / "report.html"

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Unusable files that were skipped (path, kind, message)."""
        return list(self.metrics.get("skipped") or [])

    def headline(self) -> dict[str, Any]:
        """The few numbers a summary shows."""
        m = self.metrics
        out = {"images": self.images, "accuracy": m.get("accuracy"),
               "macro_f1": (m.get("macro") or {}).get("f1"), "loss": m.get("loss")}
        if m.get("roc_auc") is not None:
            out["roc_auc"] = m["roc_auc"]
        return out

    def __repr__(self) -> str:
        nums = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.headline().items())
        return f"Evaluation({str(self.bundle)!r} on {str(self.data)!r}: {nums})"

    def _repr_html_(self) -> str:
        per_class = self.metrics.get("per_class") or {}
        rows = [(c, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support"))
                for c, v in per_class.items()] if isinstance(per_class, dict) else []
        confusion = self.dir / "confusion_matrix.png"
        return (f"<div><b>evaluation of {html.escape(str(self.bundle))}</b> on {html.escape(str(self.data))}"
                + html_table(list(self.headline()), [list(self.headline().values())])
                + (html_table(("class", "precision", "recall", "f1", "support"), rows) if rows else "")
                + (img_tag(confusion.read_bytes(), "confusion matrix", width=360) if confusion.is_file() else "")
                + f"<div>report: {html.escape(str(self.report_path))}</div></div>")
