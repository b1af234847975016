"""Evaluate a model on labelled images: metrics (scikit-learn), figures, ``report.html``.

``evaluate()`` runs at the end of every training on the validation set, and
``convlens evaluate BUNDLE DIR`` runs it on any labelled folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convlens.callable_module import callable_module
from convlens.decision import probabilities
from convlens.errors import DataError, ImageError
from convlens.evaluate.metrics import (
    compute_metrics,
    least_confident_correct,
    predict_labels,
    reliability,
    worst_mistakes,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from rich.console import Console

    from convlens.evaluate.result import Evaluation
    from convlens.infer.bundle import BundleMeta
    from convlens.infer.novelty import NoveltyIndex

__all__ = ["LabelledImages", "evaluate", "evaluate_bundle", "evaluate_command", "load_labelled_folder",
           "predict_logits", "predict_outputs", "predict_probabilities"]

GALLERY_SIZE = 16
UNLIKE_PER_CLASS = 4  # the report's "most unlike the training images" gallery: this many per class
# precision="auto" runs a model in bf16 only when bf16 moved its class probabilities by at most
# this much on the images checked (issue 13's goal is 1e-2 over a whole validation set; the check
# sees a sample, hence the margin). EfficientNet-Lite's depthwise blocks miss it (1.4e-2 to
# 4.8e-2 on cats_and_dogs_filtered and cat_breeds5); the from-scratch models measured pass (2-3.5e-3).
BF16_MAX_PROB_DIFF = 5e-3
BF16_CHECK_IMAGES = 256


@dataclass
class LabelledImages:
    """Decoded images with labels, in the bundle's class order (what ``evaluate`` consumes).

    A training :class:`convlens.data.prepare.Subset` has the same three fields.
    """

    images: np.ndarray  # uint8 N x H x W x C
    labels: np.ndarray  # int64 N
    paths: list[str]
    skipped: list[ImageError] = field(default_factory=list)
    note: str = ""


def load_labelled_folder(root: str | os.PathLike[str], meta: BundleMeta, workers: int = 0) -> LabelledImages:
    """Scan a class-folder dataset and decode every image exactly as prediction does.

    Files are found by the data package's scanner and decoded with the bundle's
    ``Preprocessing.load`` (the one definition prediction also uses). Unusable images are
    skipped and returned in ``skipped``. Folder classes the model does not know raise
    :class:`DataError`; model classes missing from the folder just have no support.
    """
    from concurrent.futures import ThreadPoolExecutor

    from convlens.data.scan import labelled_files

    found, note = labelled_files(root, meta.classes)
    items = [(str(p), label) for p, label in found]
    prep = meta.preprocessing

    def load(path: str) -> np.ndarray | ImageError:
        try:
            return prep.load(path)
        except ImageError as e:
            return e

    n_workers = workers if workers > 0 else min(8, os.cpu_count() or 1)
    # Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        decoded = list(pool.map(load, [p for p, _ in items]))
    images, labels, paths, skipped = [], [], [], []
    for (path, label), arr in zip(items, decoded, strict=True):
        if isinstance(arr, ImageError):
            skipped.append(arr)
        else:
            images.append(arr)
            labels.append(label)
            paths.append(path)
    if not images:
        raise DataError(f"none of the {len(items)} images in {str(root)!r} could be decoded; run `convlens check {root}`")
    from convlens.data.check import SkippedFiles

    skipped = SkippedFiles(skipped, root=Path(root))
    h, w = prep.size
    return LabelledImages(np.stack(images).reshape(len(images), h, w, prep.channels),
                          np.asarray(labels, dtype=np.int64), paths, skipped, note)


@contextlib.contextmanager
def _torch_backend(model: torch.nn.Module, device: str, precision: str) -> Iterator[Any]:
    """``convlens predict``'s own backend (:class:`convlens.infer.TorchBackend`) over the caller's
    model, whose layout is put back afterwards (a bundle is saved from contiguous weights)."""
    import torch

    from convlens.infer import TorchBackend

    contiguous = all(p.is_contiguous() for p in model.parameters() if p.ndim == 4)
    backend = TorchBackend(model, device, precision)
    try:
        yield backend
    finally:
        if contiguous and backend.channels_last:
            model.to(memory_format=torch.contiguous_format)


def predict_logits(model: torch.nn.Module, images: Any, prep: Any, batch_size: int = 64,
                   device: str = "cpu", precision: str = "auto") -> np.ndarray:
    """Logits ``(N, out_units)`` in float32 for uint8 ``N x H x W x C`` images, through
    ``convlens predict``'s own backend: the same normalisation, layout, precision and forward pass."""
    with _torch_backend(model, device, precision) as backend:
        return backend_logits(backend, images, prep, batch_size)


