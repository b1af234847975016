"""The audit's numeric core on synthetic features: planted label flips, copies and a stray."""

from __future__ import annotations

import numpy as np
import pytest

from convlens.audit.findings import duplicate_groups, find_all, resolve_folds
from convlens.errors import DataError
from convlens.infer.novelty import normalise


def _clusters(seed: int = 0, k: int = 3, n: int = 120, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (k, d))
    y = np.repeat(np.arange(k), n)
    return (centers[y] + rng.normal(0, 0.8, (k * n, d))).astype(np.float32), y


def test_planted_label_flips_rank_first_and_are_flagged() -> None:
    x, y = _clusters()
    rng = np.random.default_rng(1)
    bad = rng.choice(len(y), 12, replace=False)
    given = y.copy()
    given[bad] = (y[bad] + 1) % 3
    f = find_all(x, given, 3)
    top = np.argsort(f.label_quality, kind="stable")[:12]
    assert len(set(top) & set(bad)) >= 11  # recall at 12
    assert len(set(bad) & set(f.label_issues)) >= 11
    # the suggestion is the true class, and the ranking is by the given class's probability
    assert all(f.pred_probs[i].argmax() == y[i] for i in bad)
    q = f.label_quality[f.label_issues]
    assert np.all(np.diff(q) >= -1e-12)


def test_clean_clusters_give_no_label_issues() -> None:
    x, y = _clusters(seed=3)
    assert len(find_all(x, y, 3).label_issues) <= 2


def test_copies_group_together_and_a_stray_is_an_outlier() -> None:
    x, y = _clusters(seed=2)
    x[10] = x[20] * 1.3 + 0.001  # a rescaled copy: same direction
    x[30] = x[20] * 0.9
    rng = np.random.default_rng(5)
    x[200] = rng.normal(0, 1, x.shape[1]) * 6  # unlike any class
    f = find_all(x, y, 3)
    assert [10, 20, 30] in f.duplicate_groups
    assert f.duplicate_similarity[f.duplicate_groups.index([10, 20, 30])] > 0.99
    assert all(len(g) >= 2 for g in f.duplicate_groups)
    assert f.outliers[0] == 200
    assert f.outlier_scores[200] == f.outlier_scores.min()


def test_duplicate_groups_match_a_brute_force_pairwise_check() -> None:
    rng = np.random.default_rng(0)
    x = normalise(rng.normal(0, 1, (300, 8)))
    groups, _ = duplicate_groups(x, 0.97, block=64)  # several blocks
    s = x @ x.T
    pairs = {(i, j) for i in range(300) for j in range(i + 1, 300) if s[i, j] >= 0.97}
    members = {i for p in pairs for i in p}
    assert {i for g in groups for i in g} == members
    for i, j in pairs:
        assert any(i in g and j in g for g in groups)


def test_a_class_with_one_image_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="class 'b' has 1 usable image"):
        resolve_folds(np.array([0, 0, 0, 1]), 2, 5, ["a", "b"])
    assert resolve_folds(np.array([0, 0, 0, 1, 1, 1]), 2, 5) == 3
