"""The run folder: its name, ``metrics.csv``, and the finish step (evaluation, report, bundle).

Written by rank 0 only; ``convlens runs`` and ``compare`` read what is written here.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from convlens import __version__
from convlens.config import TrainConfig, dump_yaml, to_dict
from convlens.errors import ConfigError
from convlens.files import write_text

if TYPE_CHECKING:  # `convlens runs` and `compare` read these names without importing torch
    import numpy as np
    import torch

BUNDLE_NAME = "model.convlens"
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "img_per_s", "seconds"]


@dataclass
class RunResult:
    """What a finished training run produced."""

    run_dir: Path
    bundle_path: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def say(console: Console, message: str) -> None:
    """Print one line (rich markup) that stays one line in logs."""
    # soft_wrap: a long epoch line stays one line in logs instead of wrapping at 80 columns.
    console.print(message, soft_wrap=True, highlight=False)


def is_better(row: dict[str, Any], best: dict[str, Any]) -> bool:
    """Higher validation accuracy wins; equal accuracy, lower validation loss. No validation set:
    lower training loss."""
    if best.get("epoch") is None:
        return True
    if row["val_acc"] is None:
        return row["train_loss"] < best["train_loss"]
    if row["val_acc"] != best["val_acc"]:
        return row["val_acc"] > best["val_acc"]
    return row["val_loss"] < best["val_loss"]


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best epoch's row by :func:`is_better`, as the trainer chose it: among the validated
    epochs (those with a validation accuracy) when there are any, else by training loss."""
    candidates = [r for r in rows if r.get("val_acc") is not None] or rows
    best: dict[str, Any] = {"epoch": None}
    for row in candidates:
        if is_better(row, best):
            best = row
    return None if best.get("epoch") is None else dict(best)


def make_run_dir(project: str | Path, name: str, exist_ok: bool = False) -> Path:
    """``project/name``; if it exists, the first free ``name-2``, ``name-3``... (race-free mkdir)."""
    parent = Path(project)
    parent.mkdir(parents=True, exist_ok=True)
    if exist_ok:
        (parent / name).mkdir(exist_ok=True)
        return parent / name
    for i in range(1, 100_000):
        candidate = parent / (name if i == 1 else f"{name}-{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"no free run folder name for {name!r} in {str(parent)!r}; choose another --name")


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.csv``: one row per epoch (what `convlens runs` and `compare` read)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_FIELDS})
    write_text(path, buf.getvalue())


def finish_run(model: torch.nn.Module, cfg: TrainConfig, prepared: Any, run_dir: Path,
               history: list[dict[str, Any]], best: dict[str, Any], device: str, curves: bytes | None,
               console: Console, extra: dict[str, Any] | None = None,
               plan: Any = None, calibration: dict[str, Any] | Any = None,
               train_features: np.ndarray | None = None, training: dict[str, Any] | None = None) -> RunResult:
    """Evaluate the (best) model on the validation set, write the bundle and the report.

    ``extra``: more bundle metrics; ``plan``: the ``--time`` plan, named in the report.
    ``calibration``: a temperature's record (``evaluate.calibration.calibration_record``), or
    held-out images (a subset) to fit one on, or None. ``train_features``: the training images'
    pooled features when the caller has them (a frozen backbone's cache), else computed with the
    final model. ``training``: rows of the report's "How it was trained".
    """
    import torch

    from convlens.evaluate import agreement_note, bf16_agreement, evaluate, predict_outputs
    from convlens.infer.bundle import BundleMeta, save_bundle
    from convlens.models.tta import flip_averaged, temperature_scaled

    config_yaml = dump_yaml(cfg)
    meta = BundleMeta(arch=model.arch, classes=list(prepared.classes), preprocessing=prepared.preprocessing,
                      output_activation=model.output_activation, config=to_dict(cfg),
                      versions={"convlens": __version__, "torch": torch.__version__},
                      flip_average=cfg.flip_average)
    # What the bundle will compute (load_model wraps it the same way): the report measures that.
    model = flip_averaged(model) if cfg.flip_average else model
    has_val = prepared.val is not None and len(prepared.val.labels) > 0
    metrics: dict[str, Any] = {}
    summary = {"best_epoch": best.get("epoch"), "epochs_trained": len(history),
               "train_loss": history[-1]["train_loss"] if history else None}
    agreement = bf16_agreement(model, meta, prepared.val.images, device, cfg.batch_size) if has_val else None
    if agreement is not None:  # what precision="auto" means for this model, from here on
        meta.precision, summary["bf16_agreement"] = agreement["precision"], agreement
        say_precision(console, agreement)

    # The inference pass the report and predict use, of `model` as it is when called: before the
    # temperature for fitting it, after it for the validation images.
    def outputs(images: Any) -> tuple[np.ndarray, np.ndarray]:
        return predict_outputs(model, images, meta.preprocessing, cfg.batch_size, device, meta.inference_precision())

    record = fit_calibration(calibration, outputs)
    if record is not None:
        meta.temperature = record["temperature"]
        model = temperature_scaled(model, meta.temperature)
        summary["calibration"] = record
    val_out = outputs(prepared.val.images) if has_val else None
    index = novelty_index(cfg, prepared, train_features, val_out, lambda images: outputs(images)[1])
    summary["novelty"] = {"threshold": index.threshold, "accept": index.accept, "rule": index.rule,
                          "validation_images": index.validation_images, "reference_images": len(index.labels)}
    if has_val:
        metrics = evaluate(model, meta, prepared.val, out_dir=run_dir, device=device,
                           batch_size=cfg.batch_size, history=history if curves is not None else None,
                           curves=curves, config_yaml=config_yaml,
                           title=f"convlens run {run_dir.name}", subtitle=f"validation set of {cfg.data}"
                           + (f"; time budget {cfg.time}: {plan.summary()}" if plan is not None else ""),
                           console=console, outputs=val_out, novelty=index, training=training,
                           notes=[agreement_note(agreement)] if agreement is not None else [])
        summary.update(val_accuracy=metrics["accuracy"], val_loss=metrics["loss"],
                       val_macro_f1=metrics["macro"]["f1"], val_roc_auc=metrics.get("roc_auc"),
                       val_ece=metrics["calibration"]["ece"])
        summary["novelty"]["val_unknown_rate"] = metrics["novelty"]["unknown_rate"]
    else:
        write_unvalidated_report(run_dir, list(prepared.classes), curves, history, config_yaml, training)
    if prepared.test is not None and len(prepared.test.labels) > 0:
        test = evaluate(model, meta, prepared.test, out_dir=run_dir / "test", device=device,
                        batch_size=cfg.batch_size, config_yaml=config_yaml, novelty=index,
                        title=f"convlens run {run_dir.name}: test set", console=console)
        summary.update(test_accuracy=test["accuracy"], test_loss=test["loss"], test_macro_f1=test["macro"]["f1"])
    summary.update(extra or {})
    meta.metrics = summary
    bundle_path = save_bundle(run_dir / BUNDLE_NAME, model, meta, novelty=index)
    say(console, novelty_line(index, summary["novelty"].get("val_unknown_rate")))
    acc = summary.get("val_accuracy")
    say(console, f"[bold green]done[/bold green]: best epoch {summary['best_epoch']}"
                 + (f", validation accuracy {acc:.4f}" if acc is not None else "")
                 + f"\n  run folder: {run_dir}\n  bundle:     {bundle_path}\n  report:     {run_dir / 'report.html'}")
    return RunResult(run_dir=run_dir, bundle_path=bundle_path, metrics=summary, history=history)


