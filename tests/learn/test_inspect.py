"""inspect: one self-contained HTML page with every layer's shape and maps, the first kernels,
and for a trained bundle the channels that respond most (exact for GAP + dense heads)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.cli import main
from convlens.infer.bundle import load_model
from convlens.learn.layer_page import inspect_model, kernel_tiles, top_channels
from convlens.models import summarize
from tests.bundles import make_bundle


def _bundle(path, model: str = "tiny", classes=("cats", "dogs"), size: int = 24, seed: int = 0):
    return make_bundle(path, model, classes, size, seed=seed, random_biases=True)


@pytest.fixture
def photo(tmp_path):
    p = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(p)
    return p


def _page_checks(html: str) -> None:
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    # self-contained: no external resources, every image embedded
    assert not re.search(r"""(src|href)=['"](?!data:|#)""", html)
    assert html.count("data:image/png;base64,") > 5


def test_bundle_page_matches_the_summary(tmp_path, photo) -> None:
    b = _bundle(tmp_path / "m.convlens")
    r = inspect_model(b, photo, tmp_path / "out", max_maps=4)
    html = r.html_path.read_text(encoding="utf-8")
    _page_checks(html)
    assert r.trained and "Random weights" not in html
    summary = summarize("tiny", "24x24x3")
    assert [(v.name, v.type, v.shape) for v in r.layers] == \
        [(row.name, row.type, row.output_shape) for row in summary.rows]
    assert [v.params for v in r.layers] == [row.trainable_params for row in summary.rows]
    # sections in layer order, each with its Keras-style shape
    positions = [html.index(f'id="layer-{v.index}"') for v in r.layers]
    assert positions == sorted(positions)
    assert "(None, 24, 24, 8)" in html and "(None, 12, 12, 16)" in html
    # at most max_maps maps per layer: tiny's first conv has 8 channels
    first = html[positions[0]:positions[1]]
    assert first.count("<figure>") == 4 and "first 4 of 8 maps" in first
    # first conv's kernels: 8 filters of 3x3x3
    assert r.kernels_shape == (8, 3, 3, 3) and "8 filters of 3x3x3" in html
    assert r.prediction is not None and r.prediction["label"] in ("cats", "dogs")
    assert len(r.top_channels) == 6
    data = json.loads(r.json_path.read_text())
    assert data["layers"][0]["keras_shape"] == "(None, 24, 24, 8)" and data["trained"] is True


def test_flip_averaged_bundle_predicts_as_predict(tmp_path, photo) -> None:
    """The page's prediction is the whole model's: a flip-averaged bundle averages the mirror too."""
    import dataclasses

    from convlens.infer import load
    from convlens.infer.bundle import save_bundle
    from tests.bundles import make_meta, make_model

    model = make_model("tiny", 2, 3, 0, size=24, random_biases=True)
    meta = dataclasses.replace(make_meta(model, ("cats", "dogs"), 24), flip_average=True)
    b = save_bundle(tmp_path / "flip.convlens", model, meta)
    r = inspect_model(b, photo, tmp_path / "out", max_maps=2)
    ref = load(b, device="cpu", precision="fp32", engine="torch").predict(photo)[0]
    for c in ("cats", "dogs"):
        assert r.prediction["probabilities"][c] == pytest.approx(ref.probabilities[c], abs=1e-5)


def test_fused_relu_is_shown_on_the_conv(tmp_path, photo) -> None:
    b = _bundle(tmp_path / "m.convlens", model="tutorial_cnn", size=16)
    r = inspect_model(b, photo, tmp_path / "out", max_maps=2)
    conv = r.layers[0]
    assert conv.type == "conv" and conv.minimum >= 0.0 and "max pool" in conv.note


@pytest.mark.parametrize("class_index", [0, 1])
def test_top_channel_contributions_add_up_to_the_logit(tmp_path, class_index) -> None:
    model, _ = load_model(_bundle(tmp_path / "m.convlens", seed=class_index), "cpu")
    x = torch.rand(1, 3, 24, 24)
    rows, fmap, method = top_channels(model, x, class_index, model.out_units, k=100)
    assert len(rows) == fmap.shape[0] == 16 and "exact" in method
    head = model.gap_linear_head()
    with torch.no_grad():
        logit = float(model(x)[0, 0])
    bias = float(head.bias.detach()[0])
    sign = 1.0 if class_index == 1 else -1.0
    assert np.isclose(sum(r["score"] for r in rows) + sign * bias, sign * logit, atol=1e-4)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)


