"""What an audit finds, from one feature vector per image and its given label (numpy in, numpy out).

* **Label errors**: out-of-sample class probabilities from k-fold logistic regression on the
  features (scikit-learn), then cleanlab's confident learning (``find_label_issues``) and its
  label-quality score (the out-of-sample probability of the given class) for the ranking.
* **Near duplicates**: pairs whose features are almost the same direction (cosine similarity),
  grouped transitively; they catch re-encoded, resized and lightly edited copies that a byte
  hash misses.
* **Outliers**: cleanlab's ``OutOfDistribution`` score from the average cosine distance to the
  k nearest neighbours; flagged with cleanlab Datalab's rule (a distance beyond
  ``Q3 + (1/t - 1) * IQR``), so a clean dataset gets few or none.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from convlens.data.groups import linked_groups
from convlens.errors import DataError
from convlens.infer.novelty import normalise

DEFAULT_FOLDS = 5
DEFAULT_NEIGHBOURS = 10
# Cosine similarity of pooled pretrained (Lite0) features above which two images are "the same
# photo": crops, re-encodings and burst shots of cat_breeds5 score 0.92-1.0, while among the 3,000
# distinct photos of cats_and_dogs_filtered only its one real duplicate pair passes 0.90.
DEFAULT_DUPLICATE_SIMILARITY = 0.92
# Strong L2 on standardised pooled features: on cats_and_dogs_filtered (Lite0, 1280 features)
# C=1e-3 predicts 99.2% out of sample against 97.9% at C=1, and ranks 90% of 40 planted errors
# first, not 80%. Fewer features need less: C scales as 1/D (capped at 1).
C_PER_FEATURE = 1.28


def default_c(num_features: int) -> float:
    """The logistic regression's inverse L2 strength for ``num_features`` standardised features."""
    return min(1.0, C_PER_FEATURE / max(num_features, 1))
# cleanlab Datalab's default outlier threshold t: outlier when distance > Q3 + (1/t - 1) * IQR.
OUTLIER_T = 0.37037


@dataclass
class Findings:
    """Per-image arrays (row ``i`` is image ``i``) and the flagged sets."""

    pred_probs: np.ndarray  # N x K out-of-sample probabilities
    label_quality: np.ndarray  # N, the out-of-sample probability of the given label (low = suspicious)
    label_issues: np.ndarray  # indices flagged by cleanlab, most suspicious first
    duplicate_groups: list[list[int]]  # each a sorted group of >= 2 indices
    duplicate_similarity: list[float]  # the highest similarity inside each group
    outlier_scores: np.ndarray  # N, in (0, 1]; near 0 = unlike everything else
    outliers: np.ndarray  # indices flagged, most unusual first
    folds: int = DEFAULT_FOLDS


def resolve_folds(labels: np.ndarray, num_classes: int, folds: int, class_names: list[str] | None = None) -> int:
    """The number of folds the smallest class allows (at most ``folds``, at least 2)."""
    if folds < 2:
        raise DataError(f"folds must be at least 2 (each image is predicted by a model that never saw it). "
                        f"Received: folds={folds}")
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < 2:
        c = int(np.argmin(counts))
        name = class_names[c] if class_names else str(c)
        raise DataError(f"class {name!r} has {int(counts[c])} usable image(s); an audit needs at least 2 per class. "
                        f"Add images or remove the folder")
    return int(min(folds, counts.min()))


