"""Shared helpers for the benchmarks: machine description, timing, workers, markdown tables.

Every contestant runs in its own Python process (``--worker NAME``): PyTorch and TensorFlow
each bring their own thread pools and allocators, and one must not slow the other. The parent
starts the workers one after the other, reads one JSON line from each, takes medians and
computes every ratio from the numbers of this one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH-RESULT "
CATS_DOGS = Path(os.environ.get("CONVLENS_SHARED", REPO.parent / "shared")) / "datasets" / "cats_and_dogs_filtered"


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cores() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _version(module: str) -> str:
    """A package's version without importing it (importing TensorFlow takes seconds)."""
    from importlib import metadata

    names = {"tensorflow": ("tensorflow-cpu", "tensorflow"), "torch": ("torch",), "keras": ("keras",),
             "onnxruntime": ("onnxruntime",), "kornia": ("kornia",)}.get(module, (module,))
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def machine_lines() -> list[str]:
    """A short description of the machine and the software versions, as markdown bullet lines."""
    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    try:
        from convlens.runtime import cpu_supports_bf16

        bf16 = "yes" if cpu_supports_bf16() else "no"
    except Exception as e:  # the description must never stop a benchmark
        bf16 = f"unknown ({type(e).__name__})"
    load = ""
    if hasattr(os, "getloadavg"):
        load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        f"- CPU: {cpu_model()}, {cores()} usable cores (of {os.cpu_count()}); ISA: {', '.join(isa) or 'n/a'}",
        f"- native bf16 (AVX512-BF16/AMX): {bf16}; load average at start: {load or 'n/a'}",
        f"- Python {platform.python_version()}, torch {_version('torch')}, TensorFlow {_version('tensorflow')}, "
        f"Keras {_version('keras')}, onnxruntime {_version('onnxruntime')}, kornia {_version('kornia')}",
        f"- OS: {platform.platform()}",
    ]


# ----------------------------------------------------------------------------- timing
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """``warmup`` untimed calls, then the seconds of ``repeats`` timed calls."""
    for _ in range(warmup):
        fn()
    return [timed(fn) for _ in range(repeats)]


# ----------------------------------------------------------------------------- workers
def emit(result: dict[str, Any]) -> None:
    """Worker side: print one machine-readable result line."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def onednn_times(log: str) -> dict[str, float]:
    """Milliseconds of oneDNN primitive execution in ``log``, summed by ``kind/propagation``.

    ``log`` is a process's stdout with ``ONEDNN_VERBOSE=1`` (PyTorch and TensorFlow both honour
    it): one line per primitive run, ``...,exec,cpu,KIND,IMPLEMENTATION,PROPAGATION,...,MS``.
    Keys look like ``convolution/backward_weights`` or ``pooling/forward_training``.
    """
    totals: dict[str, float] = {}
    for line in log.splitlines():
        if not line.startswith("onednn_verbose,"):
            continue
        parts = line.split(",")
        if "exec" not in parts:
            continue
        i = parts.index("exec")
        try:
            ms = float(parts[-1])
            key = f"{parts[i + 2]}/{parts[i + 4]}"
        except (ValueError, IndexError):  # a truncated line or another message of the same prefix
            continue
        totals[key] = totals.get(key, 0.0) + ms
    return totals


def run_worker(script: str | Path, name: str, args: Sequence[str], timeout: float | None = None,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python SCRIPT --worker NAME ARGS`` and return its result (or ``{"error": ...}``).

    With ``ONEDNN_VERBOSE=1`` in ``env`` the result also holds ``"onednn_ms"``
    (:func:`onednn_times` of the worker's output).
    """
    cmd = [sys.executable, str(script), "--worker", name, *args]
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    src = str(REPO / "src")
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (src, full_env.get("PYTHONPATH", "")) if p)
    print(f"  running {name} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            if full_env.get("ONEDNN_VERBOSE", "0") not in ("", "0"):
                result["onednn_ms"] = onednn_times(proc.stdout)
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


BUSY_LOOP = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_load(n: int, max_seconds: float = 900.0) -> Iterator[None]:
    """``n`` busy-loop processes (one busy core each) while the block runs.

    Each loop also stops by itself after ``max_seconds``, so nothing keeps spinning if the
    benchmark dies. ``n = 0`` is the idle machine.
    """
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=max_seconds)])
             for _ in range(max(0, n))]
    try:
        time.sleep(0.5 if procs else 0.0)  # let them start spinning before anything is timed
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_idle_and_busy(script: str | Path, name: str, args: Sequence[str], busy: int,
                      timeout: float | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`run_worker` on the idle machine; with ``busy`` > 0 also under that many busy
    loops (the busy run's result under the key ``"busy"``)."""
    result = run_worker(script, name, args, timeout=timeout, env=env)
    if busy > 0 and "error" not in result:
        with busy_load(busy):
            result["busy"] = run_worker(script, name, args, timeout=timeout, env=env)
    return result


def add_busy_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="also run every contestant with N busy-loop processes keeping N cores busy")


def have(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def base_parser(description: str, repeats: int = 5) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=repeats, help="timed repeats per figure (median is reported)")
    p.add_argument("--threads", type=int, default=0, help="threads per framework (0 = every usable core)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these contestants")
    return p


def worker_args(argv: Sequence[str] | None) -> list[str]:
    """The parent's arguments minus ``--only NAME ...``: what every worker gets."""
    out, skipping = [], False
    for a in list(sys.argv[1:] if argv is None else argv):
        if a == "--only":
            skipping = True
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


def threads_of(args: argparse.Namespace) -> int:
    return args.threads if args.threads > 0 else cores()


# ----------------------------------------------------------------------------- tables
def fmt(v: float | None, digits: int = 1) -> str:
    if v is None or v != v:  # None or NaN
        return "-"
    return f"{v:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def report(title: str, command: str, body: str, notes: Sequence[str] = ()) -> str:
    """The whole markdown report: title, machine, command, table, notes."""
    parts = [f"### {title}", "", *machine_lines(), f"- command: `{command}`", "", body]
    if notes:
        parts += ["", *[f"- {n}" for n in notes]]
    return "\n".join(parts)


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], Path.cwd())
    return " ".join(["python", rel, *sys.argv[1:]])


