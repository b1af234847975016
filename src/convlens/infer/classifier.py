"""Prediction: the :class:`Classifier` behind ``convlens.load``, ``convlens predict`` and serving.

A classifier is a bundle's metadata (classes, :class:`Preprocessing`, output activation,
threshold) plus a *backend* that maps normalised float32 NCHW input to logits. The torch
backend lives here; the ONNX backend (``convlens.infer.onnx_backend.OnnxBackend``) is
torch-free. torch is therefore never imported at module level: ``convlens predict model.onnx``
runs with numpy, Pillow and onnxruntime only.

Preprocessing always comes from the bundle (``meta.preprocessing``): decode EXIF-upright RGB,
resize by the stored policy, then ``(x * scale - mean) / std``. Nothing here re-implements it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from convlens.data.inputs import (
    TTA_MODES,
    ImageInput,
    as_list,
    load_input,
    name_of,
    tta_views,
)
from convlens.data.preprocess import Preprocessing
from convlens.decision import decide, probabilities
from convlens.errors import BundleError, ConfigError, ImageError
from convlens.infer.bundle import BundleMeta

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from convlens.explain import Explanation


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
    """Maps model input to logits ``N x out_units``: normalised float32 ``N x C x H x W``
    (``logits``), or uint8 ``N x H x W x C`` images normalised by ``prep`` (``image_logits``,
    what a classifier calls: a backend may normalise in its own, faster way)."""

    def logits(self, x: np.ndarray) -> np.ndarray: ...

    def image_logits(self, images: np.ndarray, prep: Preprocessing) -> np.ndarray: ...


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

    def image_logits(self, images: np.ndarray, prep: Preprocessing) -> np.ndarray:
        """uint8 NHWC images -> logits, normalised on the device by torch (multi-threaded, and
        straight into bf16 when that holds the input exactly: see ``to_model_input``)."""
        import torch

        from convlens.data.loader import to_model_input
        from convlens.runtime import model_logits

        images = np.ascontiguousarray(images)
        with warnings.catch_warnings():  # a read-only array (a memory map, a view) is only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            x = torch.from_numpy(images).to(self.device)
        x = to_model_input(x, prep, channels_last=self.channels_last, low_precision=self.dev.amp_dtype)
        return model_logits(self.model, x, self.dev).cpu().numpy().reshape(len(images), -1)

    @property
    def explain_methods(self) -> tuple[str, ...]:
        """All three methods with a GAP + dense head; Grad-CAM and Grad-CAM++ on any other."""
        from convlens.explain.cam import methods_for

        return methods_for(self.model)

    def class_maps(self, x: np.ndarray, method: str, class_index: list[int]) -> np.ndarray:
        """Raw feature-resolution maps ``(N, h, w)`` of ``class_index`` (one per image)."""
        from convlens.explain.cam import run_method

        return run_method(method, self.model, self.tensor(x), class_index).maps.float().cpu().numpy()


def _tta_mode(tta: bool | str) -> str | None:
    if tta is False or tta is None or tta == "":
        return None
    if tta is True:
        return "flip"
    if isinstance(tta, str) and tta in TTA_MODES:
        return tta
    raise ConfigError(f"tta must be False, True, 'flip' or 'crops'. Received: tta={tta!r}")


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
        x = self.preprocessing.center_crop(x)  # images at the bundle's decode size: its centre crop
        h, w = self.preprocessing.size
        if x.ndim != 4 or x.shape[1:] != (h, w, self.preprocessing.channels):
            raise ConfigError(
                f"predict_proba takes N x {h} x {w} x {self.preprocessing.channels} uint8 images "
                f"(use predict() for images of any size). Received: shape={x.shape}"
            )
        mode = _tta_mode(tta)
        if mode == "flip" and self.meta.flip_average:
            mode = None  # the model already averages each image with its mirror
        views = tta_views(x, mode, self.preprocessing) if mode else [x]
        probs = [probabilities(self.backend.image_logits(v, self.preprocessing), self.output_activation)
                 for v in views]
        # Average probabilities, not logits: each view is a full prediction.
        return np.mean(probs, axis=0)

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Class indices from probabilities: argmax, or the threshold for a sigmoid model."""
        t = self._threshold(threshold)
        return decide(probs, self.output_activation, 0.5 if t is None else t)

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
        orders = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [Prediction(path=name, label=self.classes[i], index=int(i), probability=float(p[i]),
                           probabilities=dict(zip(self.classes, map(float, p), strict=True)),
                           top_k=[(self.classes[j], float(p[j])) for j in order])
                for name, p, i, order in zip(names, probs, idx, orders, strict=True)]

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
        check_positive(top_k=top_k, batch_size=batch_size)
        self._threshold(threshold)  # fail before any work
        _tta_mode(tta)
        prep = self.preprocessing

        def load(src: Any) -> np.ndarray | ImageError:
            try:
                return load_input(src, prep)
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
                    names = [name_of(chunk[i]) for i in good]
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
        for r in self.iter_predict(as_list(x), top_k=top_k, tta=tta, threshold=threshold,
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

        return explain_inputs(self, as_list(x), method=method, class_name=class_name, threshold=threshold)

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


def check_positive(**values: int) -> None:
    for k, v in values.items():
        if int(v) < 1:
            raise ConfigError(f"{k} must be at least 1. Received: {k}={v}")


# ----------------------------------------------------------------------------- loading
def load(path: str | os.PathLike[str], device: str = "auto", precision: str = "auto") -> Classifier:
    """Load a model bundle (``.convlens``, or a folder holding ``model.convlens``) or an ONNX file.

    ``precision``: ``auto`` (bf16 where the hardware has it natively, unless training measured
    bf16 moving this model's probabilities too far: then fp32), ``bf16`` or ``fp32``;
    ONNX models run in fp32.
    """
    from convlens.runtime import check_inference_precision

    check_inference_precision(precision)  # before reading a model, for ONNX files too
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.suffix.lower() == ".onnx":
        if not p.is_file():
            raise BundleError(f"ONNX model {str(p)!r} does not exist; check the path")
        if str(precision).lower() == "bf16":
            raise ConfigError(f"ONNX models run in fp32; use --precision auto or fp32. Received: precision={precision!r}")
        from convlens.infer.onnx_backend import OnnxBackend

        backend = OnnxBackend(p)
        return Classifier(backend.meta, backend)
    from convlens.infer.bundle import load_model

    model, meta = load_model(p, device="cpu")
    return Classifier(meta, TorchBackend(model, device, meta.inference_precision(precision)))
