"""Novelty: how unlike the training images an image is, and the cut-off above which a
prediction is ``unknown``.

The score is the cosine distance from an image's pooled features (the global average of the
model's last feature map, :meth:`ConvlensModel.forward_pooled`) to its ``k``-th nearest
training image: ``1 - cos(f, ref_k)``, from 0 (a training image) up to 2. Measured on Lite0
features (docs/benchmarks.md) it separates held-out cats and dogs from flowers, trucks and
churches far better than the largest class probability or a Mahalanobis distance, and it
needs no fitting beyond keeping the training features (fp16, at most
:data:`MAX_REFERENCE` rows, in the bundle's ``novelty.safetensors``).

The threshold is chosen on validation images (never used to fit the model): the smallest
score that keeps at least ``accept`` of them. With fewer than :data:`MIN_VALIDATION` validation
images the rule falls back to leave-one-out scores of the training images themselves (each
against the others), and the index says so in ``rule``.

numpy only (no torch): the ONNX path uses it too.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from convlens.config import DEFAULT_ACCEPT
from convlens.errors import BundleError

METHOD = "knn-cosine"
DEFAULT_K = 10  # any k in 5-50 gave the same separation on Lite0 features
MIN_VALIDATION = 20  # fewer validation images than this: the threshold comes from the training images
MAX_REFERENCE = 10_000  # training rows kept (evenly per class beyond it): 25 MB of fp16 at 1280 features
RULE_VALIDATION = "validation"
RULE_TRAINING = "training-leave-one-out"
_CHUNK = 1024  # query rows per similarity block: bounds memory at 1024 x MAX_REFERENCE floats
FEW_QUERIES = 64  # up to this many query rows, the similarities run on one BLAS thread (see similarities)


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero (distance 1 to everything)."""
    f = np.asarray(features, dtype=np.float32)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.maximum(norm, 1e-12)


@functools.cache
def _blas() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # scans the loaded libraries: once


def similarities(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``queries @ reference.T``. A few query rows (a served request, a short predict) run on one
    BLAS thread: OpenBLAS's other threads spin for a while after every product, and between a
    server's requests that spinning took a core from the model (``convlens serve`` at concurrency
    16: 30 -> 58 requests/s, docs/benchmarks.md "Serving")."""
    if len(queries) > FEW_QUERIES:
        return queries @ reference.T
    with _blas().limit(limits=1, user_api="blas"):
        return queries @ reference.T


def kth_similarity(queries: np.ndarray, reference: np.ndarray, k: int, *, exclude_self: bool = False) -> np.ndarray:
    """Cosine similarity of each (unit) query row to its ``k``-th most similar reference row.

    ``exclude_self``: queries *are* the reference rows (leave-one-out); each row's own match is skipped.
    """
    ref = np.asarray(reference, dtype=np.float32)
    kk = min(k + (1 if exclude_self else 0), ref.shape[0])
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), _CHUNK):
        sims = similarities(queries[start:start + _CHUNK], ref)
        # The kk largest, unordered; the smallest of them is the kk-th most similar.
        part = np.partition(sims, sims.shape[1] - kk, axis=1)[:, sims.shape[1] - kk:]
        out[start:start + _CHUNK] = part.min(axis=1)
    return out


def distance(similarity: np.ndarray) -> np.ndarray:
    """Novelty from a cosine similarity: ``1 - s``, clipped to [0, 2] (the fp16 reference can
    put a duplicate of a training image a hair above similarity 1)."""
    return np.clip(1.0 - np.asarray(similarity, dtype=np.float32), 0.0, 2.0)


def choose_threshold(scores: np.ndarray, accept: float) -> float:
    """The smallest novelty that keeps at least ``accept`` of ``scores`` as known (score <= threshold)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if not len(s):
        raise ValueError("no scores to choose a threshold from")
    i = min(len(s) - 1, max(0, int(np.ceil(accept * len(s))) - 1))
    return float(s[i])


def reference_rows(labels: np.ndarray, limit: int = MAX_REFERENCE) -> np.ndarray:
    """Indices of the training rows to keep: all up to ``limit``, else evenly spaced within each
    class in proportion to its size (deterministic: the same data gives the same bundle)."""
    labels = np.asarray(labels)
    if len(labels) <= limit:
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, round(limit * len(idx) / len(labels)))
        keep.append(idx[np.linspace(0, len(idx) - 1, n).round().astype(int)])
    return np.sort(np.unique(np.concatenate(keep)))


