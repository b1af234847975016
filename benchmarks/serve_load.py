"""Load and abuse test for ``convlens serve`` (a benchmark, not a unit test).

Starts ``convlens serve`` on 127.0.0.1 in a subprocess, then

1. sends ``--requests`` (default 1000) ``POST /predict`` uploads of a real photo at
   ``--concurrency`` (default 8) and reports latency percentiles, throughput and the error
   count (goal: zero errors);
2. sends ``--malformed`` (default 120, at least 100) bad uploads: random bytes, truncated
   JPEGs, huge dimensions (pixel bombs), wrong content types, empty bodies, oversized bodies,
   corrupt streams and missing fields; each must get a 4xx (never a 5xx or a dropped
   connection);
3. checks that ``/health`` still answers.

Exit code 0 only when all three hold. Traffic goes to 127.0.0.1 only; every loop is bounded in
count and time. Example (a quick smoke run)::

    python benchmarks/serve_load.py --requests 50 --malformed 100
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO.parent / "shared" / "datasets" / "cats_and_dogs_filtered" / "validation" / "cats" / "cat.2000.jpg"


# ----------------------------------------------------------------------------- set-up
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_bundle(folder: Path) -> Path:
    """A freshly initialised two-class ``tutorial_cnn`` at 150 px (speed, not accuracy, is measured)."""
    import torch

    from convlens.data.preprocess import Preprocessing
    from convlens.infer.bundle import BundleMeta, save_bundle
    from convlens.models import create

    torch.manual_seed(0)
    model = create("tutorial_cnn", 2)
    meta = BundleMeta(arch=model.arch, classes=["cats", "dogs"], preprocessing=Preprocessing(size=(150, 150)),
                      output_activation=model.output_activation)
    return save_bundle(folder / "model.convlens", model, meta)


def photo_bytes(path: str | None) -> tuple[bytes, str]:
    p = Path(path) if path else PHOTO
    if p.is_file():
        return p.read_bytes(), p.name
    # No shared photos: a synthetic 640x480 JPEG of the same order of size.
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).resize((640, 480), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "synthetic.jpg"


class Server:
    """``python -m convlens serve`` as a child process; stopped (by its own pid) on exit."""

    def __init__(self, model: Path, port: int, max_upload_mb: float, workers: int, engine: str = "auto") -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "convlens", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--max-upload-mb", str(max_upload_mb), "--workers", str(workers), "--engine", engine]
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited with {self.proc.returncode}:\n{self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise SystemExit("server did not answer /health within 120 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------- load
def load_test(url: str, data: bytes, name: str, n: int, concurrency: int, max_seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + max_seconds
    counter = iter(range(n))
    lat: list[float] = []
    server_ms: list[float] = []
    errors: Counter[str] = Counter()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in counter:  # shared iterator: each index is taken by exactly one thread
                if time.monotonic() > deadline:
                    errors["not sent (time limit)"] += 1
                    continue
                t0 = time.perf_counter()
                try:
                    r = c.post("/predict", files={"file": (name, data, "image/jpeg")})
                except httpx.HTTPError as e:
                    errors[type(e).__name__] += 1
                    continue
                lat.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    errors[f"HTTP {r.status_code}"] += 1
                else:
                    server_ms.append(r.json()["latency_ms"])

    # One warm-up request (first-call costs are not steady-state latency).
    httpx.post(url + "/predict", files={"file": (name, data, "image/jpeg")}, timeout=60)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    a = np.asarray(lat) if lat else np.zeros(1)
    return {
        "requests": n, "concurrency": concurrency, "ok": len(server_ms), "errors": sum(errors.values()),
        "error_kinds": dict(errors), "wall_s": round(wall, 2), "throughput_rps": round(len(lat) / wall, 1),
        "latency_ms": {f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 90, 95, 99)}
        | {"max": round(float(a.max()), 1), "mean": round(float(a.mean()), 1)},
        "server_latency_ms_p50": round(float(np.median(server_ms)), 1) if server_ms else None,
    }


# ----------------------------------------------------------------------------- malformed
def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb(w: int, h: int) -> bytes:
    """A tiny valid PNG whose header claims w x h pixels."""
    d = bytearray(_png(8, 8, 0))
    d[16:24] = struct.pack(">II", w, h)
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])) & 0xFFFFFFFF)
    return bytes(d)


def malformed_cases(photo: bytes, count: int, limit_bytes: int, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """``count`` (kind, httpx.post kwargs) pairs cycling through every kind of bad upload."""
    rng = random.Random(seed)

    def upload(data: bytes, name: str = "x.jpg", ctype: str = "image/jpeg") -> dict[str, Any]:
        return {"files": {"file": (name, data, ctype)}}

    makers = [
        ("random bytes", lambda i: upload(rng.randbytes(rng.randint(1, 200_000)))),
        ("truncated jpeg", lambda i: upload(photo[: rng.randint(10, max(11, len(photo) - 200))])),
        ("huge dimensions", lambda i: upload(_bomb(rng.randint(20_000, 65_000), rng.randint(20_000, 65_000)), "bomb.png", "image/png")),
        ("wrong content type (raw jpeg)", lambda i: {"content": photo, "headers": {"content-type": "image/jpeg"}}),
        ("wrong content type (json)", lambda i: {"json": {"file": "cat.jpg"}}),
        ("wrong content type (text part)", lambda i: upload(b"just some text " * rng.randint(1, 50), "a.txt", "text/plain")),
        ("empty file", lambda i: upload(b"")),
        ("empty body", lambda i: {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ("oversized body", lambda i: upload(b"\xff\xd8" + rng.randbytes(1024) * (limit_bytes // 1024 + 2))),
        ("corrupt png stream", lambda i: upload(_corrupt_png(i), "c.png", "image/png")),
        ("missing file field", lambda i: {"files": {"image": ("x.jpg", photo, "image/jpeg")}}),
        ("broken multipart", lambda i: {"content": b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab",
                                        "headers": {"content-type": "multipart/form-data; boundary=x"}}),
    ]
    return [(makers[i % len(makers)][0], makers[i % len(makers)][1](i)) for i in range(count)]


def _corrupt_png(seed: int) -> bytes:
    d = bytearray(_png(64, 48, seed))
    d[41:45] = b"\xff\xff\xff\xff"  # the zlib header of the pixel data
    return bytes(d)


def abuse_test(url: str, cases: list[tuple[str, dict[str, Any]]], max_seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + max_seconds
    statuses: dict[str, Counter[str]] = {}
    bad: list[str] = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i, (kind, kwargs) in enumerate(cases):
            if time.monotonic() > deadline:
                bad.append(f"{kind}: not sent (time limit)")
                continue
            route = "/explain" if i % 3 == 0 else "/predict"
            try:
                r = c.post(route, **kwargs)
                code = str(r.status_code)
                if not 400 <= r.status_code < 500 or "message" not in r.json():
                    bad.append(f"{kind} -> {route}: {r.status_code} {r.text[:120]}")
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                code = type(e).__name__
                bad.append(f"{kind} -> {route}: {code}")
            statuses.setdefault(kind, Counter())[code] += 1
    return {"sent": len(cases), "not_4xx": len(bad), "failures": bad[:20],
            "by_kind": {k: dict(v) for k, v in statuses.items()}}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bundle or .onnx to serve (default: a fresh tutorial_cnn at 150 px)")
    ap.add_argument("--photo", default=None, help=f"image to upload (default: {PHOTO.name} from ../shared)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--malformed", type=int, default=120, help="bad uploads to send (at least 100)")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes")
    ap.add_argument("--engine", default="auto", help="the server's --engine (auto, torch or onnx)")
    ap.add_argument("--max-upload-mb", type=float, default=2.0)
    ap.add_argument("--max-seconds", type=float, default=600, help="time cap for each phase")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    if a.malformed < 100:
        ap.error(f"--malformed must be at least 100. Received: {a.malformed}")
    data, name = photo_bytes(a.photo)
    with tempfile.TemporaryDirectory(prefix="convlens-bench-") as tmp:
        model = Path(a.model) if a.model else tiny_bundle(Path(tmp))
        port = free_port()
        print(f"serving {model.name} on 127.0.0.1:{port} ({a.workers} worker(s)); uploading {name} "
              f"({len(data) / 1024:.0f} kB)", flush=True)
        with Server(model, port, a.max_upload_mb, a.workers, a.engine) as server:
            load = load_test(server.url, data, name, a.requests, a.concurrency, a.max_seconds)
            lat = load["latency_ms"]
            print(f"load: {load['ok']}/{a.requests} ok, {load['errors']} errors {load['error_kinds'] or ''}; "
                  f"{load['throughput_rps']} req/s at concurrency {a.concurrency}; latency ms p50 {lat['p50']} "
                  f"p90 {lat['p90']} p95 {lat['p95']} p99 {lat['p99']} max {lat['max']} "
                  f"(server-side p50 {load['server_latency_ms_p50']})", flush=True)
            cases = malformed_cases(data, a.malformed, int(a.max_upload_mb * 1024 * 1024))
            abuse = abuse_test(server.url, cases, a.max_seconds)
            print(f"malformed: {abuse['sent'] - abuse['not_4xx']}/{abuse['sent']} got a 4xx with a JSON message")
            for kind, codes in abuse["by_kind"].items():
                print(f"  {kind:32s} {dict(codes)}")
            for f in abuse["failures"]:
                print(f"  FAILED {f}")
            try:
                health = httpx.get(server.url + "/health", timeout=10)
                healthy = health.status_code == 200 and health.json().get("status") == "ok"
            except httpx.HTTPError:
                healthy = False
            print(f"health after abuse: {'ok' if healthy else 'NOT ANSWERING'}")
    result = {"load": load, "malformed": abuse, "healthy_after": healthy, "model": str(model.name),
              "cpu_count": os.cpu_count()}
    if a.json:
        from convlens.files import write_json

        write_json(a.json, result)
    return 0 if load["errors"] == 0 and abuse["not_4xx"] == 0 and healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
