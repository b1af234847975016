"""Max pooling with a fast path for inference: 2x2 windows, stride 2, on channels_last tensors.

PyTorch's CPU ``max_pool2d`` always computes the argmax indices (int64, as large as the
output), which costs more than the pooling itself. For inference nothing needs them: on a
channels_last tensor a 2x2/2 window is two rows of ``2 * C`` contiguous values, so the pool is
two element-wise maxima over views, with no indices. On the tutorial model's first pool
(32 x 16 x 300 x 300, bf16) that is 6 ms against 36 ms (docs/benchmarks.md, section 2). The
result is bit-identical to ``F.max_pool2d`` (NaN propagates in both).

Training (gradients needed) and tracing/export keep ``F.max_pool2d``: the backward needs its
indices, and an exported graph should hold one MaxPool node, not reshapes of a fixed size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convlens.models.shapes import Pair, pair


def _fast_path(x: torch.Tensor, kernel: Pair, stride: Pair, padding: Pair) -> bool:
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() \
            or torch.compiler.is_compiling():
        return False
    return (kernel == (2, 2) and stride == (2, 2) and padding == (0, 0) and x.dim() == 4
            and not (torch.is_grad_enabled() and x.requires_grad)
            and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1)


def max_pool2d(x: torch.Tensor, kernel: Pair, stride: Pair, padding: Pair = (0, 0)) -> torch.Tensor:
    """``F.max_pool2d(x, kernel, stride, padding)`` (floor mode), without indices when possible."""
    if not _fast_path(x, kernel, stride, padding):
        return F.max_pool2d(x, kernel, stride, padding)
    n, c, h, w = x.shape
    h2, w2 = h // 2, w // 2
    # NHWC memory: (n, h2, 2 rows, w2, 2 columns x c) is a view; an odd last row/column is dropped.
    rows = x[:, :, : 2 * h2, : 2 * w2].permute(0, 2, 3, 1).reshape(n, h2, 2, w2, 2 * c)
    pairs = torch.maximum(rows[:, :, 0], rows[:, :, 1])
    return torch.maximum(pairs[..., :c], pairs[..., c:]).permute(0, 3, 1, 2)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same options, same state) whose forward takes :func:`max_pool2d`'s fast path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dilation not in (1, (1, 1)) or self.ceil_mode or self.return_indices:
            return super().forward(x)
        return max_pool2d(x, pair(self.kernel_size), pair(self.stride), pair(self.padding))
