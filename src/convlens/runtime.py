"""Process-level performance settings and device selection.

convlens applies these itself because users will not set environment variables.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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

    @property
    def precision(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``."""
        return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(self.amp_dtype), "fp32")


def torch_is_cpu_only() -> bool:
    """True when the installed PyTorch is a CPU-only build (PyTorch's ``+cpu`` wheels), told from
    its package metadata: importing torch to learn there is no GPU takes ~1 s, most of a short
    ``convlens predict`` on the onnx engine. False when unsure (another build, or none installed)."""
    from importlib import metadata

    try:
        return metadata.version("torch").partition("+")[2].startswith("cpu")
    except metadata.PackageNotFoundError:
        return False


def resolve_device(device: str = "auto", precision: str = "auto") -> DeviceInfo:
    """Resolve ``--device auto|cpu|cuda[:N]|mps`` and ``--precision auto|bf16|fp16|fp32``."""
    import torch

    from convlens.errors import ConfigError

    mps = torch.backends.mps.is_available()
    dev = device.lower()
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    kind = dev.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda[:N] or mps. Received: device={device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if kind == "mps" and not mps:
        raise ConfigError("device 'mps' was asked for but MPS is not available; use --device cpu")

    prec = precision.lower()
    if prec not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16, fp16 or fp32. Received: precision={precision!r}")
    note = ""
    amp: Any = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
    if prec == "auto" and kind == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif prec == "auto" and kind == "cpu":
        amp = torch.bfloat16 if cpu_supports_bf16() else None
        note = "this CPU has no native bf16: training in fp32" if amp is None else ""
    return DeviceInfo(dev, amp, note)


INFERENCE_PRECISIONS = ("auto", "bf16", "fp32")


def inference_device(device: str = "auto", precision: str = "auto") -> DeviceInfo:
    """The device and precision of every inference path: ``predict``, ``serve``, the Python API
    and ``evaluate`` (so a report and later predictions agree).

    ``auto`` is bf16 where the hardware computes it natively (AVX512-BF16/AMX CPUs, CUDA) and
    fp32 elsewhere; bf16 moves class probabilities by well under 1e-2 (docs/benchmarks.md).
    """
    check_inference_precision(precision)
    return resolve_device(device, precision)


def check_inference_precision(precision: str) -> None:
    """Raise ``ConfigError`` unless ``precision`` is one of :data:`INFERENCE_PRECISIONS`."""
    from convlens.errors import ConfigError

    if str(precision).lower() not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision for inference must be auto, bf16 or fp32. Received: precision={precision!r}")


@contextlib.contextmanager
def autocast(dev: DeviceInfo) -> Iterator[None]:
    """``torch.autocast`` to ``dev``'s precision; nothing for fp32."""
    import torch

    if dev.amp_dtype is None:
        yield
    else:
        with torch.autocast(device_type=dev.type, dtype=dev.amp_dtype):
            yield


@contextlib.contextmanager
def inference_pass(model: Any, dev: DeviceInfo) -> Iterator[None]:
    """The one inference forward pass's set-up: inference mode in ``dev``'s precision; under
    autocast the first convolution runs in fp32 unless bf16 holds the inputs exactly
    (:func:`first_conv_in_fp32` decides, once per batch)."""
    import torch

    if dev.amp_dtype is not None:
        first_conv_in_fp32(model)
    with torch.inference_mode(), autocast(dev):
        yield


def model_logits(model: Any, x: Any, dev: DeviceInfo) -> Any:
    """The one inference forward pass (:func:`inference_pass`): float32 logits."""
    with inference_pass(model, dev):
        return model(x).float()


def model_pooled(model: Any, x: Any, dev: DeviceInfo) -> tuple[Any, Any]:
    """:func:`model_logits`' pass through ``model.forward_pooled``: float32 ``(logits, pooled)``,
    the pooled features (N x C) computed in the same forward pass as the logits."""
    with inference_pass(model, dev):
        logits, pooled = model.forward_pooled(x)
        return logits.float(), pooled.float()


def exact_in_bf16(x: Any) -> bool:
    """Whether every value of the float32 tensor ``x`` is a bf16 value (its low 16 bits are zero).

    One read of ``x`` and no copy: 0-255 pixels (the tutorial's scale) pass, k/255 fractions fail.
    """
    import torch

    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)  # NHWC memory: a contiguous view, so it can be reinterpreted
    if not x.is_contiguous():
        x = x.contiguous()
    low = x.view(torch.int16)[..., 0::2] if sys.byteorder == "little" else x.view(torch.int16)[..., 1::2]
    return not bool(low.any())


def first_conv_in_fp32(model: Any) -> None:
    """Under autocast, run ``model``'s first convolution in fp32 and hand bf16 on (idempotent).

    bf16 keeps 8 significant bits: rounding the normalised input pixels (k/255) was the
    largest part of bf16's error. On a resnet8 trained on cats_and_dogs_filtered the largest
    probability difference against fp32 fell from 8.3e-3 to 2.6e-3 and label flips from 5 to
    1 in 1000 validation photos; the first convolution has 3 input channels, so it costs little.
    Inputs already in bf16, or that bf16 holds exactly (the tutorial's 0-255 scale: integers up
    to 256), skip the fp32 convolution: there is nothing to round, and it cost 18% of the
    tutorial model's inference.
    """
    import torch

    if getattr(model, "_convlens_fp32_first_conv", False):
        return
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    model._convlens_fp32_first_conv = True
    if conv is None:
        return
    inner = conv.forward

    def forward(x: Any) -> Any:
        kind = x.device.type
        if not torch.is_autocast_enabled(kind):
            return inner(x)
        low = torch.get_autocast_dtype(kind)
        if x.dtype == low:
            return inner(x)
        if x.dtype == torch.float32 and low == torch.bfloat16 and exact_in_bf16(x):
            return inner(x.to(low))  # the same cast autocast would make
        with torch.autocast(kind, enabled=False):
            return inner(x.float()).to(torch.get_autocast_dtype(kind))

    conv.forward = forward


