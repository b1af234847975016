"""`convlens runs`, `convlens compare` and `train --tensorboard` on tiny real training runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from convlens.cli import main
from convlens.engine import tensorboard
from convlens.engine.runs import config_differences, find_runs, read_run
from convlens.engine.training import train
from tests.engine.helpers import csv_rows, make_dataset, tiny_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("runs")
    data = make_dataset(tmp / "ds", classes=2, per_class=12)
    train(tiny_config(data, tmp, name="first", epochs=2, tensorboard=True))
    train(tiny_config(data, tmp, name="second", epochs=3, lr=0.01))
    (tmp / "runs" / "not-a-run").mkdir()
    return tmp / "runs"


def test_runs_lists_each_run_with_its_best_epoch(two_runs: Path) -> None:
    runs = find_runs(two_runs)
    assert [r.name for r in runs] == ["first", "second"]
    for r in runs:
        rows = csv_rows(r.path / "metrics.csv")
        best = max(float(x["val_acc"]) for x in rows)
        row = r.row()
        assert row["best_val_acc"] == pytest.approx(best)
        assert row["model"] == "tiny" and row["status"] == "finished"
        assert row["time"] == pytest.approx(sum(float(x["seconds"]) for x in rows), abs=0.05)
    assert runs[0].row()["epochs"] == "2/2" and runs[1].row()["epochs"] == "3/3"


def test_a_run_without_metrics_csv_is_listed_from_its_bundle(two_runs: Path, tmp_path: Path) -> None:
    """Runs that fit a linear head write no metrics.csv: the bundle's metrics stand in."""
    import shutil

    from convlens.infer.bundle import read_meta

    copy = tmp_path / "head-only"
    shutil.copytree(two_runs / "first", copy)
    (copy / "metrics.csv").unlink()
    row = read_run(copy).row()
    meta = read_meta(copy / "model.convlens").metrics
    assert row["best_val_acc"] == meta["val_accuracy"] and row["best_epoch"] == meta["best_epoch"]
    assert row["status"] == "finished"


def test_runs_verb_prints_tab_separated_lines_when_piped(two_runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", str(two_runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t")[:5] == ["name", "date", "model", "data", "best_val_acc"]
    assert [ln.split("\t")[0] for ln in lines[1:]] == ["first", "second"]


def test_compare_writes_png_and_html_with_the_config_differences(two_runs: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    diffs = config_differences([read_run(two_runs / "first"), read_run(two_runs / "second")])
    assert diffs["epochs"] == [2, 3] and diffs["lr"][1] == 0.01 and "image_size" not in diffs
    out = tmp_path / "cmp"
    assert main(["compare", str(two_runs / "first"), str(two_runs / "second"), "--out", str(out)]) == 0
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    assert "lr" in page and "0.01" in page
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_compare_rejects_a_folder_that_is_not_a_run(two_runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(two_runs / "first"), str(two_runs / "not-a-run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not-a-run" in err[0] and "not a convlens run folder" in err[0]


def test_tensorboard_event_files_hold_every_epoch(two_runs: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert not list((two_runs / "second").glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(two_runs / "first"))
    ea.Reload()
    rows = csv_rows(two_runs / "first" / "metrics.csv")
    val = ea.Scalars("accuracy/validation")
    assert [s.step for s in val] == [1, 2]
    assert [s.value for s in val] == pytest.approx([float(r["val_acc"]) for r in rows])
    assert "tensorflow" not in sys.modules  # scalars are written without importing TensorFlow


def test_tensorboard_missing_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    with pytest.raises(Exception, match="pip install"):
        tensorboard.require()
    data = make_dataset(tmp_path / "ds", per_class=4)
    code = main(["train", str(data), "--preset", "quick", "--tensorboard", "--project", str(tmp_path / "runs"),
                 "--cache-dir", str(tmp_path / "cache"), "--workers", "1"])
    assert code == 2
    assert "tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # failed before decoding anything


def test_pretrained_runs_write_metrics_and_tensorboard_too(tmp_path: Path) -> None:
    """The linear-head path (what photo datasets get by default) is listed, compared and logged."""
    import torch
    from safetensors.torch import save_file

    from convlens.config import resolve_train_config
    from convlens.engine import training
    from convlens.models import create

    torch.manual_seed(0)
    weights = tmp_path / "lite0.safetensors"  # random weights: only the plumbing is under test
    save_file({k: v for k, v in create("efficientnet_lite0", 2).state_dict().items() if not k.startswith("head.")},
              str(weights))
    data = make_dataset(tmp_path / "data", per_class=6, size=40)
    cfg = resolve_train_config(None, None, {
        "data": str(data), "cache_dir": str(tmp_path / "cache"), "project": str(tmp_path / "runs"), "workers": 1,
        "threads": 1, "val_fraction": 0.25, "pretrained": str(weights), "tensorboard": True, "name": "head"})
    result = training.train(cfg)
    row = read_run(result.run_dir).row()
    assert row["best_val_acc"] == pytest.approx(result.metrics["val_accuracy"]) and row["epochs"].startswith("1/")
    assert list(result.run_dir.glob("events.out.tfevents.*"))


def test_runs_reads_without_torch() -> None:
    """`convlens runs` and `compare` only read files: importing them must not start torch (~1.4 s)."""
    import subprocess

    code = "import sys, convlens.engine.runs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
