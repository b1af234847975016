"""Runtime: allocator tuning, device and precision resolution."""

from __future__ import annotations

import sys

import pytest
import torch

from convlens import runtime
from convlens.errors import ConfigError


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc-only")
def test_tune_allocator_on_glibc_is_idempotent() -> None:
    first = runtime.tune_allocator()
    assert runtime.tune_allocator() is first
    assert isinstance(first, bool)


def test_resolve_cpu_device_precision() -> None:
    info = runtime.resolve_device("cpu", "fp32")
    assert info.device == "cpu" and info.amp_dtype is None
    info = runtime.resolve_device("cpu", "bf16")
    assert info.amp_dtype is torch.bfloat16
    auto = runtime.resolve_device("cpu", "auto")
    assert (auto.amp_dtype is torch.bfloat16) == runtime.cpu_supports_bf16()
    assert auto.amp_dtype is not None or "fp32" in auto.note


@pytest.mark.parametrize(("device", "precision", "message"), [
    ("tpu", "auto", "device must be auto, cpu"),
    ("cpu", "fp8", "precision must be auto, bf16"),
])
def test_bad_device_or_precision(device, precision, message) -> None:
    with pytest.raises(ConfigError, match=message):
        runtime.resolve_device(device, precision)


@pytest.mark.skipif(torch.cuda.is_available(), reason="machine has CUDA")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU is available; use --device cpu"):
        runtime.resolve_device("cuda")
