"""Prediction: the :class:`Classifier` behind ``convlens.load``, ``convlens predict`` and serving.

A classifier is a bundle's metadata (classes, :class:`Preprocessing`, output activation,
threshold) plus a *backend* that maps normalised float32 NCHW input to logits. The torch
backend lives here; the ONNX backend (``convlens.export.onnx_backend.OnnxBackend``) is
torch-free. torch is therefore never imported at module level: ``convlens predict model.onnx``
runs with numpy, Pillow and onnxruntime only.

Preprocessing always comes from the bundle (``meta.preprocessing``): decode EXIF-upright RGB,
resize by the stored policy, then ``(x * scale - mean) / std``. Nothing here re-implements it.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np
from PIL import Image, ImageOps

from convlens.bundle import BundleMeta
from convlens.data.decode import FORMAT_EXTENSIONS
from convlens.data.preprocess import Preprocessing
from convlens.errors import BundleError, ConfigError, ImageError, UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from convlens.explain import Explanation

# One image as the Python API accepts it.
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]  # noqa: UP007 - runtime alias on 3.10

# Files a folder walk never offers as images: OS/desktop metadata (also any dot-file).
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}
SYSTEM_DIRS = {"__macosx", "$recycle.bin", "system volume information", "@eadir"}
IMAGE_SUFFIXES = frozenset(s for exts in FORMAT_EXTENSIONS.values() for s in exts)

TTA_MODES = ("flip", "crops")
CROP_FRACTION = 0.875  # side of each TTA crop relative to the model input


class NoMatchError(UserError):
    """A path argument that names no file, folder or glob match."""


# ----------------------------------------------------------------------------- results
@dataclass
class Prediction:
    """The prediction for one image.

    ``label``/``index``/``probability`` are the decision (for a two-class sigmoid model the
    positive class wins when its probability reaches the threshold) and that label's
    probability; ``probabilities`` holds every class; ``top_k`` the k most probable classes,
    highest first.
    """

    path: str | None
    label: str
    index: int
    probability: float
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top_k"] = [[c, p] for c, p in self.top_k]
        return d


# ----------------------------------------------------------------------------- backends
class Backend(Protocol):
    """Maps normalised float32 ``N x C x H x W`` input to logits ``N x out_units``."""

    def logits(self, x: np.ndarray) -> np.ndarray: ...


class TorchBackend:
    """Runs a ``ConvlensModel`` on ``device`` in ``precision`` (``auto``: bf16 where the hardware
    has it natively, else fp32; see :func:`convlens.runtime.inference_device`)."""

    def __init__(self, model: torch.nn.Module, device: str = "auto", precision: str = "auto") -> None:
        import torch

        from convlens.runtime import inference_device

        self.dev = inference_device(device, precision)
        self.device = self.dev.device
        self.precision = self.dev.precision
        self.model = model.to(self.device).eval()
        # channels_last is 1.3-1.8x faster for convolutions on these CPUs (DEVELOPERS.md).
        self.channels_last = self.device.split(":")[0] in ("cpu", "cuda")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def tensor(self, x: np.ndarray) -> torch.Tensor:
        """Normalised numpy NCHW -> a float32 tensor on the device, in the model's layout."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def logits(self, x: np.ndarray) -> np.ndarray:
        from convlens.runtime import model_logits

        return model_logits(self.model, self.tensor(x), self.dev).cpu().numpy().reshape(len(x), -1)


