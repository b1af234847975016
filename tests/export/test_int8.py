"""Static int8 quantisation (onnxruntime, QDQ, per-channel) and the accuracy report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convlens.errors import DataError
from convlens.export import export_command
from convlens.export.onnx import (
    ImageFolderReader,
    accuracy_report,
    decide,
    export_onnx,
    quantize_int8,
)
from convlens.infer.bundle import read_meta
from convlens.infer.onnx_backend import OnnxBackend
from tests.bundles import write_images


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("calib")
    write_images(d / "a", 6, seed=1)
    write_images(d / "b", 6, seed=2, fmt="JPEG")
    (d / "b" / "broken.jpg").write_bytes((d / "b" / "img000.jpg").read_bytes()[:200])  # truncated
    (d / "notes.txt").write_text("not an image")
    return d


def test_int8_model_is_quantised_and_close(tiny_bundle: Path, calib_dir: Path, tmp_path: Path) -> None:
    import onnx

    meta = read_meta(tiny_bundle)
    _, fp32 = export_onnx(tiny_bundle, None)
    out = tmp_path / "m.int8.onnx"
    res, data = quantize_int8(fp32, meta, calib_dir, out)
    assert out.read_bytes() == data and res.format == "onnx-int8"
    assert any("skipped 1 unusable calibration" in n for n in res.notes)

    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8_weights, "weights were not stored as int8"
    # Per-channel: a conv weight's scale has one entry per output channel.
    scales = [i for i in proto.graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1]
    assert scales, "no per-channel scales found"

    backend = OnnxBackend(out)
    assert backend.int8 and backend.meta.classes == meta.classes
    assert backend.export_info["calibration_images"] == 12
    assert backend.export_info["calibration_skipped"] == 1
    fp32_backend = OnnxBackend(_write(tmp_path / "fp32.onnx", fp32))
    reader = ImageFolderReader(calib_dir, meta.preprocessing)
    x = np.concatenate(reader.batches)
    diff = np.abs(backend.logits(x) - fp32_backend.logits(x)).max()
    assert 0 < diff < 0.1  # quantised (not identical) yet close on the calibration images


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_export_command_int8_with_validation(tiny_bundle: Path, calib_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    val = tmp_path / "val"
    write_images(val / "cats", 3, seed=5)
    write_images(val / "dogs", 2, seed=6)
    out = tmp_path / "q.onnx"
    assert export_command(tiny_bundle, fmt="onnx", out=out, int8=True, calibration=calib_dir, validate=val) == 0
    text = capsys.readouterr().out
    assert "int8 QDQ" in text
    assert "validation on 5 images: fp32 accuracy" in text and "int8 accuracy" in text and "change" in text
    assert OnnxBackend(out).int8


def test_calibration_folder_without_images(tiny_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.png").write_bytes(b"not a png")
    _, fp32 = export_onnx(tiny_bundle, None)
    with pytest.raises(DataError, match="no usable images"):
        quantize_int8(fp32, read_meta(tiny_bundle), tmp_path / "empty", tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_accuracy_report_counts_correctly(tiny_bundle: Path, tmp_path: Path) -> None:
    meta = read_meta(tiny_bundle)
    write_images(tmp_path / "cats", 3, seed=1)
    write_images(tmp_path / "dogs", 2, seed=2)
    (tmp_path / "dogs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    def always_dogs(x: np.ndarray) -> np.ndarray:  # one sigmoid unit: positive = class 1 = dogs
        return np.full((len(x), 1), 3.0, np.float32)

    def always_cats(x: np.ndarray) -> np.ndarray:
        return np.full((len(x), 1), -3.0, np.float32)

    rep = accuracy_report(tmp_path, meta, {"fp32": always_dogs, "int8": always_cats}, batch_size=2)
    assert rep["images"] == 5 and rep["skipped"] == 1
    assert rep["accuracy"] == {"fp32": pytest.approx(2 / 5), "int8": pytest.approx(3 / 5)}
    assert rep["agreement"] == 0.0 and rep["change"] == pytest.approx(1 / 5)


def test_validation_folder_must_use_the_models_classes(tiny_bundle: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "cats", 1)
    write_images(tmp_path / "horses", 1)
    with pytest.raises(DataError, match="does not know: horses"):
        accuracy_report(tmp_path, read_meta(tiny_bundle), {"fp32": lambda x: np.zeros((len(x), 1))})


def test_decide_uses_threshold_and_argmax(tiny_bundle: Path) -> None:
    meta = read_meta(tiny_bundle)
    assert decide(np.array([[-0.1], [0.1]]), meta).tolist() == [0, 1]
    meta.threshold = 0.6  # sigmoid(0.1) = 0.525 < 0.6
    assert decide(np.array([[0.1], [1.0]]), meta).tolist() == [0, 1]
    assert decide(np.array([[0.1, 2.0, -1.0]]), meta).tolist() == [1]


def test_int8_on_real_photos(tiny_bundle: Path, cats_dogs: Path, tmp_path: Path) -> None:
    """Calibrate on a few real JPEGs (read in place, never copied) and validate on others."""
    calib = cats_dogs / "train" / "cats"
    meta = read_meta(tiny_bundle)
    _, fp32 = export_onnx(tiny_bundle, None)
    res, _ = quantize_int8(fp32, meta, calib, tmp_path / "real.int8.onnx", max_images=8)
    backend = OnnxBackend(tmp_path / "real.int8.onnx")
    assert backend.export_info["calibration_images"] == 8
    assert res.max_abs_diff < 0.1


def test_validation_folder_may_be_presplit(tiny_bundle: Path, tmp_path: Path) -> None:
    """``DIR/train|val/<class>`` validates on the held-out part, as ``evaluate`` does."""
    for cls, n in (("cats", 2), ("dogs", 3)):
        write_images(tmp_path / "train" / cls, 4)
        write_images(tmp_path / "val" / cls, n)
    (tmp_path / "val" / "cats" / ".DS_Store").write_bytes(b"\0" * 8)
    rep = accuracy_report(tmp_path, read_meta(tiny_bundle), {"fp32": lambda x: np.full((len(x), 1), 3.0)})
    assert rep["images"] == 5 and rep["accuracy"]["fp32"] == pytest.approx(3 / 5)
