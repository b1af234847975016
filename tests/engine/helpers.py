"""Tiny generated datasets and configs for fast end-to-end training tests."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from convlens.config import TrainConfig, resolve_train_config
from convlens.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def make_dataset(root: Path, classes: int = 2, per_class: int = 16, size: int = 20, seed: int = 0) -> Path:
    """Class folders of small PNGs; each class has its own dominant colour channel and brightness,
    so a tiny model learns them in a couple of epochs."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 70, (size, size, 3), dtype=np.uint8)
            a[:, :, c % 3] += np.uint8(110 + 40 * (c // 3))
            Image.fromarray(a).save(d / f"img_{i:03d}.png")
    return root


def tiny_config(data: Path, tmp: Path, **overrides: Any) -> TrainConfig:
    """The ``quick`` preset shrunk to 16 px, batch 8, one decoding worker, everything under ``tmp``."""
    values: dict[str, Any] = {
        "data": str(data), "image_size": 16, "batch_size": 8, "epochs": 2, "workers": 1,
        "cache_dir": str(tmp / "cache"), "project": str(tmp / "runs"), "threads": 1,
    }
    values.update(overrides)
    return resolve_train_config("quick", None, values)


def ddp_env() -> dict[str, str]:
    """The environment of a ``convlens train --nproc N`` subprocess: no torchrun variables of
    this process, this checkout importable, a collective timeout that fails a deadlock."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["CONVLENS_DDP_TIMEOUT"] = "60"
    return env


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (a run's ``metrics.csv``, ``split.csv``, ``predictions.csv``)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def quiet() -> Console:
    """A console that prints into a string (wide: lines are not wrapped)."""
    return Console(file=io.StringIO(), width=200)


def assert_same_run(run_dir: Path, single_dir: Path, outliers: float = 0.0) -> dict[str, torch.Tensor]:
    """A distributed run's final weights and metrics equal one process's on the same data (the
    metrics are reduced over the ranks: the same sums over the same samples); returns its weights.

    ``outliers``: the fraction of weights allowed outside the tolerance (Adam steps a weight whose
    gradient is rounding noise by the full learning rate, in either direction); the losses then
    agree to 1e-3 instead of 1e-4 (those weights move them: fine-tuning half of Lite0's units
    put val_loss just outside 1e-4 in one clean-clone CI run of several).
    """
    a = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(single_dir / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    bad = total = 0
    for k in a:
        if not outliers:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
        bad += int((~torch.isclose(a[k], b[k], rtol=1e-4, atol=1e-5)).sum())
        total += a[k].numel()
    assert bad <= outliers * total, f"{bad} of {total} weights differ"
    rel = 1e-3 if outliers else 1e-4
    for ra, rb in zip(csv_rows(run_dir / "metrics.csv"), csv_rows(single_dir / "metrics.csv"), strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=rel, abs=1e-5), (key, ra[key], rb[key])
    return a
