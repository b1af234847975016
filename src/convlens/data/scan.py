"""Find a dataset's images and classes from its folder layout.

Two layouts are recognised:

* ``DIR/<class>/...`` - one folder per class (sorted by name); sub-folders belong to their class.
* ``DIR/train/<class>/...`` with ``DIR/val|valid|validation/<class>/...`` and an optional
  ``DIR/test/<class>/...`` - a split the user already made, used as it is.

Every file that is not a system file is a candidate image: formats are recognised later by
content (``decode.py``), never by extension, so a PNG named ``.jpg`` is found and a text file
named ``.jpg`` is reported as "not an image" instead of silently vanishing.

These are the only folder rules in convlens (like Keras's ``index_directory``): training,
``evaluate``, ``check``, ``predict``/``explain`` folders and ``export``'s calibration and
validation folders all walk folders with :func:`list_images`/:func:`scan`. Links are followed
(a link loop is walked once); hidden and system files and folders are passed over silently.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from convlens.errors import DataError

# Files and folders operating systems and tools drop into folders; ignored without a word
# (so is every dot-file and Office's "~$" lock files).
SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "__macosx",
                          "$recycle.bin", "system volume information", "@eadir"})
# Files that are plainly not meant as images (notes, labels, archives): listed as "ignored"
# rather than reported as broken images. Anything else is decoded and judged by content.
NON_IMAGE_EXTENSIONS = frozenset({
    ".txt", ".md", ".csv", ".tsv", ".json", ".xml", ".yaml", ".yml", ".html", ".htm", ".pdf",
    ".zip", ".tar", ".gz", ".py", ".ipynb", ".log", ".mat", ".npy", ".npz",
})
TRAIN_NAMES = ("train",)
VAL_NAMES = ("val", "valid", "validation")
TEST_NAMES = ("test",)
SUBSETS = ("train", "val", "test")


def is_system_file(name: str) -> bool:
    """True for hidden files and OS clutter (``.DS_Store``, ``Thumbs.db``, ``desktop.ini``)."""
    return name.startswith((".", "~$")) or name.lower() in SYSTEM_FILES


@dataclass(frozen=True)
class ImageEntry:
    """One candidate image: where it is, its class and, for pre-split layouts, its subset."""

    path: Path  # absolute
    rel: str  # POSIX path relative to the dataset root: the file's identity everywhere
    label: int
    class_name: str
    subset: str | None = None  # "train" | "val" | "test" when the layout says so


@dataclass
class DatasetIndex:
    """The result of :func:`scan`."""

    root: Path
    classes: list[str]
    entries: list[ImageEntry]
    presplit: bool = False
    subsets: list[str] = field(default_factory=list)  # subsets present in a pre-split layout
    ignored: list[str] = field(default_factory=list)  # non-image files (notes, labels), relative
    loose: list[str] = field(default_factory=list)  # files outside any class folder, relative

    @property
    def layout(self) -> str:
        return "presplit" if self.presplit else "classes"

    def class_counts(self, subset: str | None = None) -> dict[str, int]:
        """Candidate files per class (all classes, zeros included)."""
        c = Counter(e.class_name for e in self.entries if subset is None or e.subset == subset)
        return {name: c.get(name, 0) for name in self.classes}


def _subdirs(d: Path) -> list[Path]:
    try:
        with os.scandir(d) as it:
            return sorted((Path(e.path) for e in it if e.is_dir() and not is_system_file(e.name)),
                          key=lambda p: p.name)
    except PermissionError as e:
        raise DataError(f"cannot read folder {d}: permission denied. Received: {d}") from e


def _files(d: Path) -> list[Path]:
    with os.scandir(d) as it:
        return sorted(Path(e.path) for e in it if e.is_file() and not is_system_file(e.name))


def walk_files(d: str | os.PathLike[str]) -> list[Path]:
    """Every non-system file under ``d`` (recursively, links followed, hidden folders skipped), sorted."""
    out: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree: walk each real folder once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(n for n in dirnames if not is_system_file(n))
        out.extend(Path(dirpath) / n for n in sorted(filenames) if not is_system_file(n))
    return out


def is_candidate(path: str | os.PathLike[str]) -> bool:
    """False for files plainly not meant as images (notes, labels); content decides the rest."""
    return Path(path).suffix.lower() not in NON_IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """``(candidates, ignored)`` under ``folder``: the files to decode, and the non-image files passed over."""
    files = walk_files(folder)
    return [f for f in files if is_candidate(f)], [f for f in files if not is_candidate(f)]


def _find(root: Path, names: tuple[str, ...]) -> list[Path]:
    return [root / n for n in names if (root / n).is_dir()]


def scan(root: str | os.PathLike[str]) -> DatasetIndex:
    """Index the images of a dataset folder. Raises :class:`DataError` for unusable layouts."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset folder does not exist; pass a folder with one sub-folder per class. Received: {str(root)!r}")
    if not root.is_dir():
        raise DataError(f"dataset must be a folder with one sub-folder per class, not a file. Received: {str(root)!r}")
    root = root.resolve()

    trains, vals, tests = _find(root, TRAIN_NAMES), _find(root, VAL_NAMES), _find(root, TEST_NAMES)
    if len(vals) > 1:
        names = ", ".join(p.name for p in vals)
        raise DataError(f"pre-split dataset has more than one validation folder ({names}); keep one. Received: {str(root)!r}")
    presplit = bool(trains) and bool(vals or tests)

    ignored: list[str] = []
    loose: list[str] = []
    if presplit:
        subset_dirs = [("train", trains[0])] + [("val", v) for v in vals] + [("test", t) for t in tests]
        class_dirs = {s: _subdirs(d) for s, d in subset_dirs}
        for s, d in subset_dirs:
            loose += [f.relative_to(root).as_posix() for f in _files(d)]
            if not class_dirs[s]:
                raise DataError(f"{d.name}/ has no class sub-folders; put images in {d.name}/<class>/. Received: {str(d)!r}")
        classes = sorted({p.name for dirs in class_dirs.values() for p in dirs})
        groups = [(s, p) for s, dirs in class_dirs.items() for p in dirs]
        subsets = [s for s, _ in subset_dirs]
    else:
        dirs = _subdirs(root)
        loose = [f.relative_to(root).as_posix() for f in _files(root)]
        if not dirs:
            hint = " (it holds files directly: move them into one folder per class)" if loose else ""
            raise DataError(f"dataset folder has no class sub-folders{hint}; expected DIR/<class>/<images>. Received: {str(root)!r}")
        classes = [p.name for p in dirs]
        groups = [(None, p) for p in dirs]
        subsets = []

    label_of = {c: i for i, c in enumerate(classes)}
    entries: list[ImageEntry] = []
    for subset, d in groups:
        for f in walk_files(d):
            rel = f.relative_to(root).as_posix()
            if not is_candidate(f):
                ignored.append(rel)
                continue
            entries.append(ImageEntry(path=f, rel=rel, label=label_of[d.name], class_name=d.name, subset=subset))
    entries.sort(key=lambda e: e.rel)
    return DatasetIndex(root=root, classes=classes, entries=entries, presplit=presplit,
                        subsets=subsets, ignored=sorted(ignored), loose=sorted(loose))


def labelled_files(root: str | os.PathLike[str], classes: list[str]) -> tuple[list[tuple[Path, int]], str]:
    """``(path, index in classes)`` of a labelled folder's held-out images, and a note on the layout.

    ``DIR/<class>/...`` gives every image; a ``DIR/train|val|test/<class>/...`` layout gives its
    test images (else its validation images), never the training ones. Class folders that are
    not in ``classes`` raise :class:`DataError`; classes without a folder just have no images.
    """
    index = scan(root)
    entries, note = index.entries, ""
    if index.presplit:
        subset = "test" if "test" in index.subsets else "val"
        entries = [e for e in entries if e.subset == subset]
        note = f"{str(root)!r} is split into {'/'.join(index.subsets)}: using its {subset} images"
    known = {c: i for i, c in enumerate(classes)}
    unknown = sorted({e.class_name for e in entries} - set(known))
    if unknown:
        raise DataError(f"{str(root)!r} has class folders the model does not know: {', '.join(unknown)}; "
                        f"the model's classes are {', '.join(classes)}")
    items = [(e.path, known[e.class_name]) for e in entries]
    if not items:
        raise DataError(f"no images found in {str(root)!r}; expected DIR/<class>/<image> files")
    return items, note
