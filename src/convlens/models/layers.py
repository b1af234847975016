"""Layer-list specs -> ``torch.nn.Module``, with Keras semantics.

A model is declared as a list of layers, each a mapping with a ``type`` and its options::

    [{"type": "conv", "filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"},
     {"type": "max_pool", "pool_size": 2},
     {"type": "global_avg_pool"},
     {"type": "dense"}]                      # the last dense may omit units: set from the classes

Shapes are inferred while building, so a bad spec fails at build time with a message naming
the layer index and what was received. ``same`` padding is TensorFlow's: output =
ceil(n / stride), the padding total is split with the extra pixel at the bottom/right, max pooling
ignores the padding and average pooling divides by the number of real pixels only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convlens.config import suggest
from convlens.decision import OUTPUT_ACTIVATIONS, activation_for
from convlens.errors import SpecError

Pair = tuple[int, int]
Shape = tuple  # (C, H, W) for feature maps (H/W may be None when unknown) or (F,) when flat

ACTIVATIONS = ("linear", "relu", "leaky_relu", "elu", "sigmoid", "softmax", "tanh", "gelu", "silu")


# ----------------------------------------------------------------------------- shape formulas
def effective_kernel(k: int, dilation: int = 1) -> int:
    """Kernel extent with dilation: (k - 1) * d + 1."""
    return (k - 1) * dilation + 1


def conv_output_size(n: int, k: int, stride: int = 1, padding: str = "valid", dilation: int = 1) -> int:
    """Output length of a convolution or pooling (TensorFlow rules)."""
    if padding == "same":
        return -(-n // stride)
    return (n - effective_kernel(k, dilation)) // stride + 1


def same_padding(n: int, k: int, stride: int = 1, dilation: int = 1) -> Pair:
    """TensorFlow ``same`` padding (before, after); the odd pixel goes after (bottom/right)."""
    total = max((-(-n // stride) - 1) * stride + effective_kernel(k, dilation) - n, 0)
    return total // 2, total - total // 2


def conv_transpose_output_size(n: int, k: int, stride: int = 1, padding: str = "valid", dilation: int = 1) -> int:
    """Output length of a transposed convolution (Keras ``Conv2DTranspose``)."""
    if padding == "same":
        return n * stride
    return n * stride + max(effective_kernel(k, dilation) - stride, 0)


# ----------------------------------------------------------------------------- receptive field
@dataclass(frozen=True)
class RF:
    """Receptive field of one output pixel, in input pixels (size) and its step (jump)."""

    size: tuple[float, float] = (1.0, 1.0)
    jump: tuple[float, float] = (1.0, 1.0)

    def window(self, kernel: Pair, stride: Pair, dilation: Pair = (1, 1)) -> RF:
        """After a sliding window (conv or pool)."""
        size = tuple(r + (effective_kernel(k, d) - 1) * j
                     for r, k, d, j in zip(self.size, kernel, dilation, self.jump, strict=True))
        jump = tuple(j * s for j, s in zip(self.jump, stride, strict=True))
        return RF(size, jump)  # type: ignore[arg-type]

    def upsampled(self, factor: Pair, taps: Pair = (1, 1)) -> RF:
        """After an upsampling by ``factor`` where each output reads ``taps`` inputs per axis."""
        size = tuple(r + (t - 1) * j for r, t, j in zip(self.size, taps, self.jump, strict=True))
        jump = tuple(j / f for j, f in zip(self.jump, factor, strict=True))
        return RF(size, jump)  # type: ignore[arg-type]


def propagate_rf(module: nn.Module, rf: RF | None) -> RF | None:
    """Receptive field after ``module`` (None: every output sees the whole input)."""
    if rf is None:
        return None
    if hasattr(module, "receptive_field"):
        return module.receptive_field(rf)
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        d = _pair(getattr(module, "dilation", 1))
        return rf.window(k, s, d)
    if isinstance(module, (nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return None
    # A container without its own rule is taken as a chain of its children (nn.Sequential and
    # simple wrappers); blocks with branches define receptive_field() themselves.
    for child in module.children():
        rf = propagate_rf(child, rf)
    return rf  # a leaf here is pointwise: activation, batch norm, dropout


def _pair(v: int | Sequence[int]) -> Pair:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


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


# ----------------------------------------------------------------------------- layer modules
class SpecLayer(nn.Module):
    """Base of the modules a layer spec builds into; ``kind`` is the spec's ``type``."""

    kind = ""

    def receptive_field(self, rf: RF) -> RF | None:
        return rf


