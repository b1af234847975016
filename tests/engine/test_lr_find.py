"""The learning-rate finder: exponential sweep, smoothing, steepest-descent suggestion."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.engine.lr_find import lr_find, smooth, smooth_zero_phase, suggest_lr
from convlens.errors import ConfigError
from tests.engine.helpers import make_dataset, quiet, tiny_config


def test_smooth_is_bias_corrected() -> None:
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], beta=0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_zero_phase_smoothing_has_no_lag() -> None:
    ramp = [float(i) for i in range(100)]
    assert smooth(ramp, 0.9)[50] < 42  # a one-way average trails a ramp by ~9 steps
    assert smooth_zero_phase(ramp, 0.9)[50] == pytest.approx(50.0, abs=0.5)
    noisy = list(np.random.default_rng(0).normal(1.0, 0.3, 300))
    assert np.std(smooth_zero_phase(noisy)) < 0.3 * np.std(noisy)


def test_suggestion_is_the_steepest_descent_before_the_minimum() -> None:
    lrs = list(np.logspace(-6, 0, 61))
    x = np.log10(lrs)
    # Falls fastest at lr = 1e-3 (a tanh step centred there), bottoms out, then explodes.
    loss = list(2.0 - np.tanh(2.0 * (x + 3.0)) + np.where(x > -1.5, (x + 1.5) ** 2 * 10, 0.0))
    s = suggest_lr(lrs, loss)
    assert s is not None and math.isclose(math.log10(s), -3.0, abs_tol=0.15)
    assert suggest_lr(lrs[:3], loss[:3]) is None


def test_sweep_writes_only_the_plot(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", classes=2, per_class=12)
    cfg = tiny_config(data, tmp_path)
    out = tmp_path / "plots" / "lr.png"
    before = set((tmp_path).iterdir())
    result = lr_find(cfg, steps=30, start_lr=1e-5, end_lr=1.0, out=out, console=quiet())
    assert 10 < len(result.lrs) <= 30 and len(result.losses) == len(result.lrs) == len(result.smoothed)
    assert result.lrs[0] == pytest.approx(1e-5)
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:], strict=False))
    if len(result.lrs) == 30:
        assert result.lrs[-1] == pytest.approx(1.0)
    assert result.suggestion is None or 1e-5 <= result.suggestion <= 1.0
    Image.open(out).verify()
    # No run folder, no checkpoint: only the plot (and the decode cache) appeared.
    assert set(tmp_path.iterdir()) - before == {tmp_path / "plots", tmp_path / "cache"} - before
    assert not (tmp_path / "runs").exists()


def test_bad_sweep_arguments(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="start_lr < end_lr"):
        lr_find(cfg, start_lr=1.0, end_lr=0.1)
