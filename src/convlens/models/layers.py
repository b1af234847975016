"""The layer types of layer lists, each in one class that carries its options (``schema``), its
output-shape rule and its builder (Keras semantics). Adding a layer type is one
``@register_layer`` class here plus its test; :mod:`convlens.models.spec` reads the lists.

``same`` padding is TensorFlow's: output = ceil(n / stride), the padding total is split with the
extra pixel at the bottom/right, max pooling ignores the padding and average pooling divides by
the number of real pixels only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convlens.config import suggest
from convlens.errors import SpecError
from convlens.models.pooling import max_pool2d
from convlens.models.shapes import (
    RF,
    Pair,
    Shape,
    conv_output_size,
    conv_transpose_output_size,
    effective_kernel,
    keras_shape,
    pair,
    same_pads,
)
from convlens.models.spec import (
    LAYERS,
    REQUIRED,
    SpecLayer,
    bool_option,
    int_or_pair,
    interpolation_option,
    need_map,
    number_in,
    optional_int,
    optional_pair,
    padding_option,
    positive_int,
    register_layer,
    where,
)

ACTIVATIONS = ("linear", "relu", "leaky_relu", "elu", "sigmoid", "softmax", "tanh", "gelu", "silu")


# ----------------------------------------------------------------------------- activations
def make_activation(name: str | None, slope: float = 0.3, alpha: float = 1.0) -> nn.Module:
    """The module for an activation name (None and ``linear`` are the identity)."""
    if name in (None, "linear"):
        return nn.Identity()
    table: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(slope),
        "elu": lambda: nn.ELU(alpha),
        "sigmoid": nn.Sigmoid,
        "softmax": lambda: nn.Softmax(dim=1),  # over channels / units, like Keras's last axis
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
    }
    return table[name]()


# Monotone non-decreasing and exact in floating point: max(f(x)) == f(max(x)) bit for bit, so a
# max pool may run before them on 4x fewer values (same result, faster).
def _commutes_with_max(act: nn.Module) -> bool:
    if isinstance(act, nn.LeakyReLU):
        return act.negative_slope >= 0
    return isinstance(act, (nn.ReLU, nn.Identity))


def activation_option(i: int, kind: str, key: str, v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or v.lower() not in ACTIVATIONS:
        hint = suggest(v.lower(), ACTIVATIONS) if isinstance(v, str) else ""
        raise SpecError(f"{where(i, kind)}: activation must be one of {', '.join(ACTIVATIONS)} or null.{hint} "
                        f"Received: activation={v!r}")
    return v.lower()


CONV_OPTIONS = {"filters": (REQUIRED, positive_int), "kernel_size": (REQUIRED, int_or_pair),
                "strides": (1, int_or_pair), "padding": ("valid", padding_option),
                "activation": (None, activation_option), "dilation": (1, int_or_pair), "use_bias": (True, bool_option)}


def _window_out(i: int, spec: dict[str, Any], shape: Shape, kernel: Pair, strides: Pair, dilation: Pair) -> Shape:
    c, h, w = shape
    padding = spec["padding"]
    out = []
    for n, k, s, d in ((h, kernel[0], strides[0], dilation[0]), (w, kernel[1], strides[1], dilation[1])):
        if n is None:
            out.append(None)
            continue
        if padding == "valid" and effective_kernel(k, d) > n:
            key = "kernel_size" if "kernel_size" in spec else "pool_size"
            dil = f" (dilated to {effective_kernel(kernel[0], dilation[0])}x{effective_kernel(kernel[1], dilation[1])})" \
                if dilation != (1, 1) else ""
            raise SpecError(f"{where(i, spec['type'])}: {key} {kernel[0]}x{kernel[1]}{dil} is larger than its "
                            f"{h}x{w} input with padding='valid'; use padding='same', a smaller {key} or a larger "
                            f"input. Received: {key}={spec[key]!r}")
        out.append(conv_output_size(n, k, s, padding, d))
    return (c, out[0], out[1])


# ----------------------------------------------------------------------------- layer types
@register_layer
class Conv(SpecLayer):
    """2-D convolution with TensorFlow ``valid``/``same`` padding and an optional activation."""

    kind = "conv"
    schema = {**CONV_OPTIONS, "groups": (1, positive_int)}

    @classmethod
    def output_shape(cls, i: int, spec: dict[str, Any], shape: Shape) -> Shape:
        need_map(i, spec, shape)
        c, groups = shape[0], spec["groups"]
        k, s, d = pair(spec["kernel_size"]), pair(spec["strides"]), pair(spec["dilation"])
        if c % groups or spec["filters"] % groups:
            raise SpecError(f"{where(i, cls.kind)}: groups must divide both the input channels ({c}) and "
                            f"filters ({spec['filters']}). Received: groups={groups}")
        if s != (1, 1) and d != (1, 1):
            raise SpecError(f"{where(i, cls.kind)}: strides > 1 cannot be combined with dilation > 1 "
                            f"(as in Keras). Received: strides={spec['strides']!r}, dilation={spec['dilation']!r}")
        out = _window_out(i, spec, shape, k, s, d)
        return (spec["filters"], out[1], out[2])

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        return cls(shape[0], spec["filters"], pair(spec["kernel_size"]), pair(spec["strides"]), spec["padding"],
                   pair(spec["dilation"]), make_activation(spec["activation"]), spec["use_bias"], spec["groups"])

    def __init__(self, in_channels: int, filters: int, kernel_size: Pair, strides: Pair = (1, 1),
                 padding: str = "valid", dilation: Pair = (1, 1), activation: nn.Module | None = None,
                 use_bias: bool = True, groups: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.strides, self.dilation, self.padding = kernel_size, strides, dilation, padding
        totals = [effective_kernel(k, d) - 1 for k, d in zip(kernel_size, dilation, strict=True)]
        # Stride 1 with an odd kernel extent pads symmetrically for every input size: let the
        # convolution pad itself. Otherwise the split depends on the input size (computed per call).
        self._static = padding == "valid" or (strides == (1, 1) and all(t % 2 == 0 for t in totals))
        static_pad = (totals[0] // 2, totals[1] // 2) if padding == "same" and self._static else (0, 0)
        self.conv = nn.Conv2d(in_channels, filters, kernel_size, stride=strides, padding=static_pad,
                              dilation=dilation, groups=groups, bias=use_bias)
        self.act = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._static:
            (t, b), (left, r) = same_pads(x, self.kernel_size, self.strides, self.dilation)
            c = self.conv
            if t == b and left == r:
                x = F.conv2d(x, c.weight, c.bias, c.stride, (t, left), c.dilation, c.groups)
            else:
                x = F.conv2d(F.pad(x, (left, r, t, b)), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)
            return self.act(x)
        return self.act(self.conv(x))

    def receptive_field(self, rf: RF) -> RF:
        return rf.window(self.kernel_size, self.strides, self.dilation)


@register_layer
class ConvTranspose(SpecLayer):
    """Transposed convolution with Keras's output sizes and TensorFlow's cropping.

    ``same``: output = input x stride; the full result is cropped by max(k - s, 0) split like a
    forward ``same`` padding (odd pixel removed at the bottom/right). ``valid``: output =
    input x stride + max(k - s, 0) (when k < s the tail holds only the bias, as in TensorFlow).
    """

    kind = "conv_transpose"
    schema = CONV_OPTIONS

    @classmethod
    def output_shape(cls, i: int, spec: dict[str, Any], shape: Shape) -> Shape:
        need_map(i, spec, shape)
        k, s, d = pair(spec["kernel_size"]), pair(spec["strides"]), pair(spec["dilation"])
        h, w = shape[1], shape[2]
        oh = None if h is None else conv_transpose_output_size(h, k[0], s[0], spec["padding"], d[0])
        ow = None if w is None else conv_transpose_output_size(w, k[1], s[1], spec["padding"], d[1])
        return (spec["filters"], oh, ow)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        return cls(shape[0], spec["filters"], pair(spec["kernel_size"]), pair(spec["strides"]), spec["padding"],
                   pair(spec["dilation"]), make_activation(spec["activation"]), spec["use_bias"])

    def __init__(self, in_channels: int, filters: int, kernel_size: Pair, strides: Pair = (1, 1),
                 padding: str = "valid", dilation: Pair = (1, 1), activation: nn.Module | None = None,
                 use_bias: bool = True) -> None:
        super().__init__()
        self.kernel_size, self.strides, self.dilation, self.padding = kernel_size, strides, dilation, padding
        pad, out_pad, crop = [], [], []
        for k, s, d in zip(kernel_size, strides, dilation, strict=True):
            excess = effective_kernel(k, d) - s  # full output minus Keras's output
            cropped = padding == "same" and excess > 0
            pad.append(excess // 2 if cropped else 0)
            out_pad.append(max(-excess, 0))  # the output is longer than the kernel reaches: bias-only tail
            crop.append(excess % 2 if cropped else 0)  # torch crops symmetrically; TF drops the odd one last
        self._crop = tuple(crop)
        self.conv = nn.ConvTranspose2d(in_channels, filters, kernel_size, stride=strides, padding=tuple(pad),
                                       output_padding=tuple(out_pad), dilation=dilation, bias=use_bias)
        self.act = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if any(self._crop):
            y = y[..., : y.shape[-2] - self._crop[0], : y.shape[-1] - self._crop[1]]
        return self.act(y)

    def receptive_field(self, rf: RF) -> RF:
        # Each output pixel reads ceil(k_eff / s) input pixels per axis.
        taps = tuple(-(-effective_kernel(k, d) // s)
                     for k, s, d in zip(self.kernel_size, self.strides, self.dilation, strict=True))
        return rf.upsampled(self.strides, taps)  # type: ignore[arg-type]


@register_layer
class Pool(SpecLayer):
    """Max or average pooling with TensorFlow padding (``post_act``: a deferred activation)."""

    kinds = ("max_pool", "avg_pool")
    schema = {"pool_size": (2, int_or_pair), "strides": (None, optional_pair), "padding": ("valid", padding_option)}

    @classmethod
    def output_shape(cls, i: int, spec: dict[str, Any], shape: Shape) -> Shape:
        need_map(i, spec, shape)
        k = pair(spec["pool_size"])
        return _window_out(i, spec, shape, k, pair(spec["strides"]) if spec["strides"] is not None else k, (1, 1))

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        k = pair(spec["pool_size"])
        s = pair(spec["strides"]) if spec["strides"] is not None else k
        return cls(spec["type"].split("_")[0], k, s, spec["padding"])

    def __init__(self, mode: str, pool_size: Pair, strides: Pair, padding: str = "valid") -> None:
        super().__init__()
        self.mode, self.pool_size, self.strides, self.padding = mode, pool_size, strides, padding
        self.kind = f"{mode}_pool"
        self.post_act: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.pool_size, self.strides
        (t, b), (left, r) = same_pads(x, k, s) if self.padding == "same" else ((0, 0), (0, 0))
        if self.mode == "max":
            if t == b and left == r:  # torch pads with -inf itself: padding never wins
                y = max_pool2d(x, k, s, (t, left))
            else:
                y = max_pool2d(F.pad(x, (left, r, t, b), value=float("-inf")), k, s)
        elif t == b and left == r:
            y = F.avg_pool2d(x, k, s, (t, left), count_include_pad=False)
        else:
            # Mean over real pixels only: pooled sum of zero-padded x / pooled count of real pixels.
            ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
            y = F.avg_pool2d(F.pad(x, (left, r, t, b)), k, s) / F.avg_pool2d(F.pad(ones, (left, r, t, b)), k, s)
        return self.post_act(y)

    def receptive_field(self, rf: RF) -> RF:
        return rf.window(self.pool_size, self.strides)

    def take_activation(self, act: nn.Module) -> bool:
        # max(f(x)) == f(max(x)) bit for bit for monotone non-decreasing f that are exact in
        # floating point: the max pool then runs first, on 4x fewer values.
        if self.mode == "max" and _commutes_with_max(act):
            self.post_act = act
            return True
        return False


@register_layer
class GlobalPool(SpecLayer):
    """Global average or max pooling: (N, C, H, W) -> (N, C)."""

    kinds = ("global_avg_pool", "global_max_pool")

    @classmethod
    def output_shape(cls, i: int, spec: dict[str, Any], shape: Shape) -> Shape:
        need_map(i, spec, shape)
        return (shape[0],)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        return cls(spec["type"].split("_")[1])

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.kind = f"global_{mode}_pool"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.mode == "avg" else x.amax(dim=(2, 3))

    def receptive_field(self, rf: RF) -> None:
        return None


@register_layer
class Flatten(SpecLayer):
    """(N, C, H, W) -> (N, C*H*W) in channel-major order."""

    kind = "flatten"

    @classmethod
    def output_shape(cls, i: int, spec: dict[str, Any], shape: Shape) -> Shape:
        if len(shape) == 1:
            return shape
        c, h, w = shape
        return ((c * h * w) if h is not None and w is not None else None,)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        return cls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def receptive_field(self, rf: RF) -> None:
        return None


@register_layer
class Dense(SpecLayer):
    """Fully connected layer with an optional activation."""

    kind = "dense"
    schema = {"units": (None, optional_int), "activation": (None, activation_option), "use_bias": (True, bool_option)}

    @classmethod
    def output_shape(cls, i: int, spec: dict[str, Any], shape: Shape) -> Shape:
        if len(shape) != 1:
            raise SpecError(f"{where(i, cls.kind)}: dense needs a flat input but receives a 4-D tensor; add a "
                            f"'flatten' or 'global_avg_pool' layer before it. Received: input shape {keras_shape(shape)}")
        if shape[0] is None:
            raise SpecError(f"{where(i, cls.kind)}: the number of inputs of this dense layer depends on the image "
                            f"size; pass input_size (or use global_avg_pool instead of flatten). "
                            f"Received: input shape (None, None)")
        if spec["units"] is None:
            raise SpecError(f"{where(i, cls.kind)}: units is required (only the final dense layer may omit it). "
                            f"Received: units=None")
        return (spec["units"],)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        return cls(shape[0], spec["units"], make_activation(spec["activation"]), spec["use_bias"])

    def __init__(self, in_features: int, units: int, activation: nn.Module | None = None, use_bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, units, bias=use_bias)
        self.act = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


@register_layer
class Dropout(SpecLayer):
    """Dropout; the identity in eval mode."""

    kind = "dropout"
    schema = {"rate": (REQUIRED, number_in(0.0, 1.0))}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        return cls(spec["rate"])

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)


@register_layer
class BatchNorm(SpecLayer):
    """Batch normalization over channels (feature maps) or features (flat tensors).

    ``momentum`` is Keras's (weight of the old running value, 0.99); PyTorch's is 1 - that.
    """

    kind = "batch_norm"
    schema = {"momentum": (0.99, number_in(0.0, 1.0)), "epsilon": (1e-3, number_in(0.0, 1.0, lo_open=True))}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        return cls(shape[0], len(shape) == 1, spec["momentum"], spec["epsilon"])

    def __init__(self, num_features: int, flat: bool, momentum: float = 0.99, epsilon: float = 1e-3) -> None:
        super().__init__()
        cls = nn.BatchNorm1d if flat else nn.BatchNorm2d
        self.bn = cls(num_features, eps=epsilon, momentum=1.0 - momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


@register_layer
class Upsample(SpecLayer):
    """Repeat (``nearest``) or interpolate (``bilinear``, half-pixel centres like TF) by ``factor``."""

    kind = "upsample"
    schema = {"factor": (2, int_or_pair), "interpolation": ("nearest", interpolation_option)}

    @classmethod
    def output_shape(cls, i: int, spec: dict[str, Any], shape: Shape) -> Shape:
        need_map(i, spec, shape)
        f = pair(spec["factor"])
        c, h, w = shape
        return (c, None if h is None else h * f[0], None if w is None else w * f[1])

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        return cls(pair(spec["factor"]), spec["interpolation"])

    def __init__(self, factor: Pair, interpolation: str = "nearest") -> None:
        super().__init__()
        self.factor, self.interpolation = factor, interpolation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolation == "nearest":
            return F.interpolate(x, scale_factor=self.factor, mode="nearest")
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)

    def receptive_field(self, rf: RF) -> RF:
        taps = (1, 1) if self.interpolation == "nearest" else (2, 2)
        return rf.upsampled(self.factor, taps)


@register_layer
class Activation(SpecLayer):
    """A standalone activation layer (a softmax on a feature map normalises over its channels, per pixel)."""

    kinds = ("relu", "leaky_relu", "elu", "sigmoid", "softmax", "tanh", "gelu", "silu", "linear")

    @classmethod
    def options(cls, kind: str) -> dict[str, tuple[Any, Callable[..., Any]]]:
        return {"leaky_relu": {"slope": (0.3, number_in(0.0, 1.0, hi_open=False))},
                "elu": {"alpha": (1.0, number_in(0.0, 1e6, lo_open=True))}}.get(kind, {})

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        kind = spec["type"]
        return cls(kind, make_activation(kind, slope=spec.get("slope", 0.3), alpha=spec.get("alpha", 1.0)))

    def __init__(self, kind: str, act: nn.Module) -> None:
        super().__init__()
        self.kind = kind
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


LAYER_TYPES = tuple(LAYERS)
