"""Which engine runs a bundle's predictions: PyTorch, or onnxruntime over a cached, verified export.

``engine="auto"`` (every inference verb's default) picks onnxruntime when the bundle predicts in
fp32 on a CPU: on the default model (EfficientNet-Lite0, 224 px) it ran 2x faster than PyTorch
fp32 (batch 32; 3x at batch 1), with probabilities within 5e-7 (docs/benchmarks.md, "Engines"). bf16 (PyTorch only) and GPUs stay on
torch. ``torch`` / ``onnx`` force one; ``onnx`` refuses a bf16 request or a GPU device.

The ONNX file is exported once per bundle content, verified against PyTorch exactly as
``convlens export`` verifies (:func:`convlens.export.onnx.export_onnx`), with an extra ``pooled``
output so the bundle's novelty index scores the features in numpy as on the torch path (and
``--neighbours`` works). It lives under ``<convlens cache dir>/onnx/KEY.onnx`` with a
``KEY.json`` record of its SHA-256; KEY hashes the bundle's metadata, the SHA-256 of its weights
as stored (computed, not the recorded value), and the convlens, torch, onnx and onnxruntime
versions. A file whose bytes do not match its record is exported again, never trusted. On a
cache hit nothing here imports torch. Explain methods the graph cannot draw (Grad-CAM) load the
bundle's torch model on first use (:class:`BundleOnnxBackend`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from convlens.config import ENGINES, check_choice
from convlens.errors import ConfigError, first_line
from convlens.infer.bundle import BundleMeta, weights_digest
from convlens.infer.onnx_backend import OnnxBackend

# Bump when the cached graph's layout changes (its outputs, how it is verified).
CACHE_FORMAT = 1
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
    if dev == "auto" or prec == "auto":  # what auto means here needs torch (a GPU? native bf16?)
        from convlens.runtime import inference_device

        resolved = inference_device(dev, prec)
        if resolved.type != "cpu" or resolved.precision != "fp32":
            return "torch"
    return "onnx"


def onnx_threads() -> int:
    """onnxruntime's intra-op threads: one per usable core, as torch gets (runtime.configure_threads)."""
    from convlens.runtime import usable_cores

    return usable_cores()


# ----------------------------------------------------------------------------- the cache
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(bundle: str | os.PathLike[str], meta: BundleMeta) -> str:
    """What the cached export depends on: the bundle's metadata and weights, and the tool versions."""
    from convlens import __version__

    doc = {"format": CACHE_FORMAT, "meta": meta.to_json(), "weights_sha256": weights_digest(bundle),
           "novelty_sha256": (meta.novelty or {}).get("sha256"), "convlens": __version__,
           **{pkg: _version(pkg) for pkg in ("torch", "onnx", "onnxruntime")}}
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


def cached_onnx(bundle: str | os.PathLike[str], meta: BundleMeta, folder: Path | None = None,
                before_export: Callable[[], object] | None = None, export: bool = True) -> tuple[Path | None, bool]:
    """The verified fp32 ONNX export of ``bundle`` (with a ``pooled`` output) and whether it was
    exported now (``before_export`` is called first); with ``export=False`` only a cached one
    (else ``(None, False)``). Raises :class:`convlens.export.onnx.ExportError` when it cannot
    be exported."""
    key = cache_key(bundle, meta)
    folder = folder or cache_folder()
    model, record = folder / f"{key}.onnx", folder / f"{key}.json"
    if _cached(model, record, key):
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
                        "bundle": os.fspath(bundle)})
    return model, True


# ----------------------------------------------------------------------------- the backend
class BundleOnnxBackend(OnnxBackend):
    """An :class:`OnnxBackend` over a bundle's cached export. It draws the exact CAM from the
    graph; Grad-CAM and Grad-CAM++ come from the bundle's torch model (``torch_backend()``,
    called once, on first use: serving and predicting never need it)."""

    device = "cpu"
    precision = "fp32"  # what this engine computes in, named as TorchBackend names it

    def __init__(self, path: Path, torch_backend: Callable[[], Any], *, threads: int = 0) -> None:
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
                self._torch = self._make_torch()
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
    try:
        path, _ = cached_onnx(bundle, meta, export=not short, before_export=lambda: print(
            f"note: preparing {bundle.name} for onnxruntime (a verified export, once: later runs reuse it; "
            "--engine torch skips it)", file=sys.stderr, flush=True))
    except (ExportError, OSError) as e:  # a damaged bundle (BundleError) is never papered over
        if engine == "onnx":
            raise
        print(f"note: running {bundle.name} with torch: its onnxruntime export failed ({first_line(e)})",
              file=sys.stderr)
        return None
    return None if path is None else BundleOnnxBackend(path, torch_backend, threads=onnx_threads())
