"""Load and abuse test for ``convlens serve`` (a benchmark, not a unit test).

Starts two ``convlens serve`` processes on 127.0.0.1, one with ``--max-batch 1`` (no batching)
and one with the default micro-batching (or ``--max-batch``/``--max-wait``), both with an API
key that every request sends, then

1. sends ``--requests`` (default 1000) ``POST /predict`` uploads of a real photo to each at
   ``--concurrency`` (default 16), in ``--rounds`` alternating rounds (A B A B ...: on a shared
   machine both settings see the same background load), and reports each one's throughput,
   latency percentiles and errors, the speed-up and the goal of issue 22 (batched >= 2.5x the
   requests/s of unbatched, 0 errors, p99 no worse);
2. in one more batched round (not timed: on a small machine the extra client would slow only
   the batched side), sends ``--malformed`` (default 120, at least 100) bad uploads
   from another client: random bytes, truncated JPEGs, huge dimensions (pixel bombs), wrong
   content types, empty bodies, oversized bodies, corrupt streams and missing fields; each must
   get a 4xx (never a 5xx or a dropped connection) and no good request of that round may fail;
3. checks that ``/health`` still answers, and reads the batch sizes from ``/metrics``.

Exit code 0 only when there were no errors, every bad upload got a 4xx and both servers are
healthy (the speed goal is reported, not enforced: it depends on the machine). Traffic goes to
127.0.0.1 only; every loop is bounded in count and time. Example (a quick smoke run)::

    python benchmarks/serve_load.py --requests 50 --malformed 100
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import threading
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

    def __init__(self, model: Path, port: int, max_upload_mb: float, workers: int, key: str,
                 extra: list[str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "convlens", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--max-upload-mb", str(max_upload_mb), "--workers", str(workers), *extra]
        env = dict(os.environ, CONVLENS_API_KEY=key)  # not on the command line, where ps shows it
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

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

    def cpu_seconds(self) -> float | None:
        """CPU time the server has used so far, its ``--workers`` processes included (Linux /proc;
        None elsewhere)."""
        total, pids = 0.0, [self.proc.pid]
        while pids:
            pid = pids.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                if pid == self.proc.pid:
                    return None
                continue  # a child that has just exited
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            pids += [int(c) for c in children]
        return total

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------- load
class Samples:
    """What the rounds of one setting add up to."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.server_ms: list[float] = []
        self.batch_sizes: list[int] = []
        self.errors: Counter[str] = Counter()
        self.wall = 0.0
        self.sent = 0
        # Server CPU seconds over the requests of the rounds without abuse: on a busy machine the
        # steadier measure of what a request costs (time spent waiting for a core is not in it).
        self.server_cpu = 0.0
        self.cpu_ok = 0

    def summary(self, concurrency: int) -> dict[str, Any]:
        a = np.asarray(self.lat) if self.lat else np.zeros(1)
        ok = len(self.server_ms)
        return {
            "requests": self.sent, "concurrency": concurrency, "ok": ok, "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors), "wall_s": round(self.wall, 2),
            "throughput_rps": round(ok / self.wall, 1) if self.wall else 0.0,
            "latency_ms": {f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 90, 95, 99)}
            | {"max": round(float(a.max()), 1), "mean": round(float(a.mean()), 1)},
            "server_latency_ms_p50": round(float(np.median(self.server_ms)), 1) if self.server_ms else None,
            "mean_batch_size": round(float(np.mean(self.batch_sizes)), 2) if self.batch_sizes else None,
            "server_cpu_ms_per_request": round(1000 * self.server_cpu / self.cpu_ok, 2) if self.cpu_ok else None,
        }


def load_round(url: str, key: str, data: bytes, name: str, n: int, concurrency: int, deadline: float,
               into: Samples) -> None:
    """``n`` uploads from ``concurrency`` keep-alive clients; results added to ``into``."""
    counter = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
            for _ in counter:  # shared iterator: each index is taken by exactly one thread
                if time.monotonic() > deadline:
                    with lock:
                        into.errors["not sent (time limit)"] += 1
                    continue
                t0 = time.perf_counter()
                try:
                    r = c.post("/predict", files={"file": (name, data, "image/jpeg")})
                except httpx.HTTPError as e:
                    with lock:
                        into.errors[type(e).__name__] += 1
                    continue
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    into.lat.append(ms)
                    if r.status_code != 200:
                        into.errors[f"HTTP {r.status_code}"] += 1
                    else:
                        body = r.json()
                        into.server_ms.append(body["latency_ms"])
                        into.batch_sizes.append(body.get("batch_size", 1))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    into.wall += time.perf_counter() - t0
    into.sent += n