def backend_logits(backend: Any, images: Any, prep: Any, batch_size: int = 64) -> np.ndarray:
    """Logits ``(N, out_units)`` of uint8 images through any :class:`convlens.infer.Backend`
    (torch, or the onnx engine's), in batches of ``batch_size``."""
    outs = [backend.image_logits(np.asarray(images[start:start + batch_size]), prep)
            for start in range(0, len(images), batch_size)]
    if not outs:
        return np.zeros((0, 1), dtype=np.float32)
    return np.concatenate(outs).astype(np.float32)


def backend_outputs(backend: Any, images: Any, prep: Any, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits and pooled features of uint8 images through any backend's ``image_outputs`` (one
    pass each batch), in batches of ``batch_size``."""
    logits, pooled = [], []
    for start in range(0, len(images), batch_size):
        z, f = backend.image_outputs(np.asarray(images[start:start + batch_size]), prep)
        logits.append(np.asarray(z, dtype=np.float32))
        pooled.append(np.asarray(f, dtype=np.float32))
    if not logits:
        return np.zeros((0, 1), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(logits), np.concatenate(pooled)


def predict_outputs(model: torch.nn.Module, images: Any, prep: Any, batch_size: int = 64, device: str = "cpu",
                    precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, out_units)`` and pooled features ``(N, C)`` (float32) in one pass of
    :meth:`ConvlensModel.forward_pooled`, with :func:`predict_logits`'s backend, normalisation,
    layout and precision: the features novelty is measured in, from the pass the report uses."""
    with _torch_backend(model, device, precision) as backend:
        return backend_outputs(backend, images, prep, batch_size)


def predict_probabilities(model: torch.nn.Module, meta: BundleMeta, images: Any, batch_size: int = 64,
                          device: str = "cpu", precision: str = "auto") -> np.ndarray:
    """Class probabilities ``(N, num_classes)`` for uint8 images, as ``convlens predict`` computes them
    (``precision="auto"`` as the bundle narrows it: :meth:`BundleMeta.inference_precision`)."""
    logits = predict_logits(model, images, meta.preprocessing, batch_size, device, meta.inference_precision(precision))
    return probabilities(logits, meta.output_activation)


def bf16_check_size(n_images: int, device: str = "cpu", limit: int = BF16_CHECK_IMAGES) -> int:
    """How many of ``n_images`` :func:`bf16_agreement` compares: 0 where ``auto`` is not bf16 on
    ``device`` (fp32 without native bf16, fp16 on older CUDA GPUs), else up to ``limit``."""
    import torch

    from convlens import runtime

    return min(n_images, limit) if runtime.inference_device(device, "auto").amp_dtype == torch.bfloat16 else 0


