"""A real browser on the demo page: uploads wait out a broken temp dir by themselves.

Debian's Chromium (``/usr/bin/chromium``, never a downloaded browser) driven
by Playwright opens the demo under real gunicorn with the project's
``gunicorn_conf.py``.  While the upload temp dir is replaced by a regular
file, every upload is answered 503 + ``Retry-After``; ``upload.js`` shows
"retrying" and sends the file again, and once the file is removed (the guard
recreates the directory) each upload ends stored -- without a reload.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import GUNICORN_CONF, ROOT, Gunicorn

pytestmark = pytest.mark.slow

playwright_api = pytest.importorskip("playwright.sync_api")
PIL_Image = pytest.importorskip("PIL.Image")
pytest.importorskip("django")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DEMO = ROOT / "examples" / "django_demo"
BROKEN_FOR = 2.0  # seconds the temp dir stays unusable after the first retry is shown


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def serve_demo(tmp_path: Path, **env: str) -> Gunicorn:
    """The demo under gunicorn_conf.py, its dirs under ``tmp_path``, Retry-After 1 s."""
    return Gunicorn(
        "demo.wsgi:application", tmp_path=tmp_path, config=GUNICORN_CONF, pythonpath=[DEMO], workers=2,
        env={"DJANGO_SETTINGS_MODULE": "demo.settings", "UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"),
             "DEMO_STORAGE_DIR": str(tmp_path / "uploads"), "UPLOADGUARD_RETRY_AFTER": "1", **env},
    )


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
        assert "503 POST /upload/" in server.log_path.read_text(errors="replace")

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

        assert status.startswith("The request body is larger than the limit of 1M (1048576 bytes)"), status
        assert server.log_path.read_text(errors="replace").count("uploadguard: 413 POST /upload/") == 1
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
                route.continue_()

        server = serve_demo(tmp_path)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.route("**/upload/", fail_first)
            page.set_input_files("input[type=file]", str(data))
            page.click("button[type=submit]")
            retry_text = page.wait_for_selector(".uploadguard-item[data-state=retrying]", timeout=10_000).inner_text()
            page.wait_for_selector(".uploadguard-item[data-state=stored]", timeout=10_000)
            page.close()
        finally:
            server.stop()

        assert "The connection failed; retrying in 1 s" in retry_text
        assert len(sent) == 2 and sent[1] - sent[0] >= 0.9
        assert (tmp_path / "uploads").is_dir() and len(list((tmp_path / "uploads").iterdir())) == 1

    def test_gives_up_after_five_attempts(self, tmp_path: Path, browser: Any) -> None:
        """A server that keeps answering 503 gets the file five times in all; then the status says it gave up."""
        data = tmp_path / "data.bin"
        data.write_bytes(b"some bytes")
        sent: list[Any] = []

        def unavailable(route: Any) -> None:
            sent.append(route.request)
            route.fulfill(status=503, headers={"Retry-After": "0"}, content_type="application/json",
                          body='{"detail": "Uploads are temporarily unavailable."}')

        server = serve_demo(tmp_path)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.route("**/upload/", unavailable)
            page.set_input_files("input[type=file]", str(data))
            page.click("button[type=submit]")
            status = page.wait_for_selector(".uploadguard-item[data-state=failed] .uploadguard-status",
                                            timeout=10_000).inner_text()
            page.close()
        finally:
            server.stop()

        assert status == "Uploads are temporarily unavailable. (gave up after 5 attempts)"
        assert len(sent) == 5
