"""A real browser on the demo page: uploads wait out a broken temp dir by themselves.

Debian's Chromium (``/usr/bin/chromium``, never a downloaded browser) driven
by Playwright opens the demo under real gunicorn with the project's
``gunicorn_conf.py``.  While the upload temp dir is replaced by a regular
file, every upload is answered 503 + ``Retry-After``; ``upload.js`` shows
"retrying" and sends the file again, and once the file is removed (the guard
recreates the directory) each upload ends stored -- without a reload.

The helper's own edge cases (odd ``Retry-After`` headers, an odd
``data-uploadguard-concurrency``) run on a small page that Playwright serves
itself, with no server process.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import GUNICORN_CONF, ROOT, Gunicorn

pytestmark = pytest.mark.slow

pytest.importorskip("playwright.sync_api")
PIL_Image = pytest.importorskip("PIL.Image")
pytest.importorskip("django")

DEMO = ROOT / "examples" / "django_demo"
BROKEN_FOR = 2.0  # seconds the temp dir stays unusable after the first retry is shown
HELPER = ROOT / "uploadguard" / "static" / "uploadguard" / "upload.js"
SITE = "http://uploadguard.test"  # answered by page.route(), never looked up


def serve_demo(tmp_path: Path, **env: str) -> Gunicorn:
    """The demo under gunicorn_conf.py, its dirs under ``tmp_path``, Retry-After 1 s."""
    return Gunicorn(
        "demo.wsgi:application", tmp_path=tmp_path, config=GUNICORN_CONF, pythonpath=[DEMO], workers=2,
        env={"DJANGO_SETTINGS_MODULE": "demo.settings", "UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"),
             "DEMO_STORAGE_DIR": str(tmp_path / "uploads"), "UPLOADGUARD_RESUMABLE_STORAGE": str(tmp_path / "tus"),
             "UPLOADGUARD_RETRY_AFTER": "1", **env},
    )


def helper_page(browser: Any, answer: Callable[[Any], None], *, concurrency: str = "") -> Any:
    """A page with a ``<form data-uploadguard>`` and upload.js, uploads answered by ``answer(route)``."""
    attribute = f' data-uploadguard-concurrency="{concurrency}"' if concurrency else ""
    html = (f'<!doctype html><form data-uploadguard action="/upload/" method="post"{attribute}>'
            '<input type="file" name="file" multiple><button type="submit">Upload</button>'
            '<ol data-uploadguard-list></ol></form><script src="/upload.js"></script>')

    def site(route: Any) -> None:
        path = route.request.url.removeprefix(SITE)
        if path == "/upload/":
            answer(route)
        elif path == "/upload.js":
            route.fulfill(path=str(HELPER), content_type="text/javascript")
        else:
            route.fulfill(body=html, content_type="text/html")

    page = browser.new_page()
    page.route(SITE + "/**", site)
    page.goto(SITE + "/")
    return page


def stored(route: Any) -> None:
    route.fulfill(status=200, content_type="application/json", body='{"stored": []}')


def photo(path: Path, turn: int) -> Path:
    """A colourful gradient photo, different for each ``turn``."""
    ramp = PIL_Image.linear_gradient("L").resize((800, 600))
    bands = [ramp.rotate(90 * turn), ramp.rotate(90 * turn + 120, expand=False), ramp.transpose(PIL_Image.Transpose.FLIP_LEFT_RIGHT)]
    PIL_Image.merge("RGB", bands).save(path, "JPEG", quality=100)
    return path


class TestBrowserUpload:
    def test_uploads_are_stored_after_the_temp_dir_heals(self, tmp_path: Path, browser: Any) -> None:
        """Files chosen while the temp dir is broken show "retrying", then all end stored, with no page reload."""
        temp_dir, storage = tmp_path / "tmp", tmp_path / "uploads"
        files = [photo(tmp_path / f"photo-{n}.jpg", n) for n in range(3)]
        files.append(tmp_path / "notes.txt")
        files[-1].write_text("not a photo: stored as-is\n")
        server = serve_demo(tmp_path)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(server.url + "/")
            page.evaluate("window.loadedOnce = true")
            shutil.rmtree(temp_dir, ignore_errors=True)
            temp_dir.write_text("a file where the temp dir should be")

            page.set_input_files("input[type=file]", [str(f) for f in files])
            page.click("button[type=submit]")
            retrying = page.wait_for_selector(".uploadguard-item[data-state=retrying]", timeout=10_000)
            retry_text = retrying.inner_text()
            page.screenshot(path=str(tmp_path / "demo-retrying.png"), full_page=True)
            time.sleep(BROKEN_FOR)
            temp_dir.unlink()  # the guard recreates the missing directory
            page.wait_for_function(
                f"document.querySelectorAll('.uploadguard-item[data-state=stored]').length === {len(files)}",
                timeout=30_000)

            statuses = page.locator(".uploadguard-item .uploadguard-status").all_inner_texts()
            tiles = page.locator("#gallery li").count()
            not_reloaded = page.evaluate("window.loadedOnce === true")
            screenshot = tmp_path / "demo.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"\nscreenshots: {tmp_path / 'demo-retrying.png'} (while broken), {screenshot} (after)")
            page.close()
        finally:
            server.stop()

        assert "retrying in 1 s" in retry_text
        assert not_reloaded
        assert tiles == len(files)
        assert sum(status.startswith("Stored: ") for status in statuses) == 3, statuses
        assert sum(status.startswith("Stored as-is (") for status in statuses) == 1, statuses
        assert len([p for p in storage.iterdir() if not p.name.startswith(".")]) == len(files)
        assert "503 PATCH /files/" in server.log_path.read_text(errors="replace")  # the demo sends resumably

    def test_too_large_upload_fails_at_once_with_the_servers_message(self, tmp_path: Path, browser: Any) -> None:
        """A file over the body limit is not sent again: its status shows the server's 413 message."""
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(1536 * 1024))
        server = serve_demo(tmp_path, UPLOADGUARD_MAX_BODY_SIZE="1M")
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.set_input_files("input[type=file]", str(big))
            page.click("button[type=submit]")
            status = page.wait_for_selector(".uploadguard-item[data-state=failed] .uploadguard-status",
                                            timeout=15_000).inner_text()
            page.close()
        finally:
            server.stop()

        assert "The request body is larger than the limit of 1M (1048576 bytes)" in status, status
        log = server.log_path.read_text(errors="replace")
        assert log.count('"POST /files/ HTTP/1.1" 413') == 1 and "PATCH" not in log  # refused at creation, once
        assert not (tmp_path / "uploads").exists()

    def test_connection_failure_is_retried_after_a_pause(self, tmp_path: Path, browser: Any) -> None:
        """An upload whose connection fails (status 0) is sent again a second later and ends stored."""
        data = tmp_path / "data.bin"
        data.write_bytes(os.urandom(50_000))
        sent: list[float] = []

        def fail_first(route: Any) -> None:
            sent.append(time.monotonic())
            if len(sent) == 1:
                route.abort("connectionreset")
            else:
                stored(route)

        page = helper_page(browser, fail_first)
        page.set_input_files("input[type=file]", str(data))
        page.click("button[type=submit]")
        retry_text = page.wait_for_selector(".uploadguard-item[data-state=retrying]", timeout=10_000).inner_text()
        page.wait_for_selector(".uploadguard-item[data-state=stored]", timeout=10_000)
        page.close()

        assert "The connection failed; retrying in 1 s" in retry_text
        assert len(sent) == 2 and sent[1] - sent[0] >= 0.9

    def test_gives_up_after_five_attempts(self, tmp_path: Path, browser: Any) -> None:
        """A server that keeps answering 503 gets the file five times in all; then the status says it gave up."""
        data = tmp_path / "data.bin"
        data.write_bytes(b"some bytes")
        sent: list[Any] = []

        def unavailable(route: Any) -> None:
            sent.append(route.request)
            route.fulfill(status=503, headers={"Retry-After": "0"}, content_type="application/json",
                          body='{"detail": "Uploads are temporarily unavailable."}')

        page = helper_page(browser, unavailable)
        page.set_input_files("input[type=file]", str(data))
        page.click("button[type=submit]")
        status = page.wait_for_selector(".uploadguard-item[data-state=failed] .uploadguard-status",
                                        timeout=10_000).inner_text()
        page.close()

        assert status == "Uploads are temporarily unavailable. (gave up after 5 attempts)"
        assert len(sent) == 5


