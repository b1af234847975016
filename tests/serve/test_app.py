"""The HTTP API with FastAPI's TestClient: every route and every error status."""

from __future__ import annotations

import base64
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from convlens import __version__, runtime
from convlens.infer import load
from convlens.serve.app import create_app
from tests.bundles import pixel_bomb_png, png_bytes


def _client(app: Any) -> Any:
    with warnings.catch_warnings():  # starlette's note about httpx vs httpx2
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> Iterator[Any]:
    with _client(create_app(tiny_bundle, max_upload_mb=1, max_pixels=4_000_000)) as c:
        yield c


@pytest.fixture(scope="module")
def onnx_client(tiny_onnx: Path) -> Iterator[Any]:
    with _client(create_app(tiny_onnx, max_upload_mb=1)) as c:
        yield c


def _post(c: Any, route: str, data: bytes, name: str = "photo.jpg", ctype: str = "image/jpeg", **kw: Any) -> Any:
    return c.post(route, files={"file": (name, data, ctype)}, **kw)


def _error(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "message"} and body["message"]
    if code:
        assert body["error"] == code
    return body


# ----------------------------------------------------------------------------- routes
def test_health(client: Any) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == "model.convlens"


def test_model_info(client: Any) -> None:
    body = client.get("/model").json()
    assert body["classes"] == ["cats", "dogs"] and body["num_classes"] == 2
    assert body["input_size"] == {"height": 32, "width": 32, "channels": 3}
    assert body["metrics"] == {"val_accuracy": 0.75, "epochs": 1}
    assert body["convlens_version"] == __version__ and body["versions"]["convlens"] == __version__
    assert body["format"] == "bundle" and body["output_activation"] == "sigmoid"
    assert body["preprocessing"]["resize"] == "squash"
    assert body["explain_methods"] == ["cam", "gradcam", "gradcam++"]
    assert body["max_upload_bytes"] == 1024 * 1024


def test_predict_real_photo_matches_the_library(client: Any, tiny_bundle: Path, real_photo: Path) -> None:
    r = _post(client, "/predict", real_photo.read_bytes(), name="cat.0.jpg")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["probabilities"]) == {"cats", "dogs"}
    assert sum(body["probabilities"].values()) == pytest.approx(1.0)
    assert body["label"] in ("cats", "dogs") and body["probability"] == max(body["probabilities"].values())
    assert body["latency_ms"] > 0 and body["timings_ms"]["inference"] > 0
    assert body["filename"] == "cat.0.jpg" and body["image"]["format"] == "JPEG"
    # One truth: the server's numbers are exactly what `convlens predict` computes for the file.
    ref = load(tiny_bundle, device="cpu").predict(real_photo)[0]
    assert body["label"] == ref.label
    for c in ("cats", "dogs"):
        assert body["probabilities"][c] == pytest.approx(ref.probabilities[c], abs=1e-6)


def test_predict_decodes_large_jpegs_as_the_library(tmp_path: Path) -> None:
    """With a crop fraction, a JPEG's draft decode keeps the resolution the crop needs: served
    probabilities equal the library's (the server once drafted down to the model size)."""
    from tests.bundles import make_bundle

    bundle = make_bundle(tmp_path / "crop.convlens", resize="crop", crop_fraction=0.5, random_biases=True)
    rng = np.random.default_rng(0)
    photo = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(photo, quality=95)
    with _client(create_app(bundle, max_upload_mb=1)) as c:
        body = _post(c, "/predict", photo.read_bytes(), name="big.jpg").json()
    ref = load(bundle, device="cpu").predict(photo)[0]
    for k in ("cats", "dogs"):
        assert body["probabilities"][k] == pytest.approx(ref.probabilities[k], abs=1e-6)


def test_predict_accepts_any_supported_format(client: Any) -> None:
    for fmt in ("PNG", "BMP", "GIF", "WEBP", "TIFF"):
        buf = io.BytesIO()
        Image.open(io.BytesIO(png_bytes(30, 20))).convert("RGB").save(buf, format=fmt)
        r = _post(client, "/predict", buf.getvalue(), name=f"x.{fmt.lower()}", ctype="application/octet-stream")
        assert r.status_code == 200, (fmt, r.text)


