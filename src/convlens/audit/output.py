"""An audit's outputs: the terminal tables, ``--csv`` (the editable list of findings) and the
offline HTML page with thumbnails grouped by finding."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any

from convlens.audit import KIND_TEXT, AuditReport

CSV_FIELDS = ("finding", "path", "class", "new_class", "score", "detail")
PAGE_LIMIT = 120  # thumbnails per finding on the page (the JSON and CSV have everything)
THUMB = 128
_CSS = """
.grid{display:flex;flex-wrap:wrap;gap:.6rem}.item{width:150px;font-size:.75rem;word-break:break-all}
.item img{width:140px;height:140px;object-fit:contain;background:#f4f6f9;border-radius:4px;display:block}
.group{border:1px solid #dde;border-radius:8px;padding:.4rem;margin:.4rem 0}.bad{color:#b00020}
"""


def print_report(report: AuditReport, console: Any = None, top: int = 10) -> None:
    """Rich tables: a summary line and the first ``top`` rows of each finding."""
    from rich.console import Console
    from rich.table import Column, Table

    console = console or Console()
    c = report.counts()
    console.print(f"[bold]{report.root}[/bold]: {len(report.paths)} images audited with {report.backbone} "
                  f"features, {report.params.get('folds')}-fold out-of-sample probabilities"
                  + (f"; {len(report.skipped)} unusable files skipped" if report.skipped else ""))
    issues = report.label_issues()
    if issues:
        t = Table(*(Column(col, justify=just, overflow="fold") for col, just in (
            ("#", "right"), ("path", "left"), ("filed as", "left"), ("looks like", "left"), ("confidence", "right"))),
                  title=f"Likely label errors: {c['label']} (most suspicious first)", title_justify="left")
        for r in issues[:top]:
            t.add_row(str(r["rank"]), r["path"], r["given"], r["suggested"], f"{r['confidence']:.2f}")
        console.print(t)
    groups = report.near_duplicates()
    if groups:
        t = Table(Column("similarity", justify="right"), Column("images", overflow="fold"), "note",
                  title=f"Near duplicates: {len(groups)} groups, {c['duplicate']} images", title_justify="left")
        for g in groups[:top]:
            note = ", ".join(n for n, on in (("different classes", g["label_conflict"]),
                                             ("train/validation leak", g["split_leak"])) if on)
            t.add_row(f"{g['similarity']:.3f}", " ~ ".join(g["paths"]), note)
        console.print(t)
    outliers = report.outliers()
    if outliers:
        t = Table(Column("path", overflow="fold"), "class", Column("score", justify="right"),
                  title=f"Outliers: {c['outlier']} (most unusual first)", title_justify="left")
        for r in outliers[:top]:
            t.add_row(r["path"], r["class"], f"{r['score']:.3f}")
        console.print(t)
    if report.exit_code:
        console.print("[red]findings[/red]: look at them with `--html audit.html`; act with `--quarantine QDIR "
                      "--kinds ...` or `--csv findings.csv`, edit it, then `--relabel findings.csv` (undo: `--undo`)")
    else:
        console.print("[green]no findings[/green]")


def findings_csv(report: AuditReport) -> str:
    """One row per flagged image. ``new_class`` is pre-filled with the suggested class for label
    errors: delete the rows you disagree with and pass the file to ``--relabel`` or ``--paths``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in report.label_issues():
        w.writerow({"finding": "label", "path": r["path"], "class": r["given"], "new_class": r["suggested"],
                    "score": r["confidence"], "detail": f"rank {r['rank']}"})
    for n, g in enumerate(report.near_duplicates(), 1):
        for p in g["paths"]:
            w.writerow({"finding": "duplicate", "path": p, "class": report.class_of(p), "new_class": "",
                        "score": g["similarity"], "detail": f"group {n}"})
    for r in report.outliers():
        w.writerow({"finding": "outlier", "path": r["path"], "class": r["class"], "new_class": "",
                    "score": r["score"], "detail": ""})
    return buf.getvalue()


def thumbnail(path: Path, side: int = THUMB) -> str:
    """A small JPEG of an image file as a data URI (decoded like training: upright, RGB)."""
    from convlens.data.decode import decode
    from convlens.errors import ImageError

    try:
        img, _ = decode(path, draft_size=(side, side))  # JPEGs decode at 1/2-1/8 scale: a thumbnail needs no more
    except (ImageError, OSError):
        return ""
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _item(report: AuditReport, rel: str, caption: str, bad: str = "", moved: dict[str, str] | None = None) -> str:
    where = (moved or {}).get(rel)
    src = thumbnail(Path(where) if where else report.root / rel)
    img = f"<img alt='{html.escape(rel)}' src='{src}'>" if src else "<div>(cannot decode)</div>"
    extra = f"<br><span class='bad'>{html.escape(bad)}</span>" if bad else ""
    extra += f"<br>moved to {html.escape(where)}" if where else ""
    return f"<div class='item'>{img}{html.escape(rel)}<br>{html.escape(caption)}{extra}</div>"


def render_page(report: AuditReport, moved: dict[str, str] | None = None) -> str:
    """The whole audit as one self-contained HTML page (images embedded, no scripts, no network).

    ``moved``: dataset-relative path -> where a quarantine of the same run put the file (its new
    name when the old one was taken); those items say so."""
    from convlens.display import html_table
    from convlens.evaluate.report import html_page

    c = report.counts()
    parts = [html_table(["", ""], [["images audited", len(report.paths)], ["skipped (unusable)", len(report.skipped)],
                                   ["backbone", report.backbone], ["folds", report.params.get("folds")],
                                   *[[KIND_TEXT[k], v] for k, v in c.items()]], align=None)]
    issues = report.label_issues()
    parts.append(f"<h2>{KIND_TEXT['label'].capitalize()} ({len(issues)})</h2>")
    parts.append("<div class='grid'>" + "".join(
        _item(report, r["path"], f"#{r['rank']} filed as {r['given']}",
              f"looks like {r['suggested']} ({r['confidence']:.2f})", moved) for r in issues[:PAGE_LIMIT]) + "</div>")
    groups = report.near_duplicates()
    parts.append(f"<h2>{KIND_TEXT['duplicate'].capitalize()} ({len(groups)} groups)</h2>")
    for g in groups[:PAGE_LIMIT // 2]:
        note = "different classes" if g["label_conflict"] else ("train/validation leak" if g["split_leak"] else "")
        parts.append(f"<div class='group'>similarity {g['similarity']:.3f} <span class='bad'>{note}</span>"
                     "<div class='grid'>" + "".join(
                         _item(report, p, report.class_of(p), moved=moved) for p in g["paths"]) + "</div></div>")
    outliers = report.outliers()
    parts.append(f"<h2>{KIND_TEXT['outlier'].capitalize()} ({len(outliers)})</h2>")
    parts.append("<div class='grid'>" + "".join(
        _item(report, r["path"], f"in {r['class']}, score {r['score']:.3f}", moved=moved)
        for r in outliers[:PAGE_LIMIT]) + "</div>")
    shown = [("label errors", len(issues)), ("outliers", len(outliers))]
    more = [f"{n - PAGE_LIMIT} more {k}" for k, n in shown if n > PAGE_LIMIT]
    if more:
        parts.append(f"<p class='note'>Not shown: {', '.join(more)} (see --json or --csv).</p>")
    return html_page("convlens audit", parts, subtitle=str(report.root), css=_CSS)
