"""``convlens serve MODEL``: the HTTP API and web page on uvicorn (see :mod:`convlens.serve.app`)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from convlens.config import SERVE_DEFAULTS, check_serve_range
from convlens.errors import ConfigError

__all__ = ["create_app", "is_loopback", "serve_command"]


def create_app(model: object, **options: Any) -> object:
    """Build the FastAPI app (see :func:`convlens.serve.app.create_app` for the options)."""
    from convlens.serve.app import create_app as _create

    return _create(model, **options)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
                  max_upload_mb: float = 10.0, max_batch: int | None = None, max_wait_ms: float | None = None,
                  api_key: str | None = None, api_key_file: str | None = None, no_auth: bool = False,
                  engine: str = "auto") -> int:
    """Serve ``model`` (a ``.convlens`` bundle or a ``.onnx`` file) until interrupted. Returns 0.

    Keys from ``api_key`` (else ``$CONVLENS_API_KEY``) and ``api_key_file`` are required as
    ``Authorization: Bearer KEY``; a non-loopback ``host`` without a key is refused unless
    ``no_auth``. ``engine``: as :func:`convlens.load`'s (``auto``: onnxruntime for a bundle
    predicting in fp32).
    """
    import uvicorn

    from convlens.infer.engine import check_engine
    from convlens.serve import app as serve_app
    from convlens.serve.auth import ENV_API_KEY, collect_keys

    check_engine(engine)
    max_batch = SERVE_DEFAULTS["max_batch"] if max_batch is None else max_batch
    max_wait_ms = SERVE_DEFAULTS["max_wait"] if max_wait_ms is None else max_wait_ms
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"port must be between 0 and 65535. Received: port={port}")
    if int(workers) < 1:
        raise ConfigError(f"workers must be at least 1. Received: workers={workers}")
    if not max_upload_mb > 0:
        raise ConfigError(f"max-upload-mb must be positive. Received: max_upload_mb={max_upload_mb}")
    check_serve_range("max_batch", max_batch)
    check_serve_range("max_wait", max_wait_ms)
    if no_auth and (api_key is not None or api_key_file is not None):
        raise ConfigError("--no-auth serves without keys, so it cannot be combined with --api-key or "
                          "--api-key-file; drop one of them")
    keys = [] if no_auth else collect_keys(api_key, api_key_file)
    if not keys and not no_auth and not is_loopback(host):
        raise ConfigError(f"binding to {host} makes the model reachable from other machines, so it needs an "
                          f"API key: add --api-key KEY, --api-key-file FILE or ${ENV_API_KEY} (or --no-auth to "
                          f"serve without one, or --host 127.0.0.1 to keep it local). Received: host={host!r}")
    if no_auth and not is_loopback(host):
        print(f"warning: serving on {host} without authentication (--no-auth): anyone who can reach it "
              "can use the model", file=sys.stderr)
    options = {"max_upload_mb": max_upload_mb, "max_batch": int(max_batch), "max_wait_ms": float(max_wait_ms),
               "api_keys": keys or None, "engine": engine}
    # Build the app before binding the port: a bad bundle is a one-line error, not a traceback
    # from a worker process.
    app = serve_app.create_app(model, **options)
    note = app.state.serve.classifier.novelty_note  # type: ignore[attr-defined]
    if note:
        print(note, file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    auth = f"{len(keys)} API key(s)" if keys else "no API key"
    batching = "off" if max_batch == 1 else f"up to {max_batch} images, {max_wait_ms:g} ms wait"
    print(f"serving {model} on http://{shown}:{port}  (page: /, API docs: /docs, metrics: /metrics; "
          f"{auth}; batching {batching})", file=sys.stderr)
    if workers == 1:
        uvicorn.run(app, host=host, port=int(port), log_level="info")
        return 0
    # Several processes need an import string; each worker rebuilds the app from the environment.
    del app
    os.environ[serve_app.ENV_MODEL] = os.path.abspath(model)
    os.environ[serve_app.ENV_MAX_UPLOAD_MB] = str(max_upload_mb)
    os.environ[serve_app.ENV_WORKERS] = str(workers)
    os.environ[serve_app.ENV_MAX_BATCH] = str(int(max_batch))
    os.environ[serve_app.ENV_MAX_WAIT_MS] = str(float(max_wait_ms))
    os.environ[serve_app.ENV_API_KEYS] = "\n".join(keys)
    os.environ[serve_app.ENV_ENGINE] = engine  # the workers find the export in the cache the app above filled
    with _shared_metrics():
        uvicorn.run("convlens.serve.app:create_app_from_env", factory=True, host=host, port=int(port),
                    workers=int(workers), log_level="info")
    return 0


@contextlib.contextmanager
def _shared_metrics() -> Iterator[None]:
    """The workers' Prometheus counts in one fresh folder (removed afterwards), so a scrape of
    any worker sums them all; a folder the user set in ``PROMETHEUS_MULTIPROC_DIR`` is used as it is."""
    from convlens.serve.metrics import MULTIPROC_ENV

    if os.environ.get(MULTIPROC_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="convlens-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    try:
        yield
    finally:
        del os.environ[MULTIPROC_ENV]
        try:
            shutil.rmtree(folder)
        except OSError as e:  # only our own counters' files: say so, the server has stopped anyway
            print(f"note: could not remove the metrics folder {folder}: {e}", file=sys.stderr)