def usable_cores() -> int:
    """Cores this process may use: the affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 0.05)))  # 1.02 cores of quota is one core
    return max(1, cores)


def share_of_cores(processes: int) -> int:
    """Intra-op threads for each of ``processes`` processes sharing this machine's usable cores
    (at least 1): DDP ranks on a node and ``serve --workers`` divide the cores this one way."""
    return max(1, usable_cores() // max(1, int(processes)))


_inference_threads = 0  # 0: not set, every usable core


def set_inference_threads(threads: int) -> None:
    """Intra-op threads of this process's inference from now on (0: every usable core): every
    onnxruntime session created after this, and torch's pool now when torch is loaded (a torch
    backend made later applies :func:`inference_threads` itself)."""
    global _inference_threads
    _inference_threads = max(0, int(threads))
    if "torch" in sys.modules:  # never import torch for this: an onnx worker may not need it
        sys.modules["torch"].set_num_threads(inference_threads())


def inference_threads() -> int:
    """The threads set by :func:`set_inference_threads`, else one per usable core."""
    return _inference_threads or usable_cores()


def _cgroup_quota() -> float | None:
    """The cgroup's CPU limit in cores (v2 ``cpu.max``, v1 ``cfs_quota_us``), None when unlimited."""
    candidates = (("/sys/fs/cgroup/cpu.max", None),
                  ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
    for first, second in candidates:
        try:
            fields = Path(first).read_text().split()
            if second is not None:
                fields = [fields[0], Path(second).read_text().strip()]
        except (OSError, IndexError):
            continue
        if len(fields) >= 2 and fields[0] not in ("max", "-1"):
            try:
                return int(fields[0]) / int(fields[1])
            except (ValueError, ZeroDivisionError):
                return None
        return None
    return None


def configure_threads(num_threads: int | None = None) -> int:
    """Use one intra-op thread per usable core (hyper-threads slow oneDNN convolutions)."""
    import torch

    if num_threads is None or num_threads <= 0:
        num_threads = usable_cores()
    torch.set_num_threads(num_threads)
    return num_threads


class ThreadGovernor:
    """Keeps torch's thread count at the cores other processes leave free, re-checked as it runs.

    With as many threads as cores and another program busy on one of them, every parallel
    region (each convolution, each augmentation or optimiser op) waits for the thread that
    shares its core with that program, and the scheduler hands it the core only every few
    milliseconds: training ran 3-4x slower than with one thread fewer. ``update()`` (call it
    every step; it does work at most every ``interval`` seconds) measures the CPU time other
    processes used on this process's cores since the last check (``/proc/stat`` minus this
    process's own time) and sets ``threads = usable cores - busy cores``, between 1 and
    ``max_threads``. A fixed ``--threads N`` is left alone (``adaptive=False``); so is any
    system without ``/proc/stat``.
    """

    # A core counts as taken when others used more than 40% of it: one busy program that shares
    # a core with one of our threads gets about half of it.
    TAKEN = 0.4

    def __init__(self, max_threads: int, adaptive: bool = True, interval: float = 1.0) -> None:
        self.max_threads = max(1, int(max_threads))
        self.cores = max(self.max_threads, usable_cores())
        self.threads = self.max_threads
        self.interval = interval
        self.adaptive = adaptive and self.max_threads > 1 and _cpu_jiffies() is not None
        self.changes = 0
        self.reset()

    def reset(self) -> None:
        """Start a new measuring window (e.g. after data preparation, whose workers are children)."""
        self._mark = (time.monotonic(), time.process_time(), _cpu_jiffies() if self.adaptive else None)

    def busy_elsewhere(self) -> float | None:
        """Cores' worth of CPU time other processes used on our cores since the last window."""
        wall0, own0, jiffies0 = self._mark
        jiffies = _cpu_jiffies()
        wall, own = time.monotonic() - wall0, time.process_time() - own0
        if jiffies is None or jiffies0 is None or wall <= 0:
            return None
        busy = (jiffies - jiffies0) / _CLK_TCK
        return max(0.0, busy / wall - own / wall)

    def update(self) -> int:
        """Re-check (at most every ``interval`` seconds) and return the thread count in use."""
        if not self.adaptive or time.monotonic() - self._mark[0] < self.interval:
            return self.threads
        others = self.busy_elsewhere()
        self.reset()
        if others is None:
            return self.threads
        # Free cores of all usable ones: DDP siblings on this machine count as others too.
        free = self.cores - int(others + (1.0 - self.TAKEN))
        threads = min(self.max_threads, max(1, free))
        if threads != self.threads:
            import torch

            torch.set_num_threads(threads)
            log.info("other processes use %.1f cores: %d -> %d threads", others, self.threads, threads)
            self.threads, self.changes = threads, self.changes + 1
        return self.threads


_CLK_TCK = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def _cpu_jiffies() -> int | None:
    """Busy jiffies (user, nice, system, irq, softirq, steal) summed over this process's cores."""
    try:
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu") and not ln.startswith("cpu ")]
    except (AttributeError, OSError):
        return None
    total = 0
    for fields in lines:
        if fields[0] in mine and len(fields) >= 9:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
            total += user + nice + system + irq + softirq + steal
    return total
