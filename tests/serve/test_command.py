"""``convlens serve``: argument checks, keys, the non-loopback refusal and how uvicorn is started."""

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


def test_public_bind_without_a_key_is_refused(tiny_bundle: Path, fake_uvicorn: list,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVLENS_API_KEY", raising=False)
    assert main(["serve", str(tiny_bundle), "--host", "0.0.0.0", "--port", "8123"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.0.0.0" in err[0] and "--api-key" in err[0] and "--no-auth" in err[0]
    assert not fake_uvicorn


def test_public_bind_with_no_auth_warns_in_one_line(tiny_bundle: Path, fake_uvicorn: list,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLENS_API_KEY", "ignored-with-no-auth")
    assert serve_command(str(tiny_bundle), host="0.0.0.0", port=8123, no_auth=True) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "--no-auth" in warnings[0]
    assert fake_uvicorn[0][1]["host"] == "0.0.0.0"
    assert fake_uvicorn[0][0][0].state.serve.auth is False


def test_public_bind_with_a_key_serves_with_auth(tiny_bundle: Path, fake_uvicorn: list, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVLENS_API_KEY", raising=False)
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nkey-one\n\n  key-two  \n", encoding="utf-8")
    assert main(["serve", str(tiny_bundle), "--host", "0.0.0.0", "--api-key", "key-zero",
                 "--api-key-file", str(keys), "--max-batch", "8", "--max-wait", "2.5"]) == 0
    (args, kwargs), = fake_uvicorn
    state = args[0].state.serve
    assert state.auth is True and state.batcher.max_batch == 8 and state.batcher.max_wait_s == 0.0025
    err = capsys.readouterr().err
    assert "3 API key(s)" in err and "warning" not in err


def test_the_key_can_come_from_the_environment(tiny_bundle: Path, fake_uvicorn: list,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLENS_API_KEY", "from-env")
    assert serve_command(str(tiny_bundle), host="0.0.0.0") == 0
    assert fake_uvicorn[0][0][0].state.serve.auth is True


@pytest.mark.parametrize(("argv", "match"), [
    (["--max-batch", "0"], "max_batch must be in [1, 1024]. Received: max_batch=0"),
    (["--max-batch", "5000"], "max_batch must be in [1, 1024]"),
    (["--max-wait", "-1"], "max_wait must be in [0, 1000]. Received: max_wait=-1.0"),
    (["--max-wait", "nan"], "max_wait must be in"),
    (["--api-key", ""], "--api-key: the API key is empty"),
    (["--api-key", "two words"], "printable ASCII without spaces"),
    (["--api-key-file", "/nonexistent/keys.txt"], "cannot be read"),
    (["--api-key", "k", "--no-auth"], "cannot be combined"),
])
def test_bad_flags_are_one_line_exit_2(tiny_bundle: Path, fake_uvicorn: list, capsys: pytest.CaptureFixture[str],
                                       argv: list[str], match: str) -> None:
    assert main(["serve", str(tiny_bundle), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not fake_uvicorn


def test_empty_or_unreadable_key_file_is_one_line(tiny_bundle: Path, fake_uvicorn: list, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    assert main(["serve", str(tiny_bundle), "--api-key-file", str(empty)]) == 2
    assert "holds no key" in capsys.readouterr().err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00key")
    assert main(["serve", str(tiny_bundle), "--api-key-file", str(binary)]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert main(["serve", str(tiny_bundle), "--api-key-file", str(tmp_path)]) == 2  # a folder
    assert "cannot be read" in capsys.readouterr().err
    monkeypatch.setenv("CONVLENS_API_KEY", "")
    assert main(["serve", str(tiny_bundle)]) == 2
    assert "CONVLENS_API_KEY: the API key is empty" in capsys.readouterr().err
    assert not fake_uvicorn


@pytest.fixture
def threads_restored() -> Any:
    """Put this process's inference threads (and torch's pool) back as they were."""
    import torch

    from convlens import runtime

    before = torch.get_num_threads()
    yield
    runtime.set_inference_threads(0)
    torch.set_num_threads(before)


def test_several_workers_use_the_app_factory(tiny_onnx: Path, fake_uvicorn: list, threads_restored: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from convlens import runtime
    from convlens.serve import app as serve_app
    from convlens.serve.app import ENV_MAX_UPLOAD_MB, ENV_MODEL, create_app_from_env

    # serve_command sets these for the worker processes; setenv here restores them afterwards.
    for name in ("ENV_MODEL", "ENV_MAX_UPLOAD_MB", "ENV_WORKERS", "ENV_MAX_BATCH", "ENV_MAX_WAIT_MS", "ENV_API_KEYS"):
        monkeypatch.setenv(getattr(serve_app, name), "unset")
    assert serve_command(str(tiny_onnx), workers=3, max_upload_mb=2.5, max_batch=4, max_wait_ms=1,
                         api_key="worker-key") == 0
    (args, kwargs), = fake_uvicorn
    assert args == ("convlens.serve.app:create_app_from_env",)
    assert kwargs["factory"] is True and kwargs["workers"] == 3
    # What each worker process will build from the environment:
    import os

    assert os.environ[ENV_MODEL] == str(tiny_onnx.resolve()) and os.environ[ENV_MAX_UPLOAD_MB] == "2.5"
    monkeypatch.setattr(runtime, "usable_cores", lambda: 12)  # 3 workers on 12 cores: 4 threads each
    app = create_app_from_env()
    state = app.state.serve
    assert state.kind == "onnx" and state.max_upload_bytes == int(2.5 * 1024 * 1024)
    assert state.batcher.max_batch == 4 and state.batcher.max_wait_s == 0.001 and state.auth is True
    assert state.classifier.backend.session.get_session_options().intra_op_num_threads == 4


@pytest.mark.parametrize("engine", ["auto", "torch"])
def test_workers_divide_the_cores_for_either_engine(engine: str, tmp_path: Path, threads_restored: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's onnxruntime session and torch's pool (a torch bundle, or Grad-CAM's model
    loaded on first use by the onnx engine) both get usable cores // workers threads."""
    import torch

    from convlens import runtime
    from convlens.infer.bundle import save_bundle
    from convlens.serve import app as serve_app
    from tests.bundles import make_meta, make_model

    model = make_model("tiny", 2, 3, 0, size=32)
    meta = make_meta(model, ("cats", "dogs"))
    meta.precision = "fp32"  # so that auto picks the onnx engine
    bundle = save_bundle(tmp_path / "model.convlens", model, meta)
    monkeypatch.setenv("CONVLENS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(serve_app.ENV_MODEL, str(bundle))
    monkeypatch.setenv(serve_app.ENV_ENGINE, engine)
    monkeypatch.setenv(serve_app.ENV_WORKERS, "2")
    monkeypatch.setattr(runtime, "usable_cores", lambda: 6)
    torch.set_num_threads(1)
    backend = serve_app.create_app_from_env().state.serve.classifier.backend
    assert torch.get_num_threads() == 3
    if engine == "auto":
        assert backend.session.get_session_options().intra_op_num_threads == 3
        torch.set_num_threads(1)
        backend.torch_backend()  # Grad-CAM's torch model, loaded on first use
        assert torch.get_num_threads() == 3
    else:
        assert not hasattr(backend, "session")


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