def warm_up(url: str, key: str, data: bytes, name: str, concurrency: int) -> None:
    """First-call costs (and the first batches' allocations) are not steady-state latency."""
    scratch = Samples()
    load_round(url, key, data, name, 2 * concurrency, concurrency, time.monotonic() + 120, scratch)


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


def abuse_test(url: str, key: str, cases: list[tuple[str, dict[str, Any]]], max_seconds: float) -> dict[str, Any]:
    """Each bad upload (with a valid key, so it reaches the decoder) must get a 4xx JSON error."""
    deadline = time.monotonic() + max_seconds
    statuses: dict[str, Counter[str]] = {}
    bad: list[str] = []
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
        for i, (kind, kwargs) in enumerate(cases):
            if time.monotonic() > deadline:
                bad.append(f"{kind}: not sent (time limit)")
                continue
            route = "/explain" if i % 3 == 0 else "/predict"
            try:
                if "headers" in kwargs:  # its own content type, and the key
                    kwargs = kwargs | {"headers": kwargs["headers"] | {"Authorization": f"Bearer {key}"}}
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
GOAL_SPEEDUP = 2.5  # issue 22: batched requests/s over --max-batch 1's, at concurrency 16


def compare(servers: dict[str, Server], key: str, data: bytes, name: str, a: argparse.Namespace,
            cases: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Samples], dict[str, Any]]:
    """Alternating rounds of each setting, then one more batched round with the bad uploads sent
    meanwhile: its good requests must all succeed, but it is not timed (on a small machine the
    abuse client's CPU would slow only the batched side)."""
    samples = {label: Samples() for label in servers}
    deadline = time.monotonic() + a.max_seconds
    per_round = max(1, a.requests // a.rounds)
    for server in servers.values():
        warm_up(server.url, key, data, name, a.concurrency)
    for _ in range(a.rounds):
        for label, server in servers.items():
            cpu0, ok0 = server.cpu_seconds(), len(samples[label].server_ms)
            load_round(server.url, key, data, name, per_round, a.concurrency, deadline, samples[label])
            cpu1 = server.cpu_seconds()
            if cpu0 is not None and cpu1 is not None:
                samples[label].server_cpu += cpu1 - cpu0
                samples[label].cpu_ok += len(samples[label].server_ms) - ok0
    abuse: dict[str, Any] = {}
    url = servers["batched"].url
    abuser = threading.Thread(target=lambda: abuse.update(abuse_test(url, key, cases, a.max_seconds)))
    abuser.start()
    during = Samples()
    load_round(url, key, data, name, per_round, a.concurrency, time.monotonic() + a.max_seconds, during)
    abuser.join()
    abuse["good_requests"] = {"sent": during.sent, "ok": len(during.server_ms), "errors": dict(during.errors)}
    return samples, abuse


def batch_histogram(url: str, key: str) -> dict[str, float]:
    """``convlens_batch_size`` count and sum from /metrics (every batch the server ran)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("convlens_batch_size_count", "convlens_batch_size_sum"):
                out[s.name.rsplit("_", 1)[1]] = s.value
    return out


def report(results: dict[str, dict[str, Any]], abuse: dict[str, Any]) -> dict[str, Any]:
    for label, load in results.items():
        lat = load["latency_ms"]
        print(f"{label:9s}: {load['ok']}/{load['requests']} ok, {load['errors']} errors {load['error_kinds'] or ''}; "
              f"{load['throughput_rps']} req/s at concurrency {load['concurrency']}; latency ms p50 {lat['p50']} "
              f"p90 {lat['p90']} p99 {lat['p99']} max {lat['max']} (server-side p50 {load['server_latency_ms_p50']}; "
              f"mean batch {load['mean_batch_size']}; server CPU {load['server_cpu_ms_per_request']} ms/request)",
              flush=True)
    base, fast = results["unbatched"], results["batched"]
    speedup = fast["throughput_rps"] / base["throughput_rps"] if base["throughput_rps"] else 0.0
    goal = {"speedup": round(speedup, 2), "speedup_goal": GOAL_SPEEDUP,
            "p99_ratio": round(fast["latency_ms"]["p99"] / base["latency_ms"]["p99"], 2),
            "met": speedup >= GOAL_SPEEDUP and fast["errors"] == 0 and base["errors"] == 0
            and fast["latency_ms"]["p99"] <= base["latency_ms"]["p99"]}
    print(f"speed-up {goal['speedup']}x (goal {GOAL_SPEEDUP}x), p99 batched/unbatched {goal['p99_ratio']}: "
          f"goal {'met' if goal['met'] else 'NOT met'}")
    good = abuse["good_requests"]
    print(f"malformed (during an extra, untimed batched round): {abuse['sent'] - abuse['not_4xx']}/{abuse['sent']} "
          f"got a 4xx with a JSON message; the round's good requests: {good['ok']}/{good['sent']} ok "
          f"{good['errors'] or ''}")
    for kind, codes in abuse["by_kind"].items():
        print(f"  {kind:32s} {dict(codes)}")
    for f in abuse["failures"]:
        print(f"  FAILED {f}")
    return goal


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bundle or .onnx to serve (default: a fresh tutorial_cnn at 150 px)")
    ap.add_argument("--photo", default=None, help=f"image to upload (default: {PHOTO.name} from ../shared)")
    ap.add_argument("--requests", type=int, default=1000, help="uploads per setting")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds per setting")
    ap.add_argument("--max-batch", type=int, default=None, help="the batched server's --max-batch (default: serve's)")
    ap.add_argument("--max-wait", type=float, default=None, help="the batched server's --max-wait in ms")
    ap.add_argument("--malformed", type=int, default=120, help="bad uploads to send (at least 100)")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes")
    ap.add_argument("--engine", default="auto", help="the server's --engine (auto, torch or onnx)")
    ap.add_argument("--max-upload-mb", type=float, default=2.0)
    ap.add_argument("--max-seconds", type=float, default=600, help="time cap for the load and for the abuse")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    if a.malformed < 100:
        ap.error(f"--malformed must be at least 100. Received: {a.malformed}")
    if a.rounds < 1 or a.requests < a.rounds:
        ap.error(f"--rounds must be at least 1 and at most --requests. Received: {a.rounds}")
    data, name = photo_bytes(a.photo)
    key = secrets.token_urlsafe(24)
    batched = [*(["--max-batch", str(a.max_batch)] if a.max_batch else []),
               *(["--max-wait", str(a.max_wait)] if a.max_wait is not None else [])]
    with tempfile.TemporaryDirectory(prefix="convlens-bench-") as tmp:
        model = Path(a.model) if a.model else tiny_bundle(Path(tmp))
        print(f"serving {model.name} on 127.0.0.1 ({a.workers} worker(s)) with --max-batch 1 and "
              f"{' '.join(batched) or 'the default batching'}; uploading {name} ({len(data) / 1024:.0f} kB), "
              f"{a.requests} requests each in {a.rounds} alternating rounds", flush=True)
        cases = malformed_cases(data, a.malformed, int(a.max_upload_mb * 1024 * 1024))
        engine = ["--engine", a.engine]
        with Server(model, free_port(), a.max_upload_mb, a.workers, key, ["--max-batch", "1", *engine]) as one, \
                Server(model, free_port(), a.max_upload_mb, a.workers, key, [*batched, *engine]) as many:
            samples, abuse = compare({"unbatched": one, "batched": many}, key, data, name, a, cases)
            results = {label: s.summary(a.concurrency) for label, s in samples.items()}
            goal = report(results, abuse)
            healthy = all(_healthy(s.url) for s in (one, many))
            batches = batch_histogram(many.url, key)
            print(f"batched server ran {batches.get('count', 0):.0f} batches, mean size "
                  f"{batches.get('sum', 0) / max(1.0, batches.get('count', 0)):.2f}; "
                  f"health after load and abuse: {'ok' if healthy else 'NOT ANSWERING'}")
    result = {"load": results, "goal": goal, "malformed": abuse, "healthy_after": healthy, "model": str(model.name),
              "batches": batches, "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    if a.json:
        from convlens.files import write_json

        write_json(a.json, result)
    errors = sum(r["errors"] for r in results.values()) + sum(abuse["good_requests"]["errors"].values())
    return 0 if errors == 0 and abuse["not_4xx"] == 0 and healthy else 1


def _healthy(url: str) -> bool:
    try:
        health = httpx.get(url + "/health", timeout=10)
        return health.status_code == 200 and health.json().get("status") == "ok"
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
