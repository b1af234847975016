"""The HTTP API and web page of ``convlens serve`` (FastAPI on uvicorn).

Routes: ``POST /predict`` and ``POST /explain`` (multipart field ``file``), ``GET /health``,
``GET /model``, ``GET /metrics`` (Prometheus), ``GET /`` (the page), ``/docs`` and ``/redoc``
(served from local files, like the page: nothing is fetched from a CDN). Both model routes answer
with ``Prediction.to_dict()`` (``novelty``, ``known``: ``label`` is ``unknown`` for a photo unlike
the training images) and take ``?reject=false``, ``?novelty_threshold=X`` and ``?neighbours=K`` as
``convlens predict`` does. With API keys every route but ``/health``, the page and the docs needs
``Authorization: Bearer KEY`` (:mod:`convlens.serve.auth`).

Bad input never produces a 500: the upload limit is enforced by :class:`BodyLimit` while the
body streams in (413), uploads are decoded by the one decoder (:mod:`convlens.data.decode`)
whose errors map to 400 (empty, truncated, corrupt), 415 (not an image, or not a multipart
upload) and 413 (over the pixel limit). Every error body is JSON: ``{"error", "message"}``.
Model calls are serialised by a lock: the torch backend is not safe to call from several
threads at once, and on a CPU concurrent calls would only fight over the same cores. Concurrent
``/predict`` requests are gathered into one model batch (:mod:`convlens.serve.batching`): each
request decodes its own upload (so a bad file fails only its own request), only decoded images
join a batch, and the batch runs through the same ``Classifier.iter_predict`` as one image does.

``/explain`` is not batched: each request may ask for its own method and class, Grad-CAM needs a
backward pass per image, and its cost is dominated by drawing and PNG-encoding the overlay, not
by the forward pass. It takes the same lock, between batches.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convlens import __version__
from convlens.config import SERVE_DEFAULTS, check_serve_range
from convlens.data.decode import decode
from convlens.errors import ImageError, UserError
from convlens.runtime import set_inference_threads, share_of_cores
from convlens.serve.auth import ApiKeyMiddleware, KeyCheck
from convlens.serve.batching import BatchResult, MicroBatcher
from convlens.serve.metrics import MetricsMiddleware, ServeMetrics
from convlens.serve.responses import error_response

MB = 1024 * 1024
DISPLAY_SIDE = 512  # longest side of the overlay sent back to the page
ENV_MODEL = "CONVLENS_SERVE_MODEL"
ENV_MAX_UPLOAD_MB = "CONVLENS_SERVE_MAX_UPLOAD_MB"
ENV_WORKERS = "CONVLENS_SERVE_WORKERS"
ENV_MAX_BATCH = "CONVLENS_SERVE_MAX_BATCH"
ENV_MAX_WAIT_MS = "CONVLENS_SERVE_MAX_WAIT_MS"
ENV_API_KEYS = "CONVLENS_SERVE_API_KEYS"  # newline-separated, for worker processes only
DEFAULT_MAX_BATCH = int(SERVE_DEFAULTS["max_batch"])
DEFAULT_MAX_WAIT_MS = float(SERVE_DEFAULTS["max_wait"])
ENV_ENGINE = "CONVLENS_SERVE_ENGINE"

# ImageError.kind -> HTTP status. Unknown kinds are the client's fault too (400).
STATUS_BY_KIND = {
    "zero_bytes": 400, "truncated": 400, "corrupt": 400, "too_small": 400, "unreadable": 400,
    "not_image": 415, "unsupported": 415,
    "too_large": 413,
}

# The page and its files are served from this origin only; the CSP makes the browser refuse
# anything else, so "works offline" is enforced, not just intended.
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


# ----------------------------------------------------------------------------- upload limit
class BodyLimit:
    """Pure ASGI middleware: reject request bodies over ``max_bytes`` with 413 while they arrive.

    A declared ``Content-Length`` over the limit is refused before a byte is read; otherwise
    (chunked uploads, or a body longer than declared) bytes are counted as they stream in and
    the request is refused as soon as the count passes the limit, so a client can never make
    the server buffer more than ``max_bytes``. Accepted bodies are handed on unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
                if declared < 0:
                    raise ValueError(declared)
            except ValueError:
                await error_response(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
                return
            if declared > self.max_bytes:
                await self._too_large(scope, receive, send, declared)
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nobody is left to answer
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._too_large(scope, receive, send, None)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, declared: int | None) -> None:
        limit = f"{self.max_bytes / MB:g} MB"
        got = f"{declared:,} bytes" if declared is not None else f"more than {self.max_bytes:,} bytes"
        # Connection: close - the rest of the body is never read, so the connection cannot be reused.
        await error_response(413, "too_large", f"upload is over the {limit} limit (received {got}); "
                             "send a smaller image or restart the server with a larger --max-upload-mb",
                             headers={"Connection": "close"})(scope, receive, send)


