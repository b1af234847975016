"""Prediction: exact probabilities, input formats, EXIF, folders/globs, CLI output and exit codes."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convlens
from convlens.cli import main
from convlens.data.inputs import expand_paths, tta_views
from convlens.data.preprocess import Preprocessing
from convlens.decision import probabilities
from convlens.errors import ConfigError, ImageError
from convlens.infer import Classifier, TorchBackend
from convlens.infer.bundle import load_model, save_bundle
from tests.bundles import independent_probs, make_bundle, make_meta, make_model, set_logit


@pytest.fixture()
def photos(cats_dogs: Path) -> list[Path]:
    """Three cats and two dogs (real photos, read in place)."""
    train = cats_dogs / "train"
    return [train / "cats" / f"cat.{i}.jpg" for i in range(3)] + [train / "dogs" / f"dog.{i}.jpg" for i in range(2)]


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "model.convlens", "tiny", ("cat", "dog"), size=32, seed=0)


@pytest.fixture()
def bundle3(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "three.convlens", "tiny", ("a", "b", "c"), size=24, seed=1)


# ----------------------------------------------------------------------------- numbers
def test_probabilities_sigmoid_and_softmax_are_stable() -> None:
    p = probabilities(np.array([[0.0], [800.0], [-800.0], [2.0]], dtype=np.float32), "sigmoid")
    np.testing.assert_allclose(p[:, 1], [0.5, 1.0, 0.0, 1 / (1 + np.exp(-2.0))], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(p.sum(1), 1.0)
    s = probabilities(np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]]), "softmax")
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s[1], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())


@pytest.mark.parametrize("which", ["bundle", "bundle3"])
def test_predict_equals_independent_computation(which: str, photos: list[Path], request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    model, meta = load_model(path, "cpu")
    clf = convlens.load(path, device="cpu", precision="fp32", engine="torch")
    preds = clf.predict(photos, batch_size=2)
    assert [p.path for p in preds] == [str(p) for p in photos]
    for pred, photo in zip(preds, photos, strict=True):
        expect = independent_probs(model, meta.preprocessing, photo)[0]
        got = np.array([pred.probabilities[c] for c in meta.classes])
        # Same float32 model and input; only summation order (batching, channels_last) differs.
        np.testing.assert_allclose(got, expect, rtol=0, atol=2e-6)
        assert pred.index == (int(expect[1] >= 0.5) if len(expect) == 2 else int(np.argmax(expect)))
        assert pred.label == meta.classes[pred.index] and pred.probability == pred.probabilities[pred.label]


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
def test_predict_equals_evaluation(tmp_path: Path, photos: list[Path], bundle: Path, precision: str) -> None:
    """The report's numbers are predict's numbers: one forward pass, one precision rule."""
    evaluate = pytest.importorskip("convlens.evaluate")
    root = tmp_path / "labelled"
    for p in photos:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    model, meta = load_model(bundle, "cpu")
    meta.classes = ["cats", "dogs"]  # the folder's class names
    data = evaluate.load_labelled_folder(root, meta)
    eval_probs = probabilities(
        evaluate.predict_logits(model, data.images, meta.preprocessing, precision=precision), meta.output_activation)
    clf = Classifier(meta, TorchBackend(model, "cpu", precision))
    preds = {p.path: p for p in clf.predict(data.paths)}
    assert len(preds) == len(photos)
    for path, row in zip(data.paths, eval_probs, strict=True):
        got = [preds[path].probabilities[c] for c in meta.classes]
        np.testing.assert_allclose(got, row, rtol=0, atol=2e-6)


@pytest.mark.parametrize(("scale", "precision"), [(1.0, "bf16"), (1.0, "fp32"), (1 / 255, "bf16"), (1 / 255, "fp32")])
def test_backend_normalises_images_as_the_bundle_says(scale: float, precision: str) -> None:
    """``image_logits`` (torch's own normalisation; bf16 straight from uint8 for 0-255 input)
    gives what the bundle's numpy ``Preprocessing.normalize`` followed by ``logits`` gives."""
    prep = Preprocessing(size=(12, 12), scale=scale)
    backend = TorchBackend(make_model("tiny", 3, seed=1), "cpu", precision)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 12, 12, 3), dtype=np.uint8)
    want = backend.logits(prep.normalize(images))
    got = backend.image_logits(images, prep)
    if scale == 1.0:  # the very same values reach the model
        np.testing.assert_array_equal(got, want)
    else:  # float32 arithmetic in another order
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_bf16_probabilities_stay_close_to_fp32(photos: list[Path], bundle3: Path) -> None:
    fp32 = convlens.load(bundle3, device="cpu", precision="fp32", engine="torch")
    bf16 = convlens.load(bundle3, device="cpu", precision="bf16")
    assert (fp32.backend.precision, bf16.backend.precision) == ("fp32", "bf16")
    a = np.array([list(p.probabilities.values()) for p in fp32.predict(photos)])
    b = np.array([list(p.probabilities.values()) for p in bf16.predict(photos)])
    assert 0 < np.abs(a - b).max() <= 1e-2  # bf16 really ran, and moved probabilities by little