class TestRetryAfter:
    def test_only_whole_seconds_or_an_http_date_set_the_wait(self, browser: Any) -> None:
        """Retry-After is read as whole seconds or an IMF-fixdate; anything else means the backoff, and the wait is capped."""
        cases = {
            "5": 5, " 7 ": 7, "0": 0, "120": 60, "99999999999999999999": 60,  # capped by maxDelay (60)
            "1.5": 4, "+5": 4, "-1": 4, "5, 5": 4, "soon": 4, "": 4,  # the backoff for the third attempt
            "Sun, 06 Nov 1994 08:49:37 GMT": 0, "Sunday, 06-Nov-94 08:49:37 GMT": 4,
            "Fri, 01 Jan 2100 00:00:00 GMT": 60,
        }
        page = helper_page(browser, stored)

        delays = page.evaluate("(headers) => headers.map((h) => UploadGuard._retryDelay(h, 3))", list(cases))
        # A date has whole seconds: the wait is to that second, from whenever the page reads it.
        asked = time.time()
        due = int(asked) + 30
        in_30s_delay = page.evaluate("(h) => UploadGuard._retryDelay(h, 1)", email.utils.formatdate(due, usegmt=True))
        answered = time.time()
        caps = page.evaluate("""[UploadGuard._retryDelay("1000", 1, 600), UploadGuard._retryDelay("1000", 1, "x"),
                                 UploadGuard._retryDelay(null, 1, 0)]""")
        page.close()

        assert dict(zip(cases, delays)) == cases
        assert due - answered - 0.05 <= in_30s_delay <= due - asked + 0.05  # 0.05: the page's clock reading
        assert caps == [300, 60, 0]  # maxDelay itself is capped at 300 s; an unreadable one means 60 s

    def test_odd_retry_after_does_not_mean_resend_at_once(self, browser: Any) -> None:
        """A 503 with "Retry-After: 1.5" is retried after the 1-second backoff, not at once."""
        sent: list[float] = []

        def unavailable_once(route: Any) -> None:
            sent.append(time.monotonic())
            if len(sent) == 1:
                route.fulfill(status=503, headers={"Retry-After": "1.5"}, body="not now")
            else:
                stored(route)

        page = helper_page(browser, unavailable_once)
        page.evaluate("""window.statuses = [];
            new MutationObserver(() => document.querySelectorAll(".uploadguard-status").forEach(
                (status) => window.statuses.push(status.textContent)))
              .observe(document.querySelector("[data-uploadguard-list]"), {childList: true, subtree: true})""")
        page.set_input_files("input[type=file]", files={"name": "a.txt", "mimeType": "text/plain", "buffer": b"a"})
        page.click("button[type=submit]")
        page.wait_for_selector(".uploadguard-item[data-state=stored]", timeout=5_000)
        statuses = page.evaluate("window.statuses")
        page.close()

        assert any("retrying in 1 s" in status for status in statuses), statuses
        assert len(sent) == 2 and sent[1] - sent[0] >= 0.9