# ----------------------------------------------------------------------------- models and data
def random_batch(n: int, size: int, seed: int = 0) -> tuple[Any, Any]:
    """``n`` random uint8 images ``size x size x 3`` and balanced 0/1 labels (numpy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = (np.arange(n) % 2).astype(np.int64)
    rng.shuffle(y)
    return x, y


def keras_tutorial_model(size: int, augment: bool = False) -> Any:
    """The tutorial's Keras model (Conv 16/32/64/128 + MaxPool, GAP, Dense(1, sigmoid)),
    optionally with its RandomFlip + RandomRotation(0.1) augmentation in front."""
    import keras
    from keras import layers

    blocks: list[Any] = [keras.Input((size, size, 3))]
    if augment:
        blocks += [layers.RandomFlip("horizontal"), layers.RandomRotation(0.1)]
    for filters in (16, 32, 64):
        blocks += [layers.Conv2D(filters, 3, activation="relu", padding="same"), layers.MaxPooling2D(2)]
    blocks += [layers.Conv2D(128, 3, activation="relu", padding="same"), layers.GlobalAveragePooling2D(),
               layers.Dense(1, activation="sigmoid", dtype="float32")]
    return keras.Sequential(blocks)


def keras_resnet8(size: int, widths: tuple[int, ...] = (48, 96, 192), stem: int = 32) -> Any:
    """convlens's ``resnet8`` written in Keras: 3x3/2 conv-BN-ReLU stem, three stride-2 basic
    blocks (conv-BN-ReLU, conv-BN, + 1x1/2 conv-BN shortcut, ReLU), GAP, Dense(1, sigmoid)."""
    import keras
    from keras import layers

    def conv_bn(x: Any, filters: int, kernel: int, stride: int) -> Any:
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
        return layers.BatchNormalization()(x)

    inputs = keras.Input((size, size, 3))
    x = layers.ReLU()(conv_bn(inputs, stem, 3, 2))
    for w in widths:
        y = layers.ReLU()(conv_bn(x, w, 3, 2))
        y = conv_bn(y, w, 3, 1)
        x = layers.ReLU()(layers.Add()([y, conv_bn(x, w, 1, 2)]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid", dtype="float32")(x))


def keras_vgg10(size: int, widths: tuple[int, ...] = (32, 64, 128, 256), stem: int = 32) -> Any:
    """convlens's ``vgg10`` (the from-scratch default) written in Keras: 3x3/2 conv-BN-ReLU stem,
    four stages of two 3x3 conv-BN-ReLU with a 2x2 max pool after the first three, GAP,
    Dense(1, sigmoid)."""
    import keras
    from keras import layers

    def conv_bn_relu(x: Any, filters: int, stride: int = 1) -> Any:
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        return layers.ReLU()(layers.BatchNormalization()(x))

    inputs = keras.Input((size, size, 3))
    x = conv_bn_relu(inputs, stem, 2)
    for i, w in enumerate(widths):
        x = conv_bn_relu(conv_bn_relu(x, w), w)
        if i < len(widths) - 1:
            x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid", dtype="float32")(x))


def setup_tensorflow(threads: int, precision: str = "fp32") -> Any:
    """Import TensorFlow with ``threads`` intra-op threads and the Keras precision policy."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    keras.utils.set_random_seed(0)
    return tf
