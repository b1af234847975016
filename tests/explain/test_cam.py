"""CAM, Grad-CAM and Grad-CAM++ against manual computations and the known identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from convlens.data.preprocess import Preprocessing
from convlens.errors import UserError
from convlens.explain import overlay
from convlens.explain.cam import (
    cam,
    class_score,
    compute_cam,
    gradcam,
    gradcampp,
    input_window,
    normalize_heat,
    predicted_class,
    run_method,
    upsample_to_original,
)
from tests.bundles import make_model


def _x(seed: int, n: int = 3, size: int = 16, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g)


def _manual_cam(model: torch.nn.Module, x: torch.Tensor, cls: list[int]) -> np.ndarray:
    """sum_k w[c, k] f_k in float64 numpy; one sigmoid unit: +w for class 1, -w for class 0."""
    with torch.no_grad():
        f = model.forward_features(x).double().numpy()
    w = model.gap_linear_head().weight.detach().double().numpy()
    rows = [w[0] * (1 if c == 1 else -1) if w.shape[0] == 1 else w[c] for c in cls]
    return np.stack([np.tensordot(r, fi, axes=(0, 0)) for r, fi in zip(rows, f, strict=True)])


@pytest.mark.parametrize("name,num_classes", [("tiny", 2), ("tiny", 3), ("tutorial_cnn", 2)])
def test_cam_equals_manual_computation(name: str, num_classes: int) -> None:
    model = make_model(name, num_classes, seed=1)
    x = _x(0, size=32)
    cls = [i % num_classes for i in range(len(x))]
    out = cam(model, x, class_index=cls)
    np.testing.assert_allclose(out.maps.double().numpy(), _manual_cam(model, x, cls), rtol=1e-5, atol=1e-6)
    # Zhou et al.'s decomposition: the map's spatial mean plus the bias is the class score.
    dense = model.gap_linear_head()
    bias = dense.bias.detach().double()
    b = torch.stack([bias[0] * (1 if c == 1 else -1) if num_classes == 2 else bias[c] for c in cls])
    score = class_score(out.logits.double(), torch.tensor(cls))
    np.testing.assert_allclose((out.maps.double().mean(dim=(1, 2)) + b).numpy(), score.numpy(), rtol=1e-5, atol=1e-5)


def test_single_sigmoid_negative_class_is_minus_positive() -> None:
    model = make_model("tiny", 2, seed=2)
    x = _x(1)
    pos, neg = cam(model, x, class_index=1).maps, cam(model, x, class_index=0).maps
    torch.testing.assert_close(neg, -pos)
    # compute_cam with the same weights gives the same maps.
    with torch.no_grad():
        f = model.forward_features(x)
    torch.testing.assert_close(compute_cam(f, model.gap_linear_head().weight, 1), pos)


@pytest.mark.parametrize("name,num_classes", [("tiny", 2), ("tiny", 4), ("tutorial_cnn", 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcam_is_relu_cam_over_area(name: str, num_classes: int, seed: int) -> None:
    """GAP + dense: d logit_c / d f_k = w[c, k] / (h w), so Grad-CAM = ReLU(CAM) / (h w)."""
    model = make_model(name, num_classes, seed=seed)
    x = _x(100 + seed, size=32) * 2 - 0.5
    informative = 0
    for c in range(num_classes):
        exact = cam(model, x, class_index=c).maps
        grad = gradcam(model, x, class_index=c).maps
        h, w = exact.shape[1:]
        torch.testing.assert_close(grad, torch.relu(exact) / (h * w), rtol=1e-4, atol=1e-7)
        informative += int((grad > 0).any())
    # A class with no positive evidence anywhere is all zero on both sides; make sure the
    # identity was checked on real maps too.
    assert informative >= 1


def test_gradcampp_matches_closed_form_on_gap_dense() -> None:
    """With g = s w_k / (h w) constant per channel: alpha_k = g^2 / (2 g^2 + S_k g^3),
    weight_k = (h w) alpha_k ReLU(g_k), map = ReLU(sum_k weight_k f_k)."""
    model = make_model("tiny", 3, seed=4)
    x = _x(7, size=32)
    with torch.no_grad():
        f = model.forward_features(x).double().numpy()
    w = model.gap_linear_head().weight.detach().double().numpy()
    area = f.shape[2] * f.shape[3]
    for c in range(3):
        g = w[c] / area
        s = f.sum(axis=(2, 3))  # N x K
        denom = 2 * g**2 + s * g**3
        alpha = np.where(denom != 0, g**2 / np.where(denom != 0, denom, 1), 0)
        weights = area * alpha * np.maximum(g, 0)
        expect = np.maximum(np.einsum("nk,nkhw->nhw", weights, f), 0)
        got = gradcampp(model, x, class_index=c).maps.double().numpy()
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-9)


def _flatten_model(num_classes: int = 2) -> torch.nn.Module:
    from convlens.models import build_from_spec

    torch.manual_seed(3)
    spec = [{"type": "conv", "filters": 4, "kernel_size": 3, "padding": "same", "activation": "relu"},
            {"type": "max_pool", "pool_size": 2}, {"type": "flatten"}, {"type": "dense"}]
    return build_from_spec(spec, num_classes, 3, (16, 16)).eval()


def test_cam_refuses_non_gap_model_but_gradcam_works() -> None:
    model = _flatten_model()
    assert model.gap_linear_head() is None
    x = _x(3)
    with pytest.raises(UserError, match="gradcam"):
        cam(model, x, class_index=1)
    # Flatten + dense: d logit / d f[k, i, j] is the dense weight at (k, i, j); Grad-CAM's
    # channel weight is its spatial mean (negated for the negative class of one sigmoid unit).
    with torch.no_grad():
        f = model.forward_features(x)
    wd = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.detach()
    wmap = wd[0].reshape(f.shape[1:])
    for c, sign in ((1, 1.0), (0, -1.0)):
        alpha = sign * wmap.mean(dim=(1, 2))
        expect = torch.relu(torch.einsum("k,nkhw->nhw", alpha, f))
        torch.testing.assert_close(gradcam(model, x, class_index=c).maps, expect, rtol=1e-4, atol=1e-7)
        pp = gradcampp(model, x, class_index=c).maps
        assert pp.shape == f.shape[:1] + f.shape[2:] and bool((pp >= 0).all()) and torch.isfinite(pp).all()


def test_default_class_is_the_prediction() -> None:
    model = make_model("tiny", 2, seed=5)
    x = _x(11, n=6)
    with torch.no_grad():
        logits = model(x)
    for t in (0.2, 0.5, 0.8):
        expect = (torch.sigmoid(logits[:, 0]) >= t).long()
        assert torch.equal(predicted_class(logits, t), expect)
        assert torch.equal(gradcam(model, x, threshold=t).class_index, expect)
    model3 = make_model("tiny", 3, seed=5)
    out = run_method("cam", model3, x)
    assert torch.equal(out.class_index, out.logits.argmax(1))


# ----------------------------------------------------------------------------- geometry
def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w,h", [(40, 20), (20, 40), (33, 33), (50, 21)])
def test_input_window_matches_pillow(w: int, h: int) -> None:
    img = _photo(w, h)
    crop = Preprocessing(size=(16, 12), resize="crop")
    box, _ = input_window(crop, w, h)
    direct = img.resize((12, 16), Image.Resampling.BILINEAR, box=box)
    np.testing.assert_array_equal(np.asarray(direct), crop.from_pil(img))

    pad = Preprocessing(size=(16, 12), resize="pad")
    _, (x0, y0, x1, y1) = input_window(pad, w, h)
    white = pad.from_pil(Image.new("RGB", (w, h), (255, 255, 255)))[:, :, 0]
    inside = np.zeros_like(white, dtype=bool)
    inside[y0:y1, x0:x1] = True
    # Bilinear edges may blend with the black border, but every pixel outside is black and
    # every pixel inside is lit.
    assert (white[~inside] == 0).all() and (white[inside] > 0).all()
    ref = ImageOps.contain(img, (12, 16))
    assert (x1 - x0, y1 - y0) == ref.size


@pytest.mark.parametrize("policy", ["squash", "crop", "pad"])
def test_upsample_to_original_size_and_place(policy: str) -> None:
    prep = Preprocessing(size=(16, 16), resize=policy)
    raw = torch.zeros(4, 4)
    raw[0, 0] = 1.0  # evidence in the model input's top-left corner
    up = upsample_to_original(raw, prep, 60, 30)
    assert up.shape == (30, 60)
    heat = normalize_heat(up)
    assert heat.dtype == np.float32 and heat.max() == pytest.approx(1.0) and heat.min() >= 0
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    if policy == "squash":
        assert r < 8 and c < 15
    elif policy == "crop":  # the model saw the central 30 x 30; left and right strips unseen
        assert 15 <= c < 23 and r < 8
        assert np.all(heat[:, :15] == 0) and np.all(heat[:, 45:] == 0)
    else:  # pad: the photo fills the middle rows of the input; the corner is the top-left of it
        assert r < 12 and c < 15


def test_normalize_heat_keeps_zero_meaning_no_evidence() -> None:
    assert np.all(normalize_heat(-torch.rand(5, 5)) == 0)
    m = torch.tensor([[-2.0, 0.5], [1.0, 2.0]])
    np.testing.assert_allclose(normalize_heat(m), [[0, 0.25], [0.5, 1.0]])


def test_overlay_blends_colormap() -> None:
    from matplotlib import colormaps

    img = np.full((10, 20, 3), 100, dtype=np.uint8)
    heat = np.zeros((10, 20), dtype=np.float32)
    heat[:, 10:] = 1.0
    out = overlay(img, heat, alpha=0.5)
    assert out.shape == (10, 20, 3) and out.dtype == np.uint8
    hot = np.asarray(colormaps["jet"](1.0)[:3]) * 255
    np.testing.assert_allclose(out[0, 15], np.rint(0.5 * 100 + 0.5 * hot), atol=1)
    np.testing.assert_array_equal(overlay(img, heat, alpha=0.0), img)
    # A small map is resized to the image; a grayscale image becomes RGB.
    small = overlay(img[:, :, 0], np.ones((2, 4), dtype=np.float32))
    assert small.shape == (10, 20, 3)