class TestBoundForm:
    def test_unreadable_concurrency_falls_back_to_the_default(self, browser: Any) -> None:
        """A data-uploadguard-concurrency that is not a positive whole number still sends every file."""
        sent: list[str] = []

        def count(route: Any) -> None:
            sent.append(route.request.url)
            stored(route)

        page = helper_page(browser, count, concurrency="abc")
        files = [{"name": f"{n}.txt", "mimeType": "text/plain", "buffer": b"x"} for n in range(3)]
        page.set_input_files("input[type=file]", files=files)
        page.click("button[type=submit]")
        page.wait_for_function("document.querySelectorAll('.uploadguard-item[data-state=stored]').length === 3",
                               timeout=3_000)
        page.close()

        assert len(sent) == 3


class TestMaxAttempts:
    @pytest.mark.parametrize("value", ["0", "-1", "2.5", "'3'", "NaN"])
    def test_unusable_max_attempts_rejects_and_sends_nothing(self, browser: Any, value: str) -> None:
        """maxAttempts that is not a whole number of at least 1 (0 included) rejects with a RangeError, nothing sent."""
        sent: list[str] = []

        def count(route: Any) -> None:
            sent.append(route.request.url)
            stored(route)

        page = helper_page(browser, count)
        error = page.evaluate(f"""UploadGuard.upload("/upload/", new File(["x"], "a.txt"), {{maxAttempts: {value}}})
                                    .then(() => "resolved", (error) => error.name + ": " + error.message)""")
        page.close()

        assert error.startswith("RangeError: UploadGuard.upload: maxAttempts must be a whole number of at least 1")
        assert sent == []

    def test_max_attempts_is_honoured(self, browser: Any) -> None:
        """maxAttempts: 1 sends the file once against a server that keeps answering 503, then gives up."""
        sent: list[str] = []

        def unavailable(route: Any) -> None:
            sent.append(route.request.url)
            route.fulfill(status=503, headers={"Retry-After": "0"}, body="not now")

        page = helper_page(browser, unavailable)
        attempts = page.evaluate("""UploadGuard.upload("/upload/", new File(["x"], "a.txt"), {maxAttempts: 1})
                                      .then(() => "resolved", (error) => error.attempts)""")
        page.close()

        assert attempts == 1 and len(sent) == 1


