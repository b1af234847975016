"""Labelled folders decoded for evaluation: :class:`LabelledImages` and :func:`load_labelled_folder`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from convlens.errors import DataError, ImageError

if TYPE_CHECKING:  # pragma: no cover
    from convlens.infer.bundle import BundleMeta


@dataclass
class LabelledImages:
    """Decoded images with labels, in the bundle's class order (what ``evaluate`` consumes).

    A training :class:`convlens.data.prepare.Subset` has the same three fields.
    """

    images: np.ndarray  # uint8 N x H x W x C
    labels: np.ndarray  # int64 N
    paths: list[str]
    skipped: list[ImageError] = field(default_factory=list)
    note: str = ""


def load_labelled_folder(root: str | os.PathLike[str], meta: BundleMeta, workers: int = 0) -> LabelledImages:
    """Scan a class-folder dataset and decode every image exactly as prediction does.

    Files are found by the data package's scanner and decoded with the bundle's
    ``Preprocessing.load`` (the one definition prediction also uses). Unusable images are
    skipped and returned in ``skipped``. Folder classes the model does not know raise
    :class:`DataError`; model classes missing from the folder just have no support.
    """
    from concurrent.futures import ThreadPoolExecutor

    from convlens.data.scan import labelled_files

    found, note = labelled_files(root, meta.classes)
    items = [(str(p), label) for p, label in found]
    prep = meta.preprocessing

    def load(path: str) -> np.ndarray | ImageError:
        try:
            return prep.load(path)
        except ImageError as e:
            return e

    n_workers = workers if workers > 0 else min(8, os.cpu_count() or 1)
    # Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        decoded = list(pool.map(load, [p for p, _ in items]))
    images, labels, paths, skipped = [], [], [], []
    for (path, label), arr in zip(items, decoded, strict=True):
        if isinstance(arr, ImageError):
            skipped.append(arr)
        else:
            images.append(arr)
            labels.append(label)
            paths.append(path)
    if not images:
        raise DataError(f"none of the {len(items)} images in {str(root)!r} could be decoded; run `convlens check {root}`")
    from convlens.data.check import SkippedFiles

    skipped = SkippedFiles(skipped, root=Path(root))
    h, w = prep.size
    return LabelledImages(np.stack(images).reshape(len(images), h, w, prep.channels),
                          np.asarray(labels, dtype=np.int64), paths, skipped, note)
