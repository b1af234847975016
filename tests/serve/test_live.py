"""Against a real uvicorn on 127.0.0.1: concurrent requests and limits over real sockets."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.bundles import pixel_bomb_png, png_bytes
from tests.serve.conftest import free_port


def test_concurrent_requests_are_consistent(live_server, real_photo: Path) -> None:
    data = real_photo.read_bytes()
    small = png_bytes(50, 40, seed=7)

    def one(i: int) -> tuple[int, dict]:
        with httpx.Client(base_url=live_server.url, timeout=60) as c:
            route = "/explain" if i % 4 == 0 else "/predict"
            body = data if i % 2 == 0 else small
            r = c.post(route, files={"file": (f"{i}.jpg", body, "image/jpeg")})
            return i, r.json() | {"status": r.status_code}

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(pool.map(one, range(24)))
    assert all(r["status"] == 200 for r in results.values()), results
    # Same input, same answer, whichever thread and route served it.
    for parity in (0, 1):
        probs = {round(r["probabilities"]["dogs"], 6) for i, r in results.items() if i % 2 == parity}
        assert len(probs) == 1


def test_limits_over_the_wire(live_server) -> None:
    with httpx.Client(base_url=live_server.url, timeout=60) as c:
        # Declared too large: refused from the header alone.
        r = c.post("/predict", files={"file": ("big.jpg", b"\xff" * (3 * 1024 * 1024), "image/jpeg")})
        assert r.status_code == 413 and r.json()["error"] == "too_large"

        def stream():
            for _ in range(100):
                yield b"\x00" * 65536

        r = c.post("/predict", content=stream(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        r = c.post("/predict", files={"file": ("bomb.png", pixel_bomb_png(), "image/png")})
        assert r.status_code == 413
        r = c.post("/predict", files={"file": ("x.bin", b"\x00\x01garbage", "application/octet-stream")})
        assert r.status_code == 415
        assert c.get("/health").json()["status"] == "ok"


def _predicted(metrics_text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(metrics_text)
               for s in family.samples if s.name == "convlens_images_predicted_total")


def test_metrics_of_several_workers_are_summed(tiny_onnx: Path, tmp_path: Path) -> None:
    """`serve --workers 2`: the workers count in prometheus-client's multiprocess files, so every
    scrape, whichever worker answers it, reports all the requests; the folder goes with the server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"TMPDIR": str(tmp_path)}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "convlens", "serve", str(tiny_onnx), "--port", str(port),
                                 "--workers", "2"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

        def one(i: int) -> int:  # a connection each, so both workers take some
            return httpx.post(url + "/predict", files={"file": (f"{i}.png", png_bytes(40, 30, seed=i), "image/png")},
                              timeout=60).status_code

        with ThreadPoolExecutor(max_workers=6) as pool:
            assert set(pool.map(one, range(12))) == {200}
        (folder,) = tmp_path.glob("convlens-metrics-*")
        assert list(folder.glob("counter_*.db"))  # the workers' shared counters
        assert [_predicted(httpx.get(url + "/metrics", timeout=10).text) for _ in range(6)] == [12.0] * 6
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not list(tmp_path.glob("convlens-metrics-*")), log.read_text()[-2000:]