def bf16_agreement(model: torch.nn.Module, meta: BundleMeta, images: Any, device: str = "cpu",
                   batch_size: int = 64, limit: int = BF16_CHECK_IMAGES) -> dict[str, Any] | None:
    """How far bf16 moves ``model``'s probabilities from fp32 on :func:`bf16_check_size` of
    ``images`` (evenly spaced), and the precision ``auto`` should mean for it; None when that is 0."""
    size = bf16_check_size(len(images), device, limit)
    if not size:
        return None
    index = np.unique(np.linspace(0, len(images) - 1, size).round().astype(np.int64))
    sample = np.stack([np.asarray(images[int(i)]) for i in index])
    low, full = (predict_probabilities(model, meta, sample, batch_size, device, p) for p in ("bf16", "fp32"))
    diff = float(np.abs(low - full).max())
    flips = int((predict_labels(low, meta.threshold) != predict_labels(full, meta.threshold)).sum())
    return {"images": len(sample), "max_prob_diff": diff, "label_flips": flips,
            "precision": "auto" if diff <= BF16_MAX_PROB_DIFF else "fp32"}


def agreement_note(agreement: dict[str, Any]) -> str:
    """The report's sentence on :func:`bf16_agreement`."""
    verdict = ("predictions use bf16 where the hardware has it" if agreement["precision"] == "auto"
               else "this model predicts in fp32 everywhere (an explicit --precision bf16 still runs bf16)")
    return (f"bf16 against fp32 on {agreement['images']} validation images: largest probability difference "
            f"{agreement['max_prob_diff']:.1e} (limit {BF16_MAX_PROB_DIFF:g}), {agreement['label_flips']} labels "
            f"changed; {verdict}.")


def model_info(meta: BundleMeta) -> dict[str, Any]:
    """What a reader of a report needs to know about the model and its input."""
    p = meta.preprocessing
    arch = meta.arch
    name = arch.get("name") or f"layer list ({len(arch.get('layers', []))} layers)"
    return {
        "model": name,
        "classes": ", ".join(meta.classes),
        "input": f"{p.size[0]} x {p.size[1]} x {p.channels} ({'grayscale' if p.channels == 1 else p.channel_order})",
        "resize": p.resize,
        "scaling": f"(x * {p.scale:.6g} - {list(p.mean)}) / {list(p.std)}",
        "output": f"{meta.output_activation}" + (f", threshold {meta.threshold:g}" if len(meta.classes) == 2 else ""),
        "inference precision": ("auto (bf16 where the hardware has it natively, else fp32)" if meta.precision == "auto"
                                else f"{meta.precision} (bf16 moved this model's probabilities too far)"),
        "versions": ", ".join(f"{k} {v}" for k, v in meta.versions.items()) or "-",
    }


