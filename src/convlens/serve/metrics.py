"""``GET /metrics``: Prometheus counters and histograms of one app (``prometheus-client``).

Each app has its own :class:`~prometheus_client.CollectorRegistry` (not the process-wide
default), so several apps in one process, and the tests, never see each other's numbers.
With several ``--workers`` the counts live in prometheus-client's multiprocess files
(``PROMETHEUS_MULTIPROC_DIR``, set by ``serve`` before the workers start), and whichever worker
answers a scrape reports every worker's counts summed.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds: from a cached 2 ms answer to a 10 s queue under overload.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)

# prometheus-client's own variable: set before the library is imported, its metrics write to
# files in this folder, which one scrape of any process sums.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Route label of a request path: the app's own routes by name, everything else grouped, so
# scanners probing random paths cannot create a time series each.
ROUTES = ("/predict", "/explain", "/health", "/model", "/metrics", "/", "/docs", "/redoc", "/openapi.json")


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith(("/static/", "/static-offline-docs/", "/docs/")):
        return "/static"
    return "other"


class ServeMetrics:
    """The serve counters: requests by route and status, latency, batch sizes, predictions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("convlens_http_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("convlens_http_request_duration_seconds",
                                 "Time from the request's arrival to the end of its response, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("convlens_batch_size", "Images per model batch (1 with --max-batch 1)",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.predicted = Counter("convlens_images_predicted", "Images predicted, by predicted label",
                                 ["label"], registry=self.registry)
        self.unknown = Counter("convlens_images_unknown",
                               "Images predicted as unlike the training data (the prediction's known=False)",
                               registry=self.registry)

    def prediction(self, pred: Any) -> None:
        """Count one answered prediction (``known`` is read only when the Prediction has it)."""
        self.predicted.labels(label=str(pred.label)).inc()
        if getattr(pred, "known", True) is False:
            self.unknown.inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format body and its content type: this app's counts, or with several workers
        (:data:`MULTIPROC_ENV` set) every worker's, summed."""
        if not os.environ.get(MULTIPROC_ENV):
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: count every HTTP response by route and status, and time it."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # what the client sees if the app fails before answering

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = route_label(scope.get("path", ""))
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - t0)
