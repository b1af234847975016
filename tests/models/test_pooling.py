"""The inference fast path of 2x2 max pooling equals ``F.max_pool2d`` bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convlens.models import pooling
from convlens.models.pooling import MaxPool2d, max_pool2d


@pytest.mark.parametrize("shape", [(3, 16, 30, 30), (2, 8, 31, 29), (2, 5, 2, 2), (1, 7, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_equals_torch(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    x[:, :, :2] = 1.0  # ties inside windows
    x[0, 0, -1, -1] = float("nan")  # NaN wins in both
    with torch.inference_mode():
        assert pooling._fast_path(x, (2, 2), (2, 2), (0, 0))
        want = F.max_pool2d(x, 2, 2)
        for got in (max_pool2d(x, (2, 2), (2, 2)), MaxPool2d(2)(x)):
            assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(got.nan_to_num(), want.nan_to_num())
            assert torch.equal(got.isnan(), want.isnan())


def test_gradients_and_other_windows_take_torch() -> None:
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert not pooling._fast_path(x, (2, 2), (2, 2), (0, 0))  # the backward needs the indices
    assert not pooling._fast_path(x.detach(), (3, 3), (2, 2), (0, 0))
    assert not pooling._fast_path(x.detach().contiguous(), (2, 2), (2, 2), (0, 0))  # NCHW
    with torch.no_grad():
        assert pooling._fast_path(x, (2, 2), (2, 2), (0, 0))
    g_fast = torch.autograd.grad(MaxPool2d(2)(x).sum(), x)[0]
    g_torch = torch.autograd.grad(F.max_pool2d(x, 2).sum(), x)[0]
    assert torch.equal(g_fast, g_torch)
    with torch.no_grad():
        assert torch.equal(MaxPool2d(3, 2, 1)(x), F.max_pool2d(x, 3, 2, 1))


def test_export_keeps_one_pool_op() -> None:
    """What ONNX export traces: one max-pool node, not reshapes of a fixed batch size."""
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        graph = torch.export.export(MaxPool2d(2).eval(), (x,)).graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    assert any("max_pool2d" in t for t in targets) and not any("maximum" in t for t in targets)
