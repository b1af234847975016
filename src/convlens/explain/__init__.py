"""Explain predictions with class activation maps: ``Classifier.explain``, serve and ``convlens explain``.

Methods (see :mod:`convlens.explain.cam` for the maths and for why they are written here
rather than taken from pytorch-grad-cam): ``cam`` (exact, for global-average-pool + dense
heads), ``gradcam`` and ``gradcam++`` (any model with ``forward_features``). Explanation is
one function over a classifier's *backend*, which declares the methods it can draw
(``backend.explain_methods``) and draws raw class maps (``backend.class_maps``): the torch
backend all three (Grad-CAM only without a GAP + dense head), an ONNX model exported with a
``cam`` output the exact CAM. Maps are upsampled (bilinear) onto the ORIGINAL photo through
the bundle's resize geometry, reduced to positive evidence scaled to [0, 1], and overlaid
with a colour map. The command lives in :mod:`convlens.infer.commands`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from convlens.config import EXPLAIN_METHODS, check_choice
from convlens.data.inputs import load_input, load_original, name_of
from convlens.data.preprocess import Preprocessing
from convlens.errors import ImageError, UserError
from convlens.explain.figures import overlay

__all__ = ["Explanation", "explain_inputs", "iter_explain", "overlay", "supported_methods"]


class Explainable(Protocol):
    """What explanation needs of a classifier (``convlens.infer.Classifier`` is one)."""

    backend: Any
    classes: list[str]
    preprocessing: Preprocessing

    def proba_and_novelty(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...
    def rejection(self, reject: bool = True, novelty_threshold: float | None = None) -> float | None: ...
    def verdicts(self, decided: np.ndarray, novelty: np.ndarray | None,
                 cutoff: float | None) -> list[tuple[str, bool, float | None]]: ...
    def decide(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray: ...
    def class_index(self, class_name: str) -> int: ...


@dataclass
class Explanation:
    """One explained image.

    ``image`` is the upright original (uint8 RGB), ``heat`` the map at that size in [0, 1],
    ``raw`` the feature-resolution map before ReLU/scaling (signed for CAM). ``label`` and
    ``probability`` are the prediction (``label`` is ``unknown``, and ``known`` False, when the
    image's ``novelty`` is above the model's threshold: ``probability`` is then that of the
    model's own class, the one a default map is drawn for); ``explained`` is the class the map is for.
    """

    path: str | None
    image: np.ndarray
    heat: np.ndarray
    raw: np.ndarray
    label: str
    probability: float
    explained: str
    explained_probability: float
    method: str
    novelty: float | None = None
    known: bool = True


def check_method(method: str) -> str:
    """``method`` when it is an explanation method; else a one-line error listing them."""
    return check_choice("method", method, EXPLAIN_METHODS)


def supported_methods(backend: Any) -> tuple[str, ...]:
    """The methods a backend declares it can draw (none for a backend that declares nothing)."""
    return tuple(getattr(backend, "explain_methods", ()))


def _check_supported(clf: Explainable, method: str) -> None:
    methods = supported_methods(clf.backend)
    if method in methods:
        return
    kind = "ONNX model" if hasattr(clf.backend, "session") else "model"
    if methods:
        why = (": the exact CAM needs a model ending in global average pooling + one dense layer"
               if method == "cam" else "")
        raise UserError(f"this {kind} cannot draw {method!r} maps{why}; use one of {', '.join(methods)}")
    raise UserError(f"this {kind} cannot draw class maps: its head is not global-average-pool + dense or it "
                    "was exported without maps; explain or serve the .convlens bundle instead")


def _load_pair(src: Any, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray] | ImageError:
    """(model input at the model size, upright original) of one input, or its ImageError.

    The model input goes through exactly the same call as ``predict`` (so the label shown is
    the label predicted); the original is decoded separately at full resolution for display.
    """
    try:
        return load_input(src, prep), load_original(src, prep)
    except ImageError as e:
        return e


def _geometry() -> tuple[Callable[..., Any], Callable[..., Any]]:
    try:
        from convlens.explain.cam import normalize_heat, upsample_to_original
    except ImportError as e:  # a torch-free install: predictions still work
        raise UserError("drawing class maps needs PyTorch for the map geometry; install torch") from e
    return normalize_heat, upsample_to_original


def _explain_batch(clf: Explainable, pairs: list[tuple[np.ndarray, np.ndarray]], names: list[str | None],
                   method: str, forced: int | None, threshold: float | None) -> list[Explanation]:
    import torch

    normalize_heat, upsample_to_original = _geometry()
    prep = clf.preprocessing
    batch = np.stack([x for x, _ in pairs])
    probs, novelty = clf.proba_and_novelty(batch)
    decided = clf.decide(probs, threshold)
    verdicts = clf.verdicts(decided, novelty, clf.rejection())
    idx = decided if forced is None else np.full(len(pairs), forced)
    raw = clf.backend.class_maps(prep.normalize(batch), method, idx.tolist())
    out = []
    for j, ((_, image), name, (label, known, score)) in enumerate(zip(pairs, names, verdicts, strict=True)):
        up = upsample_to_original(torch.from_numpy(np.ascontiguousarray(raw[j])), prep, image.shape[1], image.shape[0])
        out.append(Explanation(
            path=name, image=image, heat=normalize_heat(up), raw=raw[j],
            label=label, probability=float(probs[j, decided[j]]),
            explained=clf.classes[int(idx[j])], explained_probability=float(probs[j, idx[j]]), method=method,
            novelty=score, known=known,
        ))
    return out


def iter_explain(
    clf: Explainable,
    sources: Sequence[Any],
    *,
    method: str = "cam",
    class_name: str | None = None,
    threshold: float | None = None,
    batch_size: int = 16,
    on_item: Callable[[], None] | None = None,
) -> Iterator[Explanation | ImageError]:
    """Explain ``sources`` in order, yielding an Explanation or the ImageError of each."""
    check_method(method)
    _check_supported(clf, method)
    _geometry()
    forced = clf.class_index(class_name) if class_name is not None else None
    for start in range(0, len(sources), batch_size):
        chunk = sources[start:start + batch_size]
        loaded = [_load_pair(src, clf.preprocessing) for src in chunk]
        good = [i for i, item in enumerate(loaded) if not isinstance(item, ImageError)]
        results: dict[int, Explanation] = {}
        if good:
            done = _explain_batch(clf, [loaded[i] for i in good], [name_of(chunk[i]) for i in good],  # type: ignore[misc]
                                  method, forced, threshold)
            results = dict(zip(good, done, strict=True))
        for i, item in enumerate(loaded):
            yield item if isinstance(item, ImageError) else results[i]
            if on_item:
                on_item()


def explain_inputs(clf: Explainable, sources: Sequence[Any], *, method: str = "cam",
                   class_name: str | None = None, threshold: float | None = None) -> list[Explanation]:
    """Explain every input; a bad image raises :class:`ImageError` (the Python API)."""
    out = []
    for r in iter_explain(clf, sources, method=method, class_name=class_name, threshold=threshold):
        if isinstance(r, ImageError):
            raise r
        out.append(r)
    return out


