"""Engine benchmark: torch fp32 vs onnxruntime (``--engine``) on a real bundle, as the verbs run it.

For one bundle (the default model: ``convlens train DIR``), on the same images, alternating
the engines so a busy machine slows both alike (medians of ``--repeats``):

* ``export``: the onnx engine's one-off cost, a verified export into a fresh cache folder
  (seconds), and each engine's load time once cached;
* ``throughput``: ``Classifier.predict_proba`` on uint8 images at ``--batch-size`` (img/s; what
  ``predict``, ``serve`` and the API run after decoding) and batch-1 latency (ms), each engine in
  its own process, alternating;
* ``agreement``: the largest probability (and novelty) difference on real photos;
* ``evaluate``: ``convlens.evaluate(bundle, --data)`` wall seconds per engine (decoding included,
  the same for both), with the onnx engine's export already cached;
* ``predict-cli``: ``convlens predict`` on ``--cli-images`` photos in a fresh process: torch,
  onnx with an empty cache (export included) and onnx cached.

    python benchmarks/engine_speed.py --model runs/train/model.convlens \
        --data ../shared/datasets/cats_and_dogs_filtered/validation
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENGINES = ("torch", "onnx")


def parse_args(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a .convlens bundle")
    p.add_argument("--data", required=True, help="labelled folder (class sub-folders) of real photos")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="batches per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=20, help="batch-1 calls per latency repeat")
    p.add_argument("--evaluate-repeats", type=int, default=2)
    p.add_argument("--cli-images", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=["evaluate", "predict-cli"])
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, choices=ENGINES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_avg() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def photos(folder: Path) -> list[Path]:
    from convlens.data.scan import list_images

    return list_images(folder)[0]


def export_and_load(bundle: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cold export seconds, cached load seconds per engine, and the loaded classifiers."""
    import convlens
    from convlens.infer import engine
    from convlens.infer.bundle import read_meta

    t = time.perf_counter()
    engine.cached_onnx(bundle, read_meta(bundle))
    out: dict[str, Any] = {"export_s": round(time.perf_counter() - t, 2)}
    clfs = {}
    for e in ENGINES:
        t = time.perf_counter()
        clfs[e] = convlens.load(bundle, device="cpu", engine=e)
        out[f"load_{e}_s"] = round(time.perf_counter() - t, 2)
    return out, clfs


def throughput_worker(bundle: Path, engine: str, files: list[Path], a: Any) -> dict[str, float]:
    """One engine in this process: img/s at the batch size and batch-1 ms after a warm-up."""
    import numpy as np

    import convlens

    clf = convlens.load(bundle, device="cpu", engine=engine)
    images = np.stack([clf.preprocessing.load(p) for p in files])
    n = a.batch_size
    clf.predict_proba(images[:n])  # warm-up: first calls allocate and pick kernels
    clf.predict_proba(images[:1])
    t = time.perf_counter()
    for b in range(a.batches):
        clf.predict_proba(images[(b * n) % (len(images) - n):][:n])
    rate = a.batches * n / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(a.calls):
        clf.predict_proba(images[i % len(images)][None])
    return {"img_per_s": rate, "batch1_ms": (time.perf_counter() - t) / a.calls * 1000}


def throughput(bundle: Path, files: list[Path], a: Any) -> dict[str, Any]:
    """Each engine in its own process (thread pools must not meet), alternating, ``--repeats``
    times; medians."""
    runs: dict[str, list[dict[str, float]]] = {e: [] for e in ENGINES}
    listing = json.dumps([str(p) for p in files])
    for _ in range(a.repeats):
        for e in ENGINES:
            out = subprocess.run([sys.executable, __file__, "--model", str(bundle), "--data", str(a.data),
                                  "--batch-size", str(a.batch_size), "--batches", str(a.batches),
                                  "--calls", str(a.calls), "--worker", e], input=listing, text=True,
                                 check=True, capture_output=True, env=os.environ).stdout
            runs[e].append(json.loads(out.strip().splitlines()[-1]))
    return {e: {"img_per_s": round(statistics.median(r["img_per_s"] for r in runs[e]), 1),
                "img_per_s_all": [round(r["img_per_s"]) for r in runs[e]],
                "batch1_ms": round(statistics.median(r["batch1_ms"] for r in runs[e]), 1)} for e in ENGINES}