def test_precision_option_is_checked(tmp_path: Path, real_photo: Path, bundle: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(bundle), str(real_photo), "--precision", "fp16"]) == 2
    assert "Received: precision='fp16'" in capsys.readouterr().err
    assert main(["predict", str(bundle), str(real_photo), "--precision", "fp32"]) == 0


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("logit", [3.0, -3.0])
def test_png_jpeg_rgba_copies_get_the_same_label(tmp_path: Path, real_photo: Path, logit: float) -> None:
    rgb = Image.open(real_photo).convert("RGB")
    png, jpg, rgba = tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "a_rgba.png"
    rgb.save(png)
    rgb.save(jpg, quality=95)
    with_alpha = rgb.copy()
    with_alpha.putalpha(255)
    with_alpha.save(rgba)
    assert Image.open(rgba).mode == "RGBA"

    model = make_model("tiny", 2, seed=3)
    meta = make_meta(model, ("cat", "dog"), size=32)
    # A random model sits near p = 0.5, where any pixel change may flip the label; shifting
    # the bias makes it confident (p = sigmoid(+-3) = 0.95 / 0.05) on this photo.
    set_logit(model, torch.from_numpy(meta.preprocessing.normalize(meta.preprocessing.load(png))), logit)
    save_bundle(tmp_path / "m.convlens", model, meta)
    clf = convlens.load(tmp_path / "m.convlens", device="cpu")
    p_png, p_jpg, p_rgba = clf.predict([png, jpg, rgba])
    assert p_png.label == p_jpg.label == p_rgba.label == ("dog" if logit > 0 else "cat")
    # Opaque alpha composites to the very same pixels: identical probabilities.
    assert p_rgba.probabilities == p_png.probabilities
    # JPEG q95 moves pixels by 1-2 levels; squashing 500 px to 32 px averages ~15 x 12 source
    # pixels per input pixel, so the probability moves by ~1e-3. 0.02 leaves 20x headroom
    # while still failing if the JPEG were decoded differently (e.g. BGR or 0-255 scaling).
    assert abs(p_jpg.probabilities["dog"] - p_png.probabilities["dog"]) < 0.02


def test_grayscale_image_is_replicated_to_three_channels(tmp_path: Path, real_photo: Path, bundle: Path) -> None:
    gray = Image.open(real_photo).convert("L")
    gray.save(tmp_path / "g.png")
    clf = convlens.load(bundle, device="cpu")
    x = clf.preprocessing.load(tmp_path / "g.png")
    assert x.shape == (32, 32, 3) and np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 1], x[..., 2])
    (from_file,) = clf.predict(tmp_path / "g.png")
    stacked = np.repeat(np.asarray(gray)[:, :, None], 3, axis=2)
    (from_rgb,) = clf.predict(stacked)
    assert from_file.probabilities == from_rgb.probabilities