# ----------------------------------------------------------------------------- state
@dataclass
class ServeState:
    """What the routes share: the classifier, its description, the batcher and the metrics."""

    classifier: Any
    source: str
    kind: str  # "bundle" or "onnx"
    max_upload_bytes: int
    max_pixels: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = field(default_factory=time.time)
    requests: int = 0
    errors: int = 0
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    batcher: MicroBatcher | None = None
    auth: bool = False

    @property
    def meta(self) -> Any:
        return self.classifier.meta

    @property
    def explain_methods(self) -> list[str]:
        """What the backend declares it can draw (the same rule as ``convlens explain``)."""
        from convlens.explain import supported_methods

        return list(supported_methods(self.classifier.backend))

    def predict_batch(self, items: list[tuple[Image.Image, tuple[tuple[str, Any], ...]]]) -> list[Any]:
        """``(decoded upright image, its request's options)`` -> a Prediction or ImageError each:
        ``Classifier.iter_predict``, the path of ``convlens predict`` and of one image (called
        under ``lock``). Requests with the same options (nearly always all of them) share one
        model batch; each other set of options gets its own."""
        out: list[Any] = [None] * len(items)
        groups: dict[tuple[tuple[str, Any], ...], list[int]] = {}
        for i, (_, options) in enumerate(items):
            groups.setdefault(options, []).append(i)
        for options, idx in groups.items():
            images = [items[i][0] for i in idx]
            for i, r in zip(idx, self.classifier.iter_predict(images, batch_size=len(images), **dict(options)),
                            strict=True):
                out[i] = r
        self.requests += len(items)
        return out


def _load_classifier(model: Any, engine: str = "auto") -> tuple[Any, str, str]:
    if isinstance(model, (str, os.PathLike)):
        from convlens.infer import load

        clf = load(model, device="cpu", engine=engine)
        kind = "onnx" if Path(model).suffix.lower() == ".onnx" else "bundle"
        return clf, os.fspath(model), kind
    kind = "onnx" if getattr(model.backend, "session", None) is not None else "bundle"
    return model, getattr(model, "source", "<in-memory model>"), kind


# ----------------------------------------------------------------------------- images
@dataclass
class Upload:
    """One decoded upload: the upright image as decoded for the model, and facts about it."""

    name: str
    image: Image.Image
    size_bytes: int
    width: int
    height: int
    format: str
    raw: bytes


def read_upload(file: UploadFile, state: ServeState) -> Upload:
    """Read and decode an upload exactly as ``Preprocessing.load`` decodes a file. Raises ImageError."""
    name = os.path.basename(file.filename or "") or "upload"
    raw = file.file.read()
    if not raw:
        raise ImageError(name, "zero_bytes", "the upload is empty (0 bytes)")
    prep = state.meta.preprocessing
    buf = io.BytesIO(raw)
    buf.name = name  # decode() names the file in its messages
    img, info = decode(buf, max_pixels=state.max_pixels, draft_size=prep.draft_size, keep_gray=prep.channels == 1)
    return Upload(name, img, len(raw), info.width, info.height, info.format, raw)


def display_image(up: Upload, state: ServeState) -> np.ndarray:
    """The upright photo at up to ``DISPLAY_SIDE`` px, for the overlay.

    The model's decode may have used JPEG draft mode (DCT scaling) down to the model size; for
    display we decode again at a higher draft size when that made the picture small.
    """
    from convlens.explain.figures import thumbnail

    img = up.image
    if max(img.size) < DISPLAY_SIDE and max(up.width, up.height) > max(img.size):
        img, _ = decode(io.BytesIO(up.raw), max_pixels=state.max_pixels,
                        draft_size=(DISPLAY_SIDE, DISPLAY_SIDE))
    return thumbnail(np.asarray(img.convert("RGB"), dtype=np.uint8), DISPLAY_SIDE)


