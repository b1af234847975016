"""End to end in headless Chromium (Debian's ``chromium``, driven by Playwright's sync API):
the page served by uvicorn on 127.0.0.1 classifies a real photo and shows its heat map.

Skipped with a reason when /usr/bin/chromium or the playwright package is absent
(`make browser` installs Chromium). Playwright never downloads a browser here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CONVLENS_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser_page():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs Chromium at {CHROMIUM} (run `make browser` or `apt-get install chromium`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory(prefix="convlens-chromium-") as profile:
        # A fresh profile per run: nothing cached or remembered from earlier runs.
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield ctx.new_page()
        finally:
            ctx.close()


def test_page_classifies_a_photo_and_shows_the_heat_map(browser_page, live_server, real_photo: Path,
                                                        tmp_path: Path) -> None:
    import httpx

    page = browser_page
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)

    page.goto(live_server.url + "/", wait_until="networkidle")
    page.wait_for_function("document.getElementById('method').options.length > 0")
    assert "cats" in page.inner_text("#model-info")

    page.set_input_files("#file", str(real_photo))
    page.wait_for_selector("#result:not([hidden])", timeout=30_000)
    label = page.inner_text("#label")
    page.wait_for_function("document.getElementById('overlay').complete && "
                           "document.getElementById('overlay').naturalWidth > 0", timeout=30_000)

    # The label is the API's answer for the same file, and every class has a bar.
    expected = httpx.post(live_server.url + "/predict",
                          files={"file": (real_photo.name, real_photo.read_bytes(), "image/jpeg")}).json()
    assert label == expected["label"]
    assert page.locator("#bars li").count() == 2
    assert page.inner_text("#bars li.top .name") == expected["label"]
    assert page.inner_text("#probability").endswith("%")
    # The bars are drawn to scale: the top class's fill is as wide as its probability says.
    page.wait_for_timeout(400)  # the width transition
    ratio = page.evaluate("""() => { const li = document.querySelector('#bars li.top');
        return li.querySelector('.fill').getBoundingClientRect().width /
               li.querySelector('.track').getBoundingClientRect().width; }""")
    assert ratio == pytest.approx(expected["probability"], abs=0.02)
    src = page.get_attribute("#overlay", "src") or ""
    assert src.startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('overlay').naturalWidth") >= 256
    assert page.is_visible("#overlay") and page.is_visible("#preview")
    assert page.inner_text("#status") == ""

    # Offline: every request stayed on this server (or was a data:/blob: URL).
    foreign = [u for u in requested if not u.startswith((live_server.url, "data:", "blob:"))]
    assert foreign == [], foreign
    assert not console_errors, console_errors
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


def test_page_reports_a_bad_file(browser_page, live_server, tmp_path: Path) -> None:
    page = browser_page
    page.goto(live_server.url + "/", wait_until="networkidle")
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a photo")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error", timeout=30_000)
    text = page.inner_text("#status")
    assert text.startswith("415") and "not an image" in text
    assert page.is_hidden("#result")


def test_page_says_unknown_for_a_photo_unlike_the_training_images(browser_page, novelty_case) -> None:
    from convlens.serve.app import create_app
    from tests.serve.conftest import LiveServer

    bundle, groups = novelty_case
    page = browser_page
    with LiveServer(create_app(bundle, max_upload_mb=1)) as server:
        page.goto(server.url + "/", wait_until="networkidle")
        page.wait_for_function("document.getElementById('method').options.length > 0")
        page.set_input_files("#file", str(groups["foreign"][0]))
        page.wait_for_selector("#result:not([hidden])", timeout=30_000)
        _wait_for_text(page, "#label", lambda t: t.startswith("unknown"))
        assert page.inner_text("#label") == "unknown: this photo is unlike the training images"
        assert page.inner_text("#probability").startswith("novelty 0.")
        assert page.locator("#bars li.top").count() == 0  # no class is presented as the answer
        assert "closest class would be" in page.inner_text("#novelty")

        page.set_input_files("#file", str(groups["train"][0]))
        _wait_for_text(page, "#label", lambda t: t in ("cats", "dogs"))
        assert page.inner_text("#label") in ("cats", "dogs")
        assert page.inner_text("#probability").endswith("%")
        assert page.inner_text("#novelty").startswith("novelty ")


def _wait_for_text(page, selector: str, ok, timeout_s: float = 30.0) -> None:
    """Poll ``selector``'s text from Python (the page's CSP refuses the string predicates of
    ``wait_for_function`` once a script has run)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not ok(page.inner_text(selector)):
        assert time.monotonic() < deadline, f"{selector} never matched: {page.inner_text(selector)!r}"
        page.wait_for_timeout(50)


def test_page_asks_for_the_api_key_once_and_keeps_it_for_the_tab(browser_page, tiny_bundle: Path,
                                                                 real_photo: Path) -> None:
    from convlens.serve.app import create_app
    from tests.serve.conftest import LiveServer

    page = browser_page
    with LiveServer(create_app(tiny_bundle, api_keys=["page-key-123"])) as server:
        page.goto(server.url + "/", wait_until="networkidle")
        page.wait_for_selector("#key-form:not([hidden])", timeout=30_000)
        page.fill("#api-key", "a-wrong-key")
        page.click("#key-form button")
        # Selector waits, not wait_for_function: the page's CSP forbids the eval that polling needs.
        page.wait_for_selector("#key-note:has-text('not accepted')", timeout=30_000)
        assert page.is_visible("#key-form")
        page.fill("#api-key", "page-key-123")
        page.click("#key-form button")
        page.wait_for_selector("#model-info:has-text('cats')", timeout=30_000)
        assert page.is_hidden("#key-form")
        assert page.evaluate("sessionStorage.getItem('convlens-api-key')") == "page-key-123"
        assert page.evaluate("localStorage.length") == 0
        # Reloading the tab keeps the key: no second prompt, and the API calls carry it.
        page.reload(wait_until="networkidle")
        page.wait_for_selector("#model-info:has-text('cats')", timeout=30_000)
        assert page.is_hidden("#key-form")
        page.set_input_files("#file", str(real_photo))
        page.wait_for_selector("#result:not([hidden])", timeout=30_000)
        assert page.inner_text("#label") in ("cats", "dogs")
        assert page.inner_text("#status") == ""
        page.evaluate("sessionStorage.clear()")
