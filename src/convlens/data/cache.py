"""Decode-once cache: every usable image decoded, EXIF-upright, resized and stored as uint8 in a
memory-mapped ``.npy`` with a JSON index.

Layout under the cache folder (default :func:`default_cache_dir`)::

    <dataset-key>/files.json            what decoding learned about each file (size, mtime, hash,
                                        usable or not, grayscale, warnings)
    <dataset-key>/px-<params-key>/index.json     relative path -> row, and the array's name
    <dataset-key>/px-<params-key>/images-<id>.npy  uint8 N x H x W x C

A file is identified by its relative path, size and mtime; the pixel array by the
preprocessing parameters (size, resize policy, channels, interpolation, Pillow version). A
changed file is decoded again, a changed setting gets its own array, and nothing else is
decoded twice. The index is the commit point: it is written atomically after the array is
complete, so a kill at any moment leaves the previous cache usable.

Disk space: a new array's blocks are reserved (:func:`convlens.files.reserve`) before it is
memory-mapped, so a full disk is a one-line :class:`DiskFullError` and never a SIGBUS; an array
whose size or header does not match its index (cut short on an earlier full disk) is rebuilt.
It takes ``N x H x W x C`` bytes for N usable images at ``H x W`` (see the README).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from convlens import files as cio
from convlens.data.check import FileRecord, inspect_file
from convlens.data.decode import DEFAULT_MAX_PIXELS
from convlens.data.parallel import pmap
from convlens.data.preprocess import Preprocessing
from convlens.data.scan import ImageEntry
from convlens.errors import DataError, DiskFullError

CACHE_VERSION = 1
COPY_CHUNK = 256  # rows copied per step: keeps memory flat however large the dataset
# How to get room for the decode and feature caches (CONVLENS_CACHE_DIR: default_cache_dir;
# --cache-dir: the cache_dir of train, lr-find and audit).
CACHE_SPACE_HINT = "free some space, or put the cache on a disk with room: CONVLENS_CACHE_DIR=DIR or --cache-dir DIR"


def default_cache_dir() -> Path:
    """``$CONVLENS_CACHE_DIR``, else the platform's user cache folder + ``convlens``
    (``$XDG_CACHE_HOME/convlens`` or ``~/.cache/convlens`` on Linux)."""
    env = os.environ.get("CONVLENS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "convlens"
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "convlens" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "convlens"


def params_key(obj: Any) -> str:
    """A short hash of JSON-able ``obj``: names the folder of what those parameters computed."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def dataset_cache_dir(cache_root: Path, dataset_root: Path) -> Path:
    """Where one dataset's cache lives: a readable name plus a hash of its absolute path."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset_root.name)[:40] or "dataset"
    return cache_root / f"{safe}-{params_key(str(dataset_root))}"


def pixel_params(prep: Preprocessing) -> dict[str, Any]:
    """What the cached pixels depend on."""
    params = {"version": CACHE_VERSION, "size": list(prep.size), "resize": prep.resize,
              "interpolation": prep.interpolation, "channels": prep.channels, "pillow": PIL.__version__}
    if prep.resize == "crop" and prep.crop_fraction != 1.0:  # only then: earlier caches keep their keys
        params["crop_fraction"] = prep.crop_fraction
    return params


class CachedImages:
    """An ``N x H x W x C`` uint8 array-like over selected rows of the memory-mapped cache (or of
    any array-like indexable by an index array).

    Indexing reads only the rows asked for (``images[idx]`` returns a NumPy array), so memory
    stays flat however large the dataset is.
    """

    def __init__(self, array: np.ndarray, rows: np.ndarray) -> None:
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: Any) -> np.ndarray:
        # Always a private, writable copy: callers (torch.from_numpy, in-place augmentation)
        # must never alias the read-only memory map.
        if isinstance(idx, (int, np.integer)):
            return np.array(self.array[self.rows[idx]])
        r = self.rows[idx]
        if len(r) and np.all(np.diff(r) == 1):  # contiguous: a plain slice, no fancy indexing
            return np.array(self.array[r[0]:r[-1] + 1])
        return np.asarray(self.array[r])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[np.arange(len(self.rows))] if len(self.rows) else np.empty(self.shape, np.uint8)
        return out.astype(dtype) if dtype is not None else out

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]


@dataclass
class CacheResult:
    """A built cache: the memory-mapped array and where each usable file lives in it."""

    array: np.ndarray  # np.memmap, N x H x W x C uint8
    rows: dict[str, int]  # relative path -> row (usable files only)
    records: dict[str, FileRecord]  # every entry, usable or not
    channels: int
    path: Path
    decoded: int = 0
    reused: int = 0
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def images(self, rels: list[str]) -> CachedImages:
        return CachedImages(self.array, np.array([self.rows[r] for r in rels], dtype=np.int64))


@contextlib.contextmanager
def cache_lock(directory: Path) -> Iterator[None]:
    """Serialise writers of one cache folder (e.g. several processes of one launch): an advisory lock."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; builds are still atomic
        yield
        return
    with open(directory / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_json(path: Path) -> dict[str, Any] | None:
    """A cache index, or None when it is missing or damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or damaged: rebuilt, never fatal


def _cache_worker(params: dict[str, Any], item: tuple[int, str, str]) -> tuple[int, FileRecord, np.ndarray | None]:
    """Inspect one file and, if usable, return its resized uint8 pixels.

    ``mode`` 0 (auto) keeps grayscale images single-channel; 1 or 3 force the channel count,
    exactly as ``Preprocessing(channels=...).load`` would.
    """
    i, path, rel = item
    mode = params["mode"]
    prep = Preprocessing(size=params["size"], channels=mode or 3, resize=params["resize"],
                         interpolation=params["interpolation"], crop_fraction=params["crop_fraction"])
    rec, img = inspect_file(Path(path), rel, max_pixels=params["max_pixels"], min_side=params["min_side"],
                            draft_size=prep.draft_size, keep_gray=mode != 3)
    if img is None:
        return i, rec, None
    if not mode and rec.info.grayscale:
        prep = replace(prep, channels=1)
    arr = prep.from_pil(img)
    img.close()
    return i, rec, arr


def _stat(entries: list[ImageEntry]) -> dict[str, tuple[int, int]]:
    out = {}
    for e in entries:
        try:
            st = os.stat(e.path)
            out[e.rel] = (st.st_size, st.st_mtime_ns)
        except OSError:
            out[e.rel] = (-1, -1)  # unreadable: decoding reports it
    return out


def _cleanup_stale(px_dir: Path, keep: set[str]) -> None:
    """Remove our own leftovers (temp files of a killed build, arrays no index points to)."""
    if not px_dir.is_dir():
        return
    for p in px_dir.iterdir():
        if (p.name.startswith("images-") and p.suffix == ".npy" and p.name not in keep) or p.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def build_cache(entries: list[ImageEntry], dataset_root: Path, *, size: tuple[int, int],
                resize: str = "squash", interpolation: str = "bilinear", crop_fraction: float = 1.0,
                channels: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 8,
                cache_dir: str | os.PathLike[str] | None = None, workers: int = 0,
                progress: bool = True) -> CacheResult:
    """Decode what is not cached yet and return the memory-mapped cache of ``entries``.

    ``channels`` 0 means 1 when every usable image is grayscale, else 3.
    """
    if channels not in (0, 1, 3):
        raise DataError(f"channels must be 0 (auto), 1 or 3. Received: channels={channels}")
    t0 = time.perf_counter()
    cache_root = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()).resolve()
    dataset_root = Path(dataset_root).resolve()
    if cache_root == dataset_root or dataset_root in cache_root.parents:
        raise DataError(f"the cache folder must be outside the dataset folder {dataset_root}. Received: cache_dir={str(cache_root)!r}")
    dcache = dataset_cache_dir(cache_root, dataset_root)
    try:
        with cache_lock(dcache):
            # A second pass with 3 channels when a dataset that looked grayscale turns out to hold
            # a colour image (rare: its check records are kept, so only pixels are redone).
            for pass_channels in (channels, 3):
                result = _build_pass(entries, dcache, size=size, resize=resize, interpolation=interpolation,
                                     crop_fraction=crop_fraction, channels=pass_channels, max_pixels=max_pixels, min_side=min_side,
                                     workers=workers, progress=progress, t0=t0)
                if result is not None:
                    return result
            raise AssertionError("a 3-channel cache pass never restarts")  # pragma: no cover
    except PermissionError as e:
        raise DataError(f"cannot write the image cache ({e.strerror}); pass a writable --cache-dir. "
                        f"Received: cache_dir={str(cache_root)!r}") from e
    except DiskFullError as e:
        raise e.with_hint(CACHE_SPACE_HINT) from e


def _known_records(entries: list[ImageEntry], files_json: Path, check_params: dict[str, Any],
                   stats: dict[str, tuple[int, int]]) -> dict[str, FileRecord]:
    """Check results of earlier builds for files that have not changed since."""
    old_files = read_json(files_json) or {}
    old_recs = old_files.get("files", {}) if old_files.get("check") == check_params else {}
    records: dict[str, FileRecord] = {}
    for e in entries:
        d = old_recs.get(e.rel)
        if d and (d.get("size"), d.get("mtime_ns")) == stats[e.rel]:
            records[e.rel] = FileRecord.from_dict(d)
    return records


def _channel_guess(channels: int, records: dict[str, FileRecord], unknown: list[ImageEntry]) -> tuple[int | None, int]:
    """(channels decided now or None, the guess to build with): confirmed after decoding."""
    known_usable = [r for r in records.values() if r.usable]
    resolved: int | None = channels or None
    if resolved is None:
        if any(not r.info.grayscale for r in known_usable):
            resolved = 3
        elif not unknown:
            resolved = 1 if known_usable else 3
    return resolved, resolved or (1 if known_usable else 3)


def _old_rows(index_path: Path, params: dict[str, Any], records: dict[str, FileRecord],
              stats: dict[str, tuple[int, int]]) -> tuple[dict[str, Any], np.ndarray | None, dict[str, int]]:
    """(old index, old array, reusable row per file) of an existing array with the same pixel parameters."""
    old_index = read_json(index_path) or {}
    old_array: np.ndarray | None = None
    reuse: dict[str, int] = {}
    if old_index.get("params") == params:
        # Only an array that is whole: one cut short by a full disk is rebuilt, never read.
        old_array = open_array(index_path.parent / str(old_index.get("array", "")), old_index.get("shape"), np.uint8)
        if old_array is not None:
            for rel, (row, sz, mt) in old_index.get("files", {}).items():
                if rel in records and records[rel].usable and (sz, mt) == stats.get(rel) and row < len(old_array):
                    reuse[rel] = row
    return old_index, old_array, reuse


def new_array(path: Path, shape: tuple[int, ...], dtype: Any = np.uint8, what: object = None) -> np.memmap:
    """A new ``.npy`` at ``path`` memory-mapped for writing, its disk blocks reserved first (no
    file is left behind when they cannot be); ``what``: what a full-disk message calls it."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    try:
        with cio.disk_full_as_error(path), open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            nbytes = f.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            cio.reserve(f, nbytes, path, zero_fill=True, what=what)  # unbacked pages of a memory map die of SIGBUS
        return np.lib.format.open_memmap(path, mode="r+")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise


def _cache_label(shape: tuple[int, ...]) -> str:
    return f"the decode cache ({shape[0]} images of {shape[1]}x{shape[2]}x{shape[3]})"


def open_array(path: Path, shape: Any = None, dtype: Any = None) -> np.ndarray | None:
    """``path`` memory-mapped read-only, or None when it is missing, damaged or cut short (its
    header names another shape or dtype, or the file is shorter than the header says)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_2_0 if version[0] >= 2 else np.lib.format.read_array_header_1_0
            got_shape, fortran, got_dtype = read_header(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
        wanted = offset + int(np.prod(got_shape, dtype=np.int64)) * got_dtype.itemsize
        if (fortran or got_dtype.hasobject or size != wanted or (shape is not None and tuple(got_shape) != tuple(shape))
                or (dtype is not None and got_dtype != np.dtype(dtype))):
            return None
        # What np.load(mmap_mode="r") returns, from the header already read.
        return np.memmap(path, dtype=got_dtype, mode="r", shape=got_shape, offset=offset)
    except (OSError, ValueError):
        return None


def _fill(tmp: Path, shape: tuple[int, ...], old_array: np.ndarray | None, reuse: dict[str, int],
          row_of: dict[str, int], todo: list[ImageEntry], records: dict[str, FileRecord],
          wparams: dict[str, Any], workers: int, progress: bool) -> bool:
    """Write reused rows and newly decoded images into a new array; True when a colour image
    arrived in what looked like a grayscale dataset."""
    out = new_array(tmp, shape, what=_cache_label(shape))
    if reuse and old_array is not None:
        pairs = sorted((row_of[rel], row) for rel, row in reuse.items())
        for k in range(0, len(pairs), COPY_CHUNK):
            chunk = np.array(pairs[k:k + COPY_CHUNK])
            out[chunk[:, 0]] = old_array[chunk[:, 1]]
    items = [(i, str(e.path), e.rel) for i, e in enumerate(todo)]
    mismatch = False
    for i, rec, arr in pmap(functools.partial(_cache_worker, wparams), items, workers=workers,
                            progress=progress, description="caching images"):
        e = todo[i]
        rec.class_name, rec.subset = e.class_name, e.subset
        records[e.rel] = rec
        if arr is None:
            continue
        if arr.shape[2] == shape[3] or arr.shape[2] == 1:
            out[row_of[e.rel]] = arr
        else:
            mismatch = True
    out.flush()
    del out
    return mismatch


def _build_pass(entries: list[ImageEntry], dcache: Path, *, size: tuple[int, int], resize: str,
                interpolation: str, crop_fraction: float, channels: int, max_pixels: int, min_side: int,
                workers: int, progress: bool, t0: float) -> CacheResult | None:
    """One build; None when it must start again with 3 channels."""
    h, w = size
    stats = _stat(entries)
    check_params = {"max_pixels": max_pixels, "min_side": min_side, "version": CACHE_VERSION}
    files_json = dcache / "files.json"
    records = _known_records(entries, files_json, check_params, stats)
    unknown = [e for e in entries if e.rel not in records]
    resolved, guess = _channel_guess(channels, records, unknown)
    prep = Preprocessing(size=(h, w), channels=guess, resize=resize, interpolation=interpolation,
                         crop_fraction=crop_fraction)
    params = pixel_params(prep)
    px_dir = dcache / f"px-{params_key(params)}"
    index_path = px_dir / "index.json"
    old_index, old_array, reuse = _old_rows(index_path, params, records, stats)
    todo = unknown + [e for e in entries if e.rel in records and records[e.rel].usable and e.rel not in reuse]

    if not todo and old_array is not None:
        # Nothing to decode: keep the existing array; rewrite the index only if files went away.
        rows = {rel: reuse[rel] for rel in sorted(reuse)}
        if set(rows) != set(old_index.get("files", {})):
            _write_index(index_path, params, old_index["array"], old_array.shape, rows, stats)
        _write_files_json(files_json, check_params, records, entries)
        return CacheResult(array=old_array, rows=rows, records=records, channels=guess,
                           path=px_dir / old_index["array"], decoded=0, reused=len(rows),
                           seconds=time.perf_counter() - t0)

    # New array: one row per file that is (or may be) usable; unusable ones leave unused rows.
    candidates = sorted({e.rel for e in todo} | set(reuse))
    row_of = {rel: i for i, rel in enumerate(candidates)}
    px_dir.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(px_dir, keep={str(old_index.get("array", ""))})
    name = f"images-{uuid.uuid4().hex[:12]}.npy"
    tmp = px_dir / f".{name}.tmp"
    wparams = {"size": (h, w), "mode": resolved or 0, "resize": resize, "interpolation": interpolation,
               "crop_fraction": crop_fraction, "max_pixels": max_pixels, "min_side": min_side}
    try:
        mismatch = _fill(tmp, (len(candidates), h, w, guess), old_array, reuse, row_of, todo, records,
                         wparams, workers, progress)
        usable = [rel for rel in candidates if records[rel].usable]
        final_channels = resolved or (1 if usable and all(records[r].info.grayscale for r in usable) else 3)
        if mismatch or final_channels > guess:
            tmp.unlink()
            _write_files_json(files_json, check_params, records, entries)
            return None
        if final_channels < guess:
            # First build of a grayscale dataset: keep one channel (all three are equal).
            provisional = px_dir
            tmp, px_dir, params = _first_channel_only(tmp, px_dir, dcache, replace(prep, channels=1))
            index_path = px_dir / "index.json"
        final = px_dir / name
        os.replace(tmp, final)
        if final_channels < guess:
            with contextlib.suppress(OSError):
                provisional.rmdir()  # the provisional 3-channel folder, now empty
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    array = np.load(final, mmap_mode="r")
    rows = {rel: row_of[rel] for rel in candidates if records[rel].usable}
    try:
        _write_index(index_path, params, name, array.shape, rows, stats)
    except BaseException:  # (a full disk) no index points to the new array: the old one stays in use
        del array
        with contextlib.suppress(OSError):
            final.unlink()
        raise
    _write_files_json(files_json, check_params, records, entries)
    _cleanup_stale(px_dir, keep={name})
    return CacheResult(array=array, rows=rows, records=records, channels=final_channels, path=final,
                       decoded=len(todo), reused=len(reuse), seconds=time.perf_counter() - t0)


def _first_channel_only(tmp: Path, provisional_dir: Path, dcache: Path,
                        prep: Preprocessing) -> tuple[Path, Path, dict[str, Any]]:
    """Copy channel 0 of a provisional 3-channel array into a new temporary file (the old one is
    removed) and make its 1-channel folder: (temp file, folder, pixel params)."""
    a = np.load(tmp, mmap_mode="r")
    shape = (*a.shape[:3], 1)
    gray = provisional_dir / f".{uuid.uuid4().hex[:12]}.gray.tmp"
    b = new_array(gray, shape, what=_cache_label(shape))
    for k in range(0, len(a), COPY_CHUNK):
        b[k:k + COPY_CHUNK] = a[k:k + COPY_CHUNK, :, :, :1]
    b.flush()
    del a, b
    tmp.unlink()
    params = pixel_params(prep)
    px_dir = dcache / f"px-{params_key(params)}"
    px_dir.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(px_dir, keep=set())
    return gray, px_dir, params


def _write_index(path: Path, params: dict[str, Any], array_name: str, shape: tuple[int, ...],
                 rows: dict[str, int], stats: dict[str, tuple[int, int]]) -> None:
    cio.write_json(path, {"params": params, "array": array_name, "shape": list(shape),
                          "files": {rel: [row, *stats[rel]] for rel, row in rows.items()}})


def _write_files_json(path: Path, check_params: dict[str, Any], records: dict[str, FileRecord],
                      entries: list[ImageEntry]) -> None:
    data = {"check": check_params, "files": {e.rel: records[e.rel].to_dict() for e in entries if e.rel in records}}
    cio.write_text(path, json.dumps(data, separators=(",", ":")))
