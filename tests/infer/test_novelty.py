"""The novelty index: the k-th-neighbour score, the threshold rule, the reference subsample and
the bundle's novelty section (round trip and strict refusal)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from convlens.errors import BundleError
from convlens.infer import novelty as nv
from convlens.infer.bundle import load_model, read_meta, read_novelty, save_bundle
from convlens.models.tta import TemperatureScaled, flip_averaged, unwrap
from tests.bundles import make_meta, make_model


def _clusters(n: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two tight clusters around different directions: classes 0 and 1."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:2] * 5
    labels = np.arange(n) % 2
    return centres[labels] + rng.normal(0, 0.3, (n, dim)).astype(np.float32), labels


def test_kth_similarity_matches_a_sort() -> None:
    rng = np.random.default_rng(1)
    q, ref = nv.normalise(rng.normal(size=(7, 5))), nv.normalise(rng.normal(size=(30, 5)))
    sims = q @ ref.T
    expected = -np.sort(-sims, axis=1)[:, 3]  # 4th most similar
    np.testing.assert_allclose(nv.kth_similarity(q, ref, 4), expected, rtol=1e-6)


def test_leave_one_out_skips_each_rows_own_match() -> None:
    ref = nv.normalise(np.random.default_rng(2).normal(size=(20, 4)))
    sims = ref @ ref.T
    np.fill_diagonal(sims, -np.inf)
    expected = -np.sort(-sims, axis=1)[:, 2]  # 3rd most similar other row
    np.testing.assert_allclose(nv.kth_similarity(ref, ref, 3, exclude_self=True), expected, rtol=1e-6)


def test_few_queries_run_on_one_blas_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A served request's similarities run on one BLAS thread (OpenBLAS's idle threads spin and took
    a core from the model); a large block keeps every thread; the product is the same either way."""
    controller = nv._blas()
    limits: list[dict[str, object]] = []
    real = controller.limit
    monkeypatch.setattr(controller, "limit", lambda **kw: limits.append(kw) or real(**kw))
    rng = np.random.default_rng(3)
    ref = nv.normalise(rng.normal(size=(50, 8)))
    for rows, limited in ((1, True), (nv.FEW_QUERIES, True), (nv.FEW_QUERIES + 1, False)):
        limits.clear()
        q = nv.normalise(rng.normal(size=(rows, 8)))
        np.testing.assert_allclose(nv.similarities(q, ref), q @ ref.T, rtol=1e-6)
        assert limits == ([{"limits": 1, "user_api": "blas"}] if limited else [])


@pytest.mark.parametrize("accept", [0.5, 0.9, 0.95, 1.0])
def test_threshold_keeps_at_least_the_accepted_share(accept: float) -> None:
    scores = np.random.default_rng(3).random(101)
    t = nv.choose_threshold(scores, accept)
    kept = np.mean(scores <= t)
    assert kept >= accept
    assert np.mean(scores < t) < accept  # the smallest such threshold: one step lower keeps too few


def test_foreign_features_score_higher_and_the_rule_is_validation() -> None:
    train, labels = _clusters(200)
    val, _ = _clusters(40, seed=5)
    index = nv.build_index(train, labels, [f"c/{i}.jpg" for i in range(200)], val, accept=0.95, k=5)
    assert index.rule == nv.RULE_VALIDATION and index.validation_images == 40
    assert np.mean(index.scores(val) <= index.threshold) >= 0.95
    foreign = np.random.default_rng(9).normal(size=(30, 8)).astype(np.float32)
    foreign[:, :2] = 0  # nowhere near either cluster
    assert (index.scores(foreign) > index.threshold).all()


def test_too_few_validation_images_fall_back_to_training_leave_one_out() -> None:
    train, labels = _clusters(60)
    index = nv.build_index(train, labels, [str(i) for i in range(60)], train[:5], accept=0.9, k=3)
    assert index.rule == nv.RULE_TRAINING and index.validation_images == 60
    loo = 1 - nv.kth_similarity(index.reference.astype(np.float32), index.reference, 3, exclude_self=True)
    assert index.threshold == pytest.approx(nv.choose_threshold(loo, 0.9))


