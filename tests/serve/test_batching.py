"""Micro-batching: the batcher on its own, then concurrent requests to a real uvicorn server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from convlens.errors import ConfigError, ImageError
from convlens.serve.app import create_app
from convlens.serve.batching import MicroBatcher
from tests.bundles import png_bytes
from tests.serve.conftest import LiveServer, make_client


# ----------------------------------------------------------------------------- the batcher
class SlowDouble:
    """A batch function that records its batch sizes and threads, and takes ``delay`` s a call."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.sizes.append(len(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        return [2 * i for i in items]


def _run_many(batcher: MicroBatcher, items: list[int], fail: set[int] = frozenset()) -> dict[int, Any]:
    def one(i: int) -> Any:
        def prepare() -> tuple[int, int]:
            time.sleep(0.002 * (i % 3))  # decoding takes a little, and not the same for all
            if i in fail:
                raise ImageError(f"{i}.jpg", "corrupt", "the image data is corrupt")
            return i, i

        try:
            ctx, done = batcher.run(prepare)
        except ImageError as e:
            return e
        assert ctx == i
        return done

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return dict(zip(items, pool.map(one, items), strict=True))


def test_concurrent_items_share_batches_and_get_their_own_answers() -> None:
    fn = SlowDouble()
    seen: list[int] = []
    batcher = MicroBatcher(fn, max_batch=8, max_wait_s=0.05, on_batch=seen.append)
    results = _run_many(batcher, list(range(20)))
    batcher.close()
    assert {i: r.value for i, r in results.items()} == {i: 2 * i for i in range(20)}
    assert max(fn.sizes) > 1 and all(s <= 8 for s in fn.sizes) and sum(fn.sizes) == 20
    assert seen == fn.sizes  # on_batch saw every batch
    assert fn.threads == {"convlens-batcher"}
    for r in results.values():
        assert 1 <= r.batch_size <= 8 and r.wait_s >= 0 and r.run_s >= fn.delay * 0.9


def test_a_failed_prepare_fails_only_its_own_request() -> None:
    fn = SlowDouble()
    batcher = MicroBatcher(fn, max_batch=16, max_wait_s=0.05)
    results = _run_many(batcher, list(range(12)), fail={3, 7})
    batcher.close()
    assert isinstance(results[3], ImageError) and isinstance(results[7], ImageError)
    assert {i: r.value for i, r in results.items() if i not in (3, 7)} == {i: 2 * i for i in range(12) if i not in (3, 7)}
    assert sum(fn.sizes) == 10  # the failed ones never entered a batch
    assert batcher._arriving == 0


def test_an_error_of_the_batch_function_reaches_every_request_of_that_batch() -> None:
    def broken(items: list[int]) -> list[int]:
        raise RuntimeError("model failed")

    batcher = MicroBatcher(broken, max_batch=4, max_wait_s=0.01)
    with pytest.raises(RuntimeError, match="model failed"):
        batcher.run(lambda: (None, 1))
    batcher.close()


def test_max_batch_1_runs_in_the_requesting_thread() -> None:
    fn = SlowDouble(delay=0.0)
    batcher = MicroBatcher(fn, max_batch=1, max_wait_s=0.5)
    results = _run_many(batcher, list(range(6)))
    assert fn.sizes == [1] * 6 and "convlens-batcher" not in fn.threads
    assert batcher._worker is None
    assert all(r.batch_size == 1 and r.value == 2 * i for i, r in results.items())


def test_a_lone_request_does_not_wait_for_company() -> None:
    """The wait is adaptive: with no other request decoding, a batch of one runs at once."""
    batcher = MicroBatcher(SlowDouble(delay=0.0), max_batch=32, max_wait_s=5.0)
    t0 = time.perf_counter()
    _, done = batcher.run(lambda: (None, 21))
    assert done.value == 42 and time.perf_counter() - t0 < 2.5  # far below the 5 s max_wait
    batcher.close()


# ----------------------------------------------------------------------------- the server
def _slowed(clf: Any, delay: float) -> Any:
    """Make each model call take ``delay`` s longer, so requests queue up while it runs."""
    inner = clf.backend.image_logits

    def slow(images: Any, prep: Any) -> Any:
        time.sleep(delay)
        return inner(images, prep)

    clf.backend.image_logits = slow
    return clf


