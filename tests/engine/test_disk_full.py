"""A full disk is one line, never a crash: the run stops with every earlier output whole, says how
to continue, and ``--resume`` then finishes as if nothing had happened (the kill -9 guarantee,
extended to ENOSPC). ENOSPC is injected at the writer (``enospc_at``) or real (a small tmpfs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convlens.data.preprocess import Preprocessing
from convlens.engine.checkpoint import load_checkpoint
from convlens.engine.features import Backbone, cached_features
from convlens.engine.resume import resume_config
from convlens.engine.training import train
from convlens.errors import DiskFullError
from convlens.infer.bundle import read_weights
from convlens.models import create
from convlens.models.pretrained import PretrainedSource, PretrainedWeights
from tests.data.conftest import tree_hashes
from tests.engine.helpers import csv_rows, make_dataset, quiet, tiny_config

OVERRIDES = {"epochs": 3, "rotation": 0.1, "mixup": 0.2}
TIMING = {"img_per_s", "seconds"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("full") / "ds", classes=2, per_class=16)


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run with room on the disk."""
    return train(tiny_config(data, tmp_path_factory.mktemp("ref"), **OVERRIDES), console=quiet()).run_dir


def _no_temporaries(run: Path) -> None:
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")], "a partial file was left behind"


def _assert_same_run(a: Path, b: Path) -> None:
    wa = load_checkpoint(a / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(b / "checkpoints" / "last.pt")["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    _, ba = read_weights(a / "model.convlens")
    _, bb = read_weights(b / "model.convlens")
    assert all(torch.equal(ba[k], bb[k]) for k in ba)
    rows = [[{k: v for k, v in r.items() if k not in TIMING} for r in csv_rows(d / "metrics.csv")] for d in (a, b)]
    assert rows[0] == rows[1]
    assert (b / "report.html").is_file()


@pytest.mark.parametrize(("needle", "skip"), [
    (".last.pt.", 1),         # the checkpoint of epoch 2 of 3: mid-run
    (".metrics.csv.", 1),     # a small file of the run folder, mid-run
    (".model.convlens.", 0),  # the bundle, once training is done
    (".report.html.", 0),     # the report, before the bundle
])
def test_a_full_disk_stops_the_run_and_resume_finishes_exactly(data: Path, reference: Path, tmp_path: Path,
                                                               enospc_at, needle: str, skip: int) -> None:
    failed = enospc_at(needle, skip)
    cfg = tiny_config(data, tmp_path, **OVERRIDES)
    with pytest.raises(DiskFullError) as e:
        train(cfg, console=quiet())
    assert failed, f"no write of {needle} failed"
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the disk filled while writing ") and " free in " in msg, msg
    assert "then continue with: convlens train --resume " in msg, msg
    run = Path(msg.rsplit("--resume ", 1)[1])
    assert run.is_dir() and run.parent == Path(cfg.project)
    _no_temporaries(run)
    state = load_checkpoint(run / "checkpoints" / "last.pt")  # the previous checkpoint, whole
    assert state["epoch"] == (1 if needle in (".last.pt.", ".metrics.csv.") else 3)
    assert not (run / "model.convlens").exists()
    resumed = train(resume_config(run, {}), resume=run, console=quiet())
    assert resumed.run_dir == run
    _assert_same_run(reference, run)


def test_a_full_disk_before_the_first_checkpoint_says_where_else_to_write(data: Path, tmp_path: Path,
                                                                          enospc_at) -> None:
    enospc_at(".best.pt.")  # epoch 1: nothing to resume from yet
    with pytest.raises(DiskFullError, match=r"best\.pt .*; free some space, or put the run folders on a "
                                            r"disk with room: --project DIR$"):
        train(tiny_config(data, tmp_path, epochs=1), console=quiet())
    _no_temporaries(tmp_path / "runs")


# ----------------------------------------------------------------------------- the feature cache
def _backbone() -> Backbone:
    torch.manual_seed(0)
    source = PretrainedSource(arch="tiny", path="tiny", sha256="0" * 64, packaged=False)
    model = create("tiny", 2).eval()
    return Backbone(model, PretrainedWeights(model.state_dict(), source), Preprocessing(size=(16, 16)))


def test_the_feature_cache_is_checked_before_computing_and_keeps_its_last_array(tmp_path: Path, enospc_at,
                                                                              small_disk, monkeypatch) -> None:
    from convlens.engine import features

    bb = _backbone()
    images = np.random.default_rng(0).integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    hashes = [f"h{i}" for i in range(12)]
    ds, cache = tmp_path / "ds", tmp_path / "cache"
    first = cached_features(bb, images[:6], hashes[:6], ds, cache_dir=cache, precision="fp32")
    enospc_at("features-")
    with pytest.raises(DiskFullError, match="CONVLENS_CACHE_DIR=DIR or --cache-dir DIR$"):
        cached_features(bb, images, hashes, ds, cache_dir=cache, precision="fp32")

    def no_computing(*a: object, **k: object) -> np.ndarray:
        raise AssertionError("the earlier rows were computed again")

    monkeypatch.setattr(features, "extract_features", no_computing)
    again = cached_features(bb, images[:6], hashes[:6], ds, cache_dir=cache, precision="fp32")
    np.testing.assert_array_equal(first, again)  # the previous cache entry, whole

    disk = small_disk("64k")
    (disk / "filler").write_bytes(bytes(60 * 1024))  # what another program took
    with pytest.raises(DiskFullError, match=r"not enough disk space for the feature cache \(12 x \d+ floats\)"):
        cached_features(bb, images, hashes, ds, cache_dir=disk, precision="fp32")  # before computing
    assert sorted(p.name for p in disk.rglob("*") if p.is_file()) == ["filler"]


# ----------------------------------------------------------------------------- the command line
def _train_cli(data: Path, tmp: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """``convlens train`` in a subprocess: a SIGBUS would show as a return code, not kill pytest."""
    cmd = [sys.executable, "-m", "convlens", "train", str(data), "--preset", "quick", "--workers", "1",
           "--threads", "1", "--epochs", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, **env}, cwd=tmp)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)  # -7 would be SIGBUS
    assert "Bus error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("convlens train: error: "), done.stderr
    return lines[0]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_train_with_the_cache_on_a_full_disk_is_one_line(tmp_path: Path, small_disk) -> None:
    data = make_dataset(tmp_path / "pets", classes=2, per_class=16)
    before = tree_hashes(data)
    disk = small_disk("3m")
    done = _train_cli(data, tmp_path, {"CONVLENS_CACHE_DIR": str(disk)}, "--image-size", "224",
                      "--project", str(tmp_path / "runs"))
    line = _one_error_line(done)
    assert "not enough disk space for the decode cache (32 images of 252x252x3): it needs 5.8 MB" in line, line
    assert str(disk) in line and "MB free" in line and "CONVLENS_CACHE_DIR=DIR or --cache-dir DIR" in line, line
    assert tree_hashes(data) == before  # the photos, byte for byte
    assert not [p for p in disk.rglob("*") if p.is_file() and p.suffix in (".npy", ".tmp")]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_train_with_the_run_folders_on_a_full_disk_is_one_line(tmp_path: Path, small_disk) -> None:
    data = make_dataset(tmp_path / "pets", classes=2, per_class=16)
    disk = small_disk("1m")
    (disk / "filler").write_bytes(bytes(1024 * 1024 - 24 * 1024))  # room for the config, not a checkpoint
    done = _train_cli(data, tmp_path, {}, "--image-size", "16", "--cache-dir", str(tmp_path / "cache"),
                      "--project", str(disk / "runs"))
    line = _one_error_line(done)
    assert str(disk / "runs") in line and "free" in line and "--project DIR" in line, line
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
