"""The ONNX ``novelty`` output: computed in the graph, equal to PyTorch + NoveltyIndex.scores,
giving the same known/unknown predictions torch-free, kept (unquantised) by int8."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convlens
from convlens.errors import ConfigError
from convlens.export.onnx import export_onnx, quantize_int8, sample_inputs
from convlens.infer.bundle import load_model, read_meta, read_novelty
from convlens.infer.onnx_backend import NOVELTY_NAME, OnnxBackend
from tests.export.test_torch_free import BLOCKED, CHILD

Case = tuple[Path, dict[str, list[Path]]]


def _all(groups: dict[str, list[Path]]) -> list[Path]:
    return [p for g in ("train", "known", "foreign") for p in groups[g]]


def test_novelty_output_equals_pytorch_and_the_index(novelty_case: Case, novelty_onnx: Path) -> None:
    import onnx
    import torch

    bundle, groups = novelty_case
    backend = OnnxBackend(novelty_onnx)
    assert backend.has_novelty and backend.meta.novelty == read_meta(bundle).novelty
    assert backend.export_info["novelty_max_abs_diff"] <= 1e-4
    model, meta = load_model(bundle)
    index = read_novelty(bundle)
    images = np.stack([meta.preprocessing.load(p) for p in _all(groups)])
    for x in [meta.preprocessing.normalize(images), *sample_inputs(meta.preprocessing, (1, 4))]:
        with torch.no_grad():
            _, pooled = model.forward_pooled(torch.from_numpy(x))
        (got,) = backend.session.run([NOVELTY_NAME], {backend.input_name: x})
        np.testing.assert_allclose(got, index.scores(pooled.numpy()), atol=1e-5)
    # The training features are stored as fp16 (cast in the graph), not doubled to fp32.
    proto = onnx.load(str(novelty_onnx))
    ref = [i for i in proto.graph.initializer if tuple(i.dims) == (index.dim, len(index.labels))]
    assert [i.data_type for i in ref] == [onnx.TensorProto.FLOAT16]


def test_onnx_predictions_equal_torch_including_unknown(novelty_case: Case, novelty_onnx: Path) -> None:
    bundle, groups = novelty_case
    torch_preds = convlens.load(bundle, device="cpu", precision="fp32", engine="torch").predict(_all(groups))
    onnx_clf = convlens.load(novelty_onnx)
    assert onnx_clf.novelty_threshold == read_novelty(bundle).threshold
    onnx_preds = onnx_clf.predict(_all(groups))
    assert [p.label for p in onnx_preds] == [p.label for p in torch_preds]
    assert [p.known for p in onnx_preds] == [p.known for p in torch_preds]
    assert sum(not p.known for p in onnx_preds) == len(groups["foreign"])
    np.testing.assert_allclose([p.novelty for p in onnx_preds], [p.novelty for p in torch_preds], atol=1e-5)
    assert all(p.known for p in onnx_clf.predict(groups["foreign"], reject=False))
    with pytest.raises(ConfigError, match="ONNX model holds no training images"):
        onnx_clf.predict(groups["known"][0], neighbours=2)


def test_novelty_without_class_maps(novelty_case: Case, tmp_path: Path) -> None:
    """The forward_pooled branch of the export (no cam output) scores the same."""
    bundle, groups = novelty_case
    result, _ = export_onnx(bundle, tmp_path / "nocam.onnx", with_cam=False)
    assert result.outputs == ["logits", NOVELTY_NAME]
    got = convlens.load(tmp_path / "nocam.onnx").predict(_all(groups))
    want = convlens.load(bundle, device="cpu", precision="fp32", engine="torch").predict(_all(groups))
    assert [p.label for p in got] == [p.label for p in want]


def test_int8_keeps_the_novelty_output_unquantised(novelty_case: Case, tmp_path: Path) -> None:
    import onnx

    bundle, groups = novelty_case
    _, fp32 = export_onnx(bundle, None)
    result, data = quantize_int8(fp32, read_meta(bundle), bundle.parent / "train", tmp_path / "m8.onnx")
    assert NOVELTY_NAME in result.outputs
    index = read_novelty(bundle)
    ref = [i for i in onnx.load_from_string(data).graph.initializer if tuple(i.dims) == (index.dim, len(index.labels))]
    assert [i.data_type for i in ref] == [onnx.TensorProto.FLOAT16]
    preds = convlens.load(tmp_path / "m8.onnx").predict(groups["foreign"] + groups["train"][:5])
    assert [p.known for p in preds] == [False] * 5 + [True] * 5


def test_metadata_without_the_output_is_refused(novelty_case: Case, tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(tiny_onnx))
    doc = json.loads(proto.metadata_props[0].value)
    doc["novelty"] = read_meta(novelty_case[0]).novelty
    proto.metadata_props[0].value = json.dumps(doc)
    onnx.save(proto, str(tmp_path / "mismatch.onnx"))
    with pytest.raises(convlens.ConvlensError, match="novelty output and metadata do not match"):
        OnnxBackend(tmp_path / "mismatch.onnx")


def test_onnx_unknown_is_torch_free(novelty_case: Case, novelty_onnx: Path) -> None:
    _, groups = novelty_case
    args = ["predict", str(novelty_onnx), str(groups["foreign"][0]), str(groups["known"][0])]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(BLOCKED), "", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.split("ATTEMPTS=")[1].strip()) == []
    lines = [ln.split("\t") for ln in proc.stdout.splitlines() if "\t" in ln]
    assert lines[0] == ["file", "label", "probability", "novelty"]
    assert lines[1][1] == "unknown" and lines[2][1] in ("cats", "dogs")
