"""The Python API: the CLI's verbs as functions that return objects.

========================================  =====================================================
``convlens check DIR``                    ``convlens.check(dir) -> CheckReport``
``convlens train DIR --epochs 5 ...``     ``convlens.train(dir, epochs=5, ...) -> Run``
``convlens train --resume RUN``           ``convlens.train(resume=RUN)`` or ``run.resume()``
``convlens evaluate BUNDLE DIR``          ``convlens.evaluate(bundle, dir) -> Evaluation``
``convlens export BUNDLE --format onnx``  ``convlens.export(bundle, format="onnx") -> Path``
``convlens predict BUNDLE PATH...``       ``convlens.load(bundle).predict(paths)``
``convlens audit DIR``                    ``convlens.audit(dir) -> AuditReport``
========================================  =====================================================

The CLI runs the same functions. Options of ``train`` are the configuration keys
(:class:`convlens.config.TrainConfig`, ``convlens train --help``) and go through the same flow
(defaults -> preset -> config file -> keywords) and validation, so every error the CLI prints as
one line is raised here as a :class:`convlens.ConvlensError` with the same message. Results show
themselves as HTML in Jupyter.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convlens.audit import AuditReport, audit
from convlens.data.check import CheckReport, check_dataset
from convlens.data.decode import DEFAULT_MAX_PIXELS
from convlens.display import html_table, img_tag, shows_progress
from convlens.engine import runs
from convlens.engine.run_folder import best_row
from convlens.errors import BundleError, UserError
from convlens.evaluate import evaluate_bundle as evaluate
from convlens.evaluate.result import Evaluation
from convlens.export import export_bundle as export
from convlens.infer import load

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    from rich.console import Console

    from convlens.infer import Classifier

# A new verb: a function here that returns an object with _repr_html_, added to __all__ and to the
# lazy names of convlens/__init__.py (and its types to __init__.pyi).
__all__ = ["AuditReport", "CheckReport", "Evaluation", "Run", "audit", "check", "evaluate", "export", "load", "train"]

# Headline numbers of a run, in display order (the bundle's metrics summary keys).
HEADLINE = ("best_epoch", "epochs_trained", "val_accuracy", "val_loss", "val_macro_f1", "val_roc_auc",
            "test_accuracy")


# ----------------------------------------------------------------------------- check
def check(dir: str | os.PathLike[str], *, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
          min_side: int = 8, near_duplicates: bool = False, progress: bool | None = None) -> CheckReport:
    """Fully decode every image of a dataset folder and report what is wrong (``convlens check``).

    Nothing is changed; ``report.quarantine(qdir)`` moves the unusable files out (with an undo
    manifest). ``report.findings()`` lists the problems, ``report.to_dict()`` is ``--json``'s
    format, ``report.has_problems`` is the CLI's exit code 1.
    """
    # None: a bar where one can be drawn (terminal; Jupyter with ipywidgets)
    return check_dataset(dir, workers=workers, max_pixels=max_pixels, min_side=min_side,
                         near_duplicates=near_duplicates,
                         progress=shows_progress() if progress is None else progress)


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One training run: its folder, configuration, per-epoch history and best metrics.

    ``interrupted`` runs (Ctrl-C / "interrupt kernel") have a ``checkpoint`` and no bundle yet:
    ``run.resume()`` continues them. In Jupyter a run shows its headline numbers and curves.
    """

    dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    bundle_path: Path | None = None
    interrupted: bool = False
    checkpoint: Path | None = None
    stopped_early: bool = False

    @classmethod
    def from_dir(cls, run_dir: str | os.PathLike[str]) -> Run:
        """Open an existing run folder (finished or interrupted) without training anything."""
        info = runs.read_run(run_dir)
        d, bundle, last = info.path, info.path / "model.convlens", info.path / "checkpoints" / "last.pt"
        metrics: dict[str, Any] = {}
        if bundle.is_file():
            from convlens.infer.bundle import read_meta

            metrics = dict(read_meta(bundle).metrics or {})
        return cls(dir=d, config=info.config, history=info.history, metrics=metrics,
                   bundle_path=bundle if bundle.is_file() else None,
                   interrupted=not bundle.is_file() and last.is_file(),
                   checkpoint=last if last.is_file() else None)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def report_path(self) -> Path | None:
        """``report.html`` when the run finished."""
        p = self.dir / "report.html"
        return p if p.is_file() else None

    @property
    def best(self) -> dict[str, Any]:
        """The history row of the best epoch (the bundle's weights), or ``{}``."""
        epoch = self.metrics.get("best_epoch")
        if epoch is None:  # interrupted: the best epoch so far, by the trainer's rule
            return best_row(self.history) or {}
        return next((dict(r) for r in self.history if r.get("epoch") == epoch), {})

    def load(self, device: str = "auto") -> Classifier:
        """The trained classifier (``convlens.load(run.bundle_path)``)."""
        if self.bundle_path is None:
            raise BundleError(f"run {str(self.dir)!r} has no model.convlens yet (it was interrupted); "
                              f"finish it with run.resume() or convlens.train(resume={str(self.dir)!r})")
        return load(self.bundle_path, device=device)

    def resume(self, **options: Any) -> Run:
        """Continue this run from its last checkpoint (``options``: e.g. ``epochs=``)."""
        return train(resume=self.dir, **options)

    def history_frame(self) -> pandas.DataFrame:
        """The history as a pandas DataFrame indexed by epoch (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise UserError("history_frame() needs pandas, which is not installed; `pip install pandas`, "
                            "or use run.history (a list of dicts)") from e
        return pd.DataFrame(self.history).set_index("epoch") if self.history else pd.DataFrame()

    def curves_png(self) -> bytes | None:
        """Loss and accuracy per epoch as PNG bytes (``curves.png``, or drawn from the history)."""
        path = self.dir / "curves.png"
        if path.is_file():
            return path.read_bytes()
        if not self.history:
            return None
        from convlens.evaluate.plots import curves_png

        return curves_png(self.history)

    def headline(self) -> dict[str, Any]:
        """The numbers a summary shows."""
        out = {k: self.metrics[k] for k in HEADLINE if self.metrics.get(k) is not None}
        if not out and self.history:  # interrupted: the last finished epoch
            last = self.history[-1]
            out = {"epochs_trained": len(self.history), "val_accuracy": last.get("val_acc"),
                   "val_loss": last.get("val_loss")}
        return out

    @property
    def status(self) -> str:
        return "interrupted" if self.interrupted else ("finished" if self.bundle_path else "incomplete")

    def __repr__(self) -> str:
        nums = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.headline().items())
        return f"Run({str(self.dir)!r}, {self.status}" + (f", {nums})" if nums else ")")

    def _repr_html_(self) -> str:
        h = self.headline()
        curves = self.curves_png()
        where = (f"bundle {html.escape(str(self.bundle_path))}, report {html.escape(str(self.report_path))}"
                 if self.bundle_path else f"checkpoint {html.escape(str(self.checkpoint))}: run.resume() continues it")
        return (f"<div><b>run {html.escape(str(self.dir))}</b> ({self.status}, model "
                f"{html.escape(str(self.config.get('model', '?')))}, data {html.escape(str(self.config.get('data')))})"
                + (html_table(list(h), [list(h.values())]) if h else "")
                + (img_tag(curves, "loss and accuracy per epoch", width=640) if curves else "")
                + f"<div>{where}</div></div>")


# ----------------------------------------------------------------------------- train
def train(
    dir: str | os.PathLike[str] | None = None,
    *,
    preset: str | None = None,
    config: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | Run | None = None,
    console: Console | None = None,
    **options: Any,
) -> Run:
    """Check, split, cache, train, evaluate and report (``convlens train``); return the :class:`Run`.

    ``dir``: a dataset folder (``DIR/<class>/...`` or ``DIR/train|val/<class>/...``); None trains
    on the embedded digits. ``preset``: ``default``, ``tutorial`` or ``quick``. ``config``: a
    YAML file of keys. ``options``: any configuration key (``epochs=5``, ``image_size=128``,
    ``model="resnet8"``, ...), the same as the CLI's flags with ``_`` for ``-``; an unknown key
    raises :class:`convlens.ConvlensError` with a suggestion. ``resume``: a run (folder) to
    continue from its last checkpoint. ``console``: a ``rich.console.Console`` for the progress.

    Ctrl-C (in Jupyter: "interrupt kernel") stops after the current step, writes a checkpoint and
    *returns* the run with ``run.interrupted == True`` (``run.resume()`` continues it exactly). A
    second Ctrl-C before that raises ``KeyboardInterrupt`` at once (the last epoch's checkpoint
    remains). Multi-process training (``nproc > 1``) runs from the CLI (``convlens train --nproc``).
    """
    from rich.console import Console

    from convlens.engine.recipe import resolve
    from convlens.engine.trainer import TrainingInterrupted
    from convlens.engine.training import train as train_recipe

    overrides = {k: v for k, v in {"data": dir, "preset": preset, **options}.items() if v is not None}
    if "data" in overrides:
        overrides["data"] = os.fspath(overrides["data"])
    resume_dir = resume.dir if isinstance(resume, Run) else resume
    try:
        # the CLI's resolution and entry: pretrained (auto) for photo folders unless a model was named
        recipe = resolve(overrides, os.fspath(config) if config else None, resume_dir)
        result = train_recipe(recipe, console=console or Console())
    except TrainingInterrupted as e:
        (console or Console(stderr=True)).print(
            f"[yellow]interrupted[/yellow]; checkpoint saved to {e.checkpoint}. "
            f"Continue with run.resume() or convlens.train(resume={str(e.run_dir)!r})", highlight=False)
        run = Run.from_dir(e.run_dir)
        run.interrupted, run.checkpoint = True, Path(e.checkpoint)
        return run
    run = Run.from_dir(result.run_dir)
    run.metrics = dict(result.metrics) or run.metrics
    run.history = list(result.history) or run.history
    run.stopped_early = result.stopped_early
    return run
