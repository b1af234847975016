"""Novelty in serve: the JSON fields, ?reject, ?novelty_threshold and ?neighbours, for a bundle
and its ONNX export, and /model's cut-off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from convlens.serve.app import create_app
from tests.serve.test_app import _client, _error, _post

Case = tuple[Path, dict[str, list[Path]]]


@pytest.fixture(scope="module")
def nclient(novelty_case: Case) -> Iterator[Any]:
    with _client(create_app(novelty_case[0], max_upload_mb=1)) as c:
        yield c


@pytest.fixture(scope="module")
def nonnx(novelty_onnx: Path) -> Iterator[Any]:
    with _client(create_app(novelty_onnx, max_upload_mb=1)) as c:
        yield c


def _png(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.parametrize("which", ["nclient", "nonnx"])
def test_foreign_uploads_are_unknown(which: str, novelty_case: Case, request: pytest.FixtureRequest) -> None:
    c = request.getfixturevalue(which)
    _, groups = novelty_case
    info = c.get("/model").json()["novelty"]
    assert info["threshold"] > 0 and info["method"] == "knn-cosine"
    for route in ("/predict", "/explain"):
        body = _post(c, route, _png(groups["foreign"][0]), name="x.png", ctype="image/png").json()
        assert body["label"] == "unknown" and body["known"] is False and body["novelty"] > info["threshold"]
        assert body["index"] in (0, 1) and set(body["probabilities"]) == {"cats", "dogs"}
        body = _post(c, route, _png(groups["train"][0]), name="t.png", ctype="image/png").json()
        assert body["known"] is True and body["label"] in ("cats", "dogs") and body["novelty"] <= info["threshold"]
    kept = _post(c, "/predict", _png(groups["foreign"][0]), ctype="image/png", params={"reject": "false"}).json()
    assert kept["known"] is True and kept["label"] in ("cats", "dogs")
    loose = _post(c, "/predict", _png(groups["foreign"][0]), ctype="image/png", params={"novelty_threshold": 1.9}).json()
    assert loose["known"] is True


def test_neighbours_query(nclient: Any, nonnx: Any, novelty_case: Case) -> None:
    _, groups = novelty_case
    body = _post(nclient, "/predict", _png(groups["train"][1]), ctype="image/png", params={"neighbours": 2}).json()
    assert len(body["neighbours"]) == 2 and body["neighbours"][0]["path"].startswith("train/")
    assert body["neighbours"][0]["class"] in ("cats", "dogs") and "path" not in {k for k in body if k != "neighbours"}
    assert _post(nclient, "/predict", _png(groups["train"][1]), ctype="image/png").json()["neighbours"] is None
    _error(_post(nonnx, "/predict", _png(groups["train"][1]), ctype="image/png", params={"neighbours": 2}),
           400, "bad_request")
    _error(_post(nclient, "/predict", _png(groups["train"][1]), ctype="image/png", params={"neighbours": -1}), 422)
    _error(_post(nclient, "/predict", _png(groups["train"][1]), ctype="image/png",
                 params={"novelty_threshold": -1}), 400, "bad_request")


def test_old_bundle_fields(tiny_bundle: Path, novelty_case: Case) -> None:
    with _client(create_app(tiny_bundle, max_upload_mb=1)) as client:
        _old_bundle_fields(client, novelty_case)


def _old_bundle_fields(client: Any, novelty_case: Case) -> None:
    body = _post(client, "/predict", _png(novelty_case[1]["train"][0]), ctype="image/png").json()
    assert body["novelty"] is None and body["known"] is True
    assert client.get("/model").json()["novelty"] is None
    _error(_post(client, "/predict", _png(novelty_case[1]["train"][0]), ctype="image/png",
                 params={"neighbours": 1}), 400, "bad_request")


def test_serve_notes_an_old_bundle_once(tiny_bundle: Path, novelty_case: Case, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    from convlens.serve import serve_command

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert serve_command(str(tiny_bundle)) == 0
    assert capsys.readouterr().err.count("trained before novelty scores existed") == 1
    assert serve_command(str(novelty_case[0])) == 0
    assert "trained before" not in capsys.readouterr().err
