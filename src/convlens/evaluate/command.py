"""``convlens evaluate BUNDLE DIR`` and ``convlens.evaluate(bundle, dir)``: a bundle on a labelled folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from convlens.evaluate.evaluation import evaluate
from convlens.evaluate.labelled import load_labelled_folder

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from convlens.evaluate.result import Evaluation


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
    line = f"accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['macro']['f1']:.4f}  log loss {metrics['loss']:.4f}"
    if metrics.get("roc_auc") is not None:
        line += f"  ROC-AUC {metrics['roc_auc']:.4f}"
    console.print(f"{ev.images} images  {line}")
    console.print(f"report: {ev.report_path}  metrics: {ev.dir / 'metrics.json'}")
    return 0
