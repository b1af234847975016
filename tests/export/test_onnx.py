"""ONNX export: numbers match PyTorch, metadata round-trips, the batch axis is dynamic, a
mismatch is refused, and the backend reads what the exporter wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convlens.errors import BundleError, ConfigError
from convlens.export import default_output, export_command, resolve_output
from convlens.export.onnx import ExportError, export_onnx, sample_inputs
from convlens.infer.bundle import load_model, read_meta
from convlens.infer.onnx_backend import CAM_NAME, LOGITS_NAME, METADATA_KEY, OnnxBackend
from tests.bundles import make_bundle


def _torch_logits(bundle: Path, x: np.ndarray) -> np.ndarray:
    import torch

    model, _ = load_model(bundle, "cpu")
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_onnx_matches_torch_on_any_batch_size(tiny_bundle: Path, tiny_onnx: Path) -> None:
    backend = OnnxBackend(tiny_onnx)
    prep = read_meta(tiny_bundle).preprocessing
    for n, x in zip((1, 4, 7), sample_inputs(prep, (1, 4, 7), seed=42), strict=True):
        got = backend.logits(x)
        assert got.shape == (n, 1)
        np.testing.assert_allclose(got, _torch_logits(tiny_bundle, x), atol=1e-4, rtol=0)
    # The batch axis is symbolic in the graph, the rest fixed.
    shape = backend.session.get_inputs()[0].shape
    assert isinstance(shape[0], str) and shape[1:] == [3, 32, 32]


def test_metadata_round_trip(tiny_bundle: Path, tiny_onnx: Path) -> None:
    import onnx

    meta = read_meta(tiny_bundle)
    backend = OnnxBackend(tiny_onnx)
    assert backend.meta.classes == ["cats", "dogs"]
    assert backend.meta.preprocessing == meta.preprocessing
    assert backend.meta.output_activation == "sigmoid"
    assert backend.meta.metrics == meta.metrics
    assert backend.meta.arch == meta.arch
    assert backend.export_info["exporter"] in ("dynamo", "legacy")
    assert backend.export_info["max_abs_diff"] <= 1e-4
    assert backend.export_info["int8"] is False
    proto = onnx.load(str(tiny_onnx))
    doc = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert doc["format"] == "convlens-bundle" and doc["preprocessing"]["size"] == [32, 32]
    assert proto.producer_name == "convlens"
    onnx.checker.check_model(proto)


def test_cam_output_is_the_exact_class_activation_map(tmp_path: Path) -> None:
    """For a GAP + dense head, mean(cam) + bias == logits: the maps decompose the logits."""
    bundle = make_bundle(tmp_path / "m.convlens", classes=("a", "b", "c"), resize="crop", random_biases=True)
    out = tmp_path / "m.onnx"
    res, _ = export_onnx(bundle, out)
    assert res.outputs == [LOGITS_NAME, CAM_NAME]
    backend = OnnxBackend(out)
    assert backend.has_cam and backend.meta.output_activation == "softmax"
    x = sample_inputs(backend.meta.preprocessing, (2,), seed=3)[0]
    logits, cam = backend.logits_and_cam(x)
    model, _ = load_model(bundle, "cpu")
    bias = model.gap_linear_head().bias.detach().numpy()
    assert cam.shape[:2] == (2, 3)
    np.testing.assert_allclose(cam.mean(axis=(2, 3)) + bias, logits, atol=1e-5)
    np.testing.assert_allclose(logits, _torch_logits(bundle, x), atol=1e-4)


def test_model_without_gap_head_exports_logits_only(tmp_path: Path) -> None:
    layers = [
        {"type": "conv", "filters": 4, "kernel_size": 3, "strides": 2, "padding": "same", "activation": "relu"},
        {"type": "flatten"},
        {"type": "dense"},
    ]
    bundle = make_bundle(tmp_path / "flat.convlens", layers=layers, size=16, channels=1, random_biases=True)
    out = tmp_path / "flat.onnx"
    res, _ = export_onnx(bundle, out)
    assert res.outputs == [LOGITS_NAME]
    backend = OnnxBackend(out)
    assert not backend.has_cam
    x = sample_inputs(backend.meta.preprocessing, (3,), seed=5)[0]
    assert x.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(backend.logits(x), _torch_logits(bundle, x), atol=1e-4)
    with pytest.raises(BundleError, match="no class activation output"):
        backend.logits_and_cam(x)


def test_mismatch_is_refused_and_nothing_is_written(tiny_bundle: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """If onnxruntime disagrees with PyTorch the export fails with a clear error."""
    from onnx import numpy_helper

    import convlens.export.onnx as mod

    real = mod._torch_to_onnx

    def corrupted(*args, **kwargs):  # a graph whose weights drifted by 1e-2
        proto, name = real(*args, **kwargs)
        for init in proto.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype == np.float32:
                init.CopyFrom(numpy_helper.from_array(arr + np.float32(0.01), init.name))
        return proto, name

    monkeypatch.setattr(mod, "_torch_to_onnx", corrupted)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"differ from PyTorch by .* \(> 0.0001\)"):
        export_onnx(tiny_bundle, out)
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no temp file left behind either


def test_legacy_exporter_fallback(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the torch.export-based exporter fails, the legacy one is used and still verified."""
    import torch

    real = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated torch.export failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    out = tmp_path / "legacy.onnx"
    res, _ = export_onnx(tiny_bundle, out)
    assert res.exporter == "legacy"
    assert any("simulated torch.export failure" in n for n in res.notes)
    backend = OnnxBackend(out)
    x = sample_inputs(backend.meta.preprocessing, (5,), seed=9)[0]
    np.testing.assert_allclose(backend.logits(x), _torch_logits(tiny_bundle, x), atol=1e-4)


