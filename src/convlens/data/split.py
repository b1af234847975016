"""Stable, stratified, deterministic train/validation(/test) split, and its CSV file.

Each image's side is decided by a hash of its relative path and the seed - not by shuffling a
list - so adding or removing other images never moves it (the speech-commands dataset's
"which_set" idea). Files with identical content hash their content instead of their path, so
all copies land on the same side and nothing leaks from training into validation. Hashing is
per image and therefore per class: every class gets the fraction in expectation. Tiny classes
(a handful of images) are fixed up so that each has a training image and, when it has two or
more, a validation image.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from convlens import files as cio
from convlens.data.scan import SUBSETS
from convlens.errors import ConfigError, DataError

DEFAULT_SEED = 1337
DEFAULT_VAL_FRACTION = 0.2
CSV_HEADER = ("path", "class", "subset")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ConfigError unless 0 <= val, 0 <= test and val + test < 1."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1). Received: {name}={value}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"val_fraction + test_fraction must leave images for training (< 1). "
                          f"Received: val_fraction={val_fraction}, test_fraction={test_fraction}")


def hash_unit(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by ``key`` and ``seed`` (same on every machine)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_keys(rels: Sequence[str], shas: Sequence[str | None]) -> list[str]:
    """The hashing key of each file: its path, or its content hash when it has copies."""
    counts = Counter(s for s in shas if s)
    return [f"sha256:{s}" if s and counts[s] > 1 else r for r, s in zip(rels, shas, strict=True)]


def assign_subsets(rels: Sequence[str], classes: Sequence[str], shas: Sequence[str | None] | None = None,
                   given: Sequence[str | None] | None = None, *, val_fraction: float = DEFAULT_VAL_FRACTION,
                   test_fraction: float = 0.0, seed: int = DEFAULT_SEED) -> list[str]:
    """Return ``"train" | "val" | "test"`` for each file.

    ``given`` holds the subsets of a pre-split layout (``None`` where the layout says nothing);
    given subsets are kept as they are. When a pre-split layout has a ``test`` folder and no
    validation folder, validation is split off its training images.
    """
    check_fractions(val_fraction, test_fraction)
    n = len(rels)
    shas = list(shas) if shas is not None else [None] * n
    given = list(given) if given is not None else [None] * n
    presplit = any(given)
    has_val = "val" in given
    keys = split_keys(rels, shas)
    out = [str(g) if g in ("val", "test") or (g == "train" and has_val) else "" for g in given]
    free = [i for i, o in enumerate(out) if not o]
    # A pre-split layout without a test folder gets no test fraction: its split is the user's.
    test_f = 0.0 if presplit else test_fraction
    units = {i: hash_unit(keys[i], seed) for i in free}
    for i, u in units.items():
        out[i] = "test" if u < test_f else ("val" if u < test_f + val_fraction else "train")

    # Tiny classes only (a few images): make sure each trains, and validates when it can.
    by_class: dict[str, list[int]] = defaultdict(list)
    for i in free:
        by_class[classes[i]].append(i)

    def move(members: list[int], candidates: list[int], to: str, lowest: bool) -> None:
        pick = (min if lowest else max)(candidates, key=lambda i: units[i])
        for i in members:
            if keys[i] == keys[pick]:  # the whole duplicate group moves together
                out[i] = to

    for members in by_class.values():
        if len({keys[i] for i in members}) == 1:
            for i in members:
                out[i] = "train"
            continue
        if not any(out[i] == "train" for i in members):
            move(members, members, "train", lowest=False)
        train = [i for i in members if out[i] == "train"]
        if val_fraction > 0 and not any(out[i] == "val" for i in members) and len({keys[i] for i in train}) >= 2:
            move(members, train, "val", lowest=True)
    return out


def write_split_csv(path: str | os.PathLike[str], rows: Sequence[tuple[str, str, str]]) -> None:
    """Atomically write ``(relative path, class, subset)`` rows with a header."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    w.writerows(rows)
    cio.write_text(path, buf.getvalue())


def read_split_csv(path: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """Read a split CSV written by :func:`write_split_csv`. Raises DataError when malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DataError(f"split file not found. Received: {str(path)!r}") from e
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(h.strip().lower() for h in header) != CSV_HEADER:
        raise DataError(f"split file must start with the header 'path,class,subset'. Received: {str(path)!r}")
    rows = []
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 3 or row[2] not in SUBSETS:
            raise DataError(f"split file line {line_no} must be 'path,class,subset' with subset one of "
                            f"{', '.join(SUBSETS)}. Received: {','.join(row)!r} in {str(path)!r}")
        rows.append((row[0], row[1], row[2]))
    return rows