class Conv(SpecLayer):
    """2-D convolution with TensorFlow ``valid``/``same`` padding and an optional activation."""

    kind = "conv"

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
            (t, b), (left, r) = _same_pads(x, self.kernel_size, self.strides, self.dilation)
            c = self.conv
            if t == b and left == r:
                x = F.conv2d(x, c.weight, c.bias, c.stride, (t, left), c.dilation, c.groups)
            else:
                x = F.conv2d(F.pad(x, (left, r, t, b)), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)
            return self.act(x)
        return self.act(self.conv(x))

    def receptive_field(self, rf: RF) -> RF:
        return rf.window(self.kernel_size, self.strides, self.dilation)


def _same_pads(x: torch.Tensor, kernel: Pair, strides: Pair, dilation: Pair = (1, 1)) -> tuple[Pair, Pair]:
    h, w = int(x.shape[-2]), int(x.shape[-1])
    return (same_padding(h, kernel[0], strides[0], dilation[0]),
            same_padding(w, kernel[1], strides[1], dilation[1]))


class ConvTranspose(SpecLayer):
    """Transposed convolution with Keras's output sizes and TensorFlow's cropping.

    ``same``: output = input x stride; the full result is cropped by max(k - s, 0) split like a
    forward ``same`` padding (odd pixel removed at the bottom/right). ``valid``: output =
    input x stride + max(k - s, 0) (when k < s the tail holds only the bias, as in TensorFlow).
    """

    kind = "conv_transpose"

    def __init__(self, in_channels: int, filters: int, kernel_size: Pair, strides: Pair = (1, 1),
                 padding: str = "valid", dilation: Pair = (1, 1), activation: nn.Module | None = None,
                 use_bias: bool = True) -> None:
        super().__init__()
        self.kernel_size, self.strides, self.dilation, self.padding = kernel_size, strides, dilation, padding
        pad, out_pad, crop = [], [], []
        for k, s, d in zip(kernel_size, strides, dilation, strict=True):
            excess = effective_kernel(k, d) - s  # full output minus Keras's output
            if excess < 0:  # the output is longer than what the kernel reaches: bias-only tail
                pad.append(0)
                out_pad.append(-excess)
                crop.append(0)
            elif padding == "same":
                pad.append(excess // 2)
                out_pad.append(0)
                crop.append(excess % 2)  # torch crops symmetrically; TF drops the odd one last
            else:
                pad.append(0)
                out_pad.append(0)
                crop.append(0)
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


class Pool(SpecLayer):
    """Max or average pooling with TensorFlow padding (``post_act``: a deferred activation)."""

    def __init__(self, mode: str, pool_size: Pair, strides: Pair, padding: str = "valid") -> None:
        super().__init__()
        self.mode, self.pool_size, self.strides, self.padding = mode, pool_size, strides, padding
        self.kind = f"{mode}_pool"
        self.post_act: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.pool_size, self.strides
        pads = _same_pads(x, k, s) if self.padding == "same" else ((0, 0), (0, 0))
        (t, b), (left, r) = pads
        if self.mode == "max":
            if t == b and left == r:  # torch pads with -inf itself: padding never wins
                y = F.max_pool2d(x, k, s, (t, left))
            else:
                y = F.max_pool2d(F.pad(x, (left, r, t, b), value=float("-inf")), k, s)
        elif t == b and left == r:
            y = F.avg_pool2d(x, k, s, (t, left), count_include_pad=False)
        else:
            # Mean over real pixels only: pooled sum of zero-padded x / pooled count of real pixels.
            ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
            y = F.avg_pool2d(F.pad(x, (left, r, t, b)), k, s) / F.avg_pool2d(F.pad(ones, (left, r, t, b)), k, s)
        return self.post_act(y)

    def receptive_field(self, rf: RF) -> RF:
        return rf.window(self.pool_size, self.strides)


class GlobalPool(SpecLayer):
    """Global average or max pooling: (N, C, H, W) -> (N, C)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.kind = f"global_{mode}_pool"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.mode == "avg" else x.amax(dim=(2, 3))

    def receptive_field(self, rf: RF) -> None:
        return None


class Flatten(SpecLayer):
    """(N, C, H, W) -> (N, C*H*W) in channel-major order."""

    kind = "flatten"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def receptive_field(self, rf: RF) -> None:
        return None


class Dense(SpecLayer):
    """Fully connected layer with an optional activation."""

    kind = "dense"

    def __init__(self, in_features: int, units: int, activation: nn.Module | None = None, use_bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, units, bias=use_bias)
        self.act = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))

    def receptive_field(self, rf: RF) -> None:
        return None


class Dropout(SpecLayer):
    """Dropout; the identity in eval mode."""

    kind = "dropout"

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)


class BatchNorm(SpecLayer):
    """Batch normalization over channels (feature maps) or features (flat tensors).

    ``momentum`` is Keras's (weight of the old running value, 0.99); PyTorch's is 1 - that.
    """

    kind = "batch_norm"

    def __init__(self, num_features: int, flat: bool, momentum: float = 0.99, epsilon: float = 1e-3) -> None:
        super().__init__()
        cls = nn.BatchNorm1d if flat else nn.BatchNorm2d
        self.bn = cls(num_features, eps=epsilon, momentum=1.0 - momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class Upsample(SpecLayer):
    """Repeat (``nearest``) or interpolate (``bilinear``, half-pixel centres like TF) by ``factor``."""

    kind = "upsample"

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


class Activation(SpecLayer):
    """A standalone activation layer."""

    def __init__(self, kind: str, act: nn.Module) -> None:
        super().__init__()
        self.kind = kind
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


# ----------------------------------------------------------------------------- spec schema
REQUIRED = object()


def _int(i: int, kind: str, key: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise SpecError(f"{_where(i, kind)}: {key} must be {rule}. Received: {key}={v!r}")
    return v


def _pair_opt(i: int, kind: str, key: str, v: Any) -> int | list[int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise SpecError(f"{_where(i, kind)}: {key} must be an integer or a pair [height, width]. Received: {key}={v!r}")
        return [_int(i, kind, key, x) for x in v]
    return _int(i, kind, key, v)


def _opt_pair(i: int, kind: str, key: str, v: Any) -> int | list[int] | None:
    return None if v is None else _pair_opt(i, kind, key, v)


def _padding(i: int, kind: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in ("valid", "same"):
        hint = suggest(v.lower(), ("valid", "same")) if isinstance(v, str) else ""
        raise SpecError(f"{_where(i, kind)}: padding must be 'valid' or 'same'.{hint} Received: padding={v!r}")
    return v.lower()


def _activation(i: int, kind: str, key: str, v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or v.lower() not in ACTIVATIONS:
        hint = suggest(v.lower(), ACTIVATIONS) if isinstance(v, str) else ""
        raise SpecError(f"{_where(i, kind)}: activation must be one of {', '.join(ACTIVATIONS)} or null.{hint} "
                        f"Received: activation={v!r}")
    return v.lower()


def _bool(i: int, kind: str, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SpecError(f"{_where(i, kind)}: {key} must be true or false. Received: {key}={v!r}")
    return v


def _number(lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> Callable[..., float]:
    def check(i: int, kind: str, key: str, v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            rule = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise SpecError(f"{_where(i, kind)}: {key} must be a number {rule}. Received: {key}={v!r}")
        return float(v)
    return check


def _interpolation(i: int, kind: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in ("nearest", "bilinear"):
        raise SpecError(f"{_where(i, kind)}: interpolation must be 'nearest' or 'bilinear'. Received: {key}={v!r}")
    return v.lower()


def _opt_units(i: int, kind: str, key: str, v: Any) -> int | None:
    return None if v is None else _int(i, kind, key, v)


_CONV = {"filters": (REQUIRED, _int), "kernel_size": (REQUIRED, _pair_opt), "strides": (1, _pair_opt),
         "padding": ("valid", _padding), "activation": (None, _activation), "dilation": (1, _pair_opt),
         "use_bias": (True, _bool)}
_POOL = {"pool_size": (2, _pair_opt), "strides": (None, _opt_pair), "padding": ("valid", _padding)}

SCHEMA: dict[str, dict[str, tuple[Any, Callable[..., Any]]]] = {
    "conv": {**_CONV, "groups": (1, _int)},
    "conv_transpose": dict(_CONV),
    "max_pool": _POOL,
    "avg_pool": _POOL,
    "global_avg_pool": {},
    "global_max_pool": {},
    "flatten": {},
    "dense": {"units": (None, _opt_units), "activation": (None, _activation), "use_bias": (True, _bool)},
    "dropout": {"rate": (REQUIRED, _number(0.0, 1.0))},
    "batch_norm": {"momentum": (0.99, _number(0.0, 1.0)), "epsilon": (1e-3, _number(0.0, 1.0, lo_open=True))},
    "upsample": {"factor": (2, _pair_opt), "interpolation": ("nearest", _interpolation)},
    "relu": {},
    "leaky_relu": {"slope": (0.3, _number(0.0, 1.0, hi_open=False))},
    "elu": {"alpha": (1.0, _number(0.0, 1e6, lo_open=True))},
    "sigmoid": {},
    "softmax": {},
    "tanh": {},
    "gelu": {},
    "silu": {},
    "linear": {},
}
LAYER_TYPES = tuple(SCHEMA)
_COMMON = ("type", "name")


def _where(i: int, kind: str | None) -> str:
    return f"layer {i} ({kind})" if kind else f"layer {i}"


def normalize_layer(i: int, raw: Any) -> dict[str, Any]:
    """Check one layer mapping and return it with every option filled in (JSON-safe)."""
    if not isinstance(raw, dict):
        raise SpecError(f"layer {i} must be a mapping like {{type: conv, filters: 16, ...}}. Received: {raw!r}")
    kind = raw.get("type")
    if kind is None:
        raise SpecError(f"layer {i} has no 'type'; use one of {', '.join(LAYER_TYPES)}. Received: {raw!r}")
    if not isinstance(kind, str) or kind not in SCHEMA:
        hint = suggest(str(kind), LAYER_TYPES)
        raise SpecError(f"layer {i}: unknown layer type {kind!r}.{hint} Known types: {', '.join(LAYER_TYPES)}. "
                        f"Received: type={kind!r}")
    schema = SCHEMA[kind]
    out: dict[str, Any] = {"type": kind}
    name = raw.get("name")
    if name is not None:
        if not isinstance(name, str) or not name:
            raise SpecError(f"{_where(i, kind)}: name must be a non-empty string. Received: name={name!r}")
        out["name"] = name
    for key in raw:
        if key not in schema and key not in _COMMON:
            options = list(schema) + list(_COMMON)
            hint = suggest(str(key), options)
            raise SpecError(f"{_where(i, kind)}: unknown option {key!r}.{hint} Options: "
                            f"{', '.join(schema) or '(none)'}. Received: {key}={raw[key]!r}")
    for key, (default, check) in schema.items():
        if key in raw:
            out[key] = check(i, kind, key, raw[key])
        elif default is REQUIRED:
            raise SpecError(f"{_where(i, kind)}: missing required option {key!r}. Received: {_brief(raw)}")
        else:
            out[key] = default
    return out


def _brief(raw: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in raw.items()) + "}"


# ----------------------------------------------------------------------------- building
@dataclass
class BuiltLayers:
    """The result of building a layer list: modules plus what shape inference found."""

    modules: list[SpecLayer]
    specs: list[dict[str, Any]]  # canonical, JSON-safe
    names: list[str]
    shapes: list[Shape]  # output shape of each layer, batch dimension excluded


def keras_shape(shape: tuple[int, ...]) -> str:
    """A PyTorch ``(C, H, W)`` (or flat) shape as Keras prints it: ``(None, H, W, C)``."""
    if len(shape) == 3:
        c, h, w = shape
        return f"(None, {h}, {w}, {c})"
    return "(None, " + ", ".join(str(d) for d in shape) + ")"


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
            raise SpecError(f"{_where(i, spec['type'])}: {key} {kernel[0]}x{kernel[1]}{dil} is larger than its "
                            f"{h}x{w} input with padding='valid'; use padding='same', a smaller {key} or a larger "
                            f"input. Received: {key}={spec[key]!r}")
        out.append(conv_output_size(n, k, s, padding, d))
    return (c, out[0], out[1])


def _need_map(i: int, spec: dict[str, Any], shape: Shape) -> None:
    if len(shape) != 3:
        raise SpecError(f"{_where(i, spec['type'])}: {spec['type']} needs a 4-D input (batch, height, width, "
                        f"channels) but receives a flat tensor; move it before 'flatten' / global pooling. "
                        f"Received: input shape {keras_shape(shape)}")


def _build_one(i: int, spec: dict[str, Any], shape: Shape) -> tuple[SpecLayer, Shape]:
    kind = spec["type"]

    def act() -> nn.Module:
        return make_activation(spec.get("activation"))

    if kind in ("conv", "conv_transpose"):
        _need_map(i, spec, shape)
        c = shape[0]
        k, s, d = _pair(spec["kernel_size"]), _pair(spec["strides"]), _pair(spec["dilation"])
        if kind == "conv":
            groups = spec["groups"]
            if c % groups or spec["filters"] % groups:
                raise SpecError(f"{_where(i, kind)}: groups must divide both the input channels ({c}) and "
                                f"filters ({spec['filters']}). Received: groups={groups}")
            if s != (1, 1) and d != (1, 1):
                raise SpecError(f"{_where(i, kind)}: strides > 1 cannot be combined with dilation > 1 "
                                f"(as in Keras). Received: strides={spec['strides']!r}, dilation={spec['dilation']!r}")
            out = _window_out(i, spec, shape, k, s, d)
            mod: SpecLayer = Conv(c, spec["filters"], k, s, spec["padding"], d, act(), spec["use_bias"], groups)
            return mod, (spec["filters"], out[1], out[2])
        h, w = shape[1], shape[2]
        oh = None if h is None else conv_transpose_output_size(h, k[0], s[0], spec["padding"], d[0])
        ow = None if w is None else conv_transpose_output_size(w, k[1], s[1], spec["padding"], d[1])
        mod = ConvTranspose(c, spec["filters"], k, s, spec["padding"], d, act(), spec["use_bias"])
        return mod, (spec["filters"], oh, ow)
    if kind in ("max_pool", "avg_pool"):
        _need_map(i, spec, shape)
        k = _pair(spec["pool_size"])
        s = _pair(spec["strides"]) if spec["strides"] is not None else k
        return Pool(kind.split("_")[0], k, s, spec["padding"]), _window_out(i, spec, shape, k, s, (1, 1))
    if kind in ("global_avg_pool", "global_max_pool"):
        _need_map(i, spec, shape)
        return GlobalPool(kind.split("_")[1]), (shape[0],)
    if kind == "flatten":
        if len(shape) == 1:
            return Flatten(), shape
        c, h, w = shape
        return Flatten(), ((c * h * w) if h is not None and w is not None else None,)
    if kind == "dense":
        if len(shape) != 1:
            raise SpecError(f"{_where(i, kind)}: dense needs a flat input but receives a 4-D tensor; add a "
                            f"'flatten' or 'global_avg_pool' layer before it. Received: input shape {keras_shape(shape)}")
        if shape[0] is None:
            raise SpecError(f"{_where(i, kind)}: the number of inputs of this dense layer depends on the image "
                            f"size; pass input_size (or use global_avg_pool instead of flatten). "
                            f"Received: input shape (None, None)")
        if spec["units"] is None:
            raise SpecError(f"{_where(i, kind)}: units is required (only the final dense layer may omit it). "
                            f"Received: units=None")
        return Dense(shape[0], spec["units"], act(), spec["use_bias"]), (spec["units"],)
    if kind == "dropout":
        return Dropout(spec["rate"]), shape
    if kind == "batch_norm":
        return BatchNorm(shape[0], len(shape) == 1, spec["momentum"], spec["epsilon"]), shape
    if kind == "upsample":
        _need_map(i, spec, shape)
        f = _pair(spec["factor"])
        c, h, w = shape
        return Upsample(f, spec["interpolation"]), (c, None if h is None else h * f[0], None if w is None else w * f[1])
    # activation layers (a softmax on a feature map normalises over its channels, per pixel)
    return Activation(kind, make_activation(kind, slope=spec.get("slope", 0.3), alpha=spec.get("alpha", 1.0))), shape


def build_layers(layers: Sequence[Any], input_shape: Sequence[int | None], *, fuse_pool: bool = True) -> BuiltLayers:
    """Build a layer list for inputs of ``input_shape`` = (C, H, W) (H/W may be None: unknown).

    With ``fuse_pool`` a ReLU (or LeakyReLU / linear) directly before a max pool runs after the
    pool instead: identical output, 4x fewer activations to compute (``max`` commutes with them).
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise SpecError(f"a model spec must be a non-empty list of layers. Received: {layers!r}")
    shape: Shape = tuple(input_shape)
    modules: list[SpecLayer] = []
    specs: list[dict[str, Any]] = []
    shapes: list[Shape] = []
    for i, raw in enumerate(layers):
        spec = normalize_layer(i, raw)
        module, shape = _build_one(i, spec, shape)
        if len(shape) == 3 and any(n is not None and n < 1 for n in shape[1:]):
            raise SpecError(f"{_where(i, spec['type'])}: the output would be empty; the input is too small for "
                            f"this layer. Received: output shape {keras_shape(shape)}")
        modules.append(module)
        specs.append(spec)
        shapes.append(shape)
    if fuse_pool:
        for a, b in zip(modules, modules[1:], strict=False):
            act = getattr(a, "act", None)
            if isinstance(b, Pool) and b.mode == "max" and act is not None and _commutes_with_max(act) \
                    and not isinstance(act, nn.Identity):
                b.post_act, a.act = act, nn.Identity()
    return BuiltLayers(modules, specs, _layer_names(specs), shapes)


def _layer_names(specs: list[dict[str, Any]]) -> list[str]:
    """User names, else Keras-style ``conv``, ``conv_1``, ``conv_2``, ..."""
    counts: dict[str, int] = {}
    names = []
    for spec in specs:
        if "name" in spec:
            names.append(spec["name"])
            continue
        n = counts.get(spec["type"], 0)
        counts[spec["type"]] = n + 1
        names.append(spec["type"] if n == 0 else f"{spec['type']}_{n}")
    return names


def init_keras_(module: nn.Module) -> None:
    """Keras's default initialisation: Glorot-uniform kernels, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class LayerStack(nn.Module):
    """A built layer list as a plain sequential module (no classification head rules)."""

    def __init__(self, layers: Sequence[Any], input_shape: Sequence[int | None], *, fuse_pool: bool = True) -> None:
        super().__init__()
        built = build_layers(layers, input_shape, fuse_pool=fuse_pool)
        self.layers = nn.ModuleList(built.modules)
        self.specs, self.names, self.shapes = built.specs, built.names, built.shapes
        init_keras_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------- models
def out_units_for(num_classes: int) -> int:
    """One logit for two classes (sigmoid), else one per class (softmax)."""
    return 1 if num_classes == 2 else num_classes


def check_classes(num_classes: Any, in_channels: Any) -> None:
    """Validate the class and channel counts every model takes."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise SpecError(f"num_classes must be an integer >= 2. Received: num_classes={num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise SpecError(f"in_channels must be a positive integer (1 grayscale, 3 RGB). Received: in_channels={in_channels!r}")


class ConvlensModel(nn.Module):
    """Base of every convlens model: ``forward(x) = forward_head(forward_features(x))`` -> logits.

    The final sigmoid/softmax is never inside the model; ``output_activation`` names it.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        check_classes(num_classes, in_channels)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.out_units = out_units_for(num_classes)
        self.output_activation = activation_for(self.out_units)
        self.arch: dict[str, Any] = {}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map, N x C x h x w."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Features -> logits (N x out_units)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def gap_linear_head(self) -> nn.Linear | None:
        """The dense layer when the head is exactly global average pooling + one dense layer."""
        return None

    def summary_units(self) -> list[tuple[str, str, nn.Module]]:
        """(name, type, module) in execution order; run one after another they equal ``forward``."""
        raise NotImplementedError


class SpecModel(ConvlensModel):
    """A classifier built from a layer list (see :func:`build_from_spec`)."""

    def __init__(self, built: BuiltLayers, num_classes: int, in_channels: int, output_activation: str,
                 arch: dict[str, Any]) -> None:
        super().__init__(num_classes, in_channels)
        self.layers = nn.ModuleList(built.modules)
        self.names = built.names
        self.specs = built.specs
        self.shapes = built.shapes
        # Features end at the last layer that still outputs a feature map.
        maps = [i for i, s in enumerate(built.shapes) if len(s) == 3]
        self.split = maps[-1] + 1 if maps else 0
        self.output_activation = output_activation
        self.arch = arch
        init_keras_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[: self.split]:
            x = layer(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        for layer in self.layers[self.split:]:
            x = layer(x)
        return x

    def gap_linear_head(self) -> nn.Linear | None:
        # Dropout is the identity at inference, so it does not break the exact CAM.
        head = [m for m in self.layers[self.split:] if not isinstance(m, Dropout)]
        if (len(head) == 2 and isinstance(head[0], GlobalPool) and head[0].mode == "avg"
                and isinstance(head[1], Dense) and isinstance(head[1].act, nn.Identity)):
            return head[1].linear
        return None

    def summary_units(self) -> list[tuple[str, str, nn.Module]]:
        return [(n, s["type"], m) for n, s, m in zip(self.names, self.specs, self.layers, strict=True)]


def _input_size(input_size: Any) -> tuple[int | None, int | None]:
    if input_size is None:
        return None, None
    if isinstance(input_size, int) and not isinstance(input_size, bool) and input_size > 0:
        return input_size, input_size
    if isinstance(input_size, (list, tuple)) and len(input_size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size):
        return int(input_size[0]), int(input_size[1])
    raise SpecError(f"input_size must be a positive integer or (height, width). Received: input_size={input_size!r}")


def build_from_spec(layers: Sequence[dict[str, Any]] | str | Any, num_classes: int, in_channels: int = 3,
                    input_size: int | Sequence[int] | None = None, *, fuse_pool: bool = True) -> SpecModel:
    """Build a classifier from a layer list (or the path of a YAML/JSON layer file).

    The output is ``out_units`` logits: a final ``dense`` may omit ``units`` (set from
    ``num_classes``: 1 for two classes); a final sigmoid/softmax (a layer, or the last dense's
    ``activation``) is recorded as ``output_activation`` and not applied. ``input_size`` (H, W)
    lets shapes be checked at build time; it is needed when a ``flatten`` feeds a ``dense``.
    """
    where = ""
    if not isinstance(layers, (list, tuple)):
        from convlens.models.registry import load_layer_file

        where = f"model file {str(layers)!r}: "
        layers = load_layer_file(layers)["layers"]
    check_classes(num_classes, in_channels)
    h, w = _input_size(input_size)
    try:
        return _build_model(list(layers), num_classes, in_channels, (h, w), fuse_pool)
    except SpecError as e:
        if where:
            raise SpecError(where + str(e)) from e
        raise


def _build_model(layers: list[Any], num_classes: int, in_channels: int, hw: tuple[int | None, int | None],
                 fuse_pool: bool) -> SpecModel:
    if not layers:
        raise SpecError("a model spec must be a non-empty list of layers. Received: []")
    specs = [normalize_layer(i, raw) for i, raw in enumerate(layers)]
    arch = {"layers": copy.deepcopy(specs), "num_classes": num_classes, "in_channels": in_channels,
            "input_size": None if hw[0] is None else [hw[0], hw[1]]}
    out_units = out_units_for(num_classes)
    recorded: str | None = None
    last = specs[-1]
    if last["type"] in OUTPUT_ACTIVATIONS:
        recorded = last["type"]
        specs = specs[:-1]
        if not specs:
            raise SpecError(f"layer 0 ({recorded}): a model needs layers before its output activation. "
                            f"Received: {len(layers)} layer")
        last = specs[-1]
    if last["type"] == "dense":
        act = last["activation"]
        if act in OUTPUT_ACTIVATIONS:
            if recorded:
                raise SpecError(f"{_where(len(specs) - 1, 'dense')}: two output activations in a row. "
                                f"Received: activation={act!r} followed by a {recorded!r} layer")
            recorded, last["activation"] = act, None
        if last["units"] is None:
            last["units"] = out_units
        elif last["units"] != out_units:
            need = "1 unit (two classes use one sigmoid unit)" if out_units == 1 else f"{out_units} units"
            raise SpecError(f"{_where(len(specs) - 1, 'dense')}: the final dense layer must have {need} for "
                            f"{num_classes} classes; omit units to set it automatically. Received: units={last['units']}")
    if recorded == "sigmoid" and out_units != 1:
        raise SpecError(f"the final activation 'sigmoid' needs one output unit (two classes) but the model has "
                        f"{out_units} classes; use softmax. Received: activation='sigmoid'")
    if recorded == "softmax" and out_units == 1:
        raise SpecError("a softmax over one unit is always 1; two classes use one sigmoid unit. "
                        "Received: activation='softmax' with 2 classes")
    built = build_layers(specs, (in_channels, hw[0], hw[1]), fuse_pool=fuse_pool)
    final = built.shapes[-1]
    if len(final) != 1 or (final[0] is not None and final[0] != out_units):
        raise SpecError(f"the model must end with {out_units} output(s) for {num_classes} classes (for example "
                        f"global_avg_pool then dense). Received: final output shape {keras_shape(final)}")
    return SpecModel(built, num_classes, in_channels, recorded or activation_for(out_units), arch)