def test_explain_returns_a_png_overlay(client: Any, real_photo: Path) -> None:
    r = _post(client, "/explain", real_photo.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "cam" and body["explained"] == body["label"]
    png = base64.b64decode(body["overlay_png"])
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB"
    assert img.size == (body["overlay_size"]["width"], body["overlay_size"]["height"])
    assert max(img.size) <= 512 and max(img.size) >= 256  # decoded again for display, not 1/8 draft
    # The overlay is not just the photo: the heat map's colours are in it.
    assert np.asarray(img).std() > 5


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_explain_other_methods_and_class(client: Any, method: str) -> None:
    r = _post(client, "/explain", png_bytes(40, 40), params={"method": method, "class": "cats"})
    assert r.status_code == 200, r.text
    assert r.json()["method"] == method and r.json()["explained"] == "cats"


def test_explain_rejects_bad_method_and_class(client: Any) -> None:
    body = _error(_post(client, "/explain?method=lime", png_bytes()), 400)
    assert "method must be one of" in body["message"]
    body = _error(_post(client, "/explain?class=horses", png_bytes()), 400)
    assert "horses" in body["message"] and "cats, dogs" in body["message"]


def test_page_is_offline(client: Any) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for needed in ('id="file"', 'id="label"', 'id="bars"', 'id="overlay"', "/static/app.js", "/static/app.css"):
        assert needed in html
    texts = [html]
    for asset, ctype in (("/static/app.js", "javascript"), ("/static/app.css", "text/css")):
        a = client.get(asset)
        assert a.status_code == 200 and ctype in a.headers["content-type"]
        texts.append(a.text)
    for text in texts:  # no CDN, no web fonts, no external anything
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), text[:200]
        assert "@import" not in text and "@font-face" not in text


def test_docs_are_served_locally(client: Any) -> None:
    r = client.get("/docs")
    assert r.status_code == 200
    srcs = re.findall(r"""(?:src|href)=["']([^"']+)""", r.text) + re.findall(r"url: ?'([^']+)'", r.text)
    assert srcs and all(s.startswith("/") for s in srcs), srcs
    for s in srcs:
        assert client.get(s).status_code == 200, s
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/explain", "/health", "/model"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


# ----------------------------------------------------------------------------- errors
def test_not_an_image_is_415(client: Any) -> None:
    body = _error(_post(client, "/predict", b"hello, I am text" * 20, name="notes.jpg"), 415, "not_image")
    assert "notes.jpg" in body["message"] and "not an image" in body["message"]


def test_wrong_request_content_type_is_415(client: Any, real_photo: Path) -> None:
    r = client.post("/predict", content=real_photo.read_bytes(), headers={"content-type": "image/jpeg"})
    body = _error(r, 415, "unsupported_media_type")
    assert "multipart/form-data" in body["message"]
    _error(client.post("/explain", json={"file": "x"}), 415)


def test_empty_upload_is_400(client: Any) -> None:
    _error(_post(client, "/predict", b""), 400, "zero_bytes")


