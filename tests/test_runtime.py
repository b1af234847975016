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


# ----------------------------------------------------------------------------- inference precision
@pytest.mark.parametrize("native", [True, False])
def test_inference_auto_is_bf16_only_on_native_hardware(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: native)
    assert runtime.inference_device("cpu", "auto").precision == ("bf16" if native else "fp32")
    assert runtime.inference_device("cpu", "fp32").precision == "fp32"
    assert runtime.inference_device("cpu", "BF16").precision == "bf16"


def test_inference_precision_refuses_fp16() -> None:
    with pytest.raises(ConfigError, match=r"auto, bf16 or fp32. Received: precision='fp16'"):
        runtime.inference_device("cpu", "fp16")


def test_model_logits_is_float32_without_grad() -> None:
    model = torch.nn.Linear(4, 2)
    out = runtime.model_logits(model, torch.ones(3, 4), runtime.inference_device("cpu", "bf16"))
    assert out.dtype == torch.float32 and not out.requires_grad
    exact = runtime.model_logits(model, torch.ones(3, 4), runtime.inference_device("cpu", "fp32"))
    torch.testing.assert_close(exact, model(torch.ones(3, 4)).detach())
    assert (out - exact).abs().max() < 0.05


# ----------------------------------------------------------------------------- threads
def test_usable_cores_follow_affinity_and_cgroup_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: None)
    assert runtime.usable_cores() == 4
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 1.5)  # docker --cpus 1.5
    assert runtime.usable_cores() == 2
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 0.5)
    assert runtime.usable_cores() == 1


def test_cgroup_quota_files(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    cpu_max = tmp_path / "cpu.max"
    real = runtime.Path

    def fake(path: str):
        return cpu_max if path == "/sys/fs/cgroup/cpu.max" else real(tmp_path / "absent")
    monkeypatch.setattr(runtime, "Path", fake)
    cpu_max.write_text("150000 100000\n")
    assert runtime._cgroup_quota() == 1.5
    cpu_max.write_text("max 100000\n")
    assert runtime._cgroup_quota() is None


@pytest.mark.parametrize(("max_threads", "cores", "load", "expected", "changes"), [
    (2, 2, [0.1, 0.5, 1.0, 0.2, 0.0], [2, 1, 1, 2, 2], 2),  # another program takes a core, then leaves
    (8, 16, [8.0, 9.0], [8, 7], 1),  # one of 2 processes on 16 cores: the sibling's 8 threads, then one more
])
def test_governor_follows_the_cores_other_processes_leave(monkeypatch: pytest.MonkeyPatch, max_threads: int,
                                                          cores: int, load: list[float], expected: list[int],
                                                          changes: int) -> None:
    before = torch.get_num_threads()
    try:
        gov = runtime.ThreadGovernor(max_threads, interval=0.0)
        if not gov.adaptive:
            pytest.skip("no /proc/stat here")
        gov.cores = cores  # all usable cores: DDP siblings count against them too
        loads = iter(load)  # cores' worth of CPU other processes used per window
        monkeypatch.setattr(gov, "busy_elsewhere", lambda: next(loads))
        assert [gov.update() for _ in load] == expected and gov.changes == changes
        assert torch.get_num_threads() == expected[-1]
    finally:
        torch.set_num_threads(before)


def test_governor_leaves_a_fixed_thread_count_alone() -> None:
    gov = runtime.ThreadGovernor(2, adaptive=False, interval=0.0)
    assert not gov.adaptive and gov.update() == 2 and gov.changes == 0
    assert not runtime.ThreadGovernor(1).adaptive  # one thread cannot go lower


def test_busy_elsewhere_measures_other_processes() -> None:
    gov = runtime.ThreadGovernor(2, interval=0.0)
    if not gov.adaptive:
        pytest.skip("no /proc/stat here")
    sum(i * i for i in range(300_000))  # our own work is not counted as someone else's
    others = gov.busy_elsewhere()
    assert others is not None and others >= 0.0


def test_first_conv_runs_in_fp32_under_autocast_only() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
    x = torch.rand(2, 3, 8, 8)
    exact = model[0](x).detach()
    runtime.first_conv_in_fp32(model)
    runtime.first_conv_in_fp32(model)  # idempotent: wrapped once
    with torch.no_grad():
        torch.testing.assert_close(model[0](x), exact)  # no autocast: untouched
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first, second = model[0](x), model(x)
    assert first.dtype == torch.bfloat16 and second.dtype == torch.bfloat16
    torch.testing.assert_close(first, exact.to(torch.bfloat16))  # fp32 arithmetic, rounded once


def test_first_conv_stays_bf16_for_inputs_bf16_holds_exactly() -> None:
    """0-255 pixels (the tutorial's scale) are exact in bf16: the first convolution then runs in
    bf16 like the rest; inputs bf16 would round still get the fp32 convolution."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    pixels = torch.randint(0, 256, (2, 3, 8, 8)).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(pixels)  # autocast's own bf16 convolution
    fractions = pixels / 255
    with torch.no_grad():
        exact = model(fractions)  # fp32
    runtime.first_conv_in_fp32(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(pixels), plain)
        torch.testing.assert_close(model(fractions), exact.to(torch.bfloat16))  # fp32, rounded once


def test_exact_in_bf16_reads_the_low_bits() -> None:
    pixels = torch.randint(0, 256, (2, 3, 5, 7)).float()
    assert runtime.exact_in_bf16(pixels)
    assert runtime.exact_in_bf16(pixels.contiguous(memory_format=torch.channels_last))
    assert runtime.exact_in_bf16(pixels[:, :, 1:, ::2])  # a strided view is copied, not misread
    assert not runtime.exact_in_bf16(pixels / 255)
    nearly = pixels.clone()
    nearly[1, 2, 4, 6] = 257.0  # one value bf16 would round (9 significant bits)
    assert not runtime.exact_in_bf16(nearly.contiguous(memory_format=torch.channels_last))


def test_model_logits_runs_exact_inputs_in_bf16() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    dev = runtime.resolve_device("cpu", "bf16")
    if dev.amp_dtype != torch.bfloat16:
        pytest.skip("bf16 inference is not native on this CPU")
    pixels = torch.randint(0, 256, (2, 3, 8, 8)).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(pixels).float()
    assert torch.equal(runtime.model_logits(model, pixels, dev), plain)  # same bf16 arithmetic
    fractions = pixels / 255
    with torch.no_grad():
        exact = model(fractions)
    torch.testing.assert_close(runtime.model_logits(model, fractions, dev), exact.to(torch.bfloat16).float())
