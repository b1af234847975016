"""Temperature scaling (convlens.evaluate.calibration): the fitted temperature, the decision it
keeps, and the slice a from-scratch run holds out for it."""

from __future__ import annotations

import numpy as np
import pytest

from convlens.decision import activation_for, decide, probabilities
from convlens.evaluate import calibration as cal


def _sampled(units: int, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from exactly those logits' probabilities (calibrated by construction)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, (n, units))
    p = probabilities(z, activation_for(units))
    y = np.array([rng.choice(p.shape[1], p=row) for row in p])
    return z, y


@pytest.mark.parametrize("units", [1, 5])
def test_recovers_a_known_temperature(units: int) -> None:
    z, y = _sampled(units)
    assert cal.fit_temperature(z, y) == pytest.approx(1.0, abs=0.08)  # calibrated: stays near 1
    for true_t in (0.4, 3.0):  # logits made over- (x 3) or under-confident (x 0.4)
        assert cal.fit_temperature(z * true_t, y) == pytest.approx(true_t, rel=0.08)
        assert cal.ece_of(z * true_t, y, cal.fit_temperature(z * true_t, y)) < cal.ece_of(z * true_t, y)


@pytest.mark.parametrize("units", [1, 4])
def test_temperature_never_changes_the_decision(units: int) -> None:
    z, y = _sampled(units, n=500, seed=1)
    t = cal.fit_temperature(z * 4.0, y)
    act = activation_for(units)
    assert t != 1.0
    np.testing.assert_array_equal(decide(probabilities(z * 4.0 / t, act), act), decide(probabilities(z * 4.0, act), act))


def test_too_few_images_or_one_class_keep_temperature_one() -> None:
    z, y = _sampled(3, n=cal.MIN_IMAGES - 1)
    assert cal.fit_temperature(z, y) == 1.0
    assert cal.fit_temperature(np.ones((50, 3)), np.zeros(50, dtype=np.int64)) == 1.0
    separated = np.where(np.arange(40) % 2, 1.0, -1.0)[:, None]  # every held-out image right: nothing to fit
    assert cal.fit_temperature(separated, np.arange(40) % 2) == 1.0


def test_log_loss_matches_scikit_learn() -> None:
    from sklearn.metrics import log_loss

    z, y = _sampled(3, n=300, seed=2)
    assert cal.log_loss(z, y, 2.0) == pytest.approx(log_loss(y, probabilities(z / 2.0)), rel=1e-9)
    z1, y1 = _sampled(1, n=300, seed=3)
    assert cal.log_loss(z1, y1) == pytest.approx(log_loss(y1, probabilities(z1)), rel=1e-9)


def test_calibration_slice_is_per_class_deterministic_and_small() -> None:
    y = np.repeat([0, 1, 2], [300, 100, 10])
    held = cal.calibration_slice(y, seed=7)
    assert np.array_equal(held, cal.calibration_slice(y, seed=7))
    assert not np.array_equal(held, cal.calibration_slice(y, seed=8))
    assert len(held) == pytest.approx(cal.SLICE_FRACTION * len(y), abs=2)
    counts = np.bincount(y[held], minlength=3)
    assert counts[0] > counts[1] > counts[2] >= 1 and (np.bincount(y) - counts >= 1).all()  # every class still trains
    assert len(cal.calibration_slice(np.repeat([0, 1], 6000), seed=0)) <= cal.SLICE_MAX
    assert len(cal.calibration_slice(np.repeat([0, 1], 50), seed=0)) == 0  # 10 images: too few to fit anything
