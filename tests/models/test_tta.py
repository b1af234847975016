"""Flip-averaged models: the logits are the mean of the two views, the CAM stays exact, and a
bundle that records ``flip_average`` is loaded (and exported) flip-averaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convlens.data.preprocess import Preprocessing
from convlens.infer.bundle import BundleMeta, load_model, read_meta, save_bundle
from convlens.models import create
from convlens.models.tta import FlipAveraged, flip_averaged, unwrap


@pytest.mark.parametrize("name", ["vgg10", "tiny", "resnet8"])
def test_logits_are_the_mean_of_the_image_and_its_mirror(name: str) -> None:
    torch.manual_seed(0)
    inner = create(name, 3, 3).eval()
    model = flip_averaged(inner)
    assert flip_averaged(model) is model and unwrap(model) is inner
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expect = (inner(x) + inner(x.flip(3))) / 2
        torch.testing.assert_close(model(x), expect)
        # An image and its mirror get the same answer.
        torch.testing.assert_close(model(x.flip(3)), model(x), atol=1e-5, rtol=1e-5)
        # GAP + dense head: the averaged features give the averaged logits (CAM stays exact).
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), expect, atol=1e-5, rtol=1e-5)
    assert model.gap_linear_head() is inner.gap_linear_head()


def test_bundle_records_and_applies_the_flip_average(tmp_path: Path) -> None:
    torch.manual_seed(0)
    inner = create("vgg10", 2, 3).eval()
    meta = BundleMeta(arch=inner.arch, classes=["a", "b"], output_activation=inner.output_activation,
                      preprocessing=Preprocessing(size=(32, 32), decode_size=(36, 36)), flip_average=True)
    path = save_bundle(tmp_path / "m.convlens", flip_averaged(inner), meta)  # saves the inner weights
    assert read_meta(path).flip_average and read_meta(path).preprocessing.decode_size == (36, 36)
    model, _ = load_model(path)
    assert isinstance(model, FlipAveraged)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), (inner(x) + inner(x.flip(3))) / 2)
    meta.flip_average = False
    plain, _ = load_model(save_bundle(tmp_path / "p.convlens", inner, meta))
    assert not isinstance(plain, FlipAveraged)


def test_onnx_export_bakes_in_the_flip_average(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from convlens.export.onnx import export_onnx, sample_inputs
    from convlens.infer.onnx_backend import OnnxBackend

    torch.manual_seed(0)
    inner = create("vgg10", 2, 3).eval()
    meta = BundleMeta(arch=inner.arch, classes=["a", "b"], output_activation=inner.output_activation,
                      preprocessing=Preprocessing(size=(32, 32)), flip_average=True)
    bundle = save_bundle(tmp_path / "m.convlens", inner, meta)
    export_onnx(bundle, tmp_path / "m.onnx")
    backend = OnnxBackend(tmp_path / "m.onnx")
    x = sample_inputs(meta.preprocessing, (3,), seed=1)[0]
    logits, cam = backend.logits_and_cam(x)
    with torch.no_grad():
        t = torch.from_numpy(x)
        expect = ((inner(t) + inner(t.flip(3))) / 2).numpy()
    np.testing.assert_allclose(logits, expect, atol=1e-4)
    # Any ONNX consumer gets the mirror-invariant answer; the CAM output still decomposes it.
    np.testing.assert_allclose(backend.logits(np.ascontiguousarray(x[:, :, :, ::-1])), logits, atol=1e-4)
    bias = inner.gap_linear_head().bias.detach().numpy()
    np.testing.assert_allclose(cam.mean(axis=(2, 3)) + bias, logits, atol=1e-4)
