"""TorchScript export: traced, saved atomically, verified after a save/load round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convlens.cli import main
from convlens.export.onnx import ExportError, sample_inputs
from convlens.export.torchscript import EXTRA_FILE, export_torchscript, load_torchscript_meta
from convlens.infer.bundle import load_model
from tests.bundles import make_bundle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_torchscript_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    bundle = make_bundle(tmp_path / "m.convlens", classes=("a", "b", "c"), random_biases=True)
    out = tmp_path / "m.pt"
    assert main(["export", str(bundle), "--format", "torchscript", "--out", str(out)]) == 0
    assert "TorchScript" in capsys.readouterr().out
    extra = {EXTRA_FILE: ""}
    loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    doc = json.loads(extra[EXTRA_FILE])
    assert doc["classes"] == ["a", "b", "c"] and doc["export"]["format"] == "torchscript"
    assert load_torchscript_meta(out)["preprocessing"]["size"] == [32, 32]
    model, meta = load_model(bundle, "cpu")
    for x in sample_inputs(meta.preprocessing, (1, 6), seed=4):
        with torch.inference_mode():
            ref, got = model(torch.from_numpy(x)), loaded(torch.from_numpy(x))
        assert got.shape == ref.shape
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-4)


def test_torchscript_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    bundle = make_bundle(tmp_path / "m.convlens", random_biases=True)
    real_load = torch.jit.load

    def drifted(*args, **kwargs):  # the saved module answers differently from the model
        module = real_load(*args, **kwargs)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05)
        return module

    monkeypatch.setattr(torch.jit, "load", drifted)
    out = tmp_path / "m.pt"
    with pytest.raises(ExportError, match="TorchScript outputs differ"):
        export_torchscript(bundle, out)
    assert not out.exists()