@dataclass(frozen=True)
class NoveltyIndex:
    """The training images' features and the decision rule: what a bundle stores for novelty."""

    reference: np.ndarray  # (N, C) float16, unit rows
    labels: np.ndarray  # (N,) int32: the class index of each reference row
    paths: tuple[str, ...]  # the dataset-relative path of each reference row
    k: int
    threshold: float  # novelty above it -> unknown
    accept: float  # the share of validation (or training) images the threshold keeps
    rule: str  # RULE_VALIDATION or RULE_TRAINING
    validation_images: int  # how many images chose the threshold

    @property
    def dim(self) -> int:
        return int(self.reference.shape[1])

    @functools.cached_property
    def reference32(self) -> np.ndarray:
        """The reference in float32, converted once (not on every query: at 10,000 rows the
        conversion costs more than the search)."""
        return self.reference.astype(np.float32)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Novelty of each row of pooled ``features`` (N, C): 1 - similarity to the k-th nearest."""
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"novelty needs (N, {self.dim}) features. Received: shape={f.shape}")
        return distance(kth_similarity(normalise(f), self.reference32, self.k))

    def neighbours(self, features: np.ndarray, n: int) -> list[list[tuple[int, float]]]:
        """For each row, the ``n`` most similar reference rows: ``(row, cosine similarity)``, best first."""
        q = normalise(features)
        ref = self.reference32
        n = min(int(n), len(ref))
        out: list[list[tuple[int, float]]] = []
        for start in range(0, len(q), _CHUNK):
            sims = similarities(q[start:start + _CHUNK], ref)
            top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
            for row, cand in zip(sims, top, strict=True):
                order = cand[np.lexsort((cand, -row[cand]))]  # similarity, then row: stable ties
                out.append([(int(j), min(1.0, float(row[j]))) for j in order])  # fp16 rows: a hair over 1
        return out

    # -- the bundle's novelty section ------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        return {"reference": np.ascontiguousarray(self.reference, dtype=np.float16),
                "labels": np.ascontiguousarray(self.labels, dtype=np.int32)}

    def to_json(self, sha256: str) -> dict[str, Any]:
        """The ``novelty`` entry of model.json (``sha256``: of the tensors' safetensors bytes)."""
        return {"method": METHOD, "k": self.k, "threshold": self.threshold, "accept": self.accept,
                "rule": self.rule, "validation_images": self.validation_images, "rows": len(self.labels),
                "dim": self.dim, "paths_sha256": paths_digest(self.paths), "sha256": sha256}

    @classmethod
    def from_parts(cls, d: dict[str, Any], tensors: dict[str, np.ndarray], paths: Sequence[str],
                   num_classes: int, where: str) -> NoveltyIndex:
        """Rebuild from model.json's entry, the tensors and the paths; a one-line BundleError for
        anything inconsistent (never a silently ignored section)."""
        def bad(why: str) -> BundleError:
            return BundleError(f"{where}: the novelty section is damaged or does not match ({why}); "
                               "retrain, or predict with --no-reject")

        if d.get("method") != METHOD:
            raise bad(f"method {d.get('method')!r}, this convlens knows {METHOD!r}")
        ref, labels = tensors.get("reference"), tensors.get("labels")
        if ref is None or labels is None or ref.ndim != 2 or labels.ndim != 1:
            raise bad("reference features or labels missing")
        try:
            k, rows, dim = int(d["k"]), int(d["rows"]), int(d["dim"])
            threshold, accept = float(d["threshold"]), float(d["accept"])
            rule, n_val = str(d["rule"]), int(d["validation_images"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"field {e}") from e
        if ref.shape != (rows, dim) or labels.shape != (rows,) or len(paths) != rows:
            raise bad(f"{rows} x {dim} recorded, {ref.shape} features, {len(labels)} labels, {len(paths)} paths")
        if d.get("paths_sha256") != paths_digest(paths):
            raise bad("the paths do not match their recorded digest")
        if not (k >= 1 and rows >= 1 and 0 < accept <= 1 and np.isfinite(threshold)
                and rule in (RULE_VALIDATION, RULE_TRAINING)):
            raise bad(f"k={k}, rows={rows}, accept={accept}, threshold={threshold}, rule={rule!r}")
        if labels.min() < 0 or labels.max() >= num_classes or not np.isfinite(ref).all():
            raise bad("labels outside the classes or non-finite features")
        return cls(reference=ref.astype(np.float16), labels=labels.astype(np.int32), paths=tuple(paths),
                   k=k, threshold=threshold, accept=accept, rule=rule, validation_images=n_val)


def paths_digest(paths: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(paths)).encode()).hexdigest()


def build_index(train_features: np.ndarray, train_labels: np.ndarray, train_paths: Sequence[str],
                val_features: np.ndarray | None, *, accept: float = DEFAULT_ACCEPT, k: int = DEFAULT_K,
                limit: int = MAX_REFERENCE) -> NoveltyIndex:
    """The index of a trained model: its training features (at most ``limit`` rows) and the
    threshold that keeps ``accept`` of the validation images (or, with fewer than
    :data:`MIN_VALIDATION`, of the training images scored leave-one-out)."""
    if not 0 < accept <= 1:
        raise ValueError(f"accept must be in (0, 1]. Received: accept={accept}")
    rows = reference_rows(np.asarray(train_labels), limit)
    ref = normalise(np.asarray(train_features)[rows]).astype(np.float16)
    labels = np.asarray(train_labels, dtype=np.int32)[rows]
    k = max(1, min(int(k), len(rows) - 1 if len(rows) > 1 else 1))
    if val_features is not None and len(val_features) >= MIN_VALIDATION:
        scores = distance(kth_similarity(normalise(val_features), ref, k))
        rule, n = RULE_VALIDATION, len(val_features)
    else:
        scores = distance(kth_similarity(ref.astype(np.float32), ref, k, exclude_self=True))
        rule, n = RULE_TRAINING, len(rows)
    return NoveltyIndex(reference=ref, labels=labels, paths=tuple(str(train_paths[i]) for i in rows), k=k,
                        threshold=choose_threshold(scores, accept), accept=float(accept), rule=rule,
                        validation_images=n)