def _predictions_csv(paths: Sequence[str], labels: np.ndarray, pred: np.ndarray, probs: np.ndarray,
                     classes: Sequence[str]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true", "predicted", *(f"p_{c}" for c in classes)])
    for i, path in enumerate(paths):
        w.writerow([path, classes[labels[i]], classes[pred[i]], *(f"{v:.6f}" for v in probs[i])])
    return buf.getvalue()


def _caption(classes: Sequence[str], true: int, probs: np.ndarray, pred: int, path: str) -> str:
    name = Path(path).name
    name = name if len(name) <= 22 else name[:19] + "..."
    return (f"{name}\ntrue {classes[true]} ({probs[true]:.2f})\npred {classes[pred]} ({probs[pred]:.2f})")


def _figures(metrics: dict[str, Any], images: Any, labels: np.ndarray, probs: np.ndarray, pred: np.ndarray,
             paths: list[str], classes: list[str], worst: list[int], unsure: list[int]) -> dict[str, bytes]:
    """The report's figures (PNG bytes): confusion, calibration, ROC (two classes), the galleries."""
    from convlens.evaluate import plots

    if not len(labels):
        return {}
    figures = {"confusion": plots.confusion_png(metrics["confusion_matrix"], classes),
               "calibration": plots.calibration_png(metrics["calibration"])}
    if metrics.get("roc"):
        figures["roc"] = plots.roc_png(metrics["roc"], metrics.get("roc_auc"), classes[1])
    figures["mistakes"] = plots.gallery_png(
        [images[i] for i in worst], [_caption(classes, labels[i], probs[i], pred[i], paths[i]) for i in worst])
    if unsure:
        figures["uncertain"] = plots.gallery_png(
            [images[i] for i in unsure], [_caption(classes, labels[i], probs[i], pred[i], paths[i]) for i in unsure])
    return figures


def novelty_summary(index: NoveltyIndex, scores: np.ndarray, labels: np.ndarray, paths: list[str],
                    classes: list[str]) -> dict[str, Any]:
    """The report's novelty entry: the threshold and how it was chosen, the share of these images
    above it (``unknown``), and per class the :data:`UNLIKE_PER_CLASS` most novel images."""
    from convlens.infer.novelty import RULE_VALIDATION

    how = (f"the smallest novelty that keeps {index.accept:.0%} of the {index.validation_images} validation images"
           if index.rule == RULE_VALIDATION else
           f"fewer than 20 validation images: the smallest novelty that keeps {index.accept:.0%} of the "
           f"{index.validation_images} training images, each scored against the others (leave-one-out)")
    return {"method": f"cosine distance to the {index.k}-th nearest of {len(index.labels)} training images",
            "threshold": index.threshold, "accept": index.accept, "rule": index.rule, "chosen_by": how,
            "unknown_rate": float(np.mean(scores > index.threshold)), "median": float(np.median(scores)),
            "most_unlike": {c: [{"path": paths[i], "novelty": float(scores[i])} for i in _most_unlike(labels, scores, k)]
                            for k, c in enumerate(classes)}}


def _most_unlike(labels: np.ndarray, scores: np.ndarray, k: int) -> list[int]:
    idx = np.flatnonzero(labels == k)
    return [int(i) for i in idx[np.argsort(-scores[idx], kind="stable")][:UNLIKE_PER_CLASS]]


def _unlike_gallery(images: Any, labels: np.ndarray, scores: np.ndarray, paths: list[str], classes: list[str],
                    threshold: float) -> bytes:
    from convlens.evaluate import plots

    rows = [i for k in range(len(classes)) for i in _most_unlike(labels, scores, k)]
    caps = [f"{Path(paths[i]).name[:22]}\n{classes[labels[i]]}: novelty {scores[i]:.3f}"
            + (" unknown" if scores[i] > threshold else "") for i in rows]
    return plots.gallery_png([images[i] for i in rows], caps, ncols=UNLIKE_PER_CLASS)


def _measure(meta: BundleMeta, outputs: tuple[np.ndarray, np.ndarray | None], labels: np.ndarray,
             paths: list[str], novelty: NoveltyIndex | None) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None]:
    """Probabilities, metrics (with the uncalibrated curve under a temperature, and the novelty
    entry) and novelty scores from :func:`predict_outputs`' logits and pooled features."""
    logits, pooled = outputs
    classes = list(meta.classes)
    probs = probabilities(logits, meta.output_activation)
    metrics = compute_metrics(labels, probs, classes, threshold=meta.threshold)
    if meta.temperature != 1.0 and len(labels):  # what the logits gave before the temperature divided them
        metrics["calibration"]["temperature"] = meta.temperature
        metrics["calibration"]["uncalibrated"] = reliability(
            labels, probabilities(logits * meta.temperature, meta.output_activation), classes, meta.threshold)
    scores = novelty.scores(pooled) if novelty is not None and pooled is not None and len(labels) else None
    if scores is not None:
        metrics["novelty"] = novelty_summary(novelty, scores, labels, paths=paths, classes=classes)
    return probs, metrics, scores


