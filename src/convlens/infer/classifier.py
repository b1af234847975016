"""Prediction: the :class:`Classifier` behind ``convlens.load``, ``convlens predict`` and serving.

A classifier is a bundle's metadata (classes, :class:`Preprocessing`, output activation,
threshold) plus a *backend* that maps normalised float32 NCHW input to logits, and the bundle's
novelty index (:mod:`convlens.infer.novelty`) when it has one: then every prediction carries a
``novelty`` score and is ``unknown`` above the bundle's threshold. The torch backend lives here
(pooled features in the same pass as the logits, scored against the index in numpy); the ONNX
backend (``convlens.infer.onnx_backend.OnnxBackend``) computes the score inside the graph and is
torch-free. torch is therefore never imported at module level: ``convlens predict model.onnx``
runs with numpy, Pillow and onnxruntime only.

Preprocessing always comes from the bundle (``meta.preprocessing``): decode EXIF-upright RGB,
resize by the stored policy, then ``(x * scale - mean) / std``. Nothing here re-implements it.
"""

from __future__ import annotations

import contextlib
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
from convlens.infer.novelty import NoveltyIndex

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from convlens.explain import Explanation


# ----------------------------------------------------------------------------- results
UNKNOWN = "unknown"  # the label of a prediction whose image is unlike the training images


@dataclass
class Prediction:
    """The prediction for one image.

    ``index``/``probability`` are the model's class decision (for a two-class sigmoid model the
    positive class wins when its probability reaches the threshold) and that class's
    probability; ``probabilities`` holds every class; ``top_k`` the k most probable classes,
    highest first. ``label`` is ``classes[index]``, or ``"unknown"`` when ``known`` is False.

    ``novelty`` is how unlike the training images the image is (cosine distance to the k-th
    nearest training image's features, 0 to 2; None for a model trained before novelty
    existed). ``known`` is False when rejection is on and ``novelty`` is above the model's
    threshold; ``index``, ``probability``, ``probabilities`` and ``top_k`` then still say what
    the model would have answered. A model may have a class literally named ``unknown``:
    ``known`` is the truth, not the label. ``neighbours`` (when asked for) lists the most
    similar training images, best first: ``{"path", "class", "similarity"}``.
    """

    path: str | None
    label: str
    index: int
    probability: float
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]] = field(default_factory=list)
    novelty: float | None = None
    known: bool = True
    neighbours: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top_k"] = [[c, p] for c, p in self.top_k]
        return d


