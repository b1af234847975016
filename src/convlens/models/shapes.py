"""Shape arithmetic of convolutional layers (TensorFlow/Keras rules), receptive fields and
the Keras way of printing a shape. The one owner of these formulas: layers, summaries and
``convlens demo-layer`` import them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

Pair = tuple[int, int]
Shape = tuple  # (C, H, W) for feature maps (H/W may be None when unknown) or (F,) when flat


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


def same_pads(x: torch.Tensor, kernel: Pair, strides: Pair, dilation: Pair = (1, 1)) -> tuple[Pair, Pair]:
    h, w = int(x.shape[-2]), int(x.shape[-1])
    return (same_padding(h, kernel[0], strides[0], dilation[0]),
            same_padding(w, kernel[1], strides[1], dilation[1]))


def keras_shape(shape: tuple[int, ...]) -> str:
    """A PyTorch ``(C, H, W)`` (or flat) shape as Keras prints it: ``(None, H, W, C)``."""
    if len(shape) == 3:
        c, h, w = shape
        return f"(None, {h}, {w}, {c})"
    return "(None, " + ", ".join(str(d) for d in shape) + ")"


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
        k, s = pair(module.kernel_size), pair(module.stride or module.kernel_size)
        d = pair(getattr(module, "dilation", 1))
        return rf.window(k, s, d)
    if isinstance(module, (nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return None
    # A container without its own rule is taken as a chain of its children (nn.Sequential and
    # simple wrappers); blocks with branches define receptive_field() themselves.
    for child in module.children():
        rf = propagate_rf(child, rf)
    return rf  # a leaf here is pointwise: activation, batch norm, dropout


def pair(v: int | Sequence[int]) -> Pair:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
