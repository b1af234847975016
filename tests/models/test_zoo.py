"""Registry and model zoo: every model trains in fp32, bf16 autocast and channels_last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from convlens.errors import SpecError
from convlens.models import (
    ConvlensModel,
    build_from_arch,
    build_from_spec,
    build_model,
    create,
    list_models,
    load_layer_file,
    register_model,
)

REPO = Path(__file__).resolve().parents[2]
MODELS = list_models()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_zoo() -> None:
    assert {"tutorial_cnn", "tiny", "resnet8", "mini_xception"} <= set(MODELS)
    with pytest.raises(ValueError, match="already registered"):
        register_model(create.__globals__["_REGISTRY"]["tiny"])


def test_tutorial_cnn_matches_keras_parameter_count() -> None:
    model = create("tutorial_cnn", num_classes=2, in_channels=3)
    # Keras's model.summary() of the tutorial model: 448 + 4,640 + 18,496 + 73,856 + 129.
    assert n_params(model) == 97_569
    assert (3 * 3 * 3 + 1) * 16 + (3 * 3 * 16 + 1) * 32 + (3 * 3 * 32 + 1) * 64 + (3 * 3 * 64 + 1) * 128 + 129 == 97_569
    assert n_params(create("tutorial_cnn", num_classes=5)) == 97_569 - 129 + 128 * 5 + 5
    assert n_params(create("tutorial_cnn", num_classes=2, in_channels=1)) == 97_569 - 448 + (9 + 1) * 16
    assert model.output_activation == "sigmoid" and create("tutorial_cnn", 3).output_activation == "softmax"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128] and all(c.kernel_size == (3, 3) for c in convs)


def test_example_layer_file_is_the_tutorial_cnn() -> None:
    path = REPO / "examples" / "tutorial_cnn.yaml"
    from_file = build_from_spec(str(path), num_classes=2, in_channels=3)
    zoo = create("tutorial_cnn", num_classes=2)
    assert [tuple(p.shape) for p in from_file.parameters()] == [tuple(p.shape) for p in zoo.parameters()]
    from_file.load_state_dict(zoo.state_dict())
    x = torch.rand(2, 3, 20, 20)
    assert torch.equal(from_file(x), zoo(x))
    assert load_layer_file(path)["name"] == "tutorial_cnn"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes,in_channels", [(2, 3), (5, 1)])
def test_forward_backward_fp32(name: str, num_classes: int, in_channels: int) -> None:
    torch.manual_seed(0)
    model = create(name, num_classes=num_classes, in_channels=in_channels)
    assert isinstance(model, ConvlensModel)
    assert (model.num_classes, model.in_channels) == (num_classes, in_channels)
    assert model.out_units == (1 if num_classes == 2 else num_classes)
    x = torch.rand(2, in_channels, 32, 32)
    model.train()
    out = model(x)
    assert out.shape == (2, model.out_units) and out.dtype == torch.float32
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_and_channels_last(name: str) -> None:
    torch.manual_seed(0)
    model = create(name, num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    cl = model.to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(cl(xc), ref, rtol=1e-4, atol=1e-4)
    feats = cl.forward_features(xc)
    assert feats.dim() == 4
    cl.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cl(xc)
        loss = nn.functional.cross_entropy(out.float(), torch.tensor([0, 2]))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cl.parameters())
    cl.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = cl(xc).float()
    scale = ref.abs().max().item() + 1e-3
    assert (low - ref).abs().max().item() < 0.1 * scale + 0.05


@pytest.mark.parametrize("name", MODELS)
def test_features_head_units_and_arch_round_trip(name: str) -> None:
    torch.manual_seed(0)
    model = create(name, num_classes=4, in_channels=1).eval()
    x = torch.rand(3, 1, 40, 36)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        assert feats.dim() == 4
        assert torch.equal(model.forward_head(feats), out)
        y = x
        for _, _, unit in model.summary_units():  # the units run in order are the model
            y = unit(y)
        torch.testing.assert_close(y, out)
        fc = model.gap_linear_head()
        assert isinstance(fc, nn.Linear)  # every zoo head is GAP + dense: exact CAM
        torch.testing.assert_close(fc(feats.mean(dim=(2, 3))), out)
    arch = json.loads(json.dumps(model.arch))  # JSON-safe, as stored in a bundle
    assert arch["name"] == name
    again = build_from_arch(arch)
    again.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), out)


def test_create_errors_are_user_errors() -> None:
    with pytest.raises(SpecError, match=r"unknown model 'resnet9'. Did you mean 'resnet8'\?.*Received: model='resnet9'"):
        create("resnet9", num_classes=2)
    with pytest.raises(SpecError, match=r"model 'mini_xception' has no option 'widht'. Did you mean 'width'\?"):
        create("mini_xception", num_classes=2, widht=0.5)
    with pytest.raises(SpecError, match=r"num_classes must be an integer >= 2. Received: num_classes=1"):
        create("tiny", num_classes=1)
    with pytest.raises(SpecError, match=r"in_channels must be a positive integer"):
        create("tiny", num_classes=2, in_channels=0)
    with pytest.raises(SpecError, match=r"width must be a positive number"):
        create("mini_xception", num_classes=2, width=0)
    with pytest.raises(SpecError, match="needs 'name' or 'layers'"):
        build_from_arch({"num_classes": 2})


def test_model_kwargs_change_the_model_and_are_recorded() -> None:
    small = create("mini_xception", num_classes=2, width=0.25)
    assert n_params(small) < n_params(create("mini_xception", num_classes=2)) / 2
    assert small.arch["kwargs"] == {"width": 0.25}
    wide = create("resnet8", num_classes=2, widths=[16, 32, 64], stem_width=8)
    assert wide.stage3.conv2.out_channels == 64
    rebuilt = build_from_arch(json.loads(json.dumps(wide.arch)))
    rebuilt.load_state_dict(wide.state_dict())


def test_build_model_accepts_name_file_and_list(tmp_path: Path) -> None:
    assert build_model("tiny", 2).arch["name"] == "tiny"
    spec = [{"type": "conv", "filters": 4, "kernel_size": 3}, {"type": "global_avg_pool"}, {"type": "dense"}]
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"name": "mine", "layers": spec}))
    from_file = build_model(str(f), 3, in_channels=1, input_size=16)
    assert from_file.arch["layers"][0]["filters"] == 4 and from_file.arch["input_size"] == [16, 16]
    assert build_from_arch(from_file.arch)(torch.rand(1, 1, 16, 16)).shape == (1, 3)
    assert build_model(spec, 2).out_units == 1
    with pytest.raises(SpecError, match="does not exist"):
        build_model(str(tmp_path / "nope.yaml"), 2)


@pytest.mark.parametrize("text,pattern", [
    ("layers:\n  - {type: conv, filters: 4, kernel_size: 3\n", r"is not valid YAML \(line"),
    ("layer:\n  - {type: flatten}\n", "must hold a list of layers"),
    ("layers:\n  - {type: global_avg_pool}\n  - {type: dense}\nnmae: x\n", r"unknown key 'nmae'. Did you mean 'name'\?"),
    ("- {type: conv, filters: 0, kernel_size: 3}\n- {type: global_avg_pool}\n- {type: dense}\n",
     r"model file '.*bad.yaml': layer 0 \(conv\): filters must be"),
])
def test_bad_layer_files_name_the_problem(tmp_path: Path, text: str, pattern: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SpecError, match=pattern):
        build_model(str(bad), 2)


@pytest.mark.parametrize("name", ["resnet8", "layers"])
def test_models_round_trip_through_a_bundle(name: str, tmp_path: Path) -> None:
    from convlens.data.preprocess import Preprocessing
    from convlens.infer.bundle import BundleMeta, load_model, save_bundle

    torch.manual_seed(0)
    if name == "layers":
        model = build_from_spec(str(REPO / "examples" / "tutorial_cnn.yaml"), num_classes=3, in_channels=1)
    else:
        model = create(name, num_classes=3, in_channels=1)
    model.eval()
    meta = BundleMeta(arch=model.arch, classes=["a", "b", "c"], preprocessing=Preprocessing(size=(24, 24), channels=1),
                      output_activation=model.output_activation)
    path = save_bundle(tmp_path / "model.convlens", model, meta)
    loaded, meta2 = load_model(path)
    x = torch.rand(2, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta2.output_activation == "softmax" and meta2.arch == json.loads(json.dumps(model.arch))
