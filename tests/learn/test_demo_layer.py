"""demo-layer: the printed shape arithmetic equals the real output shape; each kind does what it
says on real layers; figures are written; bad options are one-line errors (exit 2)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.cli import main
from convlens.errors import ConfigError, SpecError, UserError
from convlens.learn.demo_layer import (
    KINDS,
    apply_layer,
    arithmetic,
    build_layer,
    demo_layer,
    output_length,
    parse_compare,
    resolve_options,
)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _printed(text: str) -> list[int]:
    """The result(s) of the arithmetic: the number after the last '=' of each axis."""
    return [int(m) for m in re.findall(r"= (\d+)(?:;|$)", text)]


# ----------------------------------------------------------------------------- arithmetic
WINDOW_GRID = list(itertools.product(("conv", "max_pool", "avg_pool", "conv_transpose"), range(1, 6),
                                     range(1, 4), ("valid", "same"), ((7, 7), (8, 8), (13, 10), (16, 9))))


@pytest.mark.parametrize(("kind", "k", "s", "padding", "hw"), WINDOW_GRID)
def test_printed_arithmetic_equals_real_output_shape(kind, k, s, padding, hw) -> None:
    opts = {"kernel": k, "stride": s, "padding": padding}
    if kind in ("conv", "conv_transpose"):
        opts["weights"] = "box" if k != 3 else "sobel-x" if kind == "conv" else "box"
    r = apply_layer(kind, _image(*hw), opts)
    real = tuple(r.output.shape[1:])
    assert r.predicted_hw == real
    printed = _printed(r.arithmetic)
    assert printed == ([real[0]] if hw[0] == hw[1] else list(real))
    # and the models package's own shape inference agrees
    _, _, inferred = build_layer(kind, opts, 3, hw)
    assert tuple(inferred[1:]) == real


@pytest.mark.parametrize(("factor", "mode", "n"), list(itertools.product(range(1, 5), ("nearest", "bilinear"), (5, 8))))
def test_upsample_arithmetic(factor, mode, n) -> None:
    r = apply_layer("upsample", _image(n, n), {"factor": factor, "mode": mode})
    assert r.output.shape[1:] == (n * factor, n * factor)
    assert _printed(r.arithmetic) == [n * factor]


@pytest.mark.parametrize("kind", ["relu", "dropout", "batch_norm"])
def test_shape_keeping_kinds(kind) -> None:
    r = apply_layer(kind, _image(9, 11))
    assert r.output.shape[1:] == (9, 11) and r.predicted_hw == (9, 11)


def test_arithmetic_text_is_explicit() -> None:
    assert output_length("conv", 300, {"stride": 2, "padding": "same"}) == (150, "n=300, k=3, s=2, same: ceil(300 / 2) = 150")
    assert output_length("conv", 300, {"stride": 2})[1] == "n=300, k=3, s=2, valid: floor((300 - 3) / 2) + 1 = 149"
    assert output_length("conv", 300, {})[1] == "n=300, k=3, s=1, valid: 300 - 3 + 1 = 298"
    assert output_length("conv_transpose", 64, {"padding": "valid"})[1] == \
        "n=64, k=3, s=2, valid: 64 x 2 + max(3 - 2, 0) = 129"
    assert arithmetic("max_pool", (9, 8), {})[1] == \
        "height n=9, k=2, s=2, valid: floor((9 - 2) / 2) + 1 = 4; width n=8, k=2, s=2, valid: floor((8 - 2) / 2) + 1 = 4"


# ----------------------------------------------------------------------------- what each block does
def test_conv_sobel_x_responds_to_a_vertical_edge() -> None:
    img = np.zeros((12, 12, 3), np.uint8)
    img[:, 6:] = 255  # dark left, bright right
    r = apply_layer("conv", img, {"weights": "sobel-x"})
    assert r.output.shape == (1, 10, 10)
    assert r.output[0, :, 4:6].min() > 3.9  # the 4-column-wide response of sobel on a unit step
    assert np.allclose(r.output[0, :, :3], 0) and np.allclose(r.output[0, :, 7:], 0)
    assert r.kernel is not None and r.kernel.tolist() == [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]


def test_box_conv_is_the_mean_of_the_window() -> None:
    img = _image(10, 10)
    r = apply_layer("conv", img, {"weights": "box", "kernel": 3})
    x = img.astype(np.float32).mean(axis=2) / 255
    assert np.isclose(r.output[0, 0, 0], x[:3, :3].mean(), atol=1e-5)


def test_pools_match_numpy() -> None:
    img = _image(8, 8)
    x = img.astype(np.float32) / 255
    mx = apply_layer("max_pool", img).output
    av = apply_layer("avg_pool", img).output
    assert np.allclose(mx[:, 1, 2], x[2:4, 4:6].max(axis=(0, 1)))
    assert np.allclose(av[:, 1, 2], x[2:4, 4:6].mean(axis=(0, 1)), atol=1e-6)


def test_relu_zeroes_the_negative_part_of_a_signed_conv() -> None:
    r = apply_layer("relu", _image(16, 16))
    conv = r.extra["conv"]
    assert conv.min() < 0 < conv.max()
    assert np.array_equal(r.output, np.maximum(conv, 0))


def test_dropout_training_vs_evaluation() -> None:
    img = np.full((32, 32, 3), 200, np.uint8)
    r = apply_layer("dropout", img, {"rate": 0.25}, seed=3)
    zeros = float((r.output == 0).mean())
    assert 0.18 < zeros < 0.32
    kept = r.output[r.output != 0]
    assert np.allclose(kept, 200 / 255 / 0.75, atol=1e-5)  # survivors scaled by 1 / (1 - rate)
    assert np.allclose(r.extra["eval"], r.input)  # evaluation mode: the identity


def test_batch_norm_normalises_each_channel() -> None:
    r = apply_layer("batch_norm", _image(16, 16))
    assert r.input.max() > 100  # it sees the 0-255 scale
    assert np.allclose(r.output.mean(axis=(1, 2)), 0, atol=1e-4)
    assert np.allclose(r.output.std(axis=(1, 2)), 1, atol=1e-2)


def test_nearest_upsample_repeats_pixels() -> None:
    img = _image(4, 4)
    r = apply_layer("upsample", img, {"factor": 3})
    assert np.array_equal(r.output[:, ::3, ::3], r.input)
    assert np.array_equal(r.output[:, 1::3, 2::3], r.input)


def test_transposed_conv_box_kernel_has_a_checkerboard_on_a_flat_image() -> None:
    img = np.full((8, 8, 3), 128, np.uint8)
    r = apply_layer("conv_transpose", img)  # k=3, s=2, same, box kernel
    inner = r.output[0, 2:-2, 2:-2]
    assert inner.std() > 0.1  # a flat input comes out uneven ...
    assert np.allclose(inner[::2, ::2], inner[0, 0]) and np.allclose(inner[1::2, 1::2], inner[1, 1])
    assert not np.isclose(inner[0, 0], inner[1, 1])  # ... in a period-2 checkerboard
    assert np.isclose(inner.mean(), 128 / 255, rtol=0.1)  # with the brightness kept on average
    flat = apply_layer("upsample", img).output[0]
    assert flat.std() == 0  # nearest upsampling keeps it flat


def test_uses_the_models_package_layers() -> None:
    from convlens.models.layers import Conv, ConvTranspose, Pool

    assert isinstance(build_layer("conv", {}, 3, (8, 8))[0], Conv)
    assert isinstance(build_layer("max_pool", {}, 3, (8, 8))[0], Pool)
    assert isinstance(build_layer("conv_transpose", {}, 3, (8, 8))[0], ConvTranspose)
    random_a = build_layer("conv", {"weights": "random", "filters": 4}, 3, (8, 8), seed=1)[0]
    random_b = build_layer("conv", {"weights": "random", "filters": 4}, 3, (8, 8), seed=1)[0]
    assert torch.equal(random_a.conv.weight, random_b.conv.weight)  # seeded


# ----------------------------------------------------------------------------- options
def test_defaults_and_errors() -> None:
    assert resolve_options("max_pool", {"kernel": 3})["stride"] == 3
    assert resolve_options("conv", {"kernel": 5})["weights"] == "box"
    with pytest.raises(ConfigError, match="--rate does not apply to conv"):
        resolve_options("conv", {"rate": 0.5})
    with pytest.raises(ConfigError, match="Did you mean 'same'"):
        resolve_options("conv", {"padding": "sam"})
    with pytest.raises(ConfigError, match="Did you mean 'max_pool'"):
        resolve_options("maxpool", {})
    with pytest.raises(ConfigError, match="use --weights random"):
        resolve_options("conv", {"filters": 4})
    with pytest.raises(SpecError, match="larger than its 4x4 input"):
        apply_layer("conv", _image(4, 4), {"kernel": 5})


def test_parse_compare() -> None:
    assert parse_compare("avg_pool", "max_pool", {"kernel": 3}) == ("avg_pool", {"kernel": 3})
    assert parse_compare("conv_transpose", "upsample", {"factor": 3}) == ("conv_transpose", {"stride": 3})
    assert parse_compare("padding=same,stride=2", "conv", {"kernel": 3}) == \
        ("conv", {"kernel": 3, "padding": "same", "stride": 2})
    with pytest.raises(ConfigError, match="must be an integer"):
        parse_compare("stride=two", "conv", {})
    with pytest.raises(ConfigError, match="unknown option 'strid'"):
        parse_compare("strid=2", "conv", {})


# ----------------------------------------------------------------------------- figures and CLI
@pytest.fixture
def photo(tmp_path):
    p = tmp_path / "photo.png"
    Image.fromarray(_image(40, 30)).save(p)
    return p


@pytest.mark.parametrize("kind", KINDS)
def test_demo_layer_writes_a_figure_for_every_kind(kind, photo, tmp_path, capsys) -> None:
    out = tmp_path / f"{kind}.png"
    results = demo_layer(kind, photo, out, size=16)
    assert Image.open(out).format == "PNG"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == results[0].shape_line and lines[-1] == f"wrote {out}"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


@pytest.mark.parametrize(("kind", "compare", "extra"), [
    ("conv", "padding=same", {"kernel": 5}), ("max_pool", "avg_pool", {}), ("upsample", "conv_transpose", {}),
    ("conv", "stride=2", {"weights": "random", "filters": 6}), ("relu", "weights=sobel-y", {}),
])
def test_compare_mode(kind, compare, extra, photo, tmp_path, capsys) -> None:
    out = tmp_path / "cmp.svg"
    results = demo_layer(kind, photo, out, size=16, compare=compare, **extra)
    assert len(results) == 2 and out.read_text().lstrip().startswith("<?xml")
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_cli_prints_the_arithmetic(photo, tmp_path, capsys) -> None:
    out = tmp_path / "f.png"
    code = main(["demo-layer", "conv", str(photo), "--out", str(out), "--size", "17", "--stride", "2",
                 "--padding", "same"])
    assert code == 0 and out.is_file()
    assert "conv: 3x17x17 -> 1x9x9 (n=17, k=3, s=2, same: ceil(17 / 2) = 9)" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "needle"), [
    (["conv", "{img}", "--padding", "full"], "--padding must be 'valid' or 'same'"),
    (["conv", "{img}", "--kernel", "0"], "--kernel must be an integer from 1 to 31"),
    (["conv", "{img}", "--weights", "sobelx"], "Did you mean 'sobel-x'"),
    (["dropout", "{img}", "--rate", "1.5"], "--rate must be a number in [0, 1)"),
    (["upsample", "{img}", "--stride", "2"], "--stride does not apply to upsample"),
    (["upsample", "{img}", "--mode", "cubic"], "--mode must be 'nearest' or 'bilinear'"),
    (["pool", "{img}"], "KIND must be one of"),
    (["conv", "{img}", "--out", "fig.bmp"], "--out must end in one of"),
    (["conv", "{img}", "--compare", "bogus"], "--compare takes another KIND"),
    (["conv", "{img}", "--size", "2"], "--size must be between 4 and 2048"),
    (["conv", "{bad}"], "cannot use"),
    (["conv", "missing.jpg"], "not found"),
    (["conv", "{img}", "--kernel", "7", "--size", "5"], "larger than its 5x5 input"),
])
def test_cli_errors_are_one_line_exit_2(args, needle, photo, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    argv = ["demo-layer"] + [a.format(img=photo, bad=bad) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("convlens demo-layer: error:") and needle in err
    assert not (tmp_path / "demo.png").exists()


def test_errors_are_user_errors() -> None:
    with pytest.raises(UserError):
        resolve_options("conv", {"stride": 99})


def test_every_demo_kind_is_a_registered_layer_type() -> None:
    from convlens.models import LAYER_TYPES

    assert set(KINDS) <= set(LAYER_TYPES)
