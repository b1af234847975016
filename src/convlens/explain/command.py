"""``convlens explain``: one PNG per image (image, overlay, label, probability) and grid.png."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from convlens.errors import ConfigError, ImageError
from convlens.explain import check_method, iter_explain

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
    from convlens.inputs import display, display_base, expand_paths, print_skipped
    from convlens.predict import load

    check_method(method)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out must be a folder. Received: out={out!r} (an existing file)")
    files, _ = expand_paths(paths)
    clf = load(bundle, device=device)
    if class_name is not None:
        clf.class_index(class_name)  # unknown class: fail before any work
    stdout, stderr = Console(), Console(stderr=True)

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
                      explained_probability=r.explained_probability, method=method)
            png = out_dir / f"{stem}.png"
            write_bytes(png, figure_png(make_panel(name, r.image, r.heat, max_side=1024, **kw)))
            if len(panels) < GRID_LIMIT:
                panels.append(make_panel(name, r.image, r.heat, max_side=256, **kw))
            rows.append({"path": r.path, "png": png.name, **kw})

    if panels:
        write_bytes(out_dir / "grid.png", grid_png(panels))
        write_json(out_dir / "explanations.json", {"model": os.fspath(bundle), "method": method,
                                                   "classes": clf.classes, "images": rows})
        base = display_base([row["path"] for row in rows])
        table = Table(show_edge=False, header_style="bold",
                      caption=f"paths relative to {base}" if base else None)
        for col in ("file", "label", "probability", "map"):
            table.add_column(col, justify="right" if col == "probability" else "left", overflow="fold")
        for row in rows[:50]:
            table.add_row(display(row["path"], base), row["label"], f"{row['probability']:.4f}",
                          f"{row['png']} ({row['explained']})")
        stdout.print(table)
        grid_note = "" if len(rows) <= GRID_LIMIT else f" (grid.png shows the first {GRID_LIMIT})"
        stdout.print(f"wrote {len(rows)} maps and grid.png to {out_dir}{grid_note}", highlight=False)
    print_skipped(skipped, stderr)
    return 1 if skipped else 0