@pytest.fixture(scope="module")
def unbatched(tiny_bundle: Path) -> Iterator[LiveServer]:
    with LiveServer(create_app(tiny_bundle, max_batch=1)) as server:
        yield server


@pytest.fixture(scope="module")
def batched(tiny_bundle: Path) -> Iterator[LiveServer]:
    from convlens.infer import load

    clf = _slowed(load(tiny_bundle, device="cpu"), 0.15)
    with LiveServer(create_app(clf, max_batch=8, max_wait_ms=100)) as server:
        yield server


def _post(url: str, data: bytes, name: str = "x.png") -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as c:
        return c.post("/predict", files={"file": (name, data, "image/png")})


def test_concurrent_requests_are_batched_and_answered_exactly(batched: LiveServer, unbatched: LiveServer) -> None:
    images = {i: png_bytes(30 + i, 20 + 2 * i, seed=i) for i in range(12)}
    expected = {i: _post(unbatched.url, data).json() for i, data in images.items()}
    assert {r["batch_size"] for r in expected.values()} == {1}
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = dict(zip(images, pool.map(lambda d: _post(batched.url, d), images.values()), strict=True))
    assert all(r.status_code == 200 for r in got.values()), {i: r.text for i, r in got.items()}
    sizes = [r.json()["batch_size"] for r in got.values()]
    assert max(sizes) > 1, sizes
    for i, r in got.items():
        body = r.json()
        # The same numbers as the request answered alone, to the last bit.
        assert body["probabilities"] == expected[i]["probabilities"]
        assert (body["label"], body["index"], body["probability"]) == (
            expected[i]["label"], expected[i]["index"], expected[i]["probability"])
        assert body["top_k"] == expected[i]["top_k"]
        assert set(body["timings_ms"]) == {"decode", "queue", "inference"}


def test_a_bad_upload_among_batched_ones_fails_only_itself(batched: LiveServer) -> None:
    good = {i: png_bytes(40, 40, seed=100 + i) for i in range(8)}
    bad = {100: b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, 101: b"not an image at all" * 10}
    uploads = good | bad
    with ThreadPoolExecutor(max_workers=len(uploads)) as pool:
        got = dict(zip(uploads, pool.map(lambda d: _post(batched.url, d), uploads.values()), strict=True))
    for i in good:
        assert got[i].status_code == 200, got[i].text
    for i in bad:
        assert 400 <= got[i].status_code < 500 and set(got[i].json()) == {"error", "message"}
    assert max(got[i].json()["batch_size"] for i in good) > 1


def test_an_image_error_inside_a_batch_fails_only_its_request(tiny_bundle: Path) -> None:
    """A per-image error from the model path (after decoding) goes to that request alone."""
    from convlens.infer import load

    clf = _slowed(load(tiny_bundle, device="cpu"), 0.15)
    real = clf.iter_predict

    def iter_predict(sources: list[Any], **kw: Any) -> Iterator[Any]:
        for src, result in zip(sources, real(sources, **kw), strict=True):
            yield ImageError("odd.png", "unsupported", "this test's odd image") if src.size == (13, 13) else result

    clf.iter_predict = iter_predict
    uploads = {i: png_bytes(30, 30, seed=i) for i in range(6)} | {99: png_bytes(13, 13, seed=9)}
    with LiveServer(create_app(clf, max_batch=8, max_wait_ms=100)) as server, \
            ThreadPoolExecutor(max_workers=len(uploads)) as pool:
        got = dict(zip(uploads, pool.map(lambda d: _post(server.url, d), uploads.values()), strict=True))
    assert got[99].status_code == 415 and got[99].json()["error"] == "unsupported"
    assert all(got[i].status_code == 200 for i in range(6))
    assert max(got[i].json()["batch_size"] for i in range(6)) > 1


def test_model_info_reports_the_batching(tiny_bundle: Path) -> None:
    with make_client(create_app(tiny_bundle, max_batch=4, max_wait_ms=2)) as c:
        info = c.get("/model").json()
    assert info["max_batch"] == 4 and info["max_wait_ms"] == pytest.approx(2.0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_batch": 0}, "max_batch must be in"),
    ({"max_batch": 2.5}, "whole number"),
    ({"max_wait_ms": -1}, "max_wait must be in"),
])
def test_create_app_checks_the_batching_settings(tiny_bundle: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_app(tiny_bundle, **kwargs)