def test_truncated_image_is_400(client: Any, real_photo: Path) -> None:
    data = real_photo.read_bytes()
    body = _error(_post(client, "/predict", data[: len(data) // 3]), 400, "truncated")
    assert "truncated" in body["message"]


def test_corrupt_image_is_400(client: Any) -> None:
    data = bytearray(png_bytes(32, 32))
    assert data[37:41] == b"IDAT"
    data[41:45] = b"\xff" * 4  # the zlib header of the pixel stream
    r = _post(client, "/explain", bytes(data), name="bad.png", ctype="image/png")
    body = _error(r, 400)
    assert body["error"] in ("corrupt", "truncated") and "bad.png" in body["message"]


def test_upload_over_limit_is_413_by_content_length(client: Any) -> None:
    body = _error(_post(client, "/predict", b"\xff" * (2 * 1024 * 1024)), 413, "too_large")
    assert "1 MB limit" in body["message"]


def test_upload_over_limit_is_413_while_streaming(client: Any) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to check up front
        for _ in range(64):
            yield b"\x00" * 65536

    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    _error(r, 413, "too_large")


def test_body_limit_stops_reading_at_the_limit() -> None:
    """At the ASGI level: bytes are counted as they arrive and reading stops past the limit."""
    import asyncio
    import json

    from convlens.serve.app import BodyLimit

    reads, sent = [], []

    async def receive() -> dict[str, Any]:
        reads.append(1)
        return {"type": "http.request", "body": b"\x00" * 1000, "more_body": len(reads) < 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not see an oversized body")

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [], "query_string": b""}
    asyncio.run(BodyLimit(app, 5500)(scope, receive, send))
    assert len(reads) == 6  # 6000 bytes > 5500: stopped there, not after 1000 chunks
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"] == "too_large"

    # Under the limit the app gets the whole body, unchanged, in one message.
    reads.clear()
    got = []

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        got.append(await receive())

    async def small() -> dict[str, Any]:
        reads.append(1)
        return {"type": "http.request", "body": b"ab", "more_body": len(reads) < 3}

    asyncio.run(BodyLimit(echo, 5500)(scope, small, send))
    assert got == [{"type": "http.request", "body": b"ababab", "more_body": False}]


def test_pixel_bomb_is_413(client: Any) -> None:
    body = _error(_post(client, "/predict", pixel_bomb_png(), name="bomb.png", ctype="image/png"), 413, "too_large")
    assert "pixel" in body["message"]
    # Also under this server's lower limit (4 MP) with an honest, small file.
    buf = io.BytesIO()
    Image.new("L", (2500, 2000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1024 * 1024
    _error(_post(client, "/explain", buf.getvalue(), name="big.png", ctype="image/png"), 413, "too_large")


def test_missing_file_field_is_422(client: Any) -> None:
    body = _error(client.post("/predict", files={"image": ("a.png", png_bytes(), "image/png")}), 422)
    assert "file" in body["message"]


def test_malformed_multipart_is_400(client: Any) -> None:
    r = client.post("/predict", content=b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab",
                    headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code in (400, 422), r.text
    assert set(r.json()) == {"error", "message"}


def test_invalid_content_length_is_400() -> None:
    import asyncio

    from convlens.serve.app import BodyLimit

    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not run")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"abc", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for bad in (b"-5", b"lots"):
        sent.clear()
        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(b"content-length", bad)]}
        asyncio.run(BodyLimit(app, 100)(scope, receive, send))
        assert sent[0]["status"] == 400


def test_unknown_route_and_method_are_json(client: Any) -> None:
    _error(client.get("/nope"), 404, "not_found")
    _error(client.get("/predict"), 405, "method_not_allowed")


def test_errors_are_counted_and_health_survives(client: Any) -> None:
    before = client.get("/health").json()["errors"]
    _post(client, "/predict", b"junk")
    assert client.get("/health").json()["errors"] == before + 1


# ----------------------------------------------------------------------------- ONNX
def test_onnx_model_serves_predictions_and_cam(onnx_client: Any, client: Any, real_photo: Path) -> None:
    info = onnx_client.get("/model").json()
    assert info["format"] == "onnx" and info["explain_methods"] == ["cam"] and info["int8"] is False
    data = real_photo.read_bytes()
    a, b = _post(onnx_client, "/predict", data).json(), _post(client, "/predict", data).json()
    assert a["label"] == b["label"]
    # The bundle runs in bf16 where the CPU has it natively (ONNX: fp32).
    tol = 1e-2 if runtime.inference_device("cpu").precision == "bf16" else 1e-5
    assert a["probabilities"]["dogs"] == pytest.approx(b["probabilities"]["dogs"], abs=tol)
    ea, eb = _post(onnx_client, "/explain", data).json(), _post(client, "/explain", data).json()
    oa = np.asarray(Image.open(io.BytesIO(base64.b64decode(ea["overlay_png"]))), dtype=np.int16)
    ob = np.asarray(Image.open(io.BytesIO(base64.b64decode(eb["overlay_png"]))), dtype=np.int16)
    assert oa.shape == ob.shape and np.abs(oa - ob).max() <= 2  # the same map, through ONNX
    _error(_post(onnx_client, "/explain?method=gradcam", data), 400)


def test_onnx_heat_equals_torch_cam(tiny_onnx: Path, tiny_bundle: Path, real_photo: Path) -> None:
    img = Image.open(real_photo).convert("RGB")
    for cls in (None, "cats", "dogs"):
        o = load(tiny_onnx).explanations(img, method="cam", class_name=cls)[0]
        e = load(tiny_bundle, device="cpu").explanations(img, method="cam", class_name=cls)[0]
        assert o.explained == e.explained
        np.testing.assert_allclose(o.heat, e.heat, atol=1e-4)


def test_onnx_without_maps_cannot_explain(tiny_bundle: Path, tmp_path: Path) -> None:
    from convlens.export.onnx import export_onnx

    out = tmp_path / "nocam.onnx"
    export_onnx(tiny_bundle, out, with_cam=False)
    with _client(create_app(out)) as c:
        assert c.get("/model").json()["explain_methods"] == []
        body = _error(_post(c, "/explain", png_bytes()), 400)
        assert "serve the .convlens bundle" in body["message"]
        assert _post(c, "/predict", png_bytes()).status_code == 200


def test_bundle_without_gap_head_explains_with_gradcam(tmp_path: Path) -> None:
    from tests.bundles import make_bundle

    layers = [{"type": "conv", "filters": 4, "kernel_size": 3, "padding": "same", "activation": "relu"},
              {"type": "max_pool", "pool_size": 2}, {"type": "flatten"}, {"type": "dense"}]
    bundle = make_bundle(tmp_path / "flat.convlens", layers=layers, size=16, random_biases=True)
    with _client(create_app(bundle)) as c:
        assert c.get("/model").json()["explain_methods"] == ["gradcam", "gradcam++"]
        r = _post(c, "/explain", png_bytes(30, 30))
        assert r.status_code == 200, r.text
        assert r.json()["method"] == "gradcam"
        body = _error(_post(c, "/explain?method=cam", png_bytes()), 400)
        assert "gradcam" in body["message"]
