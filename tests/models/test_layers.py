"""Layer specs: output shapes, TensorFlow padding semantics, batch norm, spec errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from convlens.errors import SpecError, UserError
from convlens.models import LayerStack, build_from_spec
from convlens.models.layers import Pool
from convlens.models.shapes import same_padding
from convlens.models.zoo import TUTORIAL_CNN_LAYERS

torch.manual_seed(0)


def run(layers: list[dict], shape: tuple[int, ...]) -> tuple[LayerStack, torch.Tensor]:
    stack = LayerStack(layers, shape)
    return stack, stack(torch.randn(2, *shape))


# ----------------------------------------------------------------------------- formulas (written here, independently)
def keras_conv(n: int, k: int, s: int, padding: str, d: int = 1) -> int:
    if padding == "same":
        return math.ceil(n / s)
    return math.floor((n - ((k - 1) * d + 1)) / s) + 1


def keras_conv_transpose(n: int, k: int, s: int, padding: str) -> int:
    return n * s if padding == "same" else n * s + max(k - s, 0)


SIZES = [(5, 8), (9, 16), (37, 28), (1, 3)]


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_conv_output_shape_grid(padding: str) -> None:
    for (h, w), k, s, d in itertools.product(SIZES, (1, 2, 3, 5), (1, 2, 3), (1, 2)):
        if s > 1 and d > 1:
            continue
        spec = [{"type": "conv", "filters": 3, "kernel_size": k, "strides": s, "padding": padding, "dilation": d}]
        keff = (k - 1) * d + 1
        if padding == "valid" and keff > min(h, w):
            with pytest.raises(SpecError, match="larger than its"):
                LayerStack(spec, (2, h, w))
            continue
        stack, y = run(spec, (2, h, w))
        expected = (3, keras_conv(h, k, s, padding, d), keras_conv(w, k, s, padding, d))
        assert stack.shapes[-1] == expected, (h, w, k, s, d)
        assert tuple(y.shape[1:]) == expected, (h, w, k, s, d)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_conv_transpose_output_shape_grid(padding: str) -> None:
    for (h, w), k, s in itertools.product(SIZES, (1, 2, 3, 4, 5), (1, 2, 3)):
        spec = [{"type": "conv_transpose", "filters": 3, "kernel_size": k, "strides": s, "padding": padding}]
        stack, y = run(spec, (2, h, w))
        expected = (3, keras_conv_transpose(h, k, s, padding), keras_conv_transpose(w, k, s, padding))
        assert stack.shapes[-1] == expected, (h, w, k, s)
        assert tuple(y.shape[1:]) == expected, (h, w, k, s)


@pytest.mark.parametrize("kind", ["max_pool", "avg_pool"])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_pool_output_shape_grid(kind: str, padding: str) -> None:
    for (h, w), k, s in itertools.product(SIZES, (1, 2, 3), (None, 1, 2, 3)):
        spec = [{"type": kind, "pool_size": k, "strides": s, "padding": padding}]
        stride = k if s is None else s  # Keras: strides default to the pool size
        if padding == "valid" and k > min(h, w):
            with pytest.raises(SpecError):
                LayerStack(spec, (2, h, w))
            continue
        stack, y = run(spec, (2, h, w))
        expected = (2, keras_conv(h, k, stride, padding), keras_conv(w, k, stride, padding))
        assert stack.shapes[-1] == expected and tuple(y.shape[1:]) == expected, (h, w, k, s)


@pytest.mark.parametrize("interp", ["nearest", "bilinear"])
def test_upsample_and_flat_layer_shapes(interp: str) -> None:
    for (h, w), f in itertools.product(SIZES, (1, 2, 3, [2, 3])):
        fh, fw = (f, f) if isinstance(f, int) else f
        stack, y = run([{"type": "upsample", "factor": f, "interpolation": interp}], (2, h, w))
        assert stack.shapes[-1] == (2, h * fh, w * fw) and tuple(y.shape[1:]) == (2, h * fh, w * fw)
    layers = [{"type": "flatten"}, {"type": "dense", "units": 7, "activation": "relu"}, {"type": "dropout", "rate": 0.5},
              {"type": "batch_norm"}, {"type": "leaky_relu"}, {"type": "elu"}, {"type": "sigmoid"},
              {"type": "softmax"}, {"type": "linear"}]
    stack, y = run(layers, (3, 4, 5))
    assert [s for s in stack.shapes] == [(60,)] + [(7,)] * 8
    assert tuple(y.shape) == (2, 7)
    for kind in ("global_avg_pool", "global_max_pool"):
        stack, y = run([{"type": kind}], (6, 5, 7))
        assert stack.shapes == [(6,)] and tuple(y.shape) == (2, 6)


def test_known_keras_results() -> None:
    conv = {"type": "conv", "filters": 4, "kernel_size": 3}
    assert run([{**conv, "strides": 2, "padding": "same"}], (3, 300, 300))[1].shape[-2:] == (150, 150)
    assert run([{**conv, "strides": 2, "padding": "same"}], (3, 37, 37))[1].shape[-2:] == (19, 19)
    assert run([{**conv, "padding": "valid"}], (1, 28, 28))[1].shape[-2:] == (26, 26)
    tconv = {"type": "conv_transpose", "filters": 4, "kernel_size": 3, "strides": 2, "padding": "same"}
    assert run([tconv], (3, 75, 75))[1].shape[-2:] == (150, 150)
    # The tutorial's third pooling: MaxPooling2D(2) on 75x75 gives 37x37 in Keras's summary.
    assert run([{"type": "max_pool", "pool_size": 2}], (3, 75, 75))[1].shape[-2:] == (37, 37)


# ----------------------------------------------------------------------------- padding semantics
def test_same_padding_stride2_even_input_puts_extra_pad_bottom_right() -> None:
    # TensorFlow: 4x4 input, 3x3 kernel, stride 2, same -> 2x2 output, padding (top 0, bottom 1).
    stack = LayerStack([{"type": "conv", "filters": 1, "kernel_size": 3, "strides": 2, "padding": "same"}], (1, 4, 4))
    with torch.no_grad():
        stack.layers[0].conv.weight.fill_(1.0)
        stack.layers[0].conv.bias.zero_()
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # Windows by hand: rows/cols {0,1,2} and {2,3,pad}.
    expected = torch.tensor([[0 + 1 + 2 + 4 + 5 + 6 + 8 + 9 + 10, 2 + 3 + 6 + 7 + 10 + 11],
                             [8 + 9 + 10 + 12 + 13 + 14, 10 + 11 + 14 + 15]], dtype=torch.float32)
    assert torch.equal(stack(x)[0, 0], expected)


@pytest.mark.parametrize("n,k,s,d", [(8, 3, 2, 1), (7, 3, 2, 1), (9, 4, 3, 1), (10, 2, 1, 1), (11, 3, 1, 2), (6, 5, 2, 1)])
def test_same_conv_equals_explicit_tf_padding(n: int, k: int, s: int, d: int) -> None:
    stack = LayerStack([{"type": "conv", "filters": 2, "kernel_size": k, "strides": s, "padding": "same",
                         "dilation": d, "use_bias": False}], (3, n, n + 1))
    x = torch.randn(2, 3, n, n + 1)
    th = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
    tw = max((math.ceil((n + 1) / s) - 1) * s + (k - 1) * d + 1 - (n + 1), 0)
    padded = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
    ref = F.conv2d(padded, stack.layers[0].conv.weight, None, s, 0, d)
    torch.testing.assert_close(stack(x), ref)
    assert same_padding(n, k, s, d) == (th // 2, th - th // 2)


def test_max_pool_same_ignores_padding() -> None:
    # 3x3 input, pool 2 stride 2 same -> 2x2; the bottom-right window holds one real pixel.
    x = -torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # all negative: a zero pad would win
    stack = LayerStack([{"type": "max_pool", "pool_size": 2, "padding": "same"}], (1, 3, 3))
    expected = torch.tensor([[-1.0, -3.0], [-7.0, -9.0]])
    assert torch.equal(stack(x)[0, 0], expected)


def test_avg_pool_same_divides_by_real_pixels() -> None:
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    stack = LayerStack([{"type": "avg_pool", "pool_size": 2, "padding": "same"}], (1, 3, 3))
    expected = torch.tensor([[(1 + 2 + 4 + 5) / 4, (3 + 6) / 2], [(7 + 8) / 2, 9.0]])
    torch.testing.assert_close(stack(x)[0, 0], expected)
    # Symmetric case (pool 3, stride 1 on 4x4: pad 1 each side): corners average 4 real pixels.
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = LayerStack([{"type": "avg_pool", "pool_size": 3, "strides": 1, "padding": "same"}], (1, 4, 4))(x)
    torch.testing.assert_close(y[0, 0, 0, 0], (0 + 1 + 4 + 5) / torch.tensor(4.0))
    torch.testing.assert_close(y[0, 0, 1, 1], x[0, 0, :3, :3].mean())


@pytest.mark.parametrize("n,k,s,padding", [(3, 3, 2, "same"), (4, 4, 2, "same"), (5, 3, 1, "same"), (3, 2, 3, "same"),
                                           (4, 3, 2, "valid"), (3, 1, 2, "valid"), (2, 5, 2, "valid")])
def test_conv_transpose_is_the_gradient_of_the_matching_conv(n: int, k: int, s: int, padding: str) -> None:
    # TensorFlow defines conv2d_transpose as the input-gradient of conv2d; check ours is exactly that.
    tconv = LayerStack([{"type": "conv_transpose", "filters": 2, "kernel_size": k, "strides": s,
                         "padding": padding, "use_bias": False}], (3, n, n))
    out_n = keras_conv_transpose(n, k, s, padding)
    conv = LayerStack([{"type": "conv", "filters": 3, "kernel_size": k, "strides": s, "padding": padding,
                        "use_bias": False}], (2, out_n, out_n))
    with torch.no_grad():
        conv.layers[0].conv.weight.copy_(tconv.layers[0].conv.weight)
    g = torch.randn(1, 3, n, n)
    z = torch.zeros(1, 2, out_n, out_n, requires_grad=True)
    assert conv(z).shape == g.shape
    (grad,) = torch.autograd.grad(conv(z), z, g)
    torch.testing.assert_close(tconv(g), grad)


def test_upsample_values() -> None:
    x = torch.tensor([[[[0.0, 1.0]]]])
    near = LayerStack([{"type": "upsample", "factor": 2}], (1, 1, 2))(x)
    assert torch.equal(near[0, 0], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2))
    bil = LayerStack([{"type": "upsample", "factor": 2, "interpolation": "bilinear"}], (1, 1, 2))(x)
    # Half-pixel centres (TF2 / Keras): sample points -0.25, 0.25, 0.75, 1.25 clamped to [0, 1].
    torch.testing.assert_close(bil[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_activation_layers_values() -> None:
    x = torch.tensor([[-2.0, -0.5, 0.0, 1.5]])
    def act(spec: dict) -> torch.Tensor:
        return LayerStack([spec], (4,))(x)
    assert torch.equal(act({"type": "relu"}), torch.tensor([[0.0, 0.0, 0.0, 1.5]]))
    torch.testing.assert_close(act({"type": "leaky_relu", "slope": 0.1}), torch.tensor([[-0.2, -0.05, 0.0, 1.5]]))
    torch.testing.assert_close(act({"type": "leaky_relu"}), torch.tensor([[-0.6, -0.15, 0.0, 1.5]]))  # Keras 0.3
    torch.testing.assert_close(act({"type": "elu"}), torch.tensor([[math.exp(-2) - 1, math.exp(-0.5) - 1, 0.0, 1.5]]))
    torch.testing.assert_close(act({"type": "sigmoid"}), 1 / (1 + torch.exp(-x)))
    torch.testing.assert_close(act({"type": "softmax"}), torch.exp(x) / torch.exp(x).sum())
    assert torch.equal(act({"type": "linear"}), x)


def test_dense_dropout_and_flatten() -> None:
    stack = LayerStack([{"type": "flatten"}, {"type": "dense", "units": 3}], (2, 2, 2))
    x = torch.randn(4, 2, 2, 2)
    lin = stack.layers[1].linear
    torch.testing.assert_close(stack(x), x.reshape(4, 8) @ lin.weight.T + lin.bias)
    assert (lin.bias == 0).all()  # Keras initialisation: zero biases
    drop = LayerStack([{"type": "dropout", "rate": 0.5}], (1000,))
    ones = torch.ones(1, 1000)
    drop.train()
    y = drop(ones)
    assert 300 < int((y == 0).sum()) < 700 and torch.allclose(y[y != 0], torch.tensor(2.0))
    drop.eval()
    assert torch.equal(drop(ones), ones)


# ----------------------------------------------------------------------------- batch norm
@pytest.mark.parametrize("shape", [(3, 4, 5), (6,)])
def test_batch_norm_matches_hand_formulas(shape: tuple[int, ...]) -> None:
    stack = LayerStack([{"type": "batch_norm", "momentum": 0.9, "epsilon": 1e-3}], shape)
    bn = stack.layers[0].bn
    c = shape[0]
    gamma, beta = torch.randn(c), torch.randn(c)
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
    x = torch.randn(8, *shape) * 3 + 2
    dims = [0, 2, 3] if len(shape) == 3 else [0]
    view = (1, c, 1, 1) if len(shape) == 3 else (1, c)
    # Training mode: normalise with the batch mean and the biased batch variance.
    m = x.shape[0] * (x[0, 0].numel())
    mean = x.sum(dim=dims, keepdim=True) / m
    var = ((x - mean) ** 2).sum(dim=dims, keepdim=True) / m
    expected = gamma.view(view) * (x - mean) / torch.sqrt(var + 1e-3) + beta.view(view)
    stack.train()
    torch.testing.assert_close(stack(x), expected, rtol=1e-5, atol=1e-5)
    # Keras momentum 0.9: moving = 0.9 * moving + 0.1 * batch statistic.
    torch.testing.assert_close(bn.running_mean, 0.1 * mean.flatten())
    # Eval mode: the running statistics, not the batch's.
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-1, 1, c))
        bn.running_var.copy_(torch.linspace(0.5, 2, c))
    stack.eval()
    rm, rv = bn.running_mean.view(view), bn.running_var.view(view)
    expected = gamma.view(view) * (x - rm) / torch.sqrt(rv + 1e-3) + beta.view(view)
    torch.testing.assert_close(stack(x), expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_keras_defaults() -> None:
    bn = LayerStack([{"type": "batch_norm"}], (4, 3, 3)).layers[0].bn
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.01)


# ----------------------------------------------------------------------------- final layer
def test_last_dense_units_from_classes_and_output_activation_not_applied() -> None:
    spec = [{"type": "conv", "filters": 4, "kernel_size": 3, "padding": "same", "activation": "relu"},
            {"type": "global_avg_pool"}, {"type": "dense", "activation": "sigmoid"}]
    model = build_from_spec(spec, num_classes=2, in_channels=3)
    assert model.out_units == 1 and model.output_activation == "sigmoid"
    with torch.no_grad():
        model.layers[2].linear.bias.fill_(-5.0)  # logits are then negative: a sigmoid would not be
    x = torch.rand(3, 3, 8, 8)
    logits = model(x)
    assert logits.shape == (3, 1) and (logits < 0).all()
    five = build_from_spec([*spec[:2], {"type": "dense"}, {"type": "softmax"}], num_classes=5, in_channels=1)
    assert five.out_units == 5 and five.output_activation == "softmax"
    out = five(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 5) and not torch.allclose(out.sum(1), torch.ones(2))
    # arch is JSON-safe and stores the layer list as written (with defaults filled in).
    assert model.arch["layers"][2] == {"type": "dense", "units": None, "activation": "sigmoid", "use_bias": True}


def test_max_pool_before_relu_is_identical() -> None:
    fast = build_from_spec(TUTORIAL_CNN_LAYERS, 2, 3)
    slow = build_from_spec(TUTORIAL_CNN_LAYERS, 2, 3, fuse_pool=False)
    assert isinstance(fast.layers[1], Pool) and isinstance(fast.layers[1].post_act, torch.nn.ReLU)
    assert isinstance(slow.layers[1].post_act, torch.nn.Identity)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 33, 30)
    xs = x.clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    ys, yf = slow(xs), fast(xf)
    assert torch.equal(ys, yf)
    ys.sum().backward()
    yf.sum().backward()
    torch.testing.assert_close(xs.grad, xf.grad)


# ----------------------------------------------------------------------------- spec errors
BAD_SPECS = [
    ([{"type": "convv", "filters": 8, "kernel_size": 3}], r"layer 0: unknown layer type 'convv'. Did you mean 'conv'\?"),
    ([{"type": "conv", "filters": 0, "kernel_size": 3}], r"layer 0 \(conv\): filters must be a positive integer. Received: filters=0"),
    ([{"type": "conv", "filters": -4, "kernel_size": 3}], r"Received: filters=-4"),
    ([{"type": "conv", "filters": 8, "kernel_size": 3}] * 4, r"layer 3 \(conv\): kernel_size 3x3 is larger than its 2x2 input"),
    ([{"type": "conv", "filters": 8, "kernel_size": 3, "padding": "same"}, {"type": "dense", "units": 2}],
     r"layer 1 \(dense\): dense needs a flat input .*flatten.*Received: input shape \(None, 8, 8, 8\)"),
    ([{"type": "conv", "filters": 8, "kernal_size": 3}], r"unknown option 'kernal_size'. Did you mean 'kernel_size'\?"),
    ([{"type": "conv", "filters": 8, "kernel_size": 3, "padding": "sam"}], r"padding must be 'valid' or 'same'. Did you mean 'same'\? Received: padding='sam'"),
    ([{"type": "conv", "filters": 8}], r"layer 0 \(conv\): missing required option 'kernel_size'"),
    ([{"type": "conv", "filters": 8, "kernel_size": 3, "activation": "rleu"}], r"Did you mean 'relu'\? Received: activation='rleu'"),
    ([{"type": "dropout", "rate": 1.5}], r"layer 0 \(dropout\): rate must be a number in \[0.0, 1.0\)"),
    ([{"type": "max_pool", "pool_size": [2, 2, 2]}], r"pool_size must be an integer or a pair"),
    ([{"type": "conv", "filters": 8.5, "kernel_size": 3}], r"Received: filters=8.5"),
    ([{"type": "conv", "filters": True, "kernel_size": 3}], r"Received: filters=True"),
    (["conv"], r"layer 0 must be a mapping"),
    ([{"filters": 3}], r"layer 0 has no 'type'"),
    ([{"type": "flatten"}, {"type": "conv", "filters": 2, "kernel_size": 1}], r"layer 1 \(conv\): conv needs a 4-D input"),
    ([{"type": "upsample", "interpolation": "cubic"}], r"interpolation must be 'nearest' or 'bilinear'"),
    ([{"type": "conv", "filters": 3, "kernel_size": 3, "groups": 2}], r"groups must divide"),
]


@pytest.mark.parametrize("spec,pattern", BAD_SPECS)
def test_bad_layer_specs_fail_at_build_time(spec: list, pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern) as info:
        LayerStack(spec, (3, 8, 8))
    msg = str(info.value)
    assert "\n" not in msg and "Received:" in msg
    assert isinstance(info.value, UserError)


BAD_MODELS = [
    ([{"type": "global_avg_pool"}, {"type": "dense", "units": 3}], 2, r"final dense layer must have 1 unit .*Received: units=3"),
    ([{"type": "global_avg_pool"}, {"type": "dense", "activation": "sigmoid"}], 5, r"'sigmoid' needs one output unit"),
    ([{"type": "global_avg_pool"}, {"type": "dense"}, {"type": "softmax"}], 2, r"softmax over one unit"),
    ([{"type": "conv", "filters": 4, "kernel_size": 3}], 2, r"must end with 1 output\(s\) .*Received: final output shape"),
    ([{"type": "global_avg_pool"}, {"type": "dense", "units": None}, {"type": "dense"}], 2, r"layer 1 \(dense\): units is required"),
    ([{"type": "flatten"}, {"type": "dense"}], 2, r"pass input_size"),
    ([], 2, r"non-empty list"),
    ([{"type": "global_avg_pool"}, {"type": "dense"}], 1, r"num_classes must be an integer >= 2"),
]


@pytest.mark.parametrize("spec,classes,pattern", BAD_MODELS)
def test_bad_model_specs(spec: list, classes: int, pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern) as info:
        build_from_spec(spec, classes, 3)
    assert "\n" not in str(info.value) and "Received:" in str(info.value)


def test_flatten_dense_with_input_size_and_too_small_input() -> None:
    spec = [{"type": "conv", "filters": 4, "kernel_size": 3}, {"type": "flatten"}, {"type": "dense"}]
    model = build_from_spec(spec, 3, 1, input_size=(6, 7))
    assert model.layers[2].linear.in_features == 4 * 4 * 5
    assert model(torch.rand(2, 1, 6, 7)).shape == (2, 3)
    assert model.gap_linear_head() is None
    with pytest.raises(SpecError, match=r"layer 0 \(conv\): kernel_size 3x3 is larger than its 2x2 input"):
        build_from_spec(spec, 3, 1, input_size=2)


def test_receptive_fields_and_names_of_the_tutorial_stack() -> None:
    from convlens.models.summary import summarize

    s = summarize(TUTORIAL_CNN_LAYERS, "64x64x3")
    assert [r.name for r in s.rows][:4] == ["conv", "max_pool", "conv_1", "max_pool_1"]
    # r_out = r_in + (k - 1) * jump; jump *= stride.
    assert [r.receptive_field for r in s.rows] == [(3, 3), (4, 4), (8, 8), (10, 10), (18, 18), (22, 22), (38, 38),
                                                   None, None]


def test_a_new_layer_type_is_one_registered_class() -> None:
    """Schema, output shape and builder live on the class: nothing else needs to change."""
    from typing import Any

    from convlens.models.spec import LAYERS, SpecLayer, number_in, register_layer

    @register_layer
    class Scale(SpecLayer):
        kind = "scale_test"
        schema = {"factor": (2.0, number_in(0.0, 10.0, lo_open=True))}

        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        @classmethod
        def from_spec(cls, spec: dict[str, Any], shape: tuple) -> SpecLayer:
            return cls(spec["factor"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    try:
        stack = LayerStack([{"type": "scale_test", "factor": 3.0}, {"type": "flatten"}], (1, 2, 2))
        assert stack.shapes == [(1, 2, 2), (4,)]
        assert torch.equal(stack(torch.ones(1, 1, 2, 2)), torch.full((1, 4), 3.0))
        with pytest.raises(SpecError, match=r"layer 0 \(scale_test\): factor must be a number in \(0.0, 10.0\)"):
            LayerStack([{"type": "scale_test", "factor": 0}], (1, 2, 2))
    finally:
        del LAYERS["scale_test"]