def probabilities(logits: np.ndarray, activation: str) -> np.ndarray:
    """Logits ``N x out_units`` -> probabilities ``N x num_classes`` (float64).

    One sigmoid unit gives two classes: ``p1 = sigmoid(z)``, ``p0 = 1 - p1``. The tanh form
    of the sigmoid and the max-shifted softmax cannot overflow for any logit.
    """
    z = np.asarray(logits, dtype=np.float64)
    z = z.reshape(len(z), -1)
    if activation == "sigmoid":
        if z.shape[1] != 1:
            raise BundleError(f"a sigmoid model must have one output unit. Received: {z.shape[1]} units")
        p1 = 0.5 * (1.0 + np.tanh(0.5 * z[:, 0]))
        return np.stack([1.0 - p1, p1], axis=1)
    if activation != "softmax":
        raise BundleError(f"output_activation must be 'sigmoid' or 'softmax'. Received: {activation!r}")
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- paths
def _is_hidden_or_system(p: Path) -> bool:
    name = p.name
    return name.startswith(".") or name.startswith("~$") or name.lower() in SYSTEM_FILES


def _walk(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` (recursive, sorted), and how many other files were passed over.

    Hidden and system files/folders are skipped. In folders a file is offered when its
    extension is an image one or it has none (content decides later); files the user names
    directly are always tried, whatever their extension.
    """
    found: list[Path] = []
    ignored = 0
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d.lower() not in SYSTEM_DIRS)
        for name in sorted(files):
            p = Path(root) / name
            if _is_hidden_or_system(p):
                continue
            suffix = p.suffix.lower()
            if suffix in IMAGE_SUFFIXES or suffix == "":
                found.append(p)
            else:
                ignored += 1
    return found, ignored


def expand_paths(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], int]:
    """Expand files, folders (recursive) and globs into a sorted, de-duplicated file list.

    Globs are expanded here (``*``, ``?``, ``[...]`` and ``**``), so quoted globs work too.
    Returns ``(files, ignored)`` where ``ignored`` counts non-image files passed over in
    folders. A path that matches nothing raises :class:`NoMatchError`.
    """
    out: list[Path] = []
    seen: set[str] = set()
    ignored = 0

    def add(p: Path) -> None:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(p)

    for raw in paths:
        text = os.path.expanduser(os.fspath(raw))
        p = Path(text)
        if p.is_file():
            add(p)
            continue
        if p.is_dir():
            files, n = _walk(p)
            ignored += n
            if not files:
                raise NoMatchError(f"folder {text!r} holds no image files; pass image files, folders or globs")
            for f in files:
                add(f)
            continue
        matches = sorted(glob.glob(text, recursive=True)) if glob.has_magic(text) else []
        got = 0
        for m in matches:
            mp = Path(m)
            if mp.is_dir():
                files, n = _walk(mp)
                ignored += n
            elif mp.is_file() and not _is_hidden_or_system(mp):
                files = [mp]
            else:
                files = []
            for f in files:
                add(f)
            got += len(files)
        if not got:
            what = "glob" if glob.has_magic(text) else "path"
            raise NoMatchError(f"{what} {text!r} matches no image file; check the path. Received: {text!r}")
    return out, ignored


# ----------------------------------------------------------------------------- inputs
def _name_of(src: Any) -> str | None:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return getattr(src, "filename", None) or None


def _as_list(x: Any) -> list[Any]:
    """One input or a sequence of inputs -> a list of single images."""
    if isinstance(x, (str, os.PathLike, Image.Image)):
        return [x]
    if isinstance(x, np.ndarray):
        # N x H x W x C (C in 1, 3, 4) is a batch of images; anything else is one image.
        return list(x) if x.ndim == 4 else [x]
    if isinstance(x, Iterable):
        return list(x)
    raise ConfigError(
        "predict() takes a path, a list of paths, a PIL image or an H x W x 3 uint8 RGB array. "
        f"Received: {type(x).__name__}"
    )


def _load_input(src: Any, prep: Preprocessing) -> np.ndarray:
    """One input -> uint8 ``H x W x C`` at the model's size, through the bundle's Preprocessing."""
    if isinstance(src, (str, os.PathLike)):
        return prep.load(src)
    if isinstance(src, Image.Image):
        # A user's Image.open() result is not yet upright; files go through decode(), which is.
        return prep.from_pil(ImageOps.exif_transpose(src) or src)
    if isinstance(src, np.ndarray):
        return prep.from_array(src)
    raise ConfigError(
        "an image must be a path, a PIL image or an H x W x 3 uint8 RGB array. "
        f"Received: {type(src).__name__}"
    )


def _tta_mode(tta: bool | str) -> str | None:
    if tta is False or tta is None or tta == "":
        return None
    if tta is True:
        return "flip"
    if isinstance(tta, str) and tta in TTA_MODES:
        return tta
    raise ConfigError(f"tta must be False, True, 'flip' or 'crops'. Received: tta={tta!r}")


def _resize_uint8(img: np.ndarray, size_hw: tuple[int, int], prep: Preprocessing) -> np.ndarray:
    h, w = size_hw
    gray = img.shape[2] == 1
    pil = Image.fromarray(img[:, :, 0] if gray else img, "L" if gray else "RGB")
    method = Image.Resampling.BILINEAR if prep.interpolation == "bilinear" else Image.Resampling.NEAREST
    arr = np.asarray(pil.resize((w, h), method), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def tta_views(batch: np.ndarray, mode: str, prep: Preprocessing) -> list[np.ndarray]:
    """Test-time-augmentation views of a uint8 ``N x H x W x C`` batch at the model size.

    ``flip``: the batch and its horizontal mirror. ``crops``: additionally the four corner
    crops and the centre crop, each ``CROP_FRACTION`` of a side and resized back to the
    input size with the bundle's interpolation, each with its mirror (12 views in all).
    """
    views = [batch]
    if mode == "crops":
        n, h, w, _ = batch.shape
        ch, cw = max(1, round(h * CROP_FRACTION)), max(1, round(w * CROP_FRACTION))
        for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)):
            crops = batch[:, top:top + ch, left:left + cw]
            views.append(np.stack([_resize_uint8(c, (h, w), prep) for c in crops]))
    return views + [np.ascontiguousarray(v[:, :, ::-1]) for v in views]


# ----------------------------------------------------------------------------- classifier
class Classifier:
    """A ready-to-use classifier: ``clf.predict(x)``, ``clf.predict_proba(batch)``, ``clf.explain(x)``."""

    def __init__(self, meta: BundleMeta, backend: Backend) -> None:
        self.meta = meta
        self.backend = backend
        self.classes: list[str] = list(meta.classes)
        self.preprocessing: Preprocessing = meta.preprocessing
        self.output_activation = meta.output_activation
        if self.output_activation == "sigmoid" and len(self.classes) != 2:
            raise BundleError(f"a sigmoid model must have exactly 2 classes. Received: classes={self.classes}")

    @classmethod
    def from_model(cls, model: torch.nn.Module, meta: BundleMeta, device: str = "auto") -> Classifier:
        """Wrap an in-memory ``ConvlensModel`` (e.g. straight after training)."""
        return cls(meta, TorchBackend(model, device))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        h, w = self.preprocessing.size
        return (f"Classifier(classes={self.classes}, input={h}x{w}x{self.preprocessing.channels}, "
                f"backend={type(self.backend).__name__})")

    # -- numbers ---------------------------------------------------------------------
    def predict_proba(self, batch: np.ndarray, *, tta: bool | str = False) -> np.ndarray:
        """uint8 ``N x H x W x C`` images already at the model size -> ``N x num_classes``."""
        x = np.asarray(batch)
        if x.dtype != np.uint8:
            raise ConfigError(f"predict_proba takes uint8 images (0-255). Received: dtype={x.dtype}")
        if x.ndim == 3:
            x = x[None]
        h, w = self.preprocessing.size
        if x.ndim != 4 or x.shape[1:] != (h, w, self.preprocessing.channels):
            raise ConfigError(
                f"predict_proba takes N x {h} x {w} x {self.preprocessing.channels} uint8 images "
                f"(use predict() for images of any size). Received: shape={x.shape}"
            )
        mode = _tta_mode(tta)
        views = tta_views(x, mode, self.preprocessing) if mode else [x]
        probs = [probabilities(self.backend.logits(self.preprocessing.normalize(v)), self.output_activation)
                 for v in views]
        # Average probabilities, not logits: each view is a full prediction.
        return np.mean(probs, axis=0)

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Class indices from probabilities: argmax, or the threshold for a sigmoid model."""
        t = self._threshold(threshold)
        if t is not None:
            return (probs[:, 1] >= t).astype(np.int64)
        return probs.argmax(axis=1)

    def _threshold(self, threshold: float | None) -> float | None:
        if self.output_activation != "sigmoid":
            if threshold is not None:
                raise ConfigError(
                    f"threshold applies to two-class (sigmoid) models; this model has {self.num_classes} "
                    f"classes (softmax), so drop it. Received: threshold={threshold}"
                )
            return None
        t = self.meta.threshold if threshold is None else float(threshold)
        if not 0.0 < t < 1.0:
            raise ConfigError(f"threshold must be between 0 and 1 (exclusive). Received: threshold={t}")
        return t

    def _predictions(self, names: Sequence[str | None], probs: np.ndarray, top_k: int,
                     threshold: float | None) -> list[Prediction]:
        idx = self.decide(probs, threshold)
        k = min(top_k, self.num_classes)
        out = []
        for name, p, i in zip(names, probs, idx, strict=True):
            order = np.argsort(-p, kind="stable")[:k]
            out.append(Prediction(
                path=name, label=self.classes[i], index=int(i), probability=float(p[i]),
                probabilities={c: float(v) for c, v in zip(self.classes, p, strict=True)},
                top_k=[(self.classes[j], float(p[j])) for j in order],
            ))
        return out

    # -- images ----------------------------------------------------------------------
    def iter_predict(
        self,
        sources: Sequence[Any],
        *,
        top_k: int = 1,
        tta: bool | str = False,
        threshold: float | None = None,
        batch_size: int = 32,
        on_batch: Callable[[int], None] | None = None,
    ) -> Iterator[Prediction | ImageError]:
        """Predict ``sources`` in order, yielding a Prediction or the ImageError of each.

        Decoding runs in a small thread pool (Pillow releases the GIL while decoding and
        resizing) one batch ahead of the model.
        """
        _check_positive(top_k=top_k, batch_size=batch_size)
        self._threshold(threshold)  # fail before any work
        _tta_mode(tta)
        prep = self.preprocessing

        def load(src: Any) -> np.ndarray | ImageError:
            try:
                return _load_input(src, prep)
            except ImageError as e:
                return e

        chunks = [list(sources[i:i + batch_size]) for i in range(0, len(sources), batch_size)]
        workers = max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = [pool.map(load, chunks[0])] if chunks else []
            for ci, chunk in enumerate(chunks):
                loaded = list(pending.pop(0))
                if ci + 1 < len(chunks):
                    pending.append(pool.map(load, chunks[ci + 1]))
                good = [i for i, a in enumerate(loaded) if isinstance(a, np.ndarray)]
                results: list[Prediction | ImageError] = list(loaded)  # type: ignore[arg-type]
                if good:
                    probs = self.predict_proba(np.stack([loaded[i] for i in good]), tta=tta)
                    names = [_name_of(chunk[i]) for i in good]
                    for i, pred in zip(good, self._predictions(names, probs, top_k, threshold), strict=True):
                        results[i] = pred
                yield from results
                if on_batch:
                    on_batch(len(chunk))

    def predict(
        self,
        x: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 1,
        tta: bool | str = False,
        threshold: float | None = None,
        batch_size: int = 32,
        errors: str = "raise",
    ) -> list[Prediction]:
        """Predict a path, a list of paths, a PIL image or an ``H x W x 3`` uint8 RGB array.

        Always returns a list (one :class:`Prediction` per image). A bad image raises
        :class:`ImageError`, or is left out with ``errors="skip"``.
        """
        if errors not in ("raise", "skip"):
            raise ConfigError(f"errors must be 'raise' or 'skip'. Received: errors={errors!r}")
        out: list[Prediction] = []
        for r in self.iter_predict(_as_list(x), top_k=top_k, tta=tta, threshold=threshold,
                                   batch_size=batch_size):
            if isinstance(r, ImageError):
                if errors == "raise":
                    raise r
                continue
            out.append(r)
        return out

    # -- explanations ----------------------------------------------------------------
    def explanations(self, x: ImageInput | Sequence[ImageInput], *, method: str = "cam",
                     class_name: str | None = None, threshold: float | None = None) -> list[Explanation]:
        """Full explanations (image, heat map, label, probability) for each input."""
        from convlens.explain import explain_inputs

        model = getattr(self.backend, "model", None)
        if model is None:
            raise UserError(
                "explanations need gradients and feature maps, which ONNX models do not expose; "
                "load the .convlens bundle instead"
            )
        return explain_inputs(self, _as_list(x), method=method, class_name=class_name,
                              threshold=threshold)

    def explain(self, x: ImageInput | Sequence[ImageInput], method: str = "cam",
                class_name: str | None = None) -> np.ndarray | list[np.ndarray]:
        """Heat map ``H x W`` float32 in [0, 1] at the original image size (a list for a list).

        ``method``: ``cam`` (exact, GAP + dense models), ``gradcam`` or ``gradcam++``.
        ``class_name`` defaults to the predicted class.
        """
        many = not isinstance(x, (str, os.PathLike, Image.Image)) and not (
            isinstance(x, np.ndarray) and x.ndim != 4)
        heats = [e.heat for e in self.explanations(x, method=method, class_name=class_name)]
        return heats if many else heats[0]

    def class_index(self, class_name: str) -> int:
        """Index of ``class_name``; a one-line error listing the classes otherwise."""
        if class_name in self.classes:
            return self.classes.index(class_name)
        raise ConfigError(f"unknown class; this model's classes are {', '.join(self.classes)}. "
                          f"Received: class={class_name!r}")


def _check_positive(**values: int) -> None:
    for k, v in values.items():
        if int(v) < 1:
            raise ConfigError(f"{k} must be at least 1. Received: {k}={v}")


# ----------------------------------------------------------------------------- loading
def load(path: str | os.PathLike[str], device: str = "auto", precision: str = "auto") -> Classifier:
    """Load a model bundle (``.convlens``, or a folder holding ``model.convlens``) or an ONNX file.

    ``precision``: ``auto`` (bf16 where the hardware has it natively), ``bf16`` or ``fp32``;
    ONNX models run in fp32.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.suffix.lower() == ".onnx":
        if not p.is_file():
            raise BundleError(f"ONNX model {str(p)!r} does not exist; check the path")
        if str(precision).lower() == "bf16":
            raise ConfigError(f"ONNX models run in fp32; use --precision auto or fp32. Received: precision={precision!r}")
        from convlens.export.onnx_backend import OnnxBackend

        backend = OnnxBackend(p)
        return Classifier(backend.meta, backend)
    from convlens.bundle import load_model

    model, meta = load_model(p, device="cpu")
    return Classifier(meta, TorchBackend(model, device, precision))


# ----------------------------------------------------------------------------- command
def _display(p: str | None, base: str | None = None) -> str:
    """A short name for tables: relative to ``base`` (or the working folder when inside it)."""
    if p is None:
        return "<image>"
    for root in (base, os.getcwd()) if base else (os.getcwd(),):
        try:
            rel = os.path.relpath(p, root)
        except ValueError:  # another drive on Windows
            continue
        if not rel.startswith(".."):
            return rel
    return p


def display_base(paths: Sequence[str | os.PathLike[str] | None]) -> str | None:
    """The common folder of ``paths`` when they are not all under the working folder, else None."""
    real = [os.path.abspath(os.fspath(p)) for p in paths if p is not None]
    if not real:
        return None
    cwd = os.getcwd()
    if all(not os.path.relpath(p, cwd).startswith("..") for p in real):
        return None
    try:
        return os.path.dirname(real[0]) if len(real) == 1 else os.path.commonpath([os.path.dirname(p) for p in real])
    except ValueError:  # mixed drives
        return None


def write_predictions(path: str | os.PathLike[str], classes: Sequence[str],
                      results: Sequence[Prediction | ImageError], model: str = "") -> None:
    """Write every input's prediction (all class probabilities) atomically as CSV or JSON.

    Unreadable files appear too, with an empty label and their error, so each input has a row.
    """
    from convlens.io import write_json, write_text

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
    w.writerow(["path", "label", "probability", *(f"p_{c}" for c in classes), "error"])
    for r in results:
        if isinstance(r, Prediction):
            # repr() of a float round-trips: the file holds the exact probabilities.
            w.writerow([r.path, r.label, repr(r.probability),
                        *(repr(r.probabilities[c]) for c in classes), ""])
        else:
            w.writerow([r.path, "", "", *([""] * len(classes)), f"{r.kind}: {r.message}"])
    write_text(p, buf.getvalue())


def print_skipped(skipped: Sequence[ImageError], console: Any) -> None:
    """List unreadable files with their reasons (stderr)."""
    if not skipped:
        return
    console.print(f"[yellow]skipped {len(skipped)} unreadable file{'s' if len(skipped) != 1 else ''}:[/]")
    for e in skipped:
        console.print(f"  {_display(e.path)}: {e.message}", markup=False, highlight=False)


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
) -> int:
    """``convlens predict``: table on stdout, skipped files on stderr, optional CSV/JSON.

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
    from rich.table import Table

    from convlens.runtime import tune_allocator

    _check_positive(top_k=top_k, batch_size=batch_size)
    if out is not None and Path(out).suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--out must end in .csv or .json. Received: out={out!r}")
    files, ignored = expand_paths(paths)
    tune_allocator()
    clf = load(model, device=device, precision=precision)
    clf._threshold(threshold)
    stdout, stderr = Console(), Console(stderr=True)

    results: list[Prediction | ImageError] = []
    show_bar = len(files) > batch_size
    with Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=stderr, transient=True, disable=not show_bar) as bar:
        task = bar.add_task("predict", total=len(files))
        for r in clf.iter_predict(files, top_k=top_k, tta=tta, threshold=threshold,
                                  batch_size=batch_size, on_batch=lambda n: bar.advance(task, n)):
            results.append(r)

    preds = [r for r in results if isinstance(r, Prediction)]
    skipped = [r for r in results if isinstance(r, ImageError)]
    if preds:
        base = display_base([pr.path for pr in preds])
        table = Table(show_edge=False, header_style="bold",
                      caption=f"paths relative to {base}" if base else None)
        table.add_column("file", overflow="fold")
        table.add_column("label")
        table.add_column("probability", justify="right")
        if top_k > 1:
            table.add_column(f"top-{min(top_k, clf.num_classes)}")
        limit = 50 if out else len(preds)  # the file holds everything; keep the terminal readable
        for pr in preds[:limit]:
            row = [_display(pr.path, base), pr.label, f"{pr.probability:.4f}"]
            if top_k > 1:
                row.append(", ".join(f"{c} {p:.3f}" for c, p in pr.top_k))
            table.add_row(*row)
        stdout.print(table)
        if len(preds) > limit:
            stdout.print(f"... and {len(preds) - limit} more in {out}")
    if out:
        write_predictions(out, clf.classes, results, model=os.fspath(model))
        stderr.print(f"wrote {len(results)} rows to {out}", highlight=False)
    if ignored:
        stderr.print(f"passed over {ignored} non-image file{'s' if ignored != 1 else ''} in folders "
                     "(name image files directly to try them anyway)", highlight=False)
    print_skipped(skipped, stderr)
    sys.stdout.flush()
    return 1 if skipped else 0
