"""Benchmark 2: inference throughput (batch 32) and latency (batch 1) of the tutorial's CNN.

Contestants, each in its own process, on the same random 300 px images (inputs prepared
beforehand in each framework's layout; preprocessing is not timed):

* ``convlens-torch``: ``Classifier.predict_proba`` on the uint8 images with ``TorchBackend``'s
  default ``precision="auto"`` (what ``convlens predict``, ``serve`` and the Python API run after
  decoding: normalisation, bf16 autocast on CPUs with native bf16, fp32 elsewhere;
  channels_last, inference mode). Its normalisation is timed; the other contestants get their
  float32 input prepared beforehand;
* ``convlens-fp32``: the same with ``--precision fp32``;
* ``torch-compile``: ``torch.compile`` of the fp32 model (compile time reported separately);
* ``onnx-fp32`` / ``onnx-int8``: ``convlens export`` output (fp32, and static int8 QDQ calibrated
  on real photos when ../shared/datasets is present) through ``OnnxBackend`` (onnxruntime);
* ``keras-predict`` / ``keras-bf16-predict``: Keras 3 ``model.predict`` (fp32 / mixed_bfloat16);
* ``keras-call``: calling the Keras model directly, Keras's advice for small batches.

    python benchmarks/inference_speed.py
    python benchmarks/inference_speed.py --repeats 1 --image-size 64 --batches 1 --calls 3 \
        --only convlens-torch onnx-fp32 onnx-int8 keras-predict          # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CONTESTANTS = ["convlens-torch", "convlens-fp32", "torch-compile", "onnx-fp32", "onnx-int8",
               "keras-predict", "keras-bf16-predict", "keras-call"]
BASELINE = "keras-predict"


def parse_args(argv: list[str] | None = None) -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32, help="throughput batch size")
    p.add_argument("--batches", type=int, default=5, help="batches per timed throughput repeat")
    p.add_argument("--calls", type=int, default=20, help="batch-1 calls per timed latency repeat")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- preparation
def prepare(args: Any) -> dict[str, Any]:
    """Write the bundle, its fp32 ONNX export and the int8 export into ``args.workdir``."""
    import shutil

    import torch
    from PIL import Image

    from convlens.data.preprocess import Preprocessing
    from convlens.export.onnx import export_onnx, quantize_int8
    from convlens.infer.bundle import BundleMeta, save_bundle
    from convlens.models import create

    work = Path(args.workdir)
    torch.manual_seed(0)
    model = create("tutorial_cnn", 2, 3).eval()
    prep = Preprocessing(size=(args.image_size, args.image_size), channels=3, scale=1.0)  # the tutorial's 0-255
    meta = BundleMeta(arch=model.arch, classes=["cats", "dogs"], preprocessing=prep,
                      output_activation=model.output_activation)
    save_bundle(work / "model.convlens", model, meta)
    res, fp32 = export_onnx(work / "model.convlens", work / "model.onnx")
    calib = work / "calibration"
    calib.mkdir(exist_ok=True)
    real = sorted((common.CATS_DOGS / "validation" / "cats").glob("*.jpg"))[:16] + \
        sorted((common.CATS_DOGS / "validation" / "dogs").glob("*.jpg"))[:16]
    if real:
        for p in real:
            shutil.copy(p, calib / p.name)  # a scratch copy; the originals are only read
    else:
        x, _ = common.random_batch(32, args.image_size, seed=1)
        for i, img in enumerate(x):
            Image.fromarray(img).save(calib / f"noise_{i:02d}.png")
    q, _ = quantize_int8(fp32, meta, calib, work / "model.int8.onnx")
    return {"onnx_exporter": res.exporter, "int8_max_abs_diff": q.max_abs_diff,
            "calibration": "real photos" if real else "random images", "fp32_bytes": res.size_bytes,
            "int8_bytes": q.size_bytes, "calibration_files": len(real) or 32}


# ----------------------------------------------------------------------------- workers
def _inputs(args: Any) -> tuple[Any, Any]:
    """(batch, single) float32 in NCHW (the bundle's normalisation: 0-255, the tutorial's scale)."""
    import numpy as np

    x, _ = common.random_batch(args.batch_size, args.image_size, seed=0)
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
    return nchw, nchw[:1].copy()


def _measure(args: Any, run: Any, batch: Any, single: Any) -> dict[str, Any]:
    """Throughput over ``args.batches`` batches and mean batch-1 latency, per repeat."""
    run(batch)
    run(single)  # warm-up: allocator, kernels, tracing
    throughput = [args.batches * len(batch) / common.timed(lambda: [run(batch) for _ in range(args.batches)])
                  for _ in range(args.repeats)]
    latency = [common.timed(lambda: [run(single) for _ in range(args.calls)]) / args.calls * 1000
               for _ in range(args.repeats)]
    return {"img_per_s": throughput, "latency_ms": latency}


def torch_worker(args: Any, name: str) -> dict[str, Any]:
    import time

    from convlens import runtime

    runtime.tune_allocator()
    threads = runtime.configure_threads(common.threads_of(args))
    import torch

    from convlens.infer import Classifier, TorchBackend
    from convlens.infer.bundle import load_model

    model, meta = load_model(Path(args.workdir) / "model.convlens", "cpu")
    backend = TorchBackend(model, "cpu", "fp32" if name != "convlens-torch" else "auto")
    batch, single = _inputs(args)
    notes = f"{threads} threads, channels_last, {backend.precision}"
    if name in ("convlens-torch", "convlens-fp32"):  # from the decoded uint8 images, as users run it
        run = Classifier(meta, backend).predict_proba
        batch = common.random_batch(args.batch_size, args.image_size, seed=0)[0]  # _inputs' pixels
        single = batch[:1].copy()
        notes += ", from uint8 images (normalisation timed)"
    else:  # torch-compile
        compiled = torch.compile(backend.model)
        t = time.perf_counter()

        def run(x: Any) -> Any:
            with torch.inference_mode():
                return compiled(backend.tensor(x)).float().numpy()
        run(batch)
        run(batch[:1])
        notes += f", inductor; compiling took {time.perf_counter() - t:.1f} s (excluded)"
    return {**_measure(args, run, batch, single), "notes": notes}


def onnx_worker(args: Any, name: str) -> dict[str, Any]:
    from convlens.infer.onnx_backend import OnnxBackend

    threads = common.threads_of(args)
    path = Path(args.workdir) / ("model.int8.onnx" if name == "onnx-int8" else "model.onnx")
    backend = OnnxBackend(path, threads=threads)
    batch, single = _inputs(args)
    return {**_measure(args, backend.logits, batch, single), "notes": f"onnxruntime, {threads} threads"}


def keras_worker(args: Any, name: str) -> dict[str, Any]:
    import numpy as np

    tf = common.setup_tensorflow(common.threads_of(args), "bf16" if "bf16" in name else "fp32")
    model = common.keras_tutorial_model(args.image_size)
    batch, single = _inputs(args)
    batch, single = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (batch, single))
    if name == "keras-call":
        def run(x: Any) -> Any:
            return model(tf.constant(x), training=False).numpy()
    else:
        def run(x: Any) -> Any:
            return model.predict(x, batch_size=args.batch_size, verbose=0)
    return {**_measure(args, run, batch, single), "notes": f"{common.threads_of(args)} threads"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.worker == "prepare":
            common.emit(prepare(args))
        elif args.worker.startswith("keras"):
            common.emit(keras_worker(args, args.worker))
        elif args.worker.startswith("onnx"):
            common.emit(onnx_worker(args, args.worker))
        else:
            common.emit(torch_worker(args, args.worker))
        return 0
    names = args.only or CONTESTANTS
    with tempfile.TemporaryDirectory(prefix="convlens-bench-") as work:
        forwarded = [*common.worker_args(argv), "--workdir", work]
        prep = common.run_worker(__file__, "prepare", forwarded)
        results: dict[str, dict[str, Any]] = {}
        for name in names:
            if name.startswith("keras") and not common.have("tensorflow"):
                results[name] = {"error": "TensorFlow is not installed: pip install -e '.[bench]'"}
            elif "error" in prep and not name.startswith("keras"):
                results[name] = {"error": f"preparing the bundle failed: {prep['error']}"}
            else:
                results[name] = common.run_worker(__file__, name, forwarded)
    tput = {n: common.median(r["img_per_s"]) for n, r in results.items() if "img_per_s" in r}
    lat = {n: common.median(r["latency_ms"]) for n, r in results.items() if "latency_ms" in r}
    rows = []
    for name in names:
        r = results[name]
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", r["error"]])
            continue
        rows.append([
            name, common.fmt(tput[name]),
            f"{tput[name] / tput[BASELINE]:.2f}x" if BASELINE in tput else "-",
            common.fmt(lat[name], 2),
            f"{lat[BASELINE] / lat[name]:.2f}x" if BASELINE in lat else "-", r["notes"],
        ])
    body = common.table(["contestant", f"batch {args.batch_size} img/s (median)", "vs Keras predict",
                         "batch 1 latency ms (median)", "speed-up vs Keras predict", "notes"], rows)
    notes = [f"tutorial_cnn with random weights, {args.image_size} px; throughput over {args.batches} batches "
             f"and latency as the mean of {args.calls} batch-1 calls, each the median of {args.repeats} repeats"]
    if "error" not in prep:
        notes.append(f"ONNX exporter: {prep['onnx_exporter']}; int8 calibrated on {prep['calibration_files']} "
                     f"{prep['calibration']}, max |int8 - fp32| logit {prep['int8_max_abs_diff']:.3f}; "
                     f"sizes {prep['fp32_bytes'] / 1e3:.0f} kB / {prep['int8_bytes'] / 1e3:.0f} kB")
    keras = [n for n in ("keras-predict", "keras-bf16-predict", "keras-call") if n in tput]
    ours = [n for n in ("convlens-torch", "convlens-fp32", "torch-compile", "onnx-fp32", "onnx-int8") if n in tput]
    if keras and ours:
        best_ours = max(ours, key=lambda n: tput[n])
        best_keras = max(keras, key=lambda n: tput[n])
        ratio = tput[best_ours] / tput[best_keras]
        notes.append(f"goal: convlens inference >= 2x Keras (best of each, throughput): {best_ours} / {best_keras} = "
                     f"{ratio:.2f}x -> {'met' if ratio >= 2 else 'NOT met'}")
    if "convlens-torch" in tput and "keras-bf16-predict" in tput:
        ratio = tput["convlens-torch"] / tput["keras-bf16-predict"]
        notes.append(f"goal: the path users run >= 2x Keras mixed_bfloat16 predict: {ratio:.2f}x -> "
                     f"{'met' if ratio >= 2 else 'NOT met'}")
    print(common.report("Inference throughput and latency (benchmark 2)", common.command_line(), body, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
