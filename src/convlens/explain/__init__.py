"""Explain predictions with class activation maps: ``convlens explain`` and ``Classifier.explain``.

Methods (see :mod:`convlens.explain.cam` for the maths and for why they are written here
rather than taken from pytorch-grad-cam): ``cam`` (exact, for global-average-pool + dense
heads), ``gradcam`` and ``gradcam++`` (any model with ``forward_features``). Maps are computed
at feature resolution, upsampled (bilinear) onto the ORIGINAL photo through the bundle's
resize geometry, reduced to positive evidence scaled to [0, 1], and overlaid with a colour map.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from convlens.config import EXPLAIN_METHODS, check_choice
from convlens.errors import ConfigError, ImageError, UserError
from convlens.explain.figures import overlay

if TYPE_CHECKING:  # pragma: no cover
    from convlens.predict import Classifier

__all__ = ["Explanation", "explain_command", "explain_inputs", "iter_explain", "overlay"]

GRID_LIMIT = 60  # beyond this grid.png would be unreadable; every image still gets its own PNG


@dataclass
class Explanation:
    """One explained image.

    ``image`` is the upright original (uint8 RGB), ``heat`` the map at that size in [0, 1],
    ``raw`` the feature-resolution map before ReLU/scaling (signed for CAM). ``label`` and
    ``probability`` are the prediction; ``explained`` is the class the map is for.
    """

    path: str | None
    image: np.ndarray
    heat: np.ndarray
    raw: np.ndarray
    label: str
    probability: float
    explained: str
    explained_probability: float
    method: str


def _check_method(method: str) -> None:
    check_choice("method", method, EXPLAIN_METHODS)


def _load_pair(src: Any, clf: Classifier) -> tuple[np.ndarray, np.ndarray]:
    """(model input uint8 at the model size, upright original uint8 RGB) for one input.

    The model input goes through exactly the same call as ``predict`` (so the label shown is
    the label predicted); the original is decoded separately at full resolution for display.
    """
    from convlens.data.decode import decode, to_rgb
    from convlens.predict import _load_input

    prep = clf.preprocessing
    x = _load_input(src, prep)
    if isinstance(src, (str, os.PathLike)):
        img, _ = decode(src, max_pixels=prep.max_pixels)
    elif isinstance(src, Image.Image):
        img = to_rgb(ImageOps.exif_transpose(src) or src)
    else:
        a = np.asarray(src)
        a = a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a
        mode = "L" if a.ndim == 2 else ("RGBA" if a.shape[2] == 4 else "RGB")
        img = to_rgb(Image.fromarray(a, mode))
    return x, np.asarray(img.convert("RGB"), dtype=np.uint8)


def iter_explain(
    clf: Classifier,
    sources: Sequence[Any],
    *,
    method: str = "cam",
    class_name: str | None = None,
    threshold: float | None = None,
    batch_size: int = 16,
    on_item: Callable[[], None] | None = None,
) -> Iterator[Explanation | ImageError]:
    """Explain ``sources`` in order, yielding an Explanation or the ImageError of each."""
    from convlens.explain.cam import normalize_heat, run_method, upsample_to_original

    _check_method(method)
    model = getattr(clf.backend, "model", None)
    if model is None:
        raise UserError("explanations need the model's feature maps and gradients, which ONNX models "
                        "do not expose; pass the .convlens bundle instead")
    forced = clf.class_index(class_name) if class_name is not None else None
    prep = clf.preprocessing
    for start in range(0, len(sources), batch_size):
        chunk = sources[start:start + batch_size]
        loaded: list[tuple[np.ndarray, np.ndarray] | ImageError] = []
        for src in chunk:
            try:
                loaded.append(_load_pair(src, clf))
            except ImageError as e:
                loaded.append(e)
        good = [i for i, item in enumerate(loaded) if not isinstance(item, ImageError)]
        results: dict[int, Explanation] = {}
        if good:
            batch = np.stack([loaded[i][0] for i in good])  # type: ignore[index]
            probs = clf.predict_proba(batch)
            decided = clf.decide(probs, threshold)
            idx = decided if forced is None else np.full(len(good), forced)
            t = clf.backend.tensor(prep.normalize(batch))  # type: ignore[attr-defined]
            raw = run_method(method, model, t, class_index=idx.tolist())
            for j, i in enumerate(good):
                image = loaded[i][1]  # type: ignore[index]
                up = upsample_to_original(raw.maps[j], prep, image.shape[1], image.shape[0])
                src = chunk[i]
                results[i] = Explanation(
                    path=os.fspath(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "filename", None),
                    image=image, heat=normalize_heat(up), raw=raw.maps[j].float().cpu().numpy(),
                    label=clf.classes[int(decided[j])], probability=float(probs[j, decided[j]]),
                    explained=clf.classes[int(idx[j])], explained_probability=float(probs[j, idx[j]]),
                    method=method,
                )
        for i, item in enumerate(loaded):
            yield item if isinstance(item, ImageError) else results[i]
            if on_item:
                on_item()


def explain_inputs(clf: Classifier, sources: Sequence[Any], *, method: str = "cam",
                   class_name: str | None = None, threshold: float | None = None) -> list[Explanation]:
    """Explain every input; a bad image raises :class:`ImageError` (the Python API)."""
    out = []
    for r in iter_explain(clf, sources, method=method, class_name=class_name, threshold=threshold):
        if isinstance(r, ImageError):
            raise r
        out.append(r)
    return out


def _unique_stem(path: str | None, taken: set[str]) -> str:
    stem = Path(path).stem if path else "image"
    stem = stem or "image"
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

    from convlens.explain.figures import figure_png, grid_png, make_panel, write_png
    from convlens.io import write_json
    from convlens.predict import _display, display_base, expand_paths, load, print_skipped

    _check_method(method)
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
            write_png(png, figure_png(make_panel(name, r.image, r.heat, max_side=1024, **kw)))
            if len(panels) < GRID_LIMIT:
                panels.append(make_panel(name, r.image, r.heat, max_side=256, **kw))
            rows.append({"path": r.path, "png": png.name, "label": r.label, "probability": r.probability,
                         "explained": r.explained, "explained_probability": r.explained_probability,
                         "method": method})

    if panels:
        write_png(out_dir / "grid.png", grid_png(panels))
        write_json(out_dir / "explanations.json", {"model": os.fspath(bundle), "method": method,
                                                   "classes": clf.classes, "images": rows})
        base = display_base([row["path"] for row in rows])
        table = Table(show_edge=False, header_style="bold",
                      caption=f"paths relative to {base}" if base else None)
        for col in ("file", "label", "probability", "map"):
            table.add_column(col, justify="right" if col == "probability" else "left", overflow="fold")
        for row in rows[:50]:
            table.add_row(_display(row["path"], base), row["label"], f"{row['probability']:.4f}",
                          f"{row['png']} ({row['explained']})")
        stdout.print(table)
        grid_note = "" if len(rows) <= GRID_LIMIT else f" (grid.png shows the first {GRID_LIMIT})"
        stdout.print(f"wrote {len(rows)} maps and grid.png to {out_dir}{grid_note}", highlight=False)
    print_skipped(skipped, stderr)
    return 1 if skipped else 0
