"""``convlens audit``: find likely label errors, near duplicates and outliers in a class-folder dataset.

The pipeline: frozen pretrained features for every usable image (:mod:`convlens.engine.features`,
decoded and featurised once, then cached) -> :mod:`convlens.audit.findings` (k-fold logistic
regression, cleanlab, cosine similarity, kNN outlier scores) -> a table, ``--json``, ``--csv``
and an offline HTML page with thumbnails (:mod:`convlens.audit.page`).

It lives in its own package because it joins data (scanning, quarantine), engine (pretrained
features) and evaluate (the report's HTML style), and ``evaluate`` may not import ``engine``.
Acting on findings goes through :mod:`convlens.data.moves` (its manifest and ``--undo``): nothing
is deleted, rewritten or overwritten.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convlens.audit.findings import DEFAULT_DUPLICATE_SIMILARITY, DEFAULT_FOLDS, Findings, find_all
from convlens.callable_module import callable_module
from convlens.config import DEFAULT_BACKBONE
from convlens.errors import ConfigError, DataError

KINDS = ("label", "duplicate", "outlier")
KIND_TEXT = {"label": "likely label errors", "duplicate": "near duplicates (feature similarity)",
             "outlier": "outliers (unlike the rest of the dataset)"}


@dataclass
class AuditReport:
    """Everything an audit found; :meth:`to_dict` is the ``--json`` format."""

    root: Path
    classes: list[str]
    paths: list[str]  # relative to root, one per audited image
    labels: np.ndarray  # the given class of each image
    subsets: list[str]
    findings: Findings
    backbone: str = DEFAULT_BACKBONE
    skipped: list[Any] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}

    def class_of(self, path: str) -> str:
        """The given class of an audited image (``path`` as in :attr:`paths`, relative to the root)."""
        return self.classes[int(self.labels[self._index[path]])]

    def label_issues(self) -> list[dict[str, Any]]:
        """Flagged images, most suspicious first: given class, suggested class and its probability."""
        f = self.findings
        out = []
        for rank, i in enumerate(f.label_issues, 1):
            s = int(np.argmax(f.pred_probs[i]))
            out.append({"rank": rank, "path": self.paths[i], "given": self.classes[int(self.labels[i])],
                        "suggested": self.classes[s], "confidence": round(float(f.pred_probs[i, s]), 4),
                        "label_quality": round(float(f.label_quality[i]), 4)})
        return out

    def near_duplicates(self) -> list[dict[str, Any]]:
        f = self.findings
        out = []
        for g, sim in zip(f.duplicate_groups, f.duplicate_similarity, strict=True):
            classes = sorted({self.classes[int(self.labels[i])] for i in g})
            subsets = sorted({self.subsets[i] for i in g if self.subsets[i]})
            out.append({"paths": [self.paths[i] for i in g], "classes": classes, "similarity": round(sim, 4),
                        "label_conflict": len(classes) > 1, "split_leak": len(subsets) > 1})
        return out

    def outliers(self) -> list[dict[str, Any]]:
        f = self.findings
        return [{"path": self.paths[i], "class": self.classes[int(self.labels[i])],
                 "score": round(float(f.outlier_scores[i]), 4)} for i in f.outliers]

    def counts(self) -> dict[str, int]:
        return {"label": len(self.findings.label_issues),
                "duplicate": sum(len(g) for g in self.findings.duplicate_groups),
                "outlier": len(self.findings.outliers)}

    @property
    def exit_code(self) -> int:
        """0: nothing found; 1: findings (as ``convlens check``)."""
        return 1 if any(self.counts().values()) else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root), "backbone": self.backbone, "params": self.params,
            "summary": {"images": len(self.paths), "skipped": len(self.skipped), **self.counts()},
            "classes": {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)},
            "label_issues": self.label_issues(), "near_duplicates": self.near_duplicates(),
            "outliers": self.outliers(),
            "skipped": [{"path": getattr(e, "path", str(e)), "kind": getattr(e, "kind", ""),
                         "message": getattr(e, "message", str(e))} for e in self.skipped],
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "exit_code": self.exit_code,
        }

    def quarantine(self, qdir: str | os.PathLike[str], kinds: Sequence[str] = ("label",)) -> Path | None:
        """Move the findings of ``kinds`` into ``qdir`` (``convlens audit --quarantine QDIR
        --kinds ...``); return the undo manifest, or None when nothing was chosen. A name taken in
        ``qdir`` gets a free one; the manifest records where each file went."""
        from convlens.data.moves import quarantine_files

        files = self.chosen(list(kinds))
        return quarantine_files(self.root, files, qdir, verb="audit").manifest if files else None

    def _repr_html_(self) -> str:  # Jupyter: the offline page, isolated in a frame
        import html

        from convlens.audit.output import render_page

        return (f"<iframe srcdoc=\"{html.escape(render_page(self))}\" "
                "style='width:100%;height:640px;border:0'></iframe>")

    def chosen(self, kinds: list[str]) -> list[dict[str, Any]]:
        """Files to move for ``kinds``: flagged label errors and outliers, and every member of a
        near-duplicate group but its first. Each: ``path``, ``kind``, ``message``."""
        out: dict[str, dict[str, Any]] = {}
        if "label" in kinds:
            for r in self.label_issues():
                out.setdefault(r["path"], {"path": r["path"], "kind": "label_error", "message":
                               f"filed as {r['given']}, looks like {r['suggested']} ({r['confidence']:.2f})"})
        if "duplicate" in kinds:
            for g in self.near_duplicates():
                for p in g["paths"][1:]:
                    out.setdefault(p, {"path": p, "kind": "near_duplicate",
                                       "message": f"near duplicate of {g['paths'][0]} ({g['similarity']:.3f})"})
        if "outlier" in kinds:
            for r in self.outliers():
                out.setdefault(r["path"], {"path": r["path"], "kind": "outlier",
                                           "message": f"unlike the dataset (score {r['score']:.3f})"})
        return list(out.values())


def audit_dataset(root: str | os.PathLike[str], *, backbone: str = DEFAULT_BACKBONE, folds: int = DEFAULT_FOLDS,
                  similarity: float = DEFAULT_DUPLICATE_SIMILARITY, cache_dir: str | None = None,
                  workers: int = 0, seed: int = 0, progress: bool = False,
                  features_fn: Callable[..., Any] | None = None) -> AuditReport:
    """Audit ``root``. ``features_fn(root, backbone, cache_dir, workers, progress)`` returns an
    object with ``features`` (N x D), ``labels``, ``paths``, ``subsets``, ``classes``, ``root``,
    ``skipped`` and ``seconds`` (default: :func:`convlens.engine.features.folder_features`:
    pretrained features of every usable image, decoded and featurised once, then cached)."""
    if not 0.0 < similarity <= 1.0:
        raise ConfigError(f"similarity must be in (0, 1]. Received: similarity={similarity}")
    if features_fn is None:
        from convlens.engine.features import folder_features as features_fn
    fs = features_fn(root, backbone, cache_dir=cache_dir, workers=workers, progress=progress)
    if len(fs.paths) < 4:
        raise DataError(f"an audit needs at least a few usable images; found {len(fs.paths)}. Received: {str(root)!r}")
    t0 = time.perf_counter()
    findings = find_all(fs.features, fs.labels, len(fs.classes), folds=folds, seed=seed,
                        min_similarity=similarity, class_names=list(fs.classes))
    seconds = {**dict(getattr(fs, "seconds", {}) or {}), "findings": time.perf_counter() - t0}
    return AuditReport(root=Path(fs.root), classes=list(fs.classes), paths=list(fs.paths),
                       labels=np.asarray(fs.labels), subsets=list(getattr(fs, "subsets", [""] * len(fs.paths))),
                       findings=findings, backbone=str(backbone), skipped=list(fs.skipped), seconds=seconds,
                       params={"folds": findings.folds, "similarity": similarity, "seed": seed})


def audit(dir: str | os.PathLike[str], *, backbone: str = DEFAULT_BACKBONE, folds: int = DEFAULT_FOLDS,
          similarity: float = DEFAULT_DUPLICATE_SIMILARITY, cache_dir: str | None = None, workers: int = 0,
          progress: bool | None = None) -> AuditReport:
    """Find likely label errors, near duplicates and outliers with pretrained features
    (``convlens audit``).

    Nothing is changed: ``report.label_issues()``, ``near_duplicates()`` and ``outliers()`` list
    the findings, ``report.quarantine(qdir, kinds=("label",))`` moves chosen ones out (with an undo
    manifest), ``report.to_dict()`` is ``--json``'s format.
    """
    from convlens.display import shows_progress

    progress = shows_progress() if progress is None else progress
    return audit_dataset(dir, backbone=backbone, folds=folds, similarity=similarity, cache_dir=cache_dir,
                         workers=workers, progress=progress)


# `convlens.audit(dir)` is the public verb: this package, when called, runs audit().
callable_module(__name__, "audit")