def _outputs(model: Any, backend: Any, meta: BundleMeta, images: Any, batch_size: int, device: str,
             precision: str, pooled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``(logits, pooled features or None)`` of ``images``: through a loaded classifier's
    ``backend`` (``convlens evaluate``: torch or onnx) or ``model`` in the bundle's precision."""
    prep = meta.preprocessing
    if backend is not None:
        return (backend_outputs(backend, images, prep, batch_size) if pooled
                else (backend_logits(backend, images, prep, batch_size), None))
    run = meta.inference_precision(precision)
    return (predict_outputs(model, images, prep, batch_size, device, run) if pooled
            else (predict_logits(model, images, prep, batch_size, device, run), None))


def evaluate(
    model: torch.nn.Module | None,
    meta: BundleMeta,
    data: Any,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    history: Sequence[dict[str, Any]] | None = None,
    curves: bytes | None = None,
    config_yaml: str | None = None,
    title: str = "convlens evaluation",
    subtitle: str = "",
    console: Console | None = None,
    precision: str = "auto",
    notes: Sequence[str] = (),
    outputs: tuple[np.ndarray, np.ndarray | None] | None = None,
    novelty: NoveltyIndex | None = None,
    training: dict[str, Any] | None = None,
    backend: Any = None,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``data`` (a subset with ``images``/``labels``/``paths``, or a folder).

    With ``out_dir``, writes ``metrics.json``, ``predictions.csv`` (every file's probabilities),
    ``confusion_matrix.png``, ``calibration.png``, ``worst_mistakes.png``, ``roc.png`` (two
    classes) and a self-contained ``report.html``. Returns the metrics dict (see
    :func:`compute_metrics`) plus ``worst_mistakes`` and ``skipped`` (unusable files).
    ``backend``: a loaded classifier's (torch or onnx) instead of ``model`` (then None);
    ``outputs``: :func:`predict_outputs`' ``(logits, pooled)`` when the caller ran that pass;
    ``novelty``: the unknown rate at the index's threshold and the most novel images;
    ``training``: rows of "How it was trained"; ``meta.temperature`` is measured both ways.
    """
    from convlens.evaluate.report import render_report
    from convlens.files import write_bytes, write_json, write_text

    if isinstance(data, (str, os.PathLike)):
        data = load_labelled_folder(data, meta)
    skipped = list(getattr(data, "skipped", []) or [])
    labels = np.asarray(data.labels, dtype=np.int64)
    classes = list(meta.classes)
    if outputs is None:
        outputs = _outputs(model, backend, meta, data.images, batch_size, device, precision, novelty is not None)
    probs, metrics, scores = _measure(meta, outputs, labels, list(data.paths), novelty)
    pred = predict_labels(probs, meta.threshold) if len(labels) else np.zeros(0, dtype=np.int64)
    paths = list(data.paths)
    worst = worst_mistakes(labels, probs, meta.threshold, GALLERY_SIZE) if len(labels) else []
    unsure = least_confident_correct(labels, probs, meta.threshold, GALLERY_SIZE) if len(labels) else []
    metrics["worst_mistakes"] = [{"path": paths[i], "true": classes[labels[i]], "predicted": classes[pred[i]],
                                  "p_true": float(probs[i, labels[i]]), "p_predicted": float(probs[i, pred[i]])}
                                 for i in worst]
    metrics["skipped"] = [{"path": e.path, "kind": e.kind, "message": e.message} for e in skipped]
    if out_dir is None:
        return metrics

    out = Path(out_dir)
    figures = {**({"curves": curves} if curves is not None else {}),
               **_figures(metrics, data.images, labels, probs, pred, paths, classes, worst, unsure)}
    if scores is not None:
        figures["unlike"] = _unlike_gallery(data.images, labels, scores, paths, classes, novelty.threshold)
    files = {"confusion": "confusion_matrix.png", "calibration": "calibration.png", "roc": "roc.png",
             "mistakes": "worst_mistakes.png", "uncertain": "least_confident.png", "unlike": "most_unlike.png"}
    for key, name in files.items():
        if key in figures:
            write_bytes(out / name, figures[key])
    write_json(out / "metrics.json", metrics)
    write_text(out / "predictions.csv", _predictions_csv(paths, labels, pred, probs, classes))
    notes = list(notes)
    if skipped:
        notes.append(f"{len(skipped)} unusable files were skipped: "
                     + "; ".join(f"{e.path} ({e.kind})" for e in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    write_text(out / "report.html", render_report(
        title=title, subtitle=subtitle, metrics=metrics, figures=figures, config_yaml=config_yaml,
        history=history, notes=notes, model_info=model_info(meta), training=training))
    if console is not None:
        acc = metrics.get("accuracy")
        console.print(f"evaluated {len(labels)} images: accuracy {acc:.4f}, macro F1 {metrics['macro']['f1']:.4f}"
                      if acc is not None else "evaluated 0 images")
    return metrics


def evaluate_bundle(bundle: str | os.PathLike[str], dir: str | os.PathLike[str], *,
                    out: str | os.PathLike[str] | None = None, batch_size: int = 64, device: str = "auto",
                    precision: str = "auto", console: Console | None = None, engine: str = "auto") -> Evaluation:
    """Evaluate a model bundle on a labelled folder; write metrics, figures and ``report.html``.

    This is ``convlens.evaluate(bundle, dir)`` and what ``convlens evaluate`` runs. ``out``
    defaults to ``eval/`` beside the bundle. Unusable images are skipped (one line on
    ``console``) and listed in ``metrics["skipped"]``. ``engine``: as :func:`convlens.load`'s
    (the same engine ``convlens predict`` uses, so the report and later predictions agree).
    """
    import yaml
    from rich.console import Console

    from convlens import runtime
    from convlens.evaluate.result import Evaluation
    from convlens.infer import load

    runtime.tune_allocator()
    runtime.configure_threads()
    clf = load(bundle, device=device, precision=precision, engine=engine)
    meta = clf.meta
    console = console or Console()
    data = load_labelled_folder(dir, meta)
    if data.note:
        console.print(data.note)
    if data.skipped:
        from convlens.data.check import skipped_message

        console.print(f"[yellow]{skipped_message(data.skipped)}[/yellow]")
    bundle_path = Path(bundle)
    out_dir = Path(out) if out else (bundle_path if bundle_path.is_dir() else bundle_path.parent) / "eval"
    metrics = evaluate(None, meta, data, out_dir=out_dir, batch_size=batch_size, backend=clf.backend,
                       novelty=clf.novelty_index,
                       config_yaml=yaml.safe_dump(meta.config, sort_keys=False) if meta.config else None,
                       title=f"convlens evaluation of {bundle_path.name}", subtitle=f"on {dir}")
    return Evaluation(bundle=bundle_path, data=Path(dir), dir=out_dir, metrics=metrics,
                      images=len(data.labels), note=data.note)


def evaluate_command(bundle: str, dir: str, out: str | None = None, batch_size: int = 64,
                     device: str = "auto", precision: str = "auto", engine: str = "auto") -> int:
    """``convlens evaluate BUNDLE DIR``: metrics, figures and report.html in ``out``."""
    from rich.console import Console

    console = Console()
    ev = evaluate_bundle(bundle, dir, out=out, batch_size=batch_size, device=device, precision=precision,
                         console=console, engine=engine)
    metrics = ev.metrics
    acc = metrics["accuracy"]
    line = f"accuracy {acc:.4f}  macro F1 {metrics['macro']['f1']:.4f}  log loss {metrics['loss']:.4f}"
    if metrics.get("roc_auc") is not None:
        line += f"  ROC-AUC {metrics['roc_auc']:.4f}"
    console.print(f"{ev.images} images  {line}")
    console.print(f"report: {ev.report_path}  metrics: {ev.dir / 'metrics.json'}")
    return 0


# `convlens.evaluate(bundle, dir)` is the public verb: this package, when called, runs evaluate_bundle.
callable_module(__name__, "evaluate_bundle")
