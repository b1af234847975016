"""Process-level performance settings and device selection.

convlens applies these itself because users will not set environment variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """Stop glibc's malloc from returning large buffers to the OS after every step.

    By default glibc serves big activation buffers with ``mmap`` and unmaps them on free, so
    every training step page-faults its activations in again; on these CPUs that made PyTorch
    training 1.7-2.2x slower. Disabling mmap and trimming keeps the memory in the heap for
    reuse. A no-op (returns False) where the C library is not glibc or jemalloc/tcmalloc is
    already preloaded.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if not sys.platform.startswith("linux"):
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    _allocator_tuned = ok
    return ok


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX)."""
    import torch

    checker = getattr(torch.backends.cpu, "get_cpu_capability", None)
    cap = checker() if checker else ""
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return bool(bf16 or amx) and "AVX512" in str(cap).upper()


@dataclass(frozen=True)
class DeviceInfo:
    """The resolved device and the precision used on it."""

    device: str  # "cpu", "cuda", "cuda:1", "mps"
    amp_dtype: Any  # torch.bfloat16 / torch.float16 / None (fp32)
    note: str = ""

    @property
    def type(self) -> str:
        return self.device.split(":")[0]


def resolve_device(device: str = "auto", precision: str = "auto") -> DeviceInfo:
    """Resolve ``--device auto|cpu|cuda[:N]|mps`` and ``--precision auto|bf16|fp16|fp32``."""
    import torch

    from convlens.errors import ConfigError

    dev = device.lower()
    if dev == "auto":
        if torch.cuda.is_available():
            dev = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            dev = "mps"
        else:
            dev = "cpu"
    kind = dev.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda[:N] or mps. Received: device={device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' was asked for but MPS is not available; use --device cpu")

    prec = precision.lower()
    if prec not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16, fp16 or fp32. Received: precision={precision!r}")
    note = ""
    amp: Any = None
    if prec == "auto":
        if kind == "cuda":
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif kind == "cpu":
            if cpu_supports_bf16():
                amp = torch.bfloat16
            else:
                note = "this CPU has no native bf16: training in fp32"
    elif prec == "bf16":
        amp = torch.bfloat16
    elif prec == "fp16":
        amp = torch.float16
    return DeviceInfo(dev, amp, note)


def configure_threads(num_threads: int | None = None) -> int:
    """Use one intra-op thread per physical core (hyper-threads slow oneDNN convolutions)."""
    import torch

    if num_threads is None or num_threads <= 0:
        num_threads = os.cpu_count() or 1
    torch.set_num_threads(num_threads)
    return num_threads