def say_precision(console: Console, agreement: dict[str, Any]) -> None:
    """The note when the bf16 check chose fp32 for the bundle (nothing when bf16 agreed)."""
    if agreement["precision"] == "fp32":
        say(console, f"note: bf16 moved this model's probabilities by up to {agreement['max_prob_diff']:.1e} "
                     f"on {agreement['images']} validation images, so it predicts in fp32 (exact, slower)")


def write_unvalidated_report(run_dir: Path, classes: list[str], curves: bytes | None, history: list[dict[str, Any]],
                             config_yaml: str, training: dict[str, Any] | None) -> None:
    """``report.html`` of a run without a validation set: how it trained, nothing evaluated."""
    from convlens.evaluate.report import render_report

    write_text(run_dir / "report.html", render_report(
        title=f"convlens run {run_dir.name}", metrics={"classes": classes},
        figures={"curves": curves} if curves is not None else {}, history=history, config_yaml=config_yaml,
        training=training, notes=["No validation set (val_fraction=0): nothing was evaluated."]))


def fit_calibration(calibration: dict[str, Any] | Any, outputs: Any) -> dict[str, Any] | None:
    """The temperature record of :func:`finish_run`'s ``calibration``: given, fitted here on the
    logits of held-out images (``outputs(images)``), or None."""
    from convlens.evaluate.calibration import calibration_record, fit_temperature

    if calibration is None or isinstance(calibration, dict):
        return calibration
    if not len(calibration.labels):
        return None
    logits, _ = outputs(calibration.images)
    labels = calibration.labels
    return calibration_record(logits, labels, fit_temperature(logits, labels),
                              f"{len(labels)} training-split images held out from training")


def novelty_index(cfg: TrainConfig, prepared: Any, train_features: np.ndarray | None,
                  val_out: tuple[np.ndarray, np.ndarray] | None, pooled: Any) -> Any:
    """The bundle's :class:`convlens.infer.novelty.NoveltyIndex`: the training images' pooled
    features (paths relative to the dataset root) and the threshold that keeps ``cfg.accept`` of
    the validation images (too few: the documented fallback). ``train_features``: every
    training image's when the caller has them, else ``pooled(images)`` computes them for the
    rows the index keeps only (:func:`~convlens.infer.novelty.reference_rows`)."""
    from convlens.infer.novelty import build_index, reference_rows

    rows = reference_rows(prepared.train.labels)
    kept = prepared.train.take(rows)
    features = pooled(kept.images) if train_features is None else train_features[rows]
    return build_index(features, kept.labels, kept.paths, None if val_out is None else val_out[1],
                       accept=cfg.accept, limit=len(rows))


def novelty_line(index: Any, val_unknown: float | None) -> str:
    """The console's one line on the novelty threshold."""
    from convlens.infer.novelty import RULE_VALIDATION

    if index.rule == RULE_VALIDATION and val_unknown is not None:
        return (f"novelty: threshold {index.threshold:.3f} keeps {1 - val_unknown:.0%} of {index.validation_images} "
                "validation images as known (--accept sets the share)")
    return (f"novelty: threshold {index.threshold:.3f} keeps {index.accept:.0%} of the training images "
            "(fewer than 20 validation images; --accept sets the share)")