def png_base64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def prediction_json(pred: Any) -> dict[str, Any]:
    """A Prediction as served: ``Prediction.to_dict()`` (every field it has), less the source
    path (the response names the upload as ``filename``)."""
    d = pred.to_dict()
    d.pop("path", None)
    return d


MAX_NEIGHBOURS = 100  # a bound on the work and the response size one request can ask for


def _novelty_options(reject: bool = Query(True, description="false: never answer `unknown` (the novelty is still given)"),
                     novelty_threshold: float | None = Query(None, description="answer `unknown` above this novelty "
                                                             "(default: the model's cut-off)"),
                     neighbours: int = Query(0, ge=0, le=MAX_NEIGHBOURS,
                                             description="list the K most similar training images")) -> dict[str, Any]:
    """The prediction options of both model routes, as ``Classifier.predict`` keywords."""
    return {"reject": reject, "novelty_threshold": novelty_threshold, "neighbours": neighbours}


def _timings(t0: float, t1: float, batch: BatchResult | None = None, t2: float | None = None) -> dict[str, Any]:
    """Latency since ``t0`` with its parts: decode (``t0``-``t1``), then the queue and the
    model batch (``batch``), or inference up to ``t2`` for an unbatched call."""
    def ms(seconds: float) -> float:
        return round(seconds * 1000, 2)

    parts = {"decode": ms(t1 - t0)}
    if batch is not None:
        parts |= {"queue": ms(batch.wait_s), "inference": ms(batch.run_s)}
    elif t2 is not None:
        parts["inference"] = ms(t2 - t1)
    return {"latency_ms": ms(time.perf_counter() - t0), "timings_ms": parts}


# What an upload can go wrong with, for the API docs of both model routes.
_UPLOAD_ERRORS = {413: {"description": "upload or pixel count over the limit"},
                  415: {"description": "not an image, or not a multipart upload"}}


# ----------------------------------------------------------------------------- app
def create_app(model: Any, *, max_upload_mb: float = 10.0, max_pixels: int | None = None,
               max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
               api_keys: list[str] | None = None, engine: str = "auto") -> FastAPI:
    """Build the app for a bundle path, an ONNX path or an already loaded ``Classifier``.

    ``max_pixels`` defaults to the bundle's own pixel limit (decompression bombs -> 413).
    ``max_batch`` images at most per model batch, waiting at most ``max_wait_ms`` for more
    (``max_batch=1``: no batching). ``api_keys``: require ``Authorization: Bearer KEY`` with
    one of them (see :mod:`convlens.serve.auth`); None or empty: no authentication.
    ``engine`` is :func:`convlens.load`'s, for a path.
    """
    from fastapi_offline import FastAPIOffline

    max_batch = int(check_serve_range("max_batch", max_batch))
    max_wait_ms = check_serve_range("max_wait", max_wait_ms)
    clf, source, kind = _load_classifier(model, engine)
    prep = clf.preprocessing
    state = ServeState(clf, source, kind, max_upload_bytes=int(max_upload_mb * MB),
                       max_pixels=int(max_pixels or prep.max_pixels), auth=bool(api_keys))
    state.batcher = MicroBatcher(state.predict_batch, max_batch=max_batch, max_wait_s=max_wait_ms / 1000,
                                 lock=state.lock, on_batch=state.metrics.batch_size.observe)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        state.batcher.close()

    # With keys, the open /openapi.json does not name the classes (the docs page fetches it
    # without a key); /model tells them to a client that has one.
    what = "Image classifier" if state.auth else f"Image classifier ({', '.join(clf.classes)})"
    app = FastAPIOffline(
        title="convlens",
        version=__version__,
        description=(f"{what} served by convlens. Upload an image as multipart/form-data field `file`."
                     + (" Every route but /health needs `Authorization: Bearer KEY`." if state.auth else "")),
        lifespan=lifespan,
    )
    app.state.serve = state
    _warm_explain(state)
    # Outermost first: count everything, then headers, then keys, then the upload limit.
    app.add_middleware(BodyLimit, max_bytes=state.max_upload_bytes)
    if api_keys:
        app.add_middleware(ApiKeyMiddleware, check=KeyCheck(api_keys))
        _document_bearer(app)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    _add_error_handlers(app, state)
    _add_page(app)
    _add_service_routes(app, state)
    _add_model_routes(app, state)
    return app


