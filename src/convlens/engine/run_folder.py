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
               history: list[dict[str, Any]], best: dict[str, Any], device: str, curves: bytes,
               console: Console, extra: dict[str, Any] | None = None,
               plan: Any = None) -> RunResult:
    """Evaluate the (best) model on the validation set, write the bundle and the report.

    ``extra``: more entries for the bundle's metrics;
    ``plan``: the ``--time`` budget plan, named in the report.
    """
    import torch

    from convlens.evaluate import agreement_note, bf16_agreement, evaluate
    from convlens.infer.bundle import BundleMeta, save_bundle
    from convlens.models.tta import flip_averaged

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
        meta.precision = agreement["precision"]
        summary["bf16_agreement"] = agreement
        if meta.precision == "fp32":
            say(console, f"note: bf16 moved this model's probabilities by up to {agreement['max_prob_diff']:.1e} "
                         f"on {agreement['images']} validation images, so it predicts in fp32 (exact, slower)")
    if has_val:
        metrics = evaluate(model, meta, prepared.val, out_dir=run_dir, device=device,
                           batch_size=cfg.batch_size, history=history, curves=curves, config_yaml=config_yaml,
                           title=f"convlens run {run_dir.name}", subtitle=f"validation set of {cfg.data}"
                           + (f"; time budget {cfg.time}: {plan.summary()}" if plan is not None else ""),
                           console=console,
                           notes=[agreement_note(agreement)] if agreement is not None else [])
        summary.update(val_accuracy=metrics["accuracy"], val_loss=metrics["loss"],
                       val_macro_f1=metrics["macro"]["f1"], val_roc_auc=metrics.get("roc_auc"))
    else:
        from convlens.evaluate.report import render_report

        write_text(run_dir / "report.html", render_report(
            title=f"convlens run {run_dir.name}", metrics={"classes": list(prepared.classes)},
            figures={"curves": curves}, history=history, config_yaml=config_yaml,
            notes=["No validation set (val_fraction=0): nothing was evaluated."]))
    if prepared.test is not None and len(prepared.test.labels) > 0:
        test = evaluate(model, meta, prepared.test, out_dir=run_dir / "test", device=device,
                        batch_size=cfg.batch_size, config_yaml=config_yaml,
                        title=f"convlens run {run_dir.name}: test set", console=console)
        summary.update(test_accuracy=test["accuracy"], test_loss=test["loss"], test_macro_f1=test["macro"]["f1"])
    summary.update(extra or {})
    meta.metrics = summary
    bundle_path = save_bundle(run_dir / BUNDLE_NAME, model, meta)
    acc = summary.get("val_accuracy")
    say(console,
        f"[bold green]done[/bold green]: best epoch {summary['best_epoch']}"
        + (f", validation accuracy {acc:.4f}" if acc is not None else "")
        + f"\n  run folder: {run_dir}\n  bundle:     {bundle_path}\n  report:     {run_dir / 'report.html'}"
    )
    return RunResult(run_dir=run_dir, bundle_path=bundle_path, metrics=summary, history=history)