def test_softmax_bundle_and_top_channels(tmp_path, photo) -> None:
    b = _bundle(tmp_path / "m.convlens", classes=("a", "b", "c"))
    r = inspect_model(b, photo, tmp_path / "out")
    assert set(r.prediction["probabilities"]) == {"a", "b", "c"}
    assert abs(sum(r.prediction["probabilities"].values()) - 1) < 1e-6


def test_registry_model_has_random_weights_note(tmp_path, photo) -> None:
    r = inspect_model("resnet8", photo, tmp_path / "out", image_size=32, max_maps=3)
    html = r.html_path.read_text(encoding="utf-8")
    _page_checks(html)
    assert not r.trained and "Random weights" in html and r.prediction is None
    assert [v.name for v in r.layers] == ["stem", "stage1", "stage2", "stage3", "head"]
    assert r.layers[-1].shape == (1,)


def test_layer_file_model(tmp_path, photo) -> None:
    spec = tmp_path / "net.yaml"
    spec.write_text("layers:\n  - {type: conv, filters: 4, kernel_size: 3}\n  - {type: flatten}\n  - {type: dense}\n")
    r = inspect_model(spec, photo, tmp_path / "out", image_size=10)
    assert [v.shape for v in r.layers] == [(4, 8, 8), (256,), (1,)]


def test_kernel_tiles_are_rgb_and_scaled() -> None:
    w = np.random.default_rng(0).normal(size=(5, 3, 3, 3)).astype(np.float32)
    tiles = kernel_tiles(w)
    assert len(tiles) == 5 and tiles[0].shape == (3, 3, 3) and tiles[0].dtype == np.uint8
    assert tiles[0].min() == 0 and tiles[0].max() == 255
    assert kernel_tiles(w[:, :1])[0].shape == (3, 3, 3)  # grey first layer


def test_cli(tmp_path, photo, capsys) -> None:
    b = _bundle(tmp_path / "m.convlens")
    assert main(["inspect", str(b), str(photo), "--out", str(tmp_path / "o"), "--max-maps", "2"]) == 0
    out = capsys.readouterr().out
    assert "(None, 24, 24, 8)" in out and "prediction:" in out and f"wrote {tmp_path / 'o' / 'inspect.html'}" in out


@pytest.mark.parametrize(("args", "needle"), [
    (["{bundle}", "{img}", "--image-size", "64"], "--image-size applies to a MODEL"),
    (["tiny", "{img}", "--image-size", "4"], "--image-size must be an integer from 8 to 1024"),
    (["tiny", "{img}", "--max-maps", "0"], "--max-maps must be an integer from 1 to 512"),
    (["tiyn", "{img}"], "Did you mean 'tiny'"),
    (["tiny", "missing.jpg"], "not found"),
    (["tiny", "{bad}"], "cannot use"),
    (["nope.convlens", "{img}"], "does not exist"),
])
def test_cli_errors_one_line(args, needle, tmp_path, photo, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    b = _bundle(tmp_path / "m.convlens")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = ["inspect"] + [a.format(bundle=b, img=photo, bad=bad) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("convlens inspect: error:") and needle in err
    assert not (tmp_path / "inspect").exists()


def test_real_photo_with_a_real_bundle_layout(tmp_path, real_photo) -> None:
    _bundle(tmp_path / "run" / "model.convlens", size=32)
    r = inspect_model(tmp_path / "run", real_photo, tmp_path / "out")  # a run folder works too
    assert r.trained and r.input_shape == (3, 32, 32)
