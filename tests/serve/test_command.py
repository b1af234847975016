"""``convlens serve``: argument checks, the non-loopback warning and how uvicorn is started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from convlens.cli import main
from convlens.errors import BundleError, ConfigError
from convlens.serve import is_loopback, serve_command


@pytest.fixture
def fake_uvicorn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Record uvicorn.run calls instead of serving forever."""
    import uvicorn

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: calls.append((a, k)))
    return calls


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        assert not is_loopback(host), host


def test_default_bind_is_local_and_quiet(tiny_bundle: Path, fake_uvicorn: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tiny_bundle)]) == 0
    (args, kwargs), = fake_uvicorn
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8000
    assert type(args[0]).__name__ == "FastAPI"
    err = capsys.readouterr().err
    assert "warning" not in err and "http://127.0.0.1:8000" in err


def test_public_bind_warns_in_one_line(tiny_bundle: Path, fake_uvicorn: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_command(str(tiny_bundle), host="0.0.0.0", port=8123) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "127.0.0.1" in warnings[0]
    assert fake_uvicorn[0][1]["host"] == "0.0.0.0"


def test_several_workers_use_the_app_factory(tiny_onnx: Path, fake_uvicorn: list,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from convlens.serve.app import ENV_MAX_UPLOAD_MB, ENV_MODEL, ENV_WORKERS, create_app_from_env

    # serve_command sets these for the worker processes; setenv here restores them afterwards.
    monkeypatch.setenv(ENV_MODEL, "unset")
    monkeypatch.setenv(ENV_MAX_UPLOAD_MB, "unset")
    monkeypatch.setenv(ENV_WORKERS, "unset")
    assert serve_command(str(tiny_onnx), workers=3, max_upload_mb=2.5) == 0
    (args, kwargs), = fake_uvicorn
    assert args == ("convlens.serve.app:create_app_from_env",)
    assert kwargs["factory"] is True and kwargs["workers"] == 3
    # What each worker process will build from the environment:
    import os

    assert os.environ[ENV_MODEL] == str(tiny_onnx.resolve()) and os.environ[ENV_MAX_UPLOAD_MB] == "2.5"
    app = create_app_from_env()
    assert app.state.serve.kind == "onnx" and app.state.serve.max_upload_bytes == int(2.5 * 1024 * 1024)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"port": 70000}, "port must be between"),
    ({"workers": 0}, "workers must be at least 1"),
    ({"max_upload_mb": 0}, "max-upload-mb must be positive"),
])
def test_bad_arguments(tiny_bundle: Path, fake_uvicorn: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        serve_command(str(tiny_bundle), **kwargs)
    assert not fake_uvicorn


def test_missing_model_fails_before_binding(tmp_path: Path, fake_uvicorn: list,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BundleError):
        serve_command(str(tmp_path / "nope.convlens"))
    assert main(["serve", str(tmp_path / "nope.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not fake_uvicorn
