"""Model summaries (shapes, parameters, FLOPs, receptive fields) and `convlens summary`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from convlens.cli import main
from convlens.errors import ConfigError, SpecError
from convlens.models import create, parse_input_shape, print_summary, summarize

REPO = Path(__file__).resolve().parents[2]


def test_tutorial_cnn_params_and_flops_at_300() -> None:
    s = summarize("tutorial_cnn", "300x300x3", num_classes=2)
    assert s.total_params == s.trainable_params == 97_569 and s.non_trainable_params == 0
    assert s.size_bytes == 97_569 * 4  # fp32; Keras prints 381.13 KB
    # By hand: a same 3x3 conv does H*W*C_out*(3*3*C_in) multiply-adds, 2 FLOPs each; bias adds,
    # pooling, ReLU and GAP are not counted. MaxPooling2D(2) (valid): 300 -> 150 -> 75 -> 37.
    conv1 = 2 * 300 * 300 * 16 * (3 * 3 * 3)  # 77,760,000
    conv2 = 2 * 150 * 150 * 32 * (3 * 3 * 16)  # 207,360,000
    conv3 = 2 * 75 * 75 * 64 * (3 * 3 * 32)  # 207,360,000
    conv4 = 2 * 37 * 37 * 128 * (3 * 3 * 64)  # 201,867,264
    dense = 2 * 128 * 1  # 256
    assert s.flops == conv1 + conv2 + conv3 + conv4 + dense == 694_347_520
    assert [r.flops for r in s.rows] == [conv1, 0, conv2, 0, conv3, 0, conv4, 0, dense]
    assert [r.output_shape for r in s.rows] == [(16, 300, 300), (16, 150, 150), (32, 150, 150), (32, 75, 75),
                                                (64, 75, 75), (64, 37, 37), (128, 37, 37), (128,), (1,)]
    assert [r.params for r in s.rows] == [448, 0, 4_640, 0, 18_496, 0, 73_856, 0, 129]
    assert s.rows[0].keras_shape == "(None, 300, 300, 16)"
    assert s.out_units == 1 and s.output_activation == "sigmoid"


def test_batch_norm_statistics_count_as_non_trainable_like_keras() -> None:
    model = create("resnet8", num_classes=2)
    s = summarize(model, (3, 64, 64))
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert s.non_trainable_params == 2 * bn_channels
    assert s.trainable_params == sum(p.numel() for p in model.parameters())
    assert sum(r.params for r in s.rows) == s.total_params
    assert s.rows[-1].output_shape == (1,) and s.rows[-1].receptive_field is None


def test_flops_of_transposed_grouped_and_dense_layers() -> None:
    spec = [{"type": "conv", "filters": 8, "kernel_size": 3, "strides": 2, "padding": "same", "use_bias": False},
            {"type": "conv", "filters": 8, "kernel_size": 3, "padding": "same", "groups": 8},
            {"type": "conv_transpose", "filters": 4, "kernel_size": 3, "strides": 2, "padding": "same"},
            {"type": "batch_norm"}, {"type": "flatten"}, {"type": "dense", "units": 3}]
    s = summarize(spec, "10x10x2", num_classes=3)
    assert [r.output_shape for r in s.rows] == [(8, 5, 5), (8, 5, 5), (4, 10, 10), (4, 10, 10), (400,), (3,)]
    assert s.rows[0].flops == 2 * 5 * 5 * 8 * (3 * 3 * 2)
    assert s.rows[1].flops == 2 * 5 * 5 * 8 * (3 * 3 * 1)  # depthwise: one input channel per filter
    assert s.rows[2].flops == 2 * 5 * 5 * 8 * (3 * 3 * 4)  # every input pixel scatters a 3x3x4 kernel
    assert s.rows[3].flops == 0 and s.rows[3].params == 4 * 4
    assert s.rows[5].flops == 2 * 400 * 3


def test_summary_restores_training_mode_and_checks_channels() -> None:
    model = create("tiny", num_classes=2).train()
    summarize(model, "16x16x3")
    assert all(m.training for m in model.modules())
    with pytest.raises(SpecError, match=r"takes 3-channel images but the input has 1"):
        summarize(model, "16x16x1")
    with pytest.raises(SpecError, match=r"input is too small for layer"):
        summarize("tutorial_cnn", "4x4x3")


def test_parse_input_shape() -> None:
    assert parse_input_shape("300x300x3") == (3, 300, 300)
    assert parse_input_shape("64 X 48 x 1") == (1, 64, 48)
    assert parse_input_shape("128x96") == (3, 128, 96)
    assert parse_input_shape((1, 28, 28)) == (1, 28, 28)
    for bad in ("300", "300x300x", "axbxc", "0x10x3", "10x10x0", "-3x3x3", ""):
        with pytest.raises(ConfigError, match=r"like 300x300x3. Received: input="):
            parse_input_shape(bad)
    with pytest.raises(ConfigError):
        parse_input_shape((3, 28))


def test_layer_file_and_print_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "net.json"
    f.write_text(json.dumps([{"type": "conv", "filters": 4, "kernel_size": 3, "activation": "relu"},
                             {"type": "flatten"}, {"type": "dense"}]))
    s = print_summary(str(f), "8x8x1", num_classes=4)
    out = capsys.readouterr().out
    assert s.rows[1].output_shape == (4 * 6 * 6,) and s.out_units == 4
    assert "(None, 6, 6, 4)" in out and "(None, 144)" in out
    assert f"Total params: {s.total_params:,}" in out and "softmax" in out


def test_cli_summary_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "tutorial_cnn", "--input", "300x300x3"]) == 0
    out = capsys.readouterr().out
    for text in ("Output Shape", "Param #", "FLOPs", "Receptive field", "(None, 150, 150, 16)", "(None, 37, 37, 128)",
                 "Total params: 97,569 (381.13 KB)", "694,347,520", "global"):
        assert text in out, text
    assert main(["summary", "resnet8", "--input", "64x64x1", "--classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "(None, 5)" in out and "Non-trainable params" in out


def test_cli_summary_layer_file_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", str(REPO / "examples" / "tutorial_cnn.yaml"), "--input", "300x300x3"]) == 0
    assert "Total params: 97,569" in capsys.readouterr().out
    assert main(["summary", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("tutorial_cnn", "tiny", "resnet8", "mini_xception", "97,569"):
        assert name in out


@pytest.mark.parametrize("args,pattern", [
    (["summary", "resnt8"], "unknown model 'resnt8'. Did you mean 'resnet8'?"),
    (["summary", "tiny", "--input", "32by32"], "Received: input='32by32'"),
    (["summary", "tiny", "--classes", "1"], "num_classes must be an integer >= 2"),
    (["summary"], "summary needs a MODEL"),
    (["summary", "missing_model.yaml"], "does not exist"),
])
def test_cli_summary_user_errors(args: list[str], pattern: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert pattern in err and "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1 and err.startswith("convlens summary: error:")


def test_cli_bad_spec_file_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("layers:\n  - {type: conv, filters: 8, kernel_size: 3, padding: same}\n  - {type: dense, units: 1}\n")
    assert main(["summary", str(f), "--input", "32x32x3"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.err
    assert "layer 1 (dense): dense needs a flat input" in err and "Received: input shape (None, 32, 32, 8)" in err
    f.write_text("- {type: convolution, filters: 8, kernel_size: 3}\n")
    assert main(["summary", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert "layer 0: unknown layer type 'convolution'" in err and len(err.splitlines()) == 1
    with pytest.raises(SpecError):  # --debug shows the traceback instead
        main(["--debug", "summary", str(f)])


def test_summary_units_compose_to_forward_for_a_plain_sequential() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 2))
    s = summarize(seq, "8x8x3")
    assert [r.output_shape for r in s.rows] == [(4, 8, 8), (4, 8, 8), (4, 4, 4), (64,), (2,)]
    assert [r.receptive_field for r in s.rows] == [(3, 3), (3, 3), (4, 4), None, None]
    assert s.flops == 2 * 8 * 8 * 4 * 27 + 2 * 64 * 2
    assert torch.is_grad_enabled()
