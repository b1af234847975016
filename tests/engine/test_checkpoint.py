"""Checkpoints: plain data only, atomic, safe loading, RNG states."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from convlens.engine.checkpoint import (
    CheckpointError,
    checkpoint_bytes,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from convlens.errors import UserError


class _NotPlainData:
    """A custom class: a checkpoint holding one must be refused by weights_only loading."""

    def __init__(self) -> None:
        self.x = 1


def _state() -> dict:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    return {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
            "config": {"lr": 1e-3, "mean": [0.0], "data": None}, "rng": rng_state(),
            "history": [{"epoch": 1, "val_acc": None}]}


def test_round_trip_is_plain_data(tmp_path: Path) -> None:
    state = _state()
    path = save_checkpoint(tmp_path / "checkpoints" / "last.pt", state)
    back = load_checkpoint(path)
    assert back["epoch"] == 3 and back["config"] == state["config"] and back["history"] == state["history"]
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["state"][0]["exp_avg"].shape == (4, 3)
    # No temporary file is left beside it.
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_bytes_can_be_written_to_two_files(tmp_path: Path) -> None:
    data = checkpoint_bytes(_state())
    save_checkpoint(tmp_path / "last.pt", data)
    save_checkpoint(tmp_path / "best.pt", data)
    assert (tmp_path / "last.pt").read_bytes() == (tmp_path / "best.pt").read_bytes()


def test_truncated_checkpoint_gives_one_line_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last.pt", _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated") as e:
        load_checkpoint(path)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "convlens-checkpoint", "obj": _NotPlainData()}, path)
    with pytest.raises(CheckpointError, match="not plain data"):
        load_checkpoint(path)


def test_foreign_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a convlens checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resolve_checkpoint_from_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "train"
    path = save_checkpoint(run / "checkpoints" / "last.pt", _state())
    assert resolve_checkpoint(run) == path
    assert resolve_checkpoint(path) == path
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "runs" / "nope")
    (tmp_path / "runs" / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints/last.pt"):
        resolve_checkpoint(tmp_path / "runs" / "empty")


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"keep")
    (tmp_path / "photo.jpg").write_bytes(b"keep")
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "photo.jpg"]


def test_rng_state_survives_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]
