"""A self-contained ``report.html``: every figure embedded as base64, no scripts, no network."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from convlens import __version__
from convlens.display import html_cell, html_table, img_tag

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d232a;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde;
padding-bottom:.2rem}.sub{color:#667;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:.8rem}.card{border:1px solid #dde;border-radius:8px;padding:.6rem 1rem;
min-width:8rem}.card b{display:block;font-size:1.4rem}.card span{color:#667;font-size:.85rem}
table{border-collapse:collapse;font-size:.9rem}td,th{border:1px solid #dde;padding:.25rem .6rem;text-align:right}
th{background:#f4f6f9}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto}.figs{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
pre{background:#f4f6f9;padding:.8rem;border-radius:6px;overflow-x:auto;font-size:.85rem}
.note{color:#8a5a00}
"""


def html_page(title: str, body: Sequence[str], subtitle: str = "", css: str = "") -> str:
    """A self-contained page in the report's style around trusted HTML ``body`` parts."""
    return "\n".join(p for p in [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}{css}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='sub'>{html.escape(subtitle)}</p>" if subtitle else "",
        *body,
        f"<p class='sub'>convlens {html.escape(__version__)}</p></body></html>",
    ] if p)


def _training_section(figures: dict[str, bytes], history: Sequence[dict[str, Any]] | None) -> list[str]:
    """"Training": the curves and one table row per epoch."""
    if "curves" not in figures and not history:
        return []
    parts = ["<h2>Training</h2>"]
    if "curves" in figures:
        parts.append(img_tag(figures["curves"], "loss and accuracy per epoch"))
    if history:
        keys = [k for k in history[0] if k != "epoch"]
        rows = [[r.get("epoch"), *(r.get(k) for k in keys)] for r in history]
        parts.append(html_table(["epoch", *keys], rows, align=None))
    return parts


def _pairs_section(title: str, rows: dict[str, Any] | None) -> list[str]:
    """A section of one two-column table (key, value); nothing without rows."""
    if not rows:
        return []
    return [f"<h2>{title}</h2>", html_table(["", ""], [[k, v] for k, v in rows.items()], align=None)]


def _calibration_text(metrics: dict[str, Any]) -> list[str]:
    cal = metrics.get("calibration") or {}
    before = cal.get("uncalibrated")
    if not before:
        return []
    return [f"<p>Probabilities are divided by a temperature T = {html_cell(cal.get('temperature'), 3)} fitted on "
            f"training images the model did not fit (never these): ECE {html_cell(before.get('ece'), 3)} before, "
            f"{html_cell(cal.get('ece'), 3)} after. The predicted classes are the same either way.</p>"]


def _novelty_section(metrics: dict[str, Any], figures: dict[str, bytes]) -> list[str]:
    nov = metrics.get("novelty")
    if not nov:
        return []
    parts = ["<h2>Unknown photos (novelty)</h2>",
             f"<p>Novelty: {html.escape(nov['method'])} (0 = like a training image). Above the threshold "
             f"{html_cell(nov['threshold'], 4)} a prediction is <b>unknown</b>; the threshold is "
             f"{html.escape(nov['chosen_by'])}. Here {html_cell(100 * nov['unknown_rate'], 1)}% of these images are "
             "unknown. Change it with --accept at training or --novelty-threshold at prediction.</p>"]
    if "unlike" in figures:
        parts.append("<p>Per class, the images least like the training images:</p>")
        parts.append(img_tag(figures["unlike"], "images most unlike the training images"))
    return parts


def _class_sections(metrics: dict[str, Any]) -> list[str]:
    """"Per class" (with the macro and weighted averages) and, for two classes, "Decision threshold"."""
    parts = []
    per_class = metrics.get("per_class") or {}
    if per_class:
        parts.append("<h2>Per class</h2>")
        rows = [[c, m["precision"], m["recall"], m["f1"], m["support"]] for c, m in per_class.items()]
        for avg in ("macro", "weighted"):
            m = metrics.get(avg) or {}
            if m:
                rows.append([f"{avg} average", m["precision"], m["recall"], m["f1"], metrics.get("num_samples")])
        parts.append(html_table(["class", "precision", "recall", "F1", "support"], rows, align=None))
    if metrics.get("thresholds"):
        classes = metrics.get("classes", ["0", "1"])
        parts.append(f"<h2>Decision threshold (positive class: {html.escape(str(classes[1]))})</h2>")
        parts.append(f"<p>The model predicts {html.escape(str(classes[1]))} when its probability is at least "
                     f"the threshold (used: {html_cell(metrics.get('threshold'), 2)}).</p>")
        header = ["threshold", "precision", "recall", "F1", "accuracy", "predicted positive"]
        keys = ["threshold", "precision", "recall", "f1", "accuracy", "positives"]
        parts.append(html_table(header, [[t[k] for k in keys] for t in metrics["thresholds"]], align=None))
    return parts


def render_report(
    *,
    title: str,
    metrics: dict[str, Any],
    figures: dict[str, bytes] | None = None,
    config_yaml: str | None = None,
    history: Sequence[dict[str, Any]] | None = None,
    notes: Sequence[str] = (),
    subtitle: str = "",
    model_info: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> str:
    """The report as one HTML string.

    ``figures`` keys used: ``curves``, ``confusion``, ``roc``, ``calibration``, ``mistakes``,
    ``uncertain``, ``unlike`` (any missing one is left out). ``model_info``: rows of a "Model"
    table; ``training``: rows of "How it was trained".
    """
    figures = figures or {}
    parts = [f"<p class='note'>{html.escape(n)}</p>" for n in notes]

    cards = [
        ("accuracy", metrics.get("accuracy")),
        ("macro F1", (metrics.get("macro") or {}).get("f1")),
        ("log loss", metrics.get("loss")),
        ("ROC-AUC", metrics.get("roc_auc")),
        ("images", metrics.get("num_samples")),
        ("classes", len(metrics.get("classes", []))),
    ]
    parts.append("<div class='cards'>" + "".join(
        f"<div class='card'><b>{html_cell(v)}</b><span>{html.escape(k)}</span></div>"
        for k, v in cards if v is not None) + "</div>")

    # "How it was trained" (a pretrained head: the phases and their seconds, the regularisation
    # cross-validation chose and its score).
    parts.extend(_pairs_section("How it was trained", training))
    parts.extend(_training_section(figures, history))
    parts.extend(_class_sections(metrics))

    figs = [(k, alt) for k, alt in (("confusion", "confusion matrix"), ("roc", "ROC curve"),
                                    ("calibration", "calibration plot")) if k in figures]
    if figs:
        parts.append("<h2>Errors and calibration</h2><div class='figs'>")
        parts.extend(img_tag(figures[k], alt) for k, alt in figs)
        parts.append("</div>")
    parts.extend(_calibration_text(metrics))
    parts.extend(_novelty_section(metrics, figures))

    for key, head in (("mistakes", "Worst mistakes (lowest probability for the true class)"),
                      ("uncertain", "Least confident correct predictions")):
        if key in figures:
            parts.append(f"<h2>{head}</h2>")
            parts.append(img_tag(figures[key], head))

    parts.extend(_pairs_section("Model", model_info))
    if config_yaml:
        parts.append("<h2>Configuration</h2>")
        parts.append(f"<pre>{html.escape(config_yaml)}</pre>")
    return html_page(title, parts, subtitle)
