"""`convlens evaluate BUNDLE DIR` and evaluate() on folders; bad bundles give one-line errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from convlens.cli import main
from convlens.engine.training import train
from convlens.evaluate import evaluate, load_labelled_folder
from convlens.infer.bundle import load_model
from tests.engine.helpers import make_dataset, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle, dataset folder) of a 2-epoch tiny run on 3 generated classes."""
    tmp = tmp_path_factory.mktemp("evaluate")
    data = make_dataset(tmp / "ds", classes=3, per_class=10)
    result = train(tiny_config(data, tmp), console=Console(file=io.StringIO()))
    return result.bundle_path, data


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_evaluate_folder_with_a_broken_file(trained: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bundle, data = trained
    folder = tmp_path / "eval_data"
    shutil.copytree(data, folder)
    good = folder / "class_1" / "img_000.png"
    (folder / "class_1" / "broken.png").write_bytes(good.read_bytes()[:60])  # truncated PNG
    out = tmp_path / "out"
    assert main(["evaluate", str(bundle), str(folder), "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "skipped 1 unusable file" in text and "accuracy" in text
    for name in ("report.html", "metrics.json", "predictions.csv", "confusion_matrix.png", "calibration.png",
                 "worst_mistakes.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 30
    assert [s["kind"] for s in metrics["skipped"]] == ["truncated"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<h2>Model</h2>" in html and "16 x 16 x 3" in html


def test_folder_probabilities_equal_a_direct_forward_pass(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = trained
    model, meta = load_model(bundle)
    out = tmp_path / "out"
    metrics = evaluate(model, meta, data, out_dir=out, precision="fp32")
    with open(out / "predictions.csv", newline="") as f:
        rows = {Path(r["path"]).relative_to(data).as_posix(): r for r in csv.DictReader(f)}
    assert len(rows) == metrics["num_samples"] == 30
    rel = "class_2/img_003.png"
    x = torch.from_numpy(meta.preprocessing.normalize(meta.preprocessing.load(data / rel)))
    with torch.no_grad():
        p = torch.softmax(model(x).float(), dim=1)[0].numpy()
    got = np.array([float(rows[rel][f"p_{c}"]) for c in meta.classes])
    np.testing.assert_allclose(got, p, atol=2e-6)
    acc = np.mean([r["true"] == r["predicted"] for r in rows.values()])
    assert metrics["accuracy"] == pytest.approx(acc)


def test_default_output_folder_is_beside_the_bundle(trained: tuple[Path, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    bundle, data = trained
    assert main(["evaluate", str(bundle.parent), str(data)]) == 0
    assert (bundle.parent / "eval" / "report.html").is_file()


def test_presplit_folder_evaluates_its_validation_images(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = trained
    root = tmp_path / "presplit"
    shutil.copytree(data, root / "train")
    (root / "val" / "class_0").mkdir(parents=True)
    for i in range(3):
        shutil.copy(data / "class_0" / f"img_{i:03d}.png", root / "val" / "class_0" / f"v{i}.png")
    _, meta = load_model(bundle)
    loaded = load_labelled_folder(root, meta)
    assert len(loaded.labels) == 3 and set(loaded.labels.tolist()) == {0} and "val" in loaded.note


def test_unknown_class_folder_is_a_user_error(trained: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bundle, data = trained
    folder = tmp_path / "other"
    shutil.copytree(data / "class_0", folder / "zebra")
    err = _one_line_error(capsys, ["evaluate", str(bundle), str(folder)])
    assert "zebra" in err and "does not know" in err


def test_tampered_bundle_gives_one_line_error(trained: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bundle, data = trained
    with zipfile.ZipFile(bundle) as z:
        meta_json, weights = z.read("model.json"), bytearray(z.read("weights.safetensors"))
    weights[-5] ^= 0x01  # one flipped bit in the last tensor's data
    bad = tmp_path / "tampered.convlens"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("model.json", meta_json)
        z.writestr("weights.safetensors", bytes(weights))
    err = _one_line_error(capsys, ["evaluate", str(bad), str(data)])
    assert "SHA-256" in err


def test_truncated_and_missing_bundles_give_one_line_errors(trained: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    bundle, data = trained
    cut = tmp_path / "cut.convlens"
    cut.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    assert "not a readable model bundle" in _one_line_error(capsys, ["evaluate", str(cut), str(data)])
    assert "does not exist" in _one_line_error(capsys, ["evaluate", str(tmp_path / "nope.convlens"), str(data)])


def test_evaluation_probabilities_equal_convlens_predict(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import convlens

    bundle, data = trained
    model, meta = load_model(bundle)
    out = tmp_path / "out"
    evaluate(model, meta, data, out_dir=out)
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:5]
    clf = convlens.load(bundle, device="cpu")
    preds = clf.predict([r["path"] for r in rows])
    for row, pred in zip(rows, preds, strict=True):
        assert pred.label == row["predicted"]
        for c in meta.classes:
            assert pred.probabilities[c] == pytest.approx(float(row[f"p_{c}"]), abs=1e-6)
