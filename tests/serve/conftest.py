"""Fixtures for the serve tests: small models, TestClients and a real uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.export.bundles import make_bundle


@pytest.fixture(scope="session")
def serve_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("serve") / "model.convlens")


@pytest.fixture(scope="session")
def serve_onnx(serve_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from convlens.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("serve_onnx") / "model.onnx"
    export_onnx(serve_bundle, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 in a background thread."""

    def __init__(self, app: object) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_server(serve_bundle: Path) -> Iterator[LiveServer]:
    from convlens.serve.app import create_app

    with LiveServer(create_app(serve_bundle, max_upload_mb=1)) as server:
        yield server
