"""Adaptive micro-batching: concurrent requests' images answered by one model batch.

Each request decodes its own upload in its own (threadpool) thread, so a bad file fails only
that request, then hands the decoded image to the batcher and waits (:meth:`MicroBatcher.run`). One worker
thread takes what is queued, up to ``max_batch`` images, runs them through the model together
and hands each request its own result.

The wait is adaptive: the worker waits (at most ``max_wait_s`` after the first image) for more
images only while other requests are still decoding theirs. With nothing on its way a lone
request runs at once, so batching costs a single client no latency; under load the queue fills
while the model is busy and batches form without waiting at all.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchResult:
    """One request's answer from a batch: the result for its item, and how it was computed."""

    value: Any
    batch_size: int
    wait_s: float  # queued, before its batch started
    run_s: float  # the batch's model call


class MicroBatcher:
    """Gathers items from many threads into calls of ``fn(items) -> results``.

    ``fn`` gets at most ``max_batch`` items and must return one result per item, in order
    (a per-item failure is a result, e.g. an exception object the caller raises). An exception
    from ``fn`` itself fails every request of that batch. ``max_batch=1`` calls ``fn`` in the
    requesting thread, under ``lock``: no queue, no worker thread. ``on_batch(n)`` is called
    after each batch with its size.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], *, max_batch: int, max_wait_s: float,
                 lock: threading.Lock | None = None, on_batch: Callable[[int], None] | None = None) -> None:
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.lock = lock or threading.Lock()
        self.on_batch = on_batch
        self._cond = threading.Condition()
        self._queue: deque[tuple[Any, Future[BatchResult], float]] = deque()
        self._arriving = 0  # requests between arriving() and submit(): their images are on the way
        self._worker: threading.Thread | None = None
        self._closed = False

    def run(self, prepare: Callable[[], tuple[T, Any]]) -> tuple[T, BatchResult]:
        """``prepare()`` in this thread, then its item in the next batch; blocks until answered.

        ``prepare`` returns ``(context, item)`` (e.g. the decoded upload and its image) or
        raises, which fails only this request: nothing enters a batch. While it runs, the worker
        knows an item is on its way and may wait for it.
        """
        if self.max_batch == 1:
            context, item = prepare()
            t0 = time.perf_counter()
            with self.lock:
                t1 = time.perf_counter()
                value = self.fn([item])[0]
            result = BatchResult(value, 1, t1 - t0, time.perf_counter() - t1)
            self._batched(1)
            return context, result
        with self._cond:
            self._arriving += 1
        try:
            context, item = prepare()
        except BaseException:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()
            raise
        future: Future[BatchResult] = Future()
        with self._cond:
            self._arriving -= 1  # in the same step as the append: never counted as neither
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append((item, future, time.perf_counter()))
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="convlens-batcher", daemon=True)
                self._worker.start()
            self._cond.notify_all()
        return context, future.result()

    def close(self) -> None:
        """Stop the worker once the queue is empty (requests already queued are answered)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout=30)

    # -- worker ------------------------------------------------------------------------
    def _take(self) -> list[tuple[Any, Future[BatchResult], float]] | None:
        """The next batch (None once closed and drained): wait for a first item, then for more
        while requests are still decoding, up to ``max_wait_s`` or ``max_batch`` items."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = time.perf_counter() + self.max_wait_s
            while len(self._queue) < self.max_batch and self._arriving > 0 and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                with self.lock:
                    t1 = time.perf_counter()
                    values = list(self.fn([item for item, _, _ in jobs]))
                if len(values) != len(jobs):
                    raise RuntimeError(f"batch function returned {len(values)} results for {len(jobs)} items")
            except Exception as e:  # noqa: BLE001 - handed to every request of the batch, which raises it
                for _, future, _ in jobs:
                    future.set_exception(e)
                continue
            run_s = time.perf_counter() - t1
            for (_, future, queued), value in zip(jobs, values, strict=True):
                future.set_result(BatchResult(value, len(jobs), t1 - queued, run_s))
            self._batched(len(jobs))

    def _batched(self, n: int) -> None:
        if self.on_batch is not None:
            self.on_batch(n)