def test_one_channel_model_accepts_rgb(tmp_path: Path, real_photo: Path) -> None:
    b = make_bundle(tmp_path / "gray.convlens", "tiny", ("x", "y", "z"), size=16, channels=1)
    clf = convlens.load(b, device="cpu")
    photo = Image.open(real_photo).convert("RGB")
    photo.save(tmp_path / "rgb.png")
    photo.convert("L").save(tmp_path / "g.png")
    assert clf.preprocessing.load(tmp_path / "rgb.png").shape == (16, 16, 1)
    # Pillow's RGB -> L conversion happens before resizing either way: identical input.
    rgb, gray = clf.predict([tmp_path / "rgb.png", tmp_path / "g.png"])
    assert rgb.probabilities == gray.probabilities
    assert abs(sum(rgb.probabilities.values()) - 1) < 1e-9


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_rotated_file_is_predicted_upright(tmp_path: Path, real_photo: Path, bundle: Path, fmt: str) -> None:
    stored = Image.open(real_photo).convert("RGB")
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 displays
    exif = Image.Exif()
    exif[0x0112] = 6
    ext = ".png" if fmt == "PNG" else ".jpg"
    kw = {} if fmt == "PNG" else {"quality": 95}
    stored.save(tmp_path / f"tagged{ext}", format=fmt, exif=exif, **kw)
    upright.save(tmp_path / f"upright{ext}", format=fmt, **kw)
    stored.save(tmp_path / f"sideways{ext}", format=fmt, **kw)

    clf = convlens.load(bundle, device="cpu")
    prep = clf.preprocessing
    tagged, up, side = (prep.load(tmp_path / f"{n}{ext}") for n in ("tagged", "upright", "sideways"))
    if fmt == "PNG":  # lossless: the decoded pixels are exactly the rotated ones
        np.testing.assert_array_equal(tagged, up)
    assert np.abs(tagged.astype(int) - up.astype(int)).mean() < np.abs(tagged.astype(int) - side.astype(int)).mean() / 5
    p_tag, p_up, p_side = clf.predict([tmp_path / f"{n}{ext}" for n in ("tagged", "upright", "sideways")])
    to_up = abs(p_tag.probabilities["dog"] - p_up.probabilities["dog"])
    to_side = abs(p_tag.probabilities["dog"] - p_side.probabilities["dog"])
    if fmt == "PNG":
        assert to_up == 0 and to_side > 0
    else:  # JPEG re-encodes rotated blocks differently: close to upright, far from sideways
        assert to_up < to_side / 5


