"""Which engine runs a bundle's predictions: PyTorch, or onnxruntime over a cached, verified export.

``engine="auto"`` (every inference verb's default) picks onnxruntime when the bundle predicts in
fp32 on a CPU: on the default model (EfficientNet-Lite0, 224 px) it ran 2x faster than PyTorch
fp32 (batch 32; 3x at batch 1), with probabilities within 5e-7 (docs/benchmarks.md, "Engines"). bf16 (PyTorch only) and GPUs stay on
torch. ``torch`` / ``onnx`` force one; ``onnx`` refuses a bf16 request or a GPU device.

The ONNX file is exported once per bundle content, verified against PyTorch exactly as
``convlens export`` verifies (:func:`convlens.export.onnx.export_onnx`), with a ``pooled``
output in place of ``novelty``, so the bundle's novelty index scores the features in numpy as on
the torch path (and ``--neighbours`` works). It lives under ``<convlens cache dir>/onnx/KEY.onnx`` with a
``KEY.json`` record of its SHA-256; KEY hashes the bundle's metadata, the SHA-256 of its weights
as stored (computed, not the recorded value), and the convlens, torch, onnx and onnxruntime
versions. A file whose bytes do not match its record is exported again, never trusted. A new
export trims the folder (:func:`evict_exports`: the bundle path's earlier exports, all but the
:data:`KEEP_EXPORTS` most recently used), never while another process holds
:func:`exports_in_use`. On a cache hit nothing here imports torch. Explain methods the graph cannot draw (Grad-CAM) load the
bundle's torch model on first use (:class:`BundleOnnxBackend`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from convlens.config import ENGINES, check_choice
from convlens.errors import ConfigError, first_line
from convlens.infer.bundle import BundleMeta, weights_digest
from convlens.infer.onnx_backend import OnnxBackend

log = logging.getLogger(__name__)

# Bump when the cached graph's layout changes (its outputs, how it is verified).
CACHE_FORMAT = 2
# Exports the cache keeps (the most recently used; each about the size of its bundle): enough
# for a handful of models served or predicted in turn without exporting any of them again.
KEEP_EXPORTS = 8
ALL_MAPS = ("cam", "gradcam", "gradcam++")
# Images one `convlens predict` must run before a first export (12-15 s here) pays for itself
# (docs/benchmarks.md, "Engines"): a shorter job runs torch until serve, evaluate or a long
# predict has made the export.
EXPORT_PAYS_OFF = 2000


def check_engine(engine: str) -> str:
    """``engine`` when it is one of :data:`convlens.config.ENGINES`; else a one-line ConfigError."""
    return check_choice("engine", str(engine), ENGINES)


def resolve_engine(engine: str, meta: BundleMeta, device: str = "auto", precision: str = "auto") -> str:
    """``torch`` or ``onnx`` for a bundle with ``meta`` on ``device`` in ``precision``.

    ``auto``: onnx where the bundle's precision resolves to fp32 on a CPU, torch elsewhere.
    A forced ``onnx`` with a bf16 request or a non-CPU device is a ConfigError (onnx runs fp32 on CPU).
    """
    check_engine(engine)
    if engine == "torch":
        return "torch"
    prec = meta.inference_precision(precision)
    dev = str(device).lower()
    if engine == "onnx":
        if str(precision).lower() == "bf16":
            raise ConfigError(f"engine onnx runs in fp32; use --precision auto or fp32, or --engine torch. "
                              f"Received: precision={precision!r}")
        if dev not in ("auto", "cpu"):
            raise ConfigError(f"engine onnx runs on the CPU; use --device cpu or --engine torch. Received: device={device!r}")
        return "onnx"
    if prec == "bf16" or dev not in ("auto", "cpu"):
        return "torch"
    from convlens.runtime import inference_device, torch_is_cpu_only

    if dev == "auto" and torch_is_cpu_only():
        dev = "cpu"  # no GPU to look for, so no torch import for it
    if dev == "auto" or prec == "auto":  # what auto means here needs torch (a GPU? native bf16?)
        resolved = inference_device(dev, prec)
        if resolved.type != "cpu" or resolved.precision != "fp32":
            return "torch"
    return "onnx"


# ----------------------------------------------------------------------------- the cache
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(bundle: str | os.PathLike[str], meta: BundleMeta) -> str:
    """What the cached export depends on: the bundle's metadata (its ``novelty`` entry holds the
    novelty section's SHA-256, which reading the section checks) and weights, and the tool versions."""
    from convlens import __version__

    doc = {"format": CACHE_FORMAT, "meta": meta.to_json(), "weights_sha256": weights_digest(bundle),
           "convlens": __version__, **{pkg: _version(pkg) for pkg in ("torch", "onnx", "onnxruntime")}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_folder() -> Path:
    """``<convlens cache dir>/onnx`` (``$CONVLENS_CACHE_DIR``, else the user cache folder)."""
    from convlens.data.cache import default_cache_dir

    return default_cache_dir() / "onnx"


def _cached(model: Path, record: Path, key: str) -> bool:
    """True when ``model`` exists and its bytes match ``record`` (written after it)."""
    from convlens.files import file_sha256

    try:
        doc = json.loads(record.read_text())
        return (isinstance(doc, dict) and doc.get("key") == key and model.is_file()
                and model.stat().st_size == doc.get("bytes") and file_sha256(model) == doc.get("sha256"))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _flock(folder: Path, exclusive: bool) -> Iterator[bool]:
    """An advisory lock on ``folder/.lock``: shared (waits while an eviction runs), or exclusive
    without waiting. Yields whether it is held: False when another process holds it (exclusive
    only) or where there is no ``fcntl`` (Windows)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, so nothing is ever evicted there
        yield False
        return
    try:
        fd = os.open(folder / ".lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as e:  # a read-only cache: nobody can write or evict there either
        log.debug("no lock on %s: %s", folder, e)
        yield False
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if exclusive else fcntl.LOCK_SH)
            held = True
        except BlockingIOError:
            held = False
        yield held
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def exports_in_use(folder: Path | None = None) -> Iterator[None]:
    """While held, no process evicts from the export cache ``folder`` (a shared lock): hold it
    from finding or writing an export until its session is open. An open session no longer needs
    the file (onnxruntime reads it whole). Nothing to hold while the folder does not exist."""
    folder = folder or cache_folder()
    if not folder.is_dir():
        yield
        return
    with _flock(folder, exclusive=False):
        yield


def cached_onnx(bundle: str | os.PathLike[str], meta: BundleMeta, folder: Path | None = None,
                before_export: Callable[[], object] | None = None, export: bool = True,
                evict: bool = True) -> tuple[Path | None, bool]:
    """The verified fp32 ONNX export of ``bundle`` (with a ``pooled`` output) and whether it was
    exported now (``before_export`` is called first); with ``export=False`` only a cached one
    (else ``(None, False)``). A new export then trims the cache (:func:`evict_exports`) unless
    ``evict`` is False (a caller holding :func:`exports_in_use` trims after opening it). Raises
    :class:`convlens.export.onnx.ExportError` when it cannot be exported."""
    folder = folder or cache_folder()
    if not export and not folder.is_dir():
        return None, False  # before the key: it reads and hashes the bundle's weights
    key = cache_key(bundle, meta)
    model, record = folder / f"{key}.onnx", folder / f"{key}.json"
    folder.mkdir(parents=True, exist_ok=True)  # the lock file lives in it
    with exports_in_use(folder):
        if _cached(model, record, key):
            try:
                os.utime(record)  # just used: eviction keeps the most recently used
            except OSError as e:  # a read-only shared cache: the export is still valid, only its age is stale
                log.debug("could not mark %s as used: %s", record, e)
            return model, False
        if not export:
            return None, False
        if before_export is not None:
            before_export()
        from convlens.export.onnx import export_onnx
        from convlens.files import write_json

        _, data = export_onnx(bundle, model, pooled=True, extra_info={"engine_cache": key})
        # The record goes last: a file without one (an interrupted write) is exported again.
        write_json(record, {"key": key, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "bundle": os.path.abspath(bundle)})
    if evict:
        evict_exports(folder, key, bundle)
    return model, True


# ----------------------------------------------------------------------------- eviction
def evict_exports(folder: Path, key: str, bundle: str | os.PathLike[str], keep: int = KEEP_EXPORTS) -> list[str]:
    """Trim the export cache ``folder`` after ``key`` was exported for ``bundle``; the keys removed.

    Removed: exports made earlier for the same bundle path (its content has changed since, so
    they can no longer be hit from there), every export but the ``keep`` most recently used
    (the current one counts), and the leftovers of interrupted exports. Nothing happens while
    another process uses the cache (:func:`exports_in_use`: finding, writing or opening an
    export), nor without advisory locks; the next export trims instead. A record goes before
    its model, so a half-removed entry is never trusted.
    """
    removed: list[str] = []
    with _flock(folder, exclusive=True) as held:
        if not held:
            return removed
        here = os.path.abspath(bundle)
        complete, broken = _entries(folder)
        complete.sort(key=lambda e: (e[0] == key, e[1]), reverse=True)  # the current one, then newest use
        for rank, (k, _, doc) in enumerate(complete):
            if k != key and (rank >= keep or doc.get("bundle") == here):
                removed.append(k)
        removed += broken
        for k in removed:
            for name in (f"{k}.json", f"{k}.onnx"):
                _remove(folder / name)
        for tmp in folder.glob(".*.tmp"):  # an interrupted atomic write (no writer holds the lock)
            _remove(tmp)
    return removed


def _entries(folder: Path) -> tuple[list[tuple[str, float, dict[str, Any]]], list[str]]:
    """The cache's complete entries as (key, last use, record) and the keys of broken ones (a
    model without a readable record or a record without its model)."""
    keys = {p.stem for p in folder.iterdir() if p.suffix in (".onnx", ".json") and not p.name.startswith(".")}
    complete, broken = [], []
    for k in sorted(keys):
        record, model = folder / f"{k}.json", folder / f"{k}.onnx"
        try:
            doc = json.loads(record.read_text())
            used = record.stat().st_mtime
        except (OSError, ValueError):
            doc, used = None, 0.0
        if isinstance(doc, dict) and model.is_file():
            complete.append((k, used, doc))
        else:
            broken.append(k)
    return complete, broken


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:  # e.g. a read-only shared cache: the file stays, nothing is lost
        log.warning("could not remove the old onnx export %s: %s", path, e)


# ----------------------------------------------------------------------------- the backend
class BundleOnnxBackend(OnnxBackend):
    """An :class:`OnnxBackend` over a bundle's cached export. It draws the exact CAM from the
    graph; Grad-CAM and Grad-CAM++ come from the bundle's torch model (``torch_backend()``,
    called once, on first use: serving and predicting never need it)."""

    device = "cpu"
    precision = "fp32"  # what this engine computes in, named as TorchBackend names it

    def __init__(self, path: Path, torch_backend: Callable[[], Any], *, threads: int | None = None) -> None:
        super().__init__(path, threads=threads)
        self._make_torch = torch_backend
        self._torch: Any = None
        self._lock = threading.Lock()

    @property
    def explain_methods(self) -> tuple[str, ...]:
        """All three with a GAP + dense head (the graph has ``cam``), else Grad-CAM and Grad-CAM++."""
        return ALL_MAPS if self.has_cam else ALL_MAPS[1:]

    def torch_backend(self) -> Any:
        """The bundle's torch backend (fp32 on the CPU, like this engine), loaded once."""
        with self._lock:
            if self._torch is None:
                from convlens.runtime import configure_threads, inference_threads

                self._torch = self._make_torch()
                configure_threads(inference_threads())  # torch was just imported: the same share of cores
            return self._torch

    def class_maps(self, x: np.ndarray, method: str, class_index: list[int]) -> np.ndarray:
        if method == "cam" and self.has_cam:
            return super().class_maps(x, method, class_index)
        return self.torch_backend().class_maps(x, method, class_index)