# ----------------------------------------------------------------------------- backends
class Backend(Protocol):
    """Maps model input to logits ``N x out_units``: normalised float32 ``N x C x H x W``
    (``logits``), or uint8 ``N x H x W x C`` images normalised by ``prep`` (``image_logits``,
    what a classifier calls: a backend may normalise in its own, faster way).

    ``image_outputs`` returns ``(logits, pooled)``, the model's pooled features (N x C) from the
    same forward pass, which a classifier with a novelty index scores. A backend that scores
    novelty itself (the ONNX graph) instead sets ``has_novelty`` and implements
    ``image_novelty(images, prep) -> (logits, novelty)``.
    """

    def logits(self, x: np.ndarray) -> np.ndarray: ...

    def image_logits(self, images: np.ndarray, prep: Preprocessing) -> np.ndarray: ...

    def image_outputs(self, images: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]: ...


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

    def image_input(self, images: np.ndarray, prep: Preprocessing) -> torch.Tensor:
        """uint8 NHWC images -> the model's input, normalised on the device by torch
        (multi-threaded, and straight into bf16 when that holds the input exactly: see
        ``to_model_input``)."""
        import torch

        from convlens.data.loader import to_model_input

        images = np.ascontiguousarray(images)
        with warnings.catch_warnings():  # a read-only array (a memory map, a view) is only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            x = torch.from_numpy(images).to(self.device)
        return to_model_input(x, prep, channels_last=self.channels_last, low_precision=self.dev.amp_dtype)

    def image_logits(self, images: np.ndarray, prep: Preprocessing) -> np.ndarray:
        """uint8 NHWC images -> logits (see :meth:`image_input`)."""
        from convlens.runtime import model_logits

        x = self.image_input(images, prep)
        return model_logits(self.model, x, self.dev).cpu().numpy().reshape(len(images), -1)

    def image_outputs(self, images: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC images -> ``(logits, pooled)`` in one forward pass (``forward_pooled``), with
        the same normalisation, layout and precision as :meth:`image_logits`."""
        from convlens.runtime import model_pooled

        logits, pooled = model_pooled(self.model, self.image_input(images, prep), self.dev)
        return logits.cpu().numpy().reshape(len(images), -1), pooled.cpu().numpy().reshape(len(images), -1)

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
    """A ready-to-use classifier: ``clf.predict(x)``, ``clf.predict_proba(batch)``, ``clf.explain(x)``.

    ``novelty``: the bundle's :class:`NoveltyIndex` (:func:`load` reads it); without one (and
    without a backend that scores novelty itself) predictions have ``novelty=None`` and are
    never ``unknown``.
    """

    def __init__(self, meta: BundleMeta, backend: Backend, novelty: NoveltyIndex | None = None) -> None:
        self.meta = meta
        self.backend = backend
        self.novelty_index = novelty
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

    # -- novelty ---------------------------------------------------------------------
    @property
    def has_novelty(self) -> bool:
        """True when predictions carry a novelty score (and can be ``unknown``)."""
        return self.novelty_index is not None or bool(getattr(self.backend, "has_novelty", False))

    @property
    def novelty_threshold(self) -> float | None:
        """The model's novelty cut-off, chosen at training time (above it: ``unknown``); None without novelty."""
        if not self.has_novelty:
            return None
        if self.novelty_index is not None:
            return self.novelty_index.threshold
        return float((self.meta.novelty or {})["threshold"])

    @property
    def novelty_note(self) -> str | None:
        """The one line the CLI prints once per load for a model without novelty (else None)."""
        if self.has_novelty:
            return None
        return ("note: this model was trained before novelty scores existed, so no prediction is "
                "`unknown`; retrain it to get them")

    def rejection(self, reject: bool = True, novelty_threshold: float | None = None, neighbours: int = 0) -> float | None:
        """The novelty cut-off a call uses (None: nothing is rejected), after checking the options."""
        if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)) or neighbours < 0:
            raise ConfigError(f"neighbours must be a whole number, 0 or more. Received: neighbours={neighbours!r}")
        if neighbours and self.novelty_index is None:
            why = ("this ONNX model holds no training images; use its .convlens bundle" if self.has_novelty
                   else "this model was trained before novelty scores existed; retrain it")
            raise ConfigError(f"neighbours needs the training images' features in the bundle: {why}. "
                              f"Received: neighbours={neighbours}")
        if novelty_threshold is None:
            return self.novelty_threshold if reject else None
        try:
            t = float(novelty_threshold)
        except (TypeError, ValueError):
            t = float("nan")
        if not (np.isfinite(t) and t >= 0):
            raise ConfigError("novelty_threshold must be a number of 0 or more (novelty runs from 0, a training "
                              f"image, to 2). Received: novelty_threshold={novelty_threshold!r}")
        if not self.has_novelty:
            raise ConfigError("novelty_threshold needs a model with novelty scores; this one was trained before "
                              f"they existed (retrain it). Received: novelty_threshold={novelty_threshold!r}")
        if not reject:
            raise ConfigError("novelty_threshold has no effect without rejection; drop one of them. "
                              f"Received: novelty_threshold={novelty_threshold!r}, reject=False")
        return t

    def verdicts(self, decided: np.ndarray, novelty: np.ndarray | None,
                 cutoff: float | None) -> list[tuple[str, bool, float | None]]:
        """``(label, known, novelty)`` of each decided class index: ``unknown`` (not known) where
        the novelty is above ``cutoff`` (the one rule, for predictions and explanations alike)."""
        scores = [None] * len(decided) if novelty is None else [float(v) for v in novelty]
        out = []
        for i, score in zip(decided, scores, strict=True):
            known = score is None or cutoff is None or score <= cutoff
            out.append((self.classes[int(i)] if known else UNKNOWN, known, score))
        return out

    # -- numbers ---------------------------------------------------------------------
    def predict_proba(self, batch: np.ndarray, *, tta: bool | str = False) -> np.ndarray:
        """uint8 ``N x H x W x C`` images already at the model size -> ``N x num_classes``."""
        x, mode = self._checked(batch, tta)
        return self._forward(x, mode, novelty=False)[0]

    def proba_and_novelty(self, batch: np.ndarray, *, tta: bool | str = False) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`predict_proba` and the images' novelty scores (None without novelty), one pass.

        With test-time augmentation the probabilities are averaged over the views, the novelty
        is that of the plain image: the threshold was chosen on plain validation images.
        """
        x, mode = self._checked(batch, tta)
        probs, novelty, _ = self._forward(x, mode, novelty=True)
        return probs, novelty

    def _checked(self, batch: np.ndarray, tta: bool | str) -> tuple[np.ndarray, str | None]:
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
        return x, mode

    def _forward(self, x: np.ndarray, mode: str | None, novelty: bool
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Probabilities averaged over the views, and the plain view's novelty and pooled features."""
        views = tta_views(x, mode, self.preprocessing) if mode else [x]
        probs, scores, pooled = [], None, None
        for i, view in enumerate(views):
            if i == 0 and novelty and self.has_novelty:
                logits, scores, pooled = self._novelty_outputs(view)
            else:
                logits = self.backend.image_logits(view, self.preprocessing)
            probs.append(probabilities(logits, self.output_activation))
        # Average probabilities, not logits: each view is a full prediction.
        return np.mean(probs, axis=0), scores, pooled

    def _novelty_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(logits, novelty, pooled features or None) of one batch, in one forward pass."""
        if self.novelty_index is None:  # the backend scores novelty itself (the ONNX graph)
            logits, scores = self.backend.image_novelty(images, self.preprocessing)  # type: ignore[attr-defined]
            return logits, np.asarray(scores, dtype=np.float32).reshape(len(images)), None
        logits, pooled = self.backend.image_outputs(images, self.preprocessing)
        return logits, self.novelty_index.scores(pooled), pooled

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
                     threshold: float | None, novelty: np.ndarray | None = None, cutoff: float | None = None,
                     near: list[list[dict[str, Any]]] | None = None) -> list[Prediction]:
        idx = self.decide(probs, threshold)
        k = min(top_k, self.num_classes)
        orders = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        verdicts = self.verdicts(idx, novelty, cutoff)
        return [Prediction(path=name, label=label, index=int(i), probability=float(p[i]),
                           probabilities=dict(zip(self.classes, map(float, p), strict=True)),
                           top_k=[(self.classes[j], float(p[j])) for j in order],
                           novelty=score, known=known, neighbours=None if near is None else near[n])
                for n, (name, p, i, order, (label, known, score))
                in enumerate(zip(names, probs, idx, orders, verdicts, strict=True))]

    def _neighbours(self, pooled: np.ndarray, n: int) -> list[list[dict[str, Any]]]:
        """The ``n`` most similar training images of each row of ``pooled``, best first."""
        index = self.novelty_index
        assert index is not None  # rejection() refuses neighbours without an index
        return [[{"path": index.paths[j], "class": self.classes[int(index.labels[j])], "similarity": s}
                 for j, s in row] for row in index.neighbours(pooled, n)]

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
        reject: bool = True,
        novelty_threshold: float | None = None,
        neighbours: int = 0,
    ) -> Iterator[Prediction | ImageError]:
        """Predict ``sources`` in order, yielding a Prediction or the ImageError of each
        (the options as in :meth:`predict`).

        Decoding runs in a small thread pool (Pillow releases the GIL while decoding and
        resizing) one batch ahead of the model.
        """
        check_positive(top_k=top_k, batch_size=batch_size)
        self._threshold(threshold)  # fail before any work
        _tta_mode(tta)
        cutoff = self.rejection(reject, novelty_threshold, neighbours)
        prep = self.preprocessing

        def load(src: Any) -> np.ndarray | ImageError:
            try:
                return load_input(src, prep)
            except ImageError as e:
                return e

        chunks = [list(sources[i:i + batch_size]) for i in range(0, len(sources), batch_size)]
        workers = min(4, os.cpu_count() or 1, len(sources))
        with contextlib.ExitStack() as stack:
            # One image (a served request) loads inline: a pool's thread cost ~0.8 ms a request to start and join.
            mapper = stack.enter_context(ThreadPoolExecutor(max_workers=workers)).map if workers > 1 else map
            pending = [mapper(load, chunks[0])] if chunks else []
            for ci, chunk in enumerate(chunks):
                loaded = list(pending.pop(0))
                if ci + 1 < len(chunks):
                    pending.append(mapper(load, chunks[ci + 1]))
                good = [i for i, a in enumerate(loaded) if isinstance(a, np.ndarray)]
                results: list[Prediction | ImageError] = list(loaded)  # type: ignore[arg-type]
                if good:
                    preds = self._predict_batch(np.stack([loaded[i] for i in good]), [name_of(chunk[i]) for i in good],
                                                top_k=top_k, tta=tta, threshold=threshold, cutoff=cutoff,
                                                neighbours=neighbours)
                    for i, pred in zip(good, preds, strict=True):
                        results[i] = pred
                yield from results
                if on_batch:
                    on_batch(len(chunk))

    def _predict_batch(self, images: np.ndarray, names: list[str | None], *, top_k: int, tta: bool | str,
                       threshold: float | None, cutoff: float | None, neighbours: int) -> list[Prediction]:
        x, mode = self._checked(images, tta)
        probs, novelty, pooled = self._forward(x, mode, novelty=True)
        near = self._neighbours(pooled, neighbours) if neighbours and pooled is not None else None
        return self._predictions(names, probs, top_k, threshold, novelty, cutoff, near)

    def predict(
        self,
        x: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 1,
        tta: bool | str = False,
        threshold: float | None = None,
        batch_size: int = 32,
        errors: str = "raise",
        reject: bool = True,
        novelty_threshold: float | None = None,
        neighbours: int = 0,
    ) -> list[Prediction]:
        """Predict a path, a list of paths, a PIL image or an ``H x W x 3`` uint8 RGB array.

        Always returns a list (one :class:`Prediction` per image). A bad image raises
        :class:`ImageError`, or is left out with ``errors="skip"``.

        With a model that has novelty scores, an image whose ``novelty`` is above the model's
        threshold (or ``novelty_threshold``) is labelled ``unknown`` (``known=False``);
        ``reject=False`` keeps the class label (the score is still given). ``neighbours=K``
        lists the K most similar training images of each (a ``.convlens`` bundle only).
        With ``tta`` the probabilities are averaged over the views and the novelty is that of
        the plain image (the threshold was chosen on plain images).
        """
        if errors not in ("raise", "skip"):
            raise ConfigError(f"errors must be 'raise' or 'skip'. Received: errors={errors!r}")
        out: list[Prediction] = []
        for r in self.iter_predict(as_list(x), top_k=top_k, tta=tta, threshold=threshold,
                                   batch_size=batch_size, reject=reject, novelty_threshold=novelty_threshold,
                                   neighbours=neighbours):
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
def load(path: str | os.PathLike[str], device: str = "auto", precision: str = "auto",
         engine: str = "auto", images: int | None = None) -> Classifier:
    """Load a model bundle (``.convlens``, or a folder holding ``model.convlens``) or an ONNX file.

    ``precision``: ``auto`` (bf16 where the hardware has it natively, unless training measured
    bf16 moving this model's probabilities too far: then fp32), ``bf16`` or ``fp32``;
    ONNX models run in fp32. ``engine``: ``auto`` runs a bundle that predicts in fp32 on a CPU
    through onnxruntime (an export verified against PyTorch, cached under the convlens cache
    folder: the first load of a bundle exports it, a few seconds), anything else with torch;
    ``torch`` or ``onnx`` force one (:mod:`convlens.infer.engine`). ``images``: how many images
    this load will predict, when known: ``auto`` then exports only for a job long enough to pay
    for the export (a cached export is always used). A bundle's novelty index is
    read (strictly) here, once: its predictions carry ``novelty`` and can be ``unknown``
    (:class:`Prediction`).
    """
    from convlens.infer.engine import check_engine, onnx_engine, resolve_engine
    from convlens.runtime import check_inference_precision

    check_inference_precision(precision)  # before reading a model, for ONNX files too
    check_engine(engine)
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.suffix.lower() == ".onnx":
        if not p.is_file():
            raise BundleError(f"ONNX model {str(p)!r} does not exist; check the path")
        if str(precision).lower() == "bf16":
            raise ConfigError(f"ONNX models run in fp32; use --precision auto or fp32. Received: precision={precision!r}")
        if engine == "torch":
            raise ConfigError(f"an .onnx file runs with onnxruntime; use --engine auto or onnx, or pass the "
                              f".convlens bundle. Received: engine={engine!r}")
        from convlens.infer.onnx_backend import OnnxBackend

        backend = OnnxBackend(p)
        return Classifier(backend.meta, backend)
    from convlens.infer.bundle import load_model, read_meta, read_novelty

    meta = read_meta(p)
    if resolve_engine(engine, meta, device, precision) == "onnx":
        def torch_backend() -> TorchBackend:  # for the maps the graph cannot draw (Grad-CAM)
            return TorchBackend(load_model(p, device="cpu")[0], "cpu", "fp32")

        onnx = onnx_engine(p, meta, engine, torch_backend, images)
        if onnx is not None:
            return Classifier(meta, onnx, read_novelty(p, meta))
    model, meta = load_model(p, device="cpu")
    index = read_novelty(p, meta)
    return Classifier(meta, TorchBackend(model, device, meta.inference_precision(precision)), index)
