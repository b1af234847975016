"""The verbs that run a bundle: ``convlens predict`` (table, CSV/JSON) and ``convlens explain``
(one PNG per image and grid.png)."""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convlens.data.inputs import display, display_base, expand_paths, print_skipped
from convlens.errors import ConfigError, ImageError
from convlens.explain import check_method, iter_explain
from convlens.infer.classifier import Prediction, check_positive, load


# ----------------------------------------------------------------------------- command
def write_predictions(path: str | os.PathLike[str], classes: Sequence[str],
                      results: Sequence[Prediction | ImageError], model: str = "") -> None:
    """Write every input's prediction (all class probabilities) atomically as CSV or JSON.

    Unreadable files appear too, with an empty label and their error, so each input has a row.
    CSV columns: ``path,label,probability,novelty,known,p_<class>...,error`` (``novelty`` empty
    for a model without novelty scores), with ``neighbours`` before ``error`` when they were
    asked for (``path (class similarity); ...``; the JSON has them as objects).
    """
    from convlens.files import write_json, write_text

    p = Path(path)
    fmt = p.suffix.lower()
    if fmt == ".json":
        preds = [r.to_dict() for r in results if isinstance(r, Prediction)]
        skipped = [{"path": r.path, "kind": r.kind, "error": r.message} for r in results
                   if isinstance(r, ImageError)]
        write_json(p, {"model": model, "classes": list(classes), "predictions": preds, "skipped": skipped})
        return
    if fmt != ".csv":
        raise ConfigError(f"--out must end in .csv or .json. Received: out={os.fspath(path)!r}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    near = any(isinstance(r, Prediction) and r.neighbours is not None for r in results)
    w.writerow(["path", "label", "probability", "novelty", "known", *(f"p_{c}" for c in classes),
                *(["neighbours"] if near else []), "error"])
    for r in results:
        if isinstance(r, Prediction):
            # repr() of a float round-trips: the file holds the exact probabilities.
            w.writerow([r.path, r.label, repr(r.probability), "" if r.novelty is None else repr(r.novelty),
                        "true" if r.known else "false", *(repr(r.probabilities[c]) for c in classes),
                        *([neighbours_text(r.neighbours)] if near else []), ""])
        else:
            w.writerow([r.path, "", "", "", "", *([""] * len(classes)), *([""] if near else []),
                        f"{r.kind}: {r.message}"])
    write_text(p, buf.getvalue())


def neighbours_text(neighbours: Sequence[dict[str, Any]] | None) -> str:
    """``path (class similarity); ...``: the nearest training images in one cell."""
    return "; ".join(f"{n['path']} ({n['class']} {n['similarity']:.3f})" for n in neighbours or ())


def _print_predictions(preds: Sequence[Prediction], console: Any, top_k: int, out: str | None,
                       novelty: bool = False) -> None:
    """The predictions table; piped, tab-separated lines of every prediction with usable paths.

    ``novelty``: add the novelty column (the model has scores); an unknown image's label is
    ``unknown`` and its probability that of the class the model would have answered.
    """
    from convlens.display import is_interactive, print_table

    near = any(pr.neighbours is not None for pr in preds)
    header = (["file", "label", "probability"] + (["novelty"] if novelty else [])
              + ([f"top-{top_k}"] if top_k > 1 else []) + (["neighbours"] if near else []))
    interactive = is_interactive(console)
    # Piped output keeps every row and paths a program can open (not shortened to a base folder).
    base = display_base([pr.path for pr in preds]) if interactive else None
    limit = 50 if out and interactive else len(preds)  # the file holds everything; keep the terminal readable
    rows = [[display(pr.path, base), pr.label, f"{pr.probability:.4f}"]
            + ([f"{pr.novelty:.4f}" if pr.novelty is not None else ""] if novelty else [])
            + ([", ".join(f"{c} {p:.3f}" for c, p in pr.top_k)] if top_k > 1 else [])
            + ([neighbours_text(pr.neighbours)] if near else []) for pr in preds[:limit]]
    print_table(header, rows, console=console, caption=f"paths relative to {base}" if base else None,
                right=("probability", "novelty"), fold=("file", "neighbours"))
    if len(preds) > limit:
        console.print(f"... and {len(preds) - limit} more in {out}")


def predict_command(
    model: str,
    paths: Sequence[str],
    top_k: int = 1,
    tta: bool | str = False,
    threshold: float | None = None,
    out: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    reject: bool = True,
    novelty_threshold: float | None = None,
    neighbours: int = 0,
    engine: str = "auto",
) -> int:
    """``convlens predict``: table on stdout, skipped files on stderr, optional CSV/JSON.

    ``reject=False`` (``--no-reject``) never labels an image ``unknown``; ``novelty_threshold``
    replaces the bundle's cut-off; ``neighbours`` lists each image's nearest training images.
    Exit code 1 when any file was skipped, else 0 (user errors raise and exit 2).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from convlens.runtime import tune_allocator

    check_positive(top_k=top_k, batch_size=batch_size)
    if out is not None and Path(out).suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--out must end in .csv or .json. Received: out={out!r}")
    files, ignored = expand_paths(paths)
    tune_allocator()
    clf = load(model, device=device, precision=precision, engine=engine, images=len(files))
    clf._threshold(threshold)
    clf.rejection(reject, novelty_threshold, neighbours)  # bad options: one line before any work
    stdout, stderr = Console(), Console(stderr=True)
    if clf.novelty_note and reject:
        stderr.print(clf.novelty_note, highlight=False, markup=False, soft_wrap=True)

    show_bar = len(files) > batch_size
    with Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=stderr, transient=True, disable=not show_bar) as bar:
        task = bar.add_task("predict", total=len(files))
        results = list(clf.iter_predict(files, top_k=top_k, tta=tta, threshold=threshold,
                                        batch_size=batch_size, reject=reject,
                                        novelty_threshold=novelty_threshold, neighbours=neighbours,
                                        on_batch=lambda n: bar.advance(task, n)))

    preds = [r for r in results if isinstance(r, Prediction)]
    skipped = [r for r in results if isinstance(r, ImageError)]
    if preds:
        _print_predictions(preds, stdout, top_k=min(top_k, clf.num_classes), out=out, novelty=clf.has_novelty)
    if out:
        write_predictions(out, clf.classes, results, model=os.fspath(model))
        stderr.print(f"wrote {len(results)} rows to {out}", highlight=False)
    if ignored:
        stderr.print(f"passed over {ignored} non-image file{'s' if ignored != 1 else ''} in folders "
                     "(name image files directly to try them anyway)", highlight=False)
    print_skipped(skipped, stderr)
    sys.stdout.flush()
    return 1 if skipped else 0


# ----------------------------------------------------------------------------- explain
GRID_LIMIT = 60  # beyond this grid.png would be unreadable; every image still gets its own PNG


def _unique_stem(path: str | None, taken: set[str]) -> str:
    stem = (Path(path).stem if path else "") or "image"
    name, n = stem, 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name.lower())
    return name


def explain_command(bundle: str, paths: Sequence[str], out: str = "explain", method: str = "cam",
                    class_name: str | None = None, device: str = "auto") -> int:
    """``convlens explain``: one PNG per image (image, overlay, label, probability) + grid.png.

    Exit code 1 when any file was skipped, else 0 (user errors raise and exit 2).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from convlens.explain.figures import figure_png, grid_png, make_panel
    from convlens.files import write_bytes, write_json

    check_method(method)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out must be a folder. Received: out={out!r} (an existing file)")
    files, _ = expand_paths(paths)
    clf = load(bundle, device=device)
    if class_name is not None:
        clf.class_index(class_name)  # unknown class: fail before any work
    stdout, stderr = Console(), Console(stderr=True)
    if clf.novelty_note:
        stderr.print(clf.novelty_note, highlight=False, markup=False, soft_wrap=True)

    taken = {"grid", "explanations"}
    panels, rows, skipped = [], [], []
    with Progress(TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), console=stderr,
                  transient=True, disable=len(files) <= 4) as bar:
        task = bar.add_task("explain", total=len(files))
        for r in iter_explain(clf, files, method=method, class_name=class_name,
                              on_item=lambda: bar.advance(task)):
            if isinstance(r, ImageError):
                skipped.append(r)
                continue
            name = Path(r.path).name if r.path else "image"
            stem = _unique_stem(r.path, taken)
            kw = dict(label=r.label, probability=r.probability, explained=r.explained,
                      explained_probability=r.explained_probability, method=method,
                      novelty=r.novelty, known=r.known)
            png = out_dir / f"{stem}.png"
            write_bytes(png, figure_png(make_panel(name, r, 1024)))
            if len(panels) < GRID_LIMIT:
                panels.append(make_panel(name, r, 256))
            rows.append({"path": r.path, "png": png.name, **kw})

    if panels:
        write_bytes(out_dir / "grid.png", grid_png(panels))
        write_json(out_dir / "explanations.json", {"model": os.fspath(bundle), "method": method,
                                                   "classes": clf.classes, "images": rows})
        base = display_base([row["path"] for row in rows])
        table = Table(show_edge=False, header_style="bold",
                      caption=f"paths relative to {base}" if base else None)
        cols = ("file", "label", "probability", *(("novelty",) if clf.has_novelty else ()), "map")
        for col in cols:
            table.add_column(col, justify="right" if col in ("probability", "novelty") else "left", overflow="fold")
        for row in rows[:50]:
            novelty = [] if not clf.has_novelty else ["" if row["novelty"] is None else f"{row['novelty']:.4f}"]
            table.add_row(display(row["path"], base), row["label"], f"{row['probability']:.4f}", *novelty,
                          f"{row['png']} ({row['explained']})")
        stdout.print(table)
        grid_note = "" if len(rows) <= GRID_LIMIT else f" (grid.png shows the first {GRID_LIMIT})"
        stdout.print(f"wrote {len(rows)} maps and grid.png to {out_dir}{grid_note}", highlight=False)
    print_skipped(skipped, stderr)
    return 1 if skipped else 0