def _warm_explain(state: ServeState) -> None:
    """Import the overlay's colour maps now, not during the first /explain request."""
    if not state.explain_methods:
        return
    from matplotlib import colormaps

    from convlens.explain.figures import overlay  # noqa: F401

    colormaps["jet"]
    if state.kind == "onnx":
        # ONNX maps use explain.cam's geometry (torch): import it at start-up, when present.
        with contextlib.suppress(ImportError):
            import convlens.explain.cam  # noqa: F401


def _document_bearer(app: FastAPI) -> None:
    """The OpenAPI schema declares the bearer key, so /docs offers 'Authorize' and sends it."""
    from convlens.serve.auth import is_open

    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "a key given to `convlens serve`"}}
            for path, ops in schema.get("paths", {}).items():
                if not is_open(path):
                    for op in ops.values():
                        op["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_handlers(app: FastAPI, state: ServeState) -> None:
    """Every error is JSON with a one-line message, and counted."""

    @app.exception_handler(ImageError)
    async def _image_error(request: Request, exc: ImageError) -> JSONResponse:
        state.errors += 1
        return error_response(STATUS_BY_KIND.get(exc.kind, 400), exc.kind, f"{Path(exc.path).name}: {exc.message}")

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        state.errors += 1
        return error_response(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        state.errors += 1
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and not ctype.lower().startswith("multipart/form-data"):
            return error_response(415, "unsupported_media_type",
                                  f"send the image as multipart/form-data with the field 'file'. "
                                  f"Received: Content-Type {ctype or '(none)'!r}")
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, "invalid_request", f"{where or 'request'}: {first.get('msg', 'invalid')}"
                              + ("; send the image as the multipart field 'file'" if where == "file" else ""))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code >= 400:
            state.errors += 1
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in msg:
            msg = "the multipart body could not be parsed; send the image as multipart/form-data field 'file'"
        return error_response(exc.status_code, {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"), msg, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        state.errors += 1
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


class SecurityHeaders:
    """Pure ASGI middleware: ``nosniff`` on every response, the page's CSP on the page and its files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        page = path == "/" or path.startswith("/static/")

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                if page:
                    headers["Content-Security-Policy"] = PAGE_CSP
            await send(message)

        await self.app(scope, receive, add_headers)


def _add_page(app: FastAPI) -> None:
    """``GET /`` and its static files (under the CSP of :class:`SecurityHeaders`)."""
    static = resources.files("convlens.serve") / "static"
    page = (static / "index.html").read_text(encoding="utf-8")
    app.mount("/static", StaticFiles(packages=[("convlens.serve", "static")]), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page)


def _add_service_routes(app: FastAPI, state: ServeState) -> None:
    """``GET /health`` and ``GET /model``."""

    @app.get("/health", tags=["service"], summary="Liveness: the model is loaded and answering")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": Path(state.source).name, "uptime_s": round(time.time() - state.started, 1),
                "requests": state.requests, "errors": state.errors}

    @app.get("/model", tags=["service"], summary="The served model: classes, input, metrics, versions")
    def model_info() -> dict[str, Any]:
        meta = state.meta
        p = meta.preprocessing
        backend = state.classifier.backend
        return {
            "source": Path(state.source).name, "format": state.kind,
            "int8": bool(getattr(backend, "int8", False)),
            "classes": list(meta.classes), "num_classes": meta.num_classes,
            "input_size": {"height": p.size[0], "width": p.size[1], "channels": p.channels},
            "preprocessing": p.to_dict(), "output_activation": meta.output_activation,
            "threshold": meta.threshold, "arch": meta.arch.get("name") or "layers",
            "metrics": meta.metrics, "versions": meta.versions, "created": meta.created,
            "convlens_version": __version__, "explain_methods": state.explain_methods,
            "max_upload_bytes": state.max_upload_bytes, "max_pixels": state.max_pixels,
            "novelty": None if not state.classifier.has_novelty else {
                "threshold": state.classifier.novelty_threshold,
                **{k: (meta.novelty or {}).get(k) for k in ("method", "k", "accept", "rule")}},
            "max_batch": state.batcher.max_batch, "max_wait_ms": state.batcher.max_wait_s * 1000,
        }

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics (text exposition format)",
             response_class=Response)
    def metrics() -> Response:
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)


def _add_model_routes(app: FastAPI, state: ServeState) -> None:
    """``POST /predict`` and ``POST /explain``."""

    @app.post("/predict", tags=["model"], summary="Classify one image",
              responses={400: {"description": "empty, truncated or corrupt image"},
                         **_UPLOAD_ERRORS})
    def predict(file: UploadFile = File(..., description="the image (JPEG, PNG, WebP, BMP, GIF, TIFF)"),
                options: dict[str, Any] = Depends(_novelty_options)) -> dict[str, Any]:
        t0 = time.perf_counter()
        state.classifier.rejection(**options)  # a bad option: 400 before the upload is decoded
        t1 = t0

        def decoded() -> tuple[Upload, tuple[Image.Image, tuple[tuple[str, Any], ...]]]:
            nonlocal t1
            up = read_upload(file, state)
            t1 = time.perf_counter()
            return up, (up.image, tuple(sorted(options.items())))

        up, done = state.batcher.run(decoded)
        pred = done.value
        if isinstance(pred, ImageError):
            raise pred
        state.metrics.prediction(pred)
        return {**prediction_json(pred), "filename": up.name,
                "image": {"width": up.width, "height": up.height, "format": up.format, "bytes": up.size_bytes},
                "batch_size": done.batch_size, **_timings(t0, t1, done)}

    @app.post("/explain", tags=["model"], summary="Classify one image and draw its class activation map",
              responses={400: {"description": "bad image, unknown class or method"},
                         **_UPLOAD_ERRORS})
    def explain(file: UploadFile = File(..., description="the image"),
                method: str | None = Query(None, description="cam, gradcam or gradcam++ (default: cam when the model allows it)"),
                class_name: str | None = Query(None, alias="class", description="class to explain (default: the predicted one)"),
                options: dict[str, Any] = Depends(_novelty_options),
                ) -> dict[str, Any]:
        from convlens.explain.figures import overlay

        t0 = time.perf_counter()
        state.classifier.rejection(**options)
        methods = state.explain_methods
        method = method or (methods[0] if methods else "cam")
        up = read_upload(file, state)
        t1 = time.perf_counter()
        with state.lock:  # between batches (see the module's docstring: explain is not batched)
            e = state.classifier.explanations(up.image, method=method, class_name=class_name)[0]
            pred = state.predict_batch([(up.image, tuple(sorted(options.items())))])[0]
        if isinstance(pred, ImageError):
            raise pred
        t2 = time.perf_counter()
        state.metrics.prediction(pred)
        shown = display_image(up, state)
        png = png_base64(overlay(shown, e.heat))
        return {**prediction_json(pred), "filename": up.name, "method": method, "explained": e.explained,
                "overlay_png": png, "overlay_size": {"width": shown.shape[1], "height": shown.shape[0]},
                **_timings(t0, t1, t2=t2)}


def create_app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` / multi-worker serving: reads the model from the
    environment set by :func:`convlens.serve.serve_command`."""
    model = os.environ.get(ENV_MODEL)
    if not model:
        raise UserError(f"{ENV_MODEL} is not set; start the server with `convlens serve MODEL`")
    keys = [k for k in os.environ.get(ENV_API_KEYS, "").split("\n") if k]
    workers = max(1, int(os.environ.get(ENV_WORKERS, "1")))
    # N processes each using every core would fight over them: share the cores out, before the
    # app makes its onnxruntime session (its pool size is fixed then) and for torch's pool.
    set_inference_threads(share_of_cores(workers))
    app = create_app(model, max_upload_mb=float(os.environ.get(ENV_MAX_UPLOAD_MB, "10")),
                     max_batch=int(os.environ.get(ENV_MAX_BATCH, str(DEFAULT_MAX_BATCH))),
                     max_wait_ms=float(os.environ.get(ENV_MAX_WAIT_MS, str(DEFAULT_MAX_WAIT_MS))),
                     api_keys=keys or None, engine=os.environ.get(ENV_ENGINE, "auto"))
    set_inference_threads(share_of_cores(workers))  # again for torch, when loading the app imported it
    return app