def test_export_command_writes_beside_the_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_bundle(tmp_path / "run" / "model.convlens", random_biases=True)
    assert export_command(bundle, fmt="onnx") == 0
    out = tmp_path / "run" / "model.onnx"
    assert out.is_file()
    text = capsys.readouterr().out
    assert "exported" in text and "model.onnx" in text and "max |onnxruntime - torch|" in text
    assert OnnxBackend(out).meta.classes == ["cats", "dogs"]


def test_output_paths(tmp_path: Path) -> None:
    b = tmp_path / "run" / "model.convlens"
    assert default_output(b, "onnx") == tmp_path / "run" / "model.onnx"
    assert default_output(b, "onnx", int8=True) == tmp_path / "run" / "model.int8.onnx"
    assert default_output(b, "torchscript") == tmp_path / "run" / "model.torchscript.pt"
    (tmp_path / "run").mkdir()
    assert default_output(tmp_path / "run", "onnx") == tmp_path / "run" / "model.onnx"
    assert resolve_output(b, "onnx", tmp_path) == tmp_path / "model.onnx"  # a folder
    assert resolve_output(b, "onnx", tmp_path / "x.onnx") == tmp_path / "x.onnx"
    with pytest.raises(ConfigError, match="must not be the bundle"):
        resolve_output(b, "onnx", b)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"int8": True}, "--int8 needs --calibration"),
    ({"fmt": "torchscript", "int8": True, "calibration": "."}, "only available for ONNX"),
    ({"calibration": "."}, "only used with --int8"),
    ({"fmt": "torchscript", "validate": "."}, "use it with --format onnx"),
    ({"int8": True, "calibration": "/no/such/dir"}, "must be an existing folder"),
    ({"fmt": "tflite"}, "format must be one of onnx, torchscript"),
])
def test_bad_options_are_one_line_errors(tiny_bundle: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        export_command(tiny_bundle, **kwargs)
    assert "\n" not in str(e.value)


def test_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        export_command(tmp_path / "nope.convlens")


def test_backend_rejects_bad_files(tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx

    with pytest.raises(BundleError, match="does not exist"):
        OnnxBackend(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf" * 10)
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        OnnxBackend(junk)
    proto = onnx.load(str(tiny_onnx))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(BundleError, match="no convlens metadata"):
        OnnxBackend(bare)
    backend = OnnxBackend(tiny_onnx)
    with pytest.raises(ValueError, match=r"N x 3 x 32 x 32"):
        backend.logits(np.zeros((1, 3, 16, 16), np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tutorial_cnn", "resnet8", "mini_xception"])
def test_every_zoo_model_exports(name: str, tmp_path: Path) -> None:
    """BatchNorm, residual adds and separable convolutions all survive export within 1e-4."""
    bundle = make_bundle(tmp_path / f"{name}.convlens", name, ("a", "b", "c"), random_biases=True)
    out = tmp_path / f"{name}.onnx"
    res, _ = export_onnx(bundle, out)
    assert res.max_abs_diff <= 1e-4
    backend = OnnxBackend(out)
    x = sample_inputs(backend.meta.preprocessing, (2,), seed=11)[0]
    np.testing.assert_allclose(backend.logits(x), _torch_logits(bundle, x), atol=1e-4)
