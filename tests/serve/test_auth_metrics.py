"""API keys (401s, open routes, constant-time comparison) and the Prometheus /metrics route."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from convlens.serve import auth
from convlens.serve.app import create_app
from convlens.serve.metrics import ServeMetrics
from tests.bundles import png_bytes
from tests.serve.conftest import make_client

KEYS = ["first-key-0123456789", "second-key-abcdefghij"]


@pytest.fixture(scope="module")
def keyed(tiny_bundle: Path) -> Iterator[Any]:
    with make_client(create_app(tiny_bundle, api_keys=KEYS, max_upload_mb=1)) as c:
        yield c


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _upload() -> dict[str, Any]:
    return {"files": {"file": ("x.png", png_bytes(30, 30), "image/png")}}


def _unauthorized(r: Any) -> str:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    assert set(body) == {"error", "message"} and body["error"] == "unauthorized"
    return body["message"]


# ----------------------------------------------------------------------------- keys
@pytest.mark.parametrize(("method", "path"), [("get", "/model"), ("get", "/metrics"), ("post", "/predict"),
                                              ("post", "/explain")])
def test_every_api_route_needs_a_key(keyed: Any, method: str, path: str) -> None:
    kwargs = _upload() if method == "post" else {}
    assert "Authorization: Bearer KEY" in _unauthorized(getattr(keyed, method)(path, **kwargs))
    assert "not valid" in _unauthorized(getattr(keyed, method)(path, headers=_bearer("wrong"), **kwargs))
    # Another scheme, or a key without the scheme, is no key.
    _unauthorized(getattr(keyed, method)(path, headers={"Authorization": f"Basic {KEYS[0]}"}, **kwargs))
    _unauthorized(getattr(keyed, method)(path, headers={"Authorization": KEYS[0]}, **kwargs))
    for key in KEYS:
        r = getattr(keyed, method)(path, headers=_bearer(key), **kwargs)
        assert r.status_code == 200, r.text


def test_a_key_is_checked_before_the_upload_is_read(keyed: Any) -> None:
    r = keyed.post("/predict", files={"file": ("big.jpg", b"\xff" * (2 * 1024 * 1024), "image/jpeg")})
    _unauthorized(r)  # not 413: nothing about the server is told without a key


def test_health_page_and_docs_are_open(keyed: Any) -> None:
    assert keyed.get("/health").json()["status"] == "ok"
    for path in ("/", "/static/app.js", "/static/app.css", "/docs", "/redoc"):
        assert keyed.get(path).status_code == 200, path
    spec = keyed.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "a key given to `convlens serve`"}
    assert spec["paths"]["/predict"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in spec["paths"]["/health"]["get"]
    assert "cats" not in spec["info"]["description"]  # the open spec does not name the classes
    # A 404 needs no key to be a 404, but an unknown path tells nothing either.
    _unauthorized(keyed.get("/nope"))


def test_keys_are_compared_in_constant_time_against_every_key(keyed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert keyed.get("/model", headers=_bearer(KEYS[0])).status_code == 200
    # Both keys were compared although the first one matched.
    assert calls == [(KEYS[0].encode(), KEYS[0].encode()), (KEYS[0].encode(), KEYS[1].encode())]


def test_no_keys_means_no_authentication(tiny_bundle: Path) -> None:
    with make_client(create_app(tiny_bundle)) as c:
        assert c.get("/model").status_code == 200 and c.get("/metrics").status_code == 200
        assert "securitySchemes" not in c.get("/openapi.json").json().get("components", {})


def test_collect_keys_sources(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("a1\n# comment\n\nb2\na1\n", encoding="utf-8")
    assert auth.collect_keys("k", f, environ={}) == ["k", "a1", "b2"]
    assert auth.collect_keys(None, None, environ={auth.ENV_API_KEY: "env"}) == ["env"]
    assert auth.collect_keys("flag", None, environ={auth.ENV_API_KEY: "env"}) == ["flag"]  # the flag wins
    assert auth.collect_keys(None, None, environ={}) == []


# ----------------------------------------------------------------------------- metrics
def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {sample_name} {labels}")


def test_metrics_count_requests_batches_and_predictions(tiny_bundle: Path) -> None:
    with make_client(create_app(tiny_bundle, max_batch=4)) as c:
        for _ in range(3):
            assert c.post("/predict", **_upload()).status_code == 200
        assert c.post("/predict", files={"file": ("x.png", b"junk", "image/png")}).status_code == 415
        c.get("/health")
        c.get("/some/scanner/path")
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fam = _families(r.text)
    assert _value(fam, "convlens_http_requests_total", route="/predict", status="200") == 3
    assert _value(fam, "convlens_http_requests_total", route="/predict", status="415") == 1
    assert _value(fam, "convlens_http_requests_total", route="/health", status="200") == 1
    assert _value(fam, "convlens_http_requests_total", route="other", status="404") == 1
    assert _value(fam, "convlens_http_request_duration_seconds_count", route="/predict") == 4
    assert fam["convlens_http_request_duration_seconds"].type == "histogram"
    assert _value(fam, "convlens_batch_size_count") == 3 and _value(fam, "convlens_batch_size_sum") == 3
    predicted = sum(_value(fam, "convlens_images_predicted_total", label=k) for k in ("cats", "dogs")
                    if any(s.labels.get("label") == k for s in fam["convlens_images_predicted"].samples))
    assert predicted == 3
    assert _value(fam, "convlens_images_unknown_total") == 0


def test_each_app_has_its_own_registry(tiny_bundle: Path) -> None:
    with make_client(create_app(tiny_bundle)) as a, make_client(create_app(tiny_bundle)) as b:
        a.post("/predict", **_upload())
        fb = _families(b.get("/metrics").text)
    with pytest.raises(AssertionError):
        _value(fb, "convlens_http_requests_total", route="/predict", status="200")


def test_unknown_predictions_are_counted_once_predictions_say_so() -> None:
    m = ServeMetrics()
    m.prediction(SimpleNamespace(label="cats"))  # no `known` field yet: counted as known
    m.prediction(SimpleNamespace(label="dogs", known=True))
    m.prediction(SimpleNamespace(label="dogs", known=False))
    fam = _families(m.exposition()[0].decode())
    assert _value(fam, "convlens_images_unknown_total") == 1
    assert _value(fam, "convlens_images_predicted_total", label="dogs") == 2