def onnx_engine(bundle: Path, meta: BundleMeta, engine: str, torch_backend: Callable[[], Any],
                images: int | None = None) -> BundleOnnxBackend | None:
    """The onnx engine's backend for ``bundle``; None when ``engine`` is ``auto`` and the export
    failed (the caller then runs torch, after one line on stderr saying why), or was not made yet
    and a job of ``images`` images (when known) is too short to pay for it."""
    from convlens.export.onnx import ExportError

    short = engine == "auto" and images is not None and images < EXPORT_PAYS_OFF
    folder = cache_folder()
    try:
        if not short:
            folder.mkdir(parents=True, exist_ok=True)  # so that the lock below is held from the start
        with exports_in_use(folder):  # until the session is open: no other process evicts it
            path, exported = cached_onnx(bundle, meta, folder, export=not short, evict=False, before_export=lambda: print(
                f"note: preparing {bundle.name} for onnxruntime (a verified export, once: later runs reuse it; "
                "--engine torch skips it)", file=sys.stderr, flush=True))
            backend = None if path is None else BundleOnnxBackend(path, torch_backend)
    except (ExportError, OSError) as e:  # a damaged bundle (BundleError) is never papered over
        if engine == "onnx":
            raise
        print(f"note: running {bundle.name} with torch: its onnxruntime export failed ({first_line(e)})",
              file=sys.stderr)
        return None
    if exported and path is not None:
        evict_exports(folder, path.stem, bundle)
    return backend