def test_pil_numpy_and_path_inputs_agree(tmp_path: Path, real_photo: Path, bundle: Path) -> None:
    Image.open(real_photo).convert("RGB").save(tmp_path / "p.png")
    clf = convlens.load(bundle, device="cpu")
    (a,) = clf.predict(tmp_path / "p.png")
    (b,) = clf.predict(Image.open(tmp_path / "p.png"))
    (c,) = clf.predict(np.asarray(Image.open(tmp_path / "p.png")))
    (d,) = clf.predict(str(tmp_path / "p.png"))
    assert a.probabilities == b.probabilities == c.probabilities == d.probabilities
    assert c.path is None and a.path == str(tmp_path / "p.png")
    batch = clf.predict_proba(np.stack([clf.preprocessing.load(tmp_path / "p.png")] * 2))
    assert batch.shape == (2, 2)
    np.testing.assert_allclose(batch[0], [a.probabilities["cat"], a.probabilities["dog"]], atol=2e-6)
    with pytest.raises(ConfigError, match="shape"):
        clf.predict_proba(np.zeros((1, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match="uint8"):
        clf.predict(np.zeros((8, 8, 3), dtype=np.float32))


def test_bad_image_raises_or_is_skipped_in_the_api(tmp_path: Path, real_photo: Path, bundle: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(real_photo.read_bytes()[:2000])
    clf = convlens.load(bundle, device="cpu")
    with pytest.raises(ImageError) as e:
        clf.predict([real_photo, bad])
    assert e.value.kind == "truncated"
    preds = clf.predict([real_photo, bad], errors="skip")
    assert [p.path for p in preds] == [str(real_photo)]


def test_threshold_top_k_and_softmax_rules(photos: list[Path], bundle: Path, bundle3: Path) -> None:
    clf = convlens.load(bundle, device="cpu")
    assert {p.label for p in clf.predict(photos, threshold=0.001)} == {"dog"}
    assert {p.label for p in clf.predict(photos, threshold=0.999)} == {"cat"}
    with pytest.raises(ConfigError, match="threshold"):
        clf.predict(photos, threshold=1.5)
    clf3 = convlens.load(bundle3, device="cpu")
    with pytest.raises(ConfigError, match="two-class"):
        clf3.predict(photos, threshold=0.5)
    for p in clf3.predict(photos, top_k=2):
        assert len(p.top_k) == 2 and p.top_k[0] == (p.label, p.probability)
        assert p.top_k[0][1] >= p.top_k[1][1] >= min(p.probabilities.values())
    assert all(len(p.top_k) == 3 for p in clf3.predict(photos, top_k=10))


def test_tta_averages_the_flip(real_photo: Path, bundle3: Path) -> None:
    clf = convlens.load(bundle3, device="cpu")
    x = clf.preprocessing.load(real_photo)
    plain = clf.predict_proba(x[None])
    flipped = clf.predict_proba(np.ascontiguousarray(x[None, :, ::-1]))
    assert not np.allclose(plain, flipped)  # the photo is not mirror-symmetric
    np.testing.assert_allclose(clf.predict_proba(x[None], tta=True), (plain + flipped) / 2, atol=1e-7)
    (pred,) = clf.predict(real_photo, tta="flip")
    np.testing.assert_allclose(list(pred.probabilities.values()), ((plain + flipped) / 2)[0], atol=1e-6)
    views = tta_views(x[None], "crops", clf.preprocessing)
    assert len(views) == 12 and all(v.shape == x[None].shape and v.dtype == np.uint8 for v in views)
    crops = clf.predict_proba(x[None], tta="crops")
    assert crops.shape == (1, 3) and abs(crops.sum() - 1) < 1e-9
    with pytest.raises(ConfigError, match="tta"):
        clf.predict(real_photo, tta="rotate")


def test_cli_tta_flags(tmp_path: Path, real_photo: Path, bundle3: Path) -> None:
    clf = convlens.load(bundle3, device="cpu")
    for flag, mode in (("--tta", "flip"), ("--tta-crops", "crops")):
        out = tmp_path / f"{mode}.json"
        assert main(["predict", str(bundle3), str(real_photo), flag, "--out", str(out)]) == 0
        (row,) = json.loads(out.read_text())["predictions"]
        (api,) = clf.predict(real_photo, tta=mode)
        np.testing.assert_allclose(list(row["probabilities"].values()), list(api.probabilities.values()), atol=1e-6)


# ----------------------------------------------------------------------------- paths
def _folder(tmp_path: Path, photos: list[Path]) -> Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    shutil.copy(photos[0], d / "a.jpg")
    shutil.copy(photos[3], d / "sub" / "b.JPG")
    Image.open(photos[1]).save(d / "c.png")
    (d / ".DS_Store").write_bytes(b"\0" * 64)
    (d / "._a.jpg").write_bytes(b"\0" * 64)  # macOS AppleDouble
    (d / "Thumbs.db").write_bytes(b"\0" * 64)
    (d / ".hidden").mkdir()
    shutil.copy(photos[2], d / ".hidden" / "h.jpg")
    (d / "notes.txt").write_text("not an image")
    return d


def test_expand_paths_folders_globs_and_hidden_files(tmp_path: Path, photos: list[Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    d = _folder(tmp_path, photos)
    files, ignored = expand_paths([d])
    assert [f.relative_to(d).as_posix() for f in files] == ["a.jpg", "c.png", "sub/b.JPG"]
    assert ignored == 1  # notes.txt
    monkeypatch.chdir(tmp_path)
    assert [f.name for f in expand_paths(["imgs/*.png"])[0]] == ["c.png"]
    assert [f.name for f in expand_paths(["imgs/**/*.[jJ]*"])[0]] == ["a.jpg", "b.JPG"]
    # Duplicates are dropped; a file named directly is tried whatever its extension.
    files, _ = expand_paths([d / "a.jpg", "imgs/a.jpg", d / "notes.txt"])
    assert [f.name for f in files] == ["a.jpg", "notes.txt"]
    from convlens.data.inputs import NoMatchError

    for bad in ("missing.jpg", "imgs/*.gif"):
        with pytest.raises(NoMatchError, match="matches no image"):
            expand_paths([bad])
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoMatchError, match="no image files"):
        expand_paths(["empty"])


def test_cli_folder_with_one_bad_file(tmp_path: Path, photos: list[Path], bundle: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    d = _folder(tmp_path, photos)
    (d / "broken.jpg").write_bytes(photos[4].read_bytes()[:3000])
    out = tmp_path / "preds.json"
    rc = main(["predict", str(bundle), str(d), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.jpg" in captured.err and "truncated" in captured.err
    doc = json.loads(out.read_text())
    assert doc["classes"] == ["cat", "dog"]
    assert sorted(Path(p["path"]).name for p in doc["predictions"]) == ["a.jpg", "b.JPG", "c.png"]
    assert [Path(s["path"]).name for s in doc["skipped"]] == ["broken.jpg"]
    for p in doc["predictions"]:
        assert set(p["probabilities"]) == {"cat", "dog"} and abs(sum(p["probabilities"].values()) - 1) < 1e-9
        assert p["label"] in captured.out


def test_cli_csv_output_and_exit_codes(tmp_path: Path, photos: list[Path], bundle3: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "preds.csv"
    rc = main(["predict", str(bundle3), *map(str, photos), "--out", str(out), "--top-k", "2", "--batch-size", "2"])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "probability", "novelty", "known", "p_a", "p_b", "p_c", "error"]
    api = convlens.load(bundle3, device="cpu").predict(photos)
    for row, pred in zip(rows, api, strict=True):
        assert row["path"] == pred.path and row["label"] == pred.label and row["error"] == ""
        assert row["novelty"] == "" and row["known"] == "true"  # a bundle without novelty
        probs = [float(row[f"p_{c}"]) for c in "abc"]
        np.testing.assert_allclose(probs, [pred.probabilities[c] for c in "abc"], rtol=0, atol=2e-6)
        assert row["label"] == "abc"[int(np.argmax(probs))]
    capsys.readouterr()

    for args, needle in (
        (["nothing/*.jpg"], "matches no image"),
        ([str(photos[0]), "--out", str(tmp_path / "p.txt")], "--out must end in .csv or .json"),
        ([str(photos[0]), "--threshold", "0.3"], "two-class"),
        ([str(photos[0]), "--top-k", "0"], "top_k must be at least 1"),
    ):
        assert main(["predict", str(bundle3), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p.txt").exists()
    assert main(["predict", str(tmp_path / "no.convlens"), str(photos[0])]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_quoted_glob_and_threshold(tmp_path: Path, photos: list[Path], bundle: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    d = _folder(tmp_path, photos)
    out = tmp_path / "p.json"
    assert main(["predict", str(bundle), str(d / "**" / "*.*"), "--threshold", "0.001", "--out", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert {p["label"] for p in doc["predictions"]} == {"dog"}
    assert [Path(s["path"]).name for s in doc["skipped"]] == ["notes.txt"]  # named by the glob: tried
    assert "not an image" in capsys.readouterr().err


def test_load_dispatches_onnx(tmp_path: Path, photos: list[Path], bundle: Path) -> None:
    onnx = pytest.importorskip("convlens.export.onnx")
    path = tmp_path / "m.onnx"
    onnx.export_onnx(bundle, path)
    clf = convlens.load(path)
    assert type(clf.backend).__name__ == "OnnxBackend" and clf.classes == ["cat", "dog"]
    torch_preds = convlens.load(bundle, device="cpu", precision="fp32", engine="torch").predict(photos[:2])  # ONNX runs fp32
    for a, b in zip(clf.predict(photos[:2]), torch_preds, strict=True):
        assert abs(a.probabilities["dog"] - b.probabilities["dog"]) < 1e-4
    # An ONNX model with a `cam` output draws the exact CAM, the same map as the bundle; no Grad-CAM.
    assert clf.backend.explain_methods == ("cam",)
    np.testing.assert_allclose(clf.explain(photos[0]), convlens.load(bundle, device="cpu").explain(photos[0]),
                               atol=1e-4)
    with pytest.raises(convlens.errors.UserError, match="ONNX model cannot draw 'gradcam'"):
        clf.explain(photos[0], method="gradcam")
    with pytest.raises(ConfigError, match="ONNX models run in fp32"):
        convlens.load(path, precision="bf16")
    with pytest.raises(ConfigError, match="precision for inference must be auto, bf16 or fp32"):
        convlens.load(path, precision="fp16")  # checked for ONNX files too, not ignored
    # The ONNX path never needs torch: block it and run the CLI in a fresh interpreter.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from convlens.cli import main\n"
            f"rc = main(['predict', {str(path)!r}, {str(photos[0])!r}, '--out', {str(tmp_path / 'o.json')!r}])\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "raise SystemExit(rc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (row,) = json.loads((tmp_path / "o.json").read_text())["predictions"]
    assert abs(row["probabilities"]["dog"] - torch_preds[0].probabilities["dog"]) < 1e-4