def out_of_sample_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int,
                                folds: int = DEFAULT_FOLDS, seed: int = 0, c: float | None = None) -> np.ndarray:
    """k-fold logistic regression: every image's class probabilities from a model that did not
    train on it. Features are standardised inside each fold (no information leaks across);
    ``c`` defaults to :func:`default_c`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    c = default_c(features.shape[1]) if c is None else c
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # One thread: these small fits are fastest that way, and with the OpenMP/BLAS pools on a busy
    # 2-core machine they ran 20x slower (five classes of cat_breeds5: 25 s against 1.1 s).
    with warnings.catch_warnings(), threadpool_limits(1):
        # lbfgs may stop a little before its tolerance on separable features: the ranking holds.
        warnings.filterwarnings("ignore", message=".*did not converge.*")
        probs = cross_val_predict(model, features, labels, cv=cv, method="predict_proba")
    return np.asarray(probs, dtype=np.float64).reshape(len(labels), num_classes)


def label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab: (flagged indices ranked most-suspicious first, label-quality score per image)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    flagged = find_label_issues(labels, pred_probs, filter_by="prune_by_noise_rate",
                                return_indices_ranked_by="self_confidence")
    return np.asarray(flagged, dtype=np.int64), np.asarray(quality, dtype=np.float64)


def neighbours(unit: np.ndarray, k: int = DEFAULT_NEIGHBOURS) -> Any:
    """A fitted scikit-learn ``NearestNeighbors`` (cosine) over unit-length features."""
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=min(k, len(unit) - 1), metric="cosine").fit(unit)


def duplicate_groups(unit: np.ndarray, min_similarity: float = DEFAULT_DUPLICATE_SIMILARITY,
                     block: int = 2048) -> tuple[list[list[int]], list[float]]:
    """Groups of images whose features have cosine similarity >= ``min_similarity`` with another
    member (transitively), largest similarity first; and each group's highest similarity."""
    n = len(unit)
    rows, cols, sims = [], [], []
    for start in range(0, n, block):  # blocks keep memory at block x N, not N x N
        s = unit[start:start + block] @ unit.T
        i, j = np.nonzero(s >= min_similarity)
        keep = j > i + start
        rows.append(i[keep] + start)
        cols.append(j[keep])
        sims.append(s[i[keep], j[keep]])
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)
    groups = linked_groups(n, r, c)
    group_of = np.full(n, -1)
    for k, g in enumerate(groups):
        group_of[g] = k
    best = np.full(len(groups), -1.0)
    np.maximum.at(best, group_of[r], v.astype(np.float64))  # each group's highest similarity
    order = sorted(range(len(groups)), key=lambda k: (-best[k], groups[k][0]))
    return [groups[k] for k in order], [float(best[k]) for k in order]


def outlier_scores(unit: np.ndarray, knn: Any) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab OutOfDistribution scores (low = unusual) and the flagged indices, most unusual first."""
    from cleanlab.outlier import OutOfDistribution

    with warnings.catch_warnings():  # it warns that the kNN we pass is fitted already: it is meant to be
        warnings.filterwarnings("ignore", message=".*KNN estimator has previously already been fit.*")
        scores = OutOfDistribution(params={"knn": knn}).fit_score(features=unit, verbose=False)
    scores = np.asarray(scores, dtype=np.float64)
    # score = exp(-distance / scale): -log(score) is the scaled average kNN distance.
    dist = -np.log(np.maximum(scores, 1e-300))
    q1, q3 = np.percentile(dist, [25, 75])
    flagged = np.nonzero(dist > q3 + (1 / OUTLIER_T - 1) * (q3 - q1))[0]
    return scores, flagged[np.argsort(scores[flagged], kind="stable")]


def find_all(features: np.ndarray, labels: np.ndarray, num_classes: int, *, folds: int = DEFAULT_FOLDS,
             seed: int = 0, min_similarity: float = DEFAULT_DUPLICATE_SIMILARITY,
             class_names: list[str] | None = None) -> Findings:
    """Every finding for ``features`` (N x D) with given ``labels`` (N, ints < ``num_classes``)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    k = resolve_folds(labels, num_classes, folds, class_names)
    probs = out_of_sample_probabilities(features, labels, num_classes, folds=k, seed=seed)
    issues, quality = label_issues(labels, probs)
    unit = normalise(features)  # a dot product of rows is then a cosine similarity
    groups, sims = duplicate_groups(unit, min_similarity)
    scores, outliers = outlier_scores(unit, neighbours(unit))
    return Findings(pred_probs=probs, label_quality=quality, label_issues=issues, duplicate_groups=groups,
                    duplicate_similarity=sims, outlier_scores=scores, outliers=outliers, folds=k)
