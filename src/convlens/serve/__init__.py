"""``convlens serve MODEL``: the HTTP API and web page on uvicorn (see :mod:`convlens.serve.app`)."""

from __future__ import annotations

import ipaddress
import os
import sys

from convlens.errors import ConfigError

__all__ = ["create_app", "is_loopback", "serve_command"]


def create_app(model: object, *, max_upload_mb: float = 10.0, max_pixels: int | None = None,
               engine: str = "auto") -> object:
    """Build the FastAPI app (see :func:`convlens.serve.app.create_app`)."""
    from convlens.serve.app import create_app as _create

    return _create(model, max_upload_mb=max_upload_mb, max_pixels=max_pixels, engine=engine)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
                  max_upload_mb: float = 10.0, engine: str = "auto") -> int:
    """Serve ``model`` (a ``.convlens`` bundle or a ``.onnx`` file) until interrupted. Returns 0.

    ``engine``: as :func:`convlens.load`'s (``auto``: onnxruntime for a bundle predicting in fp32).
    """
    import uvicorn

    from convlens.infer.engine import check_engine
    from convlens.serve.app import ENV_ENGINE, ENV_MAX_UPLOAD_MB, ENV_MODEL, ENV_WORKERS
    from convlens.serve.app import create_app as _create

    check_engine(engine)
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"port must be between 0 and 65535. Received: port={port}")
    if int(workers) < 1:
        raise ConfigError(f"workers must be at least 1. Received: workers={workers}")
    if not max_upload_mb > 0:
        raise ConfigError(f"max-upload-mb must be positive. Received: max_upload_mb={max_upload_mb}")
    if not is_loopback(host):
        print(f"warning: binding to {host} makes the model reachable from other machines, "
              "without authentication; use --host 127.0.0.1 to keep it local", file=sys.stderr)
    # Build the app before binding the port: a bad bundle is a one-line error, not a traceback
    # from a worker process.
    app = _create(model, max_upload_mb=max_upload_mb, engine=engine)
    note = app.state.serve.classifier.novelty_note  # type: ignore[attr-defined]
    if note:
        print(note, file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model} on http://{shown}:{port}  (page: /, API docs: /docs)", file=sys.stderr)
    if workers == 1:
        uvicorn.run(app, host=host, port=int(port), log_level="info")
        return 0
    # Several processes need an import string; each worker rebuilds the app from the environment.
    del app
    os.environ[ENV_MODEL] = os.path.abspath(model)
    os.environ[ENV_MAX_UPLOAD_MB] = str(max_upload_mb)
    os.environ[ENV_WORKERS] = str(workers)
    os.environ[ENV_ENGINE] = engine  # the workers find the export in the cache the app above filled
    uvicorn.run("convlens.serve.app:create_app_from_env", factory=True, host=host, port=int(port),
                workers=int(workers), log_level="info")
    return 0