def test_reference_rows_are_capped_evenly_per_class() -> None:
    labels = np.array([0] * 900 + [1] * 100)
    rows = nv.reference_rows(labels, limit=100)
    assert 95 <= len(rows) <= 105
    assert abs(np.sum(labels[rows] == 1) - 10) <= 1
    np.testing.assert_array_equal(rows, nv.reference_rows(labels, limit=100))  # deterministic


def test_neighbours_are_the_most_similar_rows_best_first() -> None:
    train, labels = _clusters(50)
    index = nv.build_index(train, labels, [str(i) for i in range(50)], None, k=3)
    (near,) = index.neighbours(train[:1], 4)
    assert near[0][0] == 0 and near[0][1] == pytest.approx(1.0, abs=1e-3)  # itself (fp16 reference)
    assert [s for _, s in near] == sorted((s for _, s in near), reverse=True)
    assert all(index.labels[j] == 0 for j, _ in near)


def _bundle_with_index(tmp_path: Path) -> tuple[Path, nv.NoveltyIndex]:
    model = make_model("tiny", 2)
    train, labels = _clusters(40, dim=model.gap_linear_head().in_features)
    index = nv.build_index(train, labels, [f"cats/{i}.jpg" for i in range(40)], train[:25], k=3)
    return save_bundle(tmp_path / "m.convlens", model, make_meta(model, ["cats", "dogs"]), novelty=index), index


def test_bundle_round_trip_of_the_novelty_section(tmp_path: Path) -> None:
    path, index = _bundle_with_index(tmp_path)
    back = read_novelty(path)
    assert back is not None
    np.testing.assert_array_equal(back.reference, index.reference)
    np.testing.assert_array_equal(back.labels, index.labels)
    assert back.paths == index.paths and back.threshold == index.threshold and back.k == 3


def test_old_bundles_have_no_novelty(tmp_path: Path) -> None:
    model = make_model("tiny", 2)
    path = save_bundle(tmp_path / "old.convlens", model, make_meta(model, ["a", "b"]))
    assert read_meta(path).novelty is None and read_novelty(path) is None


def _rewrite(src: Path, dst: Path, change: dict[str, bytes | None]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if item.filename in change:
                if change[item.filename] is not None:
                    zout.writestr(item.filename, change[item.filename])
            else:
                zout.writestr(item, zin.read(item.filename))
    return dst


def test_a_damaged_or_mismatched_novelty_section_is_refused(tmp_path: Path) -> None:
    path, _ = _bundle_with_index(tmp_path)
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("model.json"))
        paths = json.loads(z.read("novelty_paths.json"))
    missing = _rewrite(path, tmp_path / "missing.convlens", {"novelty.safetensors": None})
    with pytest.raises(BundleError, match="novelty section is incomplete"):
        read_novelty(missing)
    tampered = _rewrite(path, tmp_path / "paths.convlens",
                        {"novelty_paths.json": json.dumps(paths[::-1]).encode()})
    with pytest.raises(BundleError, match="paths do not match"):
        read_novelty(tampered)
    meta["novelty"]["k"] = 0
    bad_k = _rewrite(path, tmp_path / "k.convlens", {"model.json": json.dumps(meta).encode()})
    with pytest.raises(BundleError, match="novelty section is damaged"):
        read_novelty(bad_k)


def test_temperature_is_stored_and_applied_by_load_model(tmp_path: Path) -> None:
    model = make_model("tiny", 3)
    meta = make_meta(model, ["a", "b", "c"])
    meta.temperature = 2.5
    meta.flip_average = True
    path = save_bundle(tmp_path / "t.convlens", TemperatureScaled(flip_averaged(model), 2.5), meta)
    loaded, back = load_model(path)
    assert back.temperature == 2.5 and isinstance(loaded, TemperatureScaled)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = flip_averaged(model)(x) / 2.5
        torch.testing.assert_close(loaded(x), expected)
        logits, pooled = loaded.forward_pooled(x)
        torch.testing.assert_close(logits, expected)
        views = [model.forward_features(v).mean((2, 3)) for v in (x, x.flip(3))]
        torch.testing.assert_close(pooled, (views[0] + views[1]) / 2)
    assert unwrap(loaded).state_dict().keys() == model.state_dict().keys()
