"""``convlens explain`` and ``Classifier.explain`` end to end on real photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import convlens
from convlens.cli import main
from convlens.data.decode import decode
from convlens.infer.bundle import load_model
from tests.bundles import make_bundle


@pytest.fixture()
def photos(cats_dogs: Path) -> list[Path]:
    train = cats_dogs / "train"
    return [train / "cats" / "cat.0.jpg", train / "dogs" / "dog.0.jpg", train / "cats" / "cat.1.jpg"]


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "model.convlens", "tiny", ("cat", "dog"), size=32, seed=0)


def test_explain_heat_is_manual_cam_at_original_size(photos: list[Path], bundle: Path) -> None:
    clf = convlens.load(bundle, device="cpu")
    model, meta = load_model(bundle, "cpu")
    prep = meta.preprocessing
    for photo in photos:
        heat = clf.explain(photo, method="cam")
        w0, h0 = decode(photo)[0].size
        assert heat.shape == (h0, w0) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
        # Manual: the bundle's preprocessing, features, the dense row of the predicted class
        # (sign flipped for the negative class), bilinear to the photo, ReLU, / max.
        x = torch.from_numpy(prep.normalize(prep.load(photo)))
        with torch.no_grad():
            f = model.forward_features(x)[0]
            z = float(model(x)[0, 0])
        w = model.gap_linear_head().weight[0].detach()
        m = torch.einsum("k,khw->hw", w if z >= 0 else -w, f)
        up = F.interpolate(m[None, None], size=(h0, w0), mode="bilinear", align_corners=False)[0, 0].relu()
        np.testing.assert_allclose(heat, (up / up.max()).numpy(), atol=1e-5)
    # Lists give lists; another class gives the complementary evidence.
    heats = clf.explain(photos[:2], method="gradcam")
    assert isinstance(heats, list) and len(heats) == 2
    (e_cat,) = clf.explanations(photos[0], method="cam", class_name="cat")
    (e_dog,) = clf.explanations(photos[0], method="cam", class_name="dog")
    np.testing.assert_allclose(e_cat.raw, -e_dog.raw, atol=1e-6)
    assert e_cat.label == e_dog.label and {e_cat.explained, e_dog.explained} == {"cat", "dog"}
    assert e_cat.explained_probability + e_dog.explained_probability == pytest.approx(1.0)


def test_explain_label_matches_predict(photos: list[Path], bundle: Path) -> None:
    clf = convlens.load(bundle, device="cpu")
    preds = clf.predict(photos)
    for method in ("cam", "gradcam", "gradcam++"):
        for e, p in zip(clf.explanations(photos, method=method), preds, strict=True):
            assert e.label == p.label and e.probability == pytest.approx(p.probability, abs=1e-6)
            assert e.heat.shape == e.image.shape[:2] and e.heat.min() >= 0 and e.heat.max() <= 1


def test_crop_policy_map_only_covers_what_the_model_saw(tmp_path: Path, photos: list[Path]) -> None:
    b = make_bundle(tmp_path / "crop.convlens", "tiny", ("cat", "dog"), size=32, resize="crop")
    heat = convlens.load(b, device="cpu").explain(photos[0], method="gradcam", class_name="dog")
    h0, w0 = heat.shape
    assert w0 > h0  # a landscape photo: the centre square was used, the side strips were not
    side = (w0 - h0) // 2
    assert np.all(heat[:, : side - 1] == 0) and np.all(heat[:, w0 - side + 1:] == 0)


def test_cli_writes_figures_grid_and_summary(tmp_path: Path, photos: list[Path], bundle: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "maps"
    # Two inputs share the stem "cat.0": their PNGs must not overwrite each other.
    Image.open(photos[0]).save(tmp_path / "cat.0.png")
    rc = main(["explain", str(bundle), *map(str, photos), str(tmp_path / "cat.0.png"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cat.0.png", "cat.0_2.png", "cat.1.png", "dog.0.png", "explanations.json", "grid.png"]
    for n in names:
        if n.endswith(".png"):
            with Image.open(out / n) as im:
                assert im.format == "PNG" and im.width > 200 and im.height > 100
    with Image.open(out / "grid.png") as grid, Image.open(out / "cat.0.png") as single:
        assert grid.width > 3 * 150 and single.width > single.height  # 4 columns; image | overlay
    doc = json.loads((out / "explanations.json").read_text())
    preds = convlens.load(bundle, device="cpu").predict([*photos, tmp_path / "cat.0.png"])
    assert [r["label"] for r in doc["images"]] == [p.label for p in preds]
    assert [r["png"] for r in doc["images"]] == ["cat.0.png", "dog.0.png", "cat.1.png", "cat.0_2.png"]
    assert "grid.png" in capsys.readouterr().out


def test_cli_methods_classes_and_errors(tmp_path: Path, photos: list[Path], bundle: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    for method in ("gradcam", "gradcam++"):
        assert main(["explain", str(bundle), str(photos[0]), "--out", str(tmp_path / method),
                     "--method", method, "--class", "dog"]) == 0
        doc = json.loads((tmp_path / method / "explanations.json").read_text())
        assert doc["method"] == method and doc["images"][0]["explained"] == "dog"
    capsys.readouterr()
    assert main(["explain", str(bundle), str(photos[0]), "--out", str(tmp_path / "x"), "--class", "wolf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cat, dog" in err and "wolf" in err
    assert not (tmp_path / "x").exists()
    assert main(["explain", str(bundle), str(tmp_path / "none*.jpg"), "--out", str(tmp_path / "x")]) == 2
    assert "matches no image" in capsys.readouterr().err


def test_cli_cam_on_a_model_without_gap_dense_head(tmp_path: Path, photos: list[Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    spec = [{"type": "conv", "filters": 4, "kernel_size": 3, "padding": "same", "activation": "relu"},
            {"type": "max_pool", "pool_size": 4}, {"type": "flatten"}, {"type": "dense"}]
    make_bundle(tmp_path / "flat.convlens", classes=("cat", "dog"), size=16, layers=spec)
    assert main(["explain", str(tmp_path / "flat.convlens"), str(photos[0]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "global average pooling" in err and "gradcam" in err
    assert main(["explain", str(tmp_path / "flat.convlens"), str(photos[0]), "--out", str(tmp_path / "o"),
                 "--method", "gradcam"]) == 0


def test_cli_folder_with_a_bad_file(tmp_path: Path, photos: list[Path], bundle: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(photos[0], d / "good.jpg")
    (d / "bad.jpg").write_bytes(b"")
    assert main(["explain", str(bundle), str(d), "--out", str(tmp_path / "o")]) == 1
    assert "bad.jpg" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["explanations.json", "good.png", "grid.png"]
