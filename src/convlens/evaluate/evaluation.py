"""``evaluate()``: metrics, figures, ``predictions.csv`` and ``report.html`` of a model on labelled images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convlens.decision import probabilities
from convlens.evaluate.inference import (
    backend_logits,
    backend_outputs,
    predict_logits,
    predict_outputs,
)
from convlens.evaluate.labelled import load_labelled_folder
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

    from convlens.infer.bundle import BundleMeta
    from convlens.infer.novelty import NoveltyIndex

GALLERY_SIZE = 16
UNLIKE_PER_CLASS = 4  # the report's "most unlike the training images" gallery: this many per class


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
    classes, paths = list(meta.classes), list(data.paths)
    if outputs is None:
        outputs = _outputs(model, backend, meta, data.images, batch_size, device, precision, novelty is not None)
    probs, metrics, scores = _measure(meta, outputs, labels, paths, novelty)
    pred = predict_labels(probs, meta.threshold) if len(labels) else np.zeros(0, dtype=np.int64)
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