class TestProgressScreenshot:
    def test_each_file_shows_its_own_progress_mid_upload(self, tmp_path: Path, browser: Any) -> None:
        """Mid-upload on a slow link, each chosen photo has its own bar part-way and an "Uploading… N %" status.

        The screenshot taken then is the docs' picture of the demo: with UPLOADGUARD_DOCS_SCREENSHOT=1 it is
        written to docs/images/demo-resumable.png, otherwise into the test's tmp dir.
        """
        rng = __import__("random").Random(7)
        files = []
        for n in range(3):
            noise = PIL_Image.frombytes("RGB", (1200, 900), rng.randbytes(1200 * 900 * 3))
            files.append(tmp_path / f"photo-{n + 1}.jpg")
            noise.save(files[-1], "JPEG", quality=95)  # ~1.5 MB each: seconds at the throttled rate
        server = serve_demo(tmp_path)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(server.url + "/")
            cdp = page.context.new_cdp_session(page)
            cdp.send("Network.emulateNetworkConditions", {
                "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 256 * 1024})
            page.set_input_files("input[type=file]", [str(f) for f in files])
            page.click("button[type=submit]")
            page.wait_for_function(
                "[...document.querySelectorAll('.uploadguard-item progress')].some(p => p.value > 0.15 && p.value < 0.85)",
                timeout=60_000)
            statuses = page.locator(".uploadguard-item .uploadguard-status").all_inner_texts()
            bars = page.locator(".uploadguard-item progress").count()
            target = (ROOT / "docs" / "images" if os.environ.get("UPLOADGUARD_DOCS_SCREENSHOT") == "1" else tmp_path)
            page.screenshot(path=str(target / "demo-resumable.png"))
            cdp.send("Network.emulateNetworkConditions", {
                "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
            page.wait_for_function(
                f"document.querySelectorAll('.uploadguard-item[data-state=stored]').length === {len(files)}",
                timeout=60_000)
            page.close()
        finally:
            server.stop()

        assert bars == len(files)
        assert any(status.startswith("Uploading\u2026 ") and status.endswith("%") for status in statuses), statuses
