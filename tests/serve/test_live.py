"""Against a real uvicorn on 127.0.0.1: concurrent requests and limits over real sockets."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.bundles import pixel_bomb_png, png_bytes


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