def agreement(clfs: dict[str, Any], images: Any) -> dict[str, Any]:
    import numpy as np

    (pt, nt), (po, no) = (clfs[e].proba_and_novelty(images) for e in ENGINES)
    out = {"images": len(images), "max_prob_diff": float(np.abs(pt - po).max()),
           "same_decisions": bool((clfs["torch"].decide(pt) == clfs["onnx"].decide(po)).all())}
    if nt is not None and no is not None:
        out["max_novelty_diff"] = float(np.abs(nt - no).max())
    return out


def evaluate_times(bundle: Path, data: Path, repeats: int) -> dict[str, Any]:
    import convlens

    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    acc = {}
    with tempfile.TemporaryDirectory(prefix="convlens-bench-eval-") as tmp:
        for r in range(repeats):
            for e in ENGINES:
                t = time.perf_counter()
                ev = convlens.evaluate(bundle, data, out=Path(tmp) / f"{e}{r}", engine=e, device="cpu")
                times[e].append(time.perf_counter() - t)
                acc[e] = ev.metrics["accuracy"]
                images = ev.images
    return {"images": images, **{e: {"seconds": round(statistics.median(times[e]), 1), "accuracy": acc[e]}
                                 for e in ENGINES}}


def predict_cli(bundle: Path, files: list[Path]) -> dict[str, float]:
    """Wall seconds of ``convlens predict`` in a fresh process: torch, onnx cold, onnx cached."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="convlens-bench-cache-") as cache:
        env = {**os.environ, "CONVLENS_CACHE_DIR": cache}
        for label, engine in (("torch", "torch"), ("onnx_cold", "onnx"), ("onnx_cached", "onnx")):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "convlens", "predict", str(bundle), *map(str, files),
                            "--engine", engine], env=env, check=True, capture_output=True)
            out[label] = round(time.perf_counter() - t, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from convlens import runtime

    a = parse_args(argv)
    bundle, data = Path(a.model), Path(a.data)
    runtime.tune_allocator()
    threads = runtime.configure_threads()
    if a.worker:  # one engine's throughput, the image list on stdin, one JSON line out
        print(json.dumps(throughput_worker(bundle, a.worker, [Path(p) for p in json.loads(sys.stdin.read())], a)))
        return 0
    res: dict[str, Any] = {"model": bundle.name, "threads": threads, "load_before": load_avg()}
    with tempfile.TemporaryDirectory(prefix="convlens-bench-cache-") as cache:
        os.environ["CONVLENS_CACHE_DIR"] = cache  # a cold cache: the export is timed
        res["export"], clfs = export_and_load(bundle)
        print(f"export (cold) {res['export']}", flush=True)
        files = photos(data)
        sample = files[::max(1, len(files) // (a.batch_size * 2))][:a.batch_size * 2]
        images = np.stack([clfs["torch"].preprocessing.load(p) for p in sample])
        res["throughput"] = throughput(bundle, sample, a)
        print(f"throughput {res['throughput']}", flush=True)
        res["agreement"] = agreement(clfs, images)
        print(f"agreement {res['agreement']}", flush=True)
        if "evaluate" not in a.skip:
            res["evaluate"] = evaluate_times(bundle, data, a.evaluate_repeats)
            print(f"evaluate {res['evaluate']}", flush=True)
    if "predict-cli" not in a.skip:
        res["predict_cli"] = predict_cli(bundle, files[:a.cli_images])
        print(f"predict-cli {res['predict_cli']}", flush=True)
    res["load_after"] = load_avg()
    print(json.dumps(res, indent=1))
    if a.json:
        from convlens.files import write_json

        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
