"""End-to-end training on tiny generated datasets: run folder, bundle, resume, determinism."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from convlens.config import TrainConfig
from convlens.engine.checkpoint import load_checkpoint
from convlens.engine.factory import class_weights, classification_loss
from convlens.engine.recipe import resolve
from convlens.engine.resume import resume_config
from convlens.engine.run_folder import best_row, is_better, make_run_dir
from convlens.engine.trainer import TrainingInterrupted
from convlens.engine.training import train
from convlens.errors import ConfigError
from convlens.evaluate import LabelledImages, evaluate
from convlens.infer.bundle import load_model
from convlens.models.tta import FlipAveraged, unwrap
from tests.engine.helpers import csv_rows, make_dataset, quiet, tiny_config

RUN_FILES = ["config.yaml", "split.csv", "metrics.csv", "curves.png", "checkpoints/last.pt",
             "checkpoints/best.pt", "model.convlens", "report.html", "metrics.json", "confusion_matrix.png",
             "calibration.png", "worst_mistakes.png"]


@pytest.fixture(scope="module")
def two_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data2") / "ds", classes=2, per_class=16)


@pytest.fixture(scope="module")
def three_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data3") / "ds", classes=3, per_class=12)


def _split(run: Path, subset: str) -> list[dict[str, str]]:
    return [r for r in csv_rows(run / "split.csv") if r["subset"] == subset]


def test_two_classes_end_to_end(two_class: Path, tmp_path: Path) -> None:
    cfg = tiny_config(two_class, tmp_path, name="cats")
    out = quiet()
    result = train(cfg, console=out)
    run = result.run_dir
    assert run == tmp_path / "runs" / "cats"
    for name in RUN_FILES + ["roc.png"]:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    rows = csv_rows(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["train_loss"]) > 0 and 0 <= float(r["val_acc"]) <= 1 for r in rows)
    # The bundle: best weights, one sigmoid unit, the data's preprocessing, metrics and config.
    model, meta = load_model(result.bundle_path)
    assert meta.classes == ["class_0", "class_1"] and meta.output_activation == "sigmoid"
    assert model.out_units == 1 and meta.preprocessing.size == (16, 16) and meta.preprocessing.channels == 3
    assert meta.config["model"] == "tiny" and meta.metrics["best_epoch"] in (1, 2)
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert meta.flip_average and isinstance(model, FlipAveraged)  # the default: recorded and applied
    for k, v in unwrap(model).state_dict().items():
        assert torch.equal(v, best["model"][k].float() if v.is_floating_point() else best["model"][k]), k
    # The reloaded bundle, fed the validation files decoded as prediction decodes them,
    # reproduces the run's metrics.json.
    saved = json.loads((run / "metrics.json").read_text())
    val = _split(run, "val")
    assert saved["num_samples"] == len(val) > 0
    data = LabelledImages(np.stack([meta.preprocessing.load(two_class / r["path"]) for r in val]),
                          np.array([meta.classes.index(r["class"]) for r in val]), [r["path"] for r in val])
    again = evaluate(model, meta, data)
    assert again["accuracy"] == saved["accuracy"] == meta.metrics["val_accuracy"]
    assert again["loss"] == pytest.approx(saved["loss"], rel=1e-5)
    text = out.file.getvalue()
    assert "run folder:" in text and "model.convlens" in text and "epoch 2/2" in text


def test_several_classes_with_all_the_options(three_class: Path, tmp_path: Path) -> None:
    cfg = tiny_config(three_class, tmp_path, label_smoothing=0.1, class_weights="auto", mixup=0.2, cutmix=1.0,
                      rotation=0.05, crop_scale=0.8, optimizer="sgd", schedule="cosine", warmup_epochs=0.5,
                      epochs=2, patience=5)
    result = train(cfg, console=quiet())
    _, meta = load_model(result.bundle_path)
    assert meta.output_activation == "softmax" and len(meta.classes) == 3
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"class_0", "class_1", "class_2"}
    assert np.asarray(metrics["confusion_matrix"]).shape == (3, 3)
    assert "thresholds" not in metrics


def test_same_seed_same_split_and_metrics_and_no_overwrite(two_class: Path, tmp_path: Path) -> None:
    a = train(tiny_config(two_class, tmp_path, rotation=0.1), console=quiet()).run_dir
    b = train(tiny_config(two_class, tmp_path, rotation=0.1), console=quiet()).run_dir
    assert (a.name, b.name) == ("train", "train-2")  # never overwritten
    assert (a / "split.csv").read_text() == (b / "split.csv").read_text()
    timing = {"img_per_s", "seconds"}
    ra = [{k: v for k, v in r.items() if k not in timing} for r in csv_rows(a / "metrics.csv")]
    rb = [{k: v for k, v in r.items() if k not in timing} for r in csv_rows(b / "metrics.csv")]
    assert ra == rb
    c = train(tiny_config(two_class, tmp_path, seed=7), console=quiet()).run_dir
    assert (c / "split.csv").read_text() != (a / "split.csv").read_text()


@pytest.mark.parametrize("where", ["mid-epoch", "end-of-epoch"])
def test_resume_ends_with_the_same_weights(two_class: Path, tmp_path: Path, where: str) -> None:
    overrides = {"rotation": 0.1, "mixup": 0.2, "epochs": 2}
    ref = train(tiny_config(two_class, tmp_path / "ref", **overrides), console=quiet())
    n_train = len(_split(ref.run_dir, "train"))
    steps = -(-n_train // 8)
    assert steps >= 3
    stop_at = (0, 1) if where == "mid-epoch" else (0, steps - 1)

    def interrupt(epoch: int, step: int) -> None:
        if (epoch, step) == stop_at:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = tiny_config(two_class, tmp_path / "cut", **overrides)
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, console=quiet(), on_step=interrupt)
    ckpt = load_checkpoint(e.value.checkpoint)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, stop_at[1] + 1)
    assert not (e.value.run_dir / "model.convlens").exists()
    resumed = train(resume_config(e.value.run_dir, {}), resume=e.value.run_dir, console=quiet())
    assert resumed.run_dir == e.value.run_dir
    a = load_checkpoint(ref.run_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert csv_rows(ref.run_dir / "metrics.csv")[-1]["val_loss"] == csv_rows(resumed.run_dir / "metrics.csv")[-1]["val_loss"]


def test_resume_refuses_a_finished_run_and_changed_settings(two_class: Path, tmp_path: Path) -> None:
    run = train(tiny_config(two_class, tmp_path, epochs=1), console=quiet()).run_dir
    with pytest.raises(ConfigError, match="cannot change lr when resuming"):
        resume_config(run, {"lr": 0.5})
    with pytest.raises(ConfigError, match="cannot change accept when resuming"):  # recorded: the threshold's rule
        resume_config(run, {"accept": 0.99})
    from convlens.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="already finished"):
        train(resume_config(run, {}), resume=run, console=quiet())


def test_make_run_dir_never_overwrites(tmp_path: Path) -> None:
    assert make_run_dir(tmp_path, "exp").name == "exp"
    assert make_run_dir(tmp_path, "exp").name == "exp-2"
    assert make_run_dir(tmp_path, "exp").name == "exp-3"
    assert make_run_dir(tmp_path, "exp", exist_ok=True).name == "exp"


def test_binary_loss_matches_hand_computation() -> None:
    z = torch.tensor([[2.0], [-1.0], [0.5]])
    y = torch.tensor([1, 0, 0])
    t = torch.nn.functional.one_hot(y, 2).float()
    p = torch.sigmoid(z[:, 0])
    plain = -(torch.log(p[0]) + torch.log(1 - p[1]) + torch.log(1 - p[2])) / 3
    assert classification_loss(z, t) == pytest.approx(float(plain), rel=1e-6)
    w = torch.tensor([0.5, 2.0])
    weighted = -(2.0 * torch.log(p[0]) + 0.5 * torch.log(1 - p[1]) + 0.5 * torch.log(1 - p[2])) / 3
    assert classification_loss(z, t, w) == pytest.approx(float(weighted), rel=1e-6)
    # Label smoothing 0.2: targets 1 -> 0.9, 0 -> 0.1.
    ts = torch.tensor([0.9, 0.1, 0.1])
    smooth = -(ts * torch.log(p) + (1 - ts) * torch.log(1 - p)).mean()
    assert classification_loss(z, t, label_smoothing=0.2) == pytest.approx(float(smooth), rel=1e-6)


def test_multiclass_loss_and_auto_class_weights() -> None:
    z = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]])
    t = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])  # soft (mixed) targets
    logp = torch.log_softmax(z, dim=1)
    assert classification_loss(z, t) == pytest.approx(float(-(t * logp).sum(1).mean()), rel=1e-6)
    w = class_weights(np.array([0, 0, 0, 1]), 3, "auto")
    # 4 samples, 3 classes: 4 / (3 * 3), 4 / (3 * 1), and 1 for the absent class.
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 1.0])
    assert class_weights(np.array([0, 1]), 2, "none") is None


def test_best_epoch_rule() -> None:
    best = {"epoch": None}
    row = {"val_acc": 0.5, "val_loss": 0.7, "train_loss": 0.6}
    assert is_better(row, best)
    best = {"epoch": 1, "val_acc": 0.5, "val_loss": 0.7, "train_loss": 0.6}
    assert is_better({"val_acc": 0.6, "val_loss": 0.9, "train_loss": 0.9}, best)
    assert is_better({"val_acc": 0.5, "val_loss": 0.6, "train_loss": 0.9}, best)
    assert not is_better({"val_acc": 0.5, "val_loss": 0.8, "train_loss": 0.1}, best)
    assert not is_better({"val_acc": 0.4, "val_loss": 0.1, "train_loss": 0.1}, best)
    assert is_better({"val_acc": None, "val_loss": None, "train_loss": 0.5}, best)


def test_best_row_is_the_trainers_choice() -> None:
    """The run listing and the API pick the epoch the trainer kept: ties in accuracy go to the
    lower validation loss, unvalidated epochs are skipped, no validation at all -> training loss."""
    rows = [{"epoch": 1, "val_acc": 0.8, "val_loss": 0.5, "train_loss": 0.6},
            {"epoch": 2, "val_acc": None, "val_loss": None, "train_loss": 0.1},  # not validated (--val-every)
            {"epoch": 3, "val_acc": 0.8, "val_loss": 0.4, "train_loss": 0.5},
            {"epoch": 4, "val_acc": 0.8, "val_loss": 0.4, "train_loss": 0.3}]  # a full tie keeps the earlier
    assert best_row(rows)["epoch"] == 3
    assert best_row([{**r, "val_acc": None, "val_loss": None} for r in rows])["epoch"] == 2
    assert best_row([]) is None


def test_digits_defaults_unless_set_explicitly(tmp_path: Path) -> None:
    def command_config(overrides: dict, config_file: str | None) -> TrainConfig:
        return resolve(overrides, config_file).cfg

    cfg = command_config({}, None)
    assert Path(cfg.data).name == "digits" and cfg.pretrained == "none"  # the embedded data, from scratch
    assert cfg.image_size == 32 and cfg.flip is False and cfg.epochs == 10 and cfg.mixup == 0.0
    quick = command_config({"preset": "quick"}, None)  # the preset's own choices are kept
    assert quick.epochs == 2 and quick.image_size == 32 and quick.flip is False
    assert command_config({"image_size": 48}, None).image_size == 48
    f = tmp_path / "c.yaml"
    f.write_text("flip: true\n")
    assert command_config({}, str(f)).flip is True
    data = make_dataset(tmp_path / "data", size=20)  # not photos: from scratch, at the default size
    assert command_config({"data": str(data)}, None).image_size == TrainConfig().image_size


def test_cli_train_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convlens.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 1\n")
    cases = [
        (["train", "--resume", str(tmp_path / "runs" / "missing")], "does not exist"),
        (["train", "--resume", str(tmp_path), "--config", str(cfg_file)], "cannot be combined with --resume"),
        (["train", str(tmp_path / "no-such-folder"), "--project", str(tmp_path / "runs")], "does not exist"),
        (["train", "--accept", "0", "--project", str(tmp_path / "runs")], "accept must be in (0, 1]. Received: accept=0"),
        (["train", "--accept", "1.5", "--project", str(tmp_path / "runs")], "accept must be in (0, 1]"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, err
    assert not (tmp_path / "runs").exists()


def test_report_accuracy_is_what_predict_gives(two_class: Path, tmp_path: Path) -> None:
    """The default recipe's centre crop and flip average are in the bundle: `convlens predict` on
    the validation files gives the report's probabilities and accuracy."""
    from convlens.cli import main

    cfg = tiny_config(two_class, tmp_path, crop_margin=0.25, flip_average=True)
    result = train(cfg, console=quiet())
    run = result.run_dir
    _, meta = load_model(result.bundle_path)
    assert meta.flip_average and meta.preprocessing.decode_size == (20, 20) and meta.preprocessing.size == (16, 16)
    report = {r["path"]: r for r in csv_rows(run / "predictions.csv")}
    out = tmp_path / "pred.csv"
    val = _split(run, "val")
    code = main(["predict", str(result.bundle_path), *[str(two_class / r["path"]) for r in val], "--out", str(out)])
    assert code == 0
    predicted = {Path(r["path"]).relative_to(two_class).as_posix(): r for r in csv_rows(out)}
    assert set(predicted) == set(report) == {r["path"] for r in val}
    correct = 0
    for path, row in report.items():
        for c in meta.classes:
            assert float(predicted[path][f"p_{c}"]) == pytest.approx(float(row[f"p_{c}"]), abs=1e-5)
        correct += predicted[path]["label"] == row["true"]
    saved = json.loads((run / "metrics.json").read_text())
    assert correct / len(report) == saved["accuracy"] == meta.metrics["val_accuracy"]


def test_val_every_validates_every_nth_and_the_last_epoch(two_class: Path, tmp_path: Path) -> None:
    result = train(tiny_config(two_class, tmp_path, epochs=3, val_every=2), console=quiet())
    rows = csv_rows(result.run_dir / "metrics.csv")
    assert [bool(r["val_acc"]) for r in rows] == [False, True, True]
    assert result.metrics["best_epoch"] in (2, 3)
