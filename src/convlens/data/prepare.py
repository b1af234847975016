"""One call from a folder to training-ready data: scan -> decode/check -> split -> cache.

Unusable files never stop a run: they are left out and returned in ``skipped`` so the caller
can say so in one line (:func:`convlens.data.check.skipped_message`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convlens.data.cache import CachedImages, CacheResult, build_cache
from convlens.data.check import SkippedFiles
from convlens.data.preprocess import Preprocessing
from convlens.data.scan import scan
from convlens.data.split import (
    DEFAULT_SEED,
    DEFAULT_VAL_FRACTION,
    assign_subsets,
    check_fractions,
    read_split_csv,
)
from convlens.errors import ConfigError, DataError, ImageError
from convlens.files import human_bytes


@dataclass
class Subset:
    """One side of the split: memory-mapped uint8 ``N x H x W x C`` images, labels and paths."""

    images: CachedImages
    labels: np.ndarray  # int64, N
    paths: list[str]  # relative to the dataset root
    name: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)

    def take(self, idx: np.ndarray, name: str | None = None) -> Subset:
        """The rows ``idx`` of this subset (images still read lazily from the cache)."""
        return Subset(CachedImages(self.images.array, self.images.rows[idx]), self.labels[idx],
                      [self.paths[i] for i in idx], self.name if name is None else name)


@dataclass
class PreparedData:
    """Everything training needs, with the images decoded once into the cache."""

    root: Path
    classes: list[str]
    preprocessing: Preprocessing
    train: Subset
    val: Subset
    test: Subset | None
    split_rows: list[tuple[str, str, str]]
    skipped: list[ImageError]
    layout: str = "classes"
    cache: CacheResult | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        parts = [f"{len(self.train)} train", f"{len(self.val)} val"]
        if self.test is not None:
            parts.append(f"{len(self.test)} test")
        ch = "grayscale" if self.preprocessing.channels == 1 else "RGB"
        return f"{len(self.classes)} classes, {', '.join(parts)} images ({ch}, {self.preprocessing.size[0]}x{self.preprocessing.size[1]})"


def prepare_dataset(root: str | os.PathLike[str], prep: Preprocessing, *, detect_channels: bool = False,
                    val_fraction: float = DEFAULT_VAL_FRACTION, test_fraction: float = 0.0,
                    seed: int = DEFAULT_SEED, cache_dir: str | os.PathLike[str] | None = None,
                    workers: int = 0, min_side: int = 8, progress: bool = True,
                    split_file: str | os.PathLike[str] | None = None) -> PreparedData:
    """Scan ``root``, decode every image once into the cache at ``prep`` (whole: its size, decode
    size, resize policy, interpolation, crop fraction and pixel limit), split, and return the subsets.

    ``detect_channels``: grayscale when every image is (``prep.channels`` otherwise). With
    ``prep.decode_size`` the cache holds the larger images; the model input is the ``size`` crop
    of them (random in training, centred elsewhere; see :class:`Preprocessing`).
    ``split_file`` reuses a ``split.csv`` from an earlier run (files it does not list are
    assigned by hash as usual).
    """
    check_fractions(val_fraction, test_fraction)
    if any(s == 0 for s in prep.std):
        raise ConfigError(f"std must not contain zeros. Received: std={list(prep.std)}")
    if min_side < 1:
        raise ConfigError(f"min_side must be positive. Received: min_side={min_side}")

    index = scan(root)
    cache = build_cache(index.entries, index.root, size=prep.decode_size or prep.size, resize=prep.resize,
                        interpolation=prep.interpolation, crop_fraction=prep.crop_fraction,
                        channels=0 if detect_channels else prep.channels, max_pixels=prep.max_pixels,
                        min_side=min_side, cache_dir=cache_dir, workers=workers, progress=progress)
    recs = cache.records
    usable = [e for e in index.entries if recs[e.rel].usable]
    skipped = SkippedFiles([recs[e.rel].to_error(index.root) for e in index.entries if not recs[e.rel].usable],
                           root=index.root)

    resolved = cache.channels
    for name, v in (("mean", prep.mean), ("std", prep.std)):
        if len(v) not in (1, resolved):
            raise ConfigError(f"{name} needs 1 or {resolved} values for this {'grayscale' if resolved == 1 else 'RGB'} "
                              f"dataset. Received: {name}={list(v)}")
    prep = dataclasses.replace(prep, channels=resolved)

    subsets = assign_subsets([e.rel for e in usable], [e.class_name for e in usable],
                             [recs[e.rel].sha256 for e in usable], [e.subset for e in usable],
                             val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if split_file is not None:
        given = {p: s for p, _, s in read_split_csv(split_file)}
        subsets = [given.get(e.rel, s) for e, s in zip(usable, subsets, strict=True)]

    by_subset: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, s in enumerate(subsets):
        by_subset[s].append(i)

    def make(name: str) -> Subset:
        idx = by_subset[name]
        rels = [usable[i].rel for i in idx]
        return Subset(images=cache.images(rels), labels=np.array([usable[i].label for i in idx], dtype=np.int64),
                      paths=rels, name=name)

    train, val = make("train"), make("val")
    test = make("test") if by_subset["test"] or "test" in index.subsets else None
    _validate(index.classes, train, val, index.root, val_expected=val_fraction > 0 or "val" in index.subsets)

    rows = sorted(((e.rel, e.class_name, s) for e, s in zip(usable, subsets, strict=True)), key=lambda r: r[0])
    data = PreparedData(root=index.root, classes=index.classes, preprocessing=prep, train=train, val=val,
                        test=test, split_rows=rows, skipped=skipped, layout=index.layout, cache=cache)
    if progress:
        _report(data, cache)
    return data


def _validate(classes: list[str], train: Subset, val: Subset, root: Path, val_expected: bool) -> None:
    counts = train.class_counts(len(classes))
    if len(classes) < 2:
        raise DataError(f"a classifier needs at least 2 class folders; found {len(classes)} ({', '.join(classes)}). Received: {str(root)!r}")
    missing = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if missing:
        raise DataError(f"class {missing[0]!r} has no usable training images"
                        f"{f' (and {len(missing) - 1} more classes)' if len(missing) > 1 else ''}; add images or remove "
                        f"the folder (see `convlens check {root}`). Received: {str(root)!r}")
    if val_expected and len(val) == 0:
        raise DataError(f"too few images to hold out a validation set; add images or pass --val-fraction 0. Received: {str(root)!r}")


def _report(data: PreparedData, cache: CacheResult) -> None:
    from rich.console import Console

    from convlens.data.check import skipped_message

    console = Console(stderr=True)
    console.print(f"data: {data.summary()}")
    console.print(f"cache: {cache.array.shape[0]} images, {human_bytes(cache.nbytes)} at {cache.path.parent} "
                  f"(decoded {cache.decoded}, reused {cache.reused}, {cache.seconds:.1f} s)")
    if data.skipped:
        console.print(f"[yellow]{skipped_message(data.skipped)}[/yellow]")

