"""precision="auto" per model: training measures what bf16 does to the model's probabilities and
the bundle records fp32 when bf16 moves them too far; every inference path then agrees."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import convlens
from convlens import runtime
from convlens.engine.training import train
from convlens.errors import BundleError
from convlens.evaluate import BF16_MAX_PROB_DIFF, bf16_agreement, predict_probabilities
from convlens.infer.bundle import load_model, save_bundle
from tests.bundles import make_meta, make_model
from tests.engine.helpers import make_dataset, quiet, tiny_config

NATIVE_BF16 = runtime.cpu_supports_bf16()
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16: auto is fp32 everywhere")


def _images(n: int = 64, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _model(head_scale: float) -> torch.nn.Module:
    """The tiny model; a large head scale turns bf16's small feature errors into large logit errors."""
    model = make_model("tiny", 3, seed=1, random_biases=True)
    with torch.no_grad():
        model.gap_linear_head().weight.mul_(head_scale)
    return model


@needs_bf16
def test_bf16_is_kept_where_it_agrees_and_refused_where_it_does_not() -> None:
    images = _images()
    for scale, precision in ((1.0, "auto"), (100.0, "fp32")):
        model = _model(scale)
        check = bf16_agreement(model, make_meta(model, ["a", "b", "c"]), images, "cpu", batch_size=16)
        assert check is not None and check["images"] == len(images) and check["precision"] == precision
        assert (check["max_prob_diff"] <= BF16_MAX_PROB_DIFF) is (precision == "auto")
        assert check["max_prob_diff"] > 0  # bf16 really ran


def test_no_check_where_auto_is_fp32_anyway(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    model = _model(100.0)
    assert bf16_agreement(model, make_meta(model, ["a", "b", "c"]), _images(), "cpu") is None


@needs_bf16
def test_a_large_set_is_sampled_evenly() -> None:
    model = _model(1.0)
    check = bf16_agreement(model, make_meta(model, ["a", "b", "c"]), _images(300), "cpu", limit=50)
    assert check is not None and check["images"] == 50


def test_the_bundle_records_the_choice_and_every_path_follows_it(tmp_path: Path) -> None:
    model = _model(100.0)
    meta = make_meta(model, ["a", "b", "c"])
    meta.precision = "fp32"
    path = save_bundle(tmp_path / "m.convlens", model, meta)
    _, loaded = load_model(path)
    assert loaded.precision == "fp32" and loaded.inference_precision("auto") == "fp32"
    assert loaded.inference_precision("bf16") == "bf16"  # an explicit request still wins
    assert convlens.load(path, device="cpu").backend.precision == "fp32"
    images = _images(8)
    exact = predict_probabilities(model, loaded, images, precision="fp32")
    np.testing.assert_array_equal(predict_probabilities(model, loaded, images), exact)
    np.testing.assert_allclose(convlens.load(path, device="cpu", engine="torch").predict_proba(images), exact, atol=1e-6)
    # engine auto runs this fp32 bundle through onnxruntime: the same numbers but for float rounding
    np.testing.assert_allclose(convlens.load(path, device="cpu").predict_proba(images), exact, atol=1e-5)


def test_bundles_without_the_field_are_auto_and_a_bad_value_is_refused(tmp_path: Path) -> None:
    model = make_model("tiny", 2)
    path = save_bundle(tmp_path / "m.convlens", model, make_meta(model, ["a", "b"]))
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    doc = json.loads(files["model.json"])
    for value, ok in ((None, True), ("bf16", False)):
        if value is None:
            doc.pop("precision")
        else:
            doc["precision"] = value
        files["model.json"] = json.dumps(doc).encode()
        with zipfile.ZipFile(path, "w") as z:
            for n, b in files.items():
                z.writestr(n, b)
        if ok:
            assert load_model(path)[1].precision == "auto"
        else:
            with pytest.raises(BundleError, match="invalid model.json"):
                load_model(path)


@needs_bf16
def test_a_training_run_measures_records_and_reports_it(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", classes=2, per_class=12)
    result = train(tiny_config(data, tmp_path), console=quiet())
    _, meta = load_model(result.bundle_path)
    check = meta.metrics["bf16_agreement"]
    assert check["images"] > 0 and meta.precision == check["precision"]
    assert "bf16 against fp32 on" in (result.run_dir / "report.html").read_text()


@needs_bf16
def test_a_run_whose_model_fails_the_check_predicts_in_fp32_and_says_so(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import convlens.evaluate.bf16 as ev

    monkeypatch.setattr(ev, "BF16_MAX_PROB_DIFF", 0.0)  # no bf16 difference is small enough
    data = make_dataset(tmp_path / "ds", classes=2, per_class=12)
    out = quiet()
    result = train(tiny_config(data, tmp_path), console=out)
    _, meta = load_model(result.bundle_path)
    assert meta.precision == "fp32" and meta.metrics["bf16_agreement"]["precision"] == "fp32"
    assert "so it predicts in fp32" in out.file.getvalue()
    assert convlens.load(result.bundle_path, device="cpu").backend.precision == "fp32"
