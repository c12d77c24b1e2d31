"""upload.js's resumable mode in a real browser, through a connection that breaks mid-upload.

Debian's Chromium driven by Playwright (the set-up of ``tests/test_browser.py``)
opens a page served by ``UploadGuard(ResumableUploads(...))`` under real
gunicorn with the project's ``gunicorn_conf.py``
(``tests/resumable_client_apps.py``), through ``ChaosProxy``
(``tests/chaos_proxy.py``) on 127.0.0.1.  The page calls
``UploadGuard.resumableUpload`` on a chosen file; the proxy resets or
black-holes the connection partway.  What the server stored is checked through
the sha256 its ``on_complete`` hook recorded; the progress reported to the page
never goes back by more than one chunk.  The cut connections are also taken by
the ASGI endpoint (``tests/resumable_asgi_apps.py``, the same page) under
``gunicorn -c gunicorn_conf.py -k asgi`` and under uvicorn.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.chaos_proxy import BLACKHOLE, RESET, ChaosProxy
from tests.support import GUNICORN_CONF, ROOT, TESTS, Gunicorn
from tests.test_asgi import Uvicorn

pytest.importorskip("uploadguard.resumable")
pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow

HELPER = ROOT / "uploadguard" / "static" / "uploadguard" / "upload.js"
MiB = 1024 * 1024
CHUNK = 4 * MiB  # the page's chunkSize
PAGE = """<!doctype html><meta charset="utf-8"><title>resumable</title>
<input type="file"><script src="/page/upload.js"></script>
<script>
window.start = function (options) {
  var file = document.querySelector("input").files[0];
  window.progress = []; window.statuses = []; window.result = null; window.failure = null;
  window.progressAt = []; window.statusAt = [];  // the page's Date.now() of each (a fake clock in some tests)
  window.upload = UploadGuard.resumableUpload(file, Object.assign({
    endpoint: "/files/", chunkSize: %d,
    onProgress: function (loaded, total) { window.progress.push(loaded); window.progressAt.push(Date.now()); },
    onStatus: function (text, info) {
      window.statuses.push([text, info.state]); window.statusAt.push(Date.now()); window.url = info.url;
    }
  }, options || {}));
  window.upload.then(function (result) { window.result = result; }, function (error) {
    window.failure = {message: error.message, status: error.status, cancelled: !!error.cancelled};
  });
};
</script>""" % CHUNK
FORM = """<!doctype html><meta charset="utf-8"><title>bound form</title>
<form data-uploadguard data-uploadguard-resumable="/files/" action="/not-used/" method="post">
<input type="file" name="file" multiple><button type="submit">Upload</button><ol data-uploadguard-list></ol></form>
<script src="/page/upload.js"></script>
<script>
window.stored = []; window.failed = [];
document.addEventListener("uploadguard:stored", function (event) { window.stored.push(event.detail.result.url); });
document.addEventListener("uploadguard:failed", function (event) { window.failed.push(event.detail.error.message); });
</script>"""


#: Where the endpoint runs: WSGI under gunicorn's sync workers, or ASGI under ``gunicorn -k asgi`` or uvicorn.
SERVERS = ("wsgi", "asgi-gunicorn", "asgi-uvicorn")


class Site:
    """The endpoint and the test page under one of ``SERVERS``, reached through a ChaosProxy."""

    def __init__(self, tmp_path: Path, server: str = "wsgi") -> None:
        pages = tmp_path / "pages"
        pages.mkdir()
        (pages / "index.html").write_text(PAGE)
        (pages / "form.html").write_text(FORM)
        shutil.copy(HELPER, pages / "upload.js")
        self.storage = tmp_path / "uploads"
        self.records = tmp_path / "records"
        env = {"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"), "UPLOADGUARD_RETRY_AFTER": "2",
               "TEST_RESUMABLE_STORAGE": str(self.storage), "TEST_RECORDS": str(self.records),
               "TEST_PAGES": str(pages), "TEST_COMPLETIONS": str(tmp_path / "completions")}
        self.server: Any
        if server == "wsgi":
            self.server = Gunicorn("resumable_client_apps:application", tmp_path=tmp_path, config=GUNICORN_CONF,
                                   workers=3, env=env)
        elif server == "asgi-gunicorn":
            self.server = Gunicorn("resumable_asgi_apps:application", tmp_path=tmp_path, config=GUNICORN_CONF,
                                   workers=2, args=["-k", "asgi", "--log-level", "info"], env=env)
        else:
            self.server = Uvicorn("resumable_asgi_apps:application", tmp_path=tmp_path,
                                  env={**env, "PYTHONPATH": str(TESTS)})
        self.completions = tmp_path / "completions"
        self.proxy = ChaosProxy(self.server.port, seed=3).start()
        self.url = self.proxy.url + "/page/index.html"

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()

    def sha256(self, url: str) -> str | None:
        path = self.records / f"{url.rstrip('/').rsplit('/', 1)[-1]}.json"
        return json.loads(path.read_text())["sha256"] if path.exists() else None

    def completed(self, url: str) -> int:
        """How many times ``on_complete`` ran for the upload at ``url``."""
        upload_id = url.rstrip("/").rsplit("/", 1)[-1]
        lines = self.completions.read_text().splitlines() if self.completions.exists() else []
        return [line.split()[0] for line in lines].count(upload_id)

    def requests(self, method: str) -> int:
        """How many ``method /files/...`` requests the server's access log (gunicorn's or uvicorn's) shows."""
        return len(re.findall(rf'"{method} /files/', self.server.log()))


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    """The site under gunicorn's sync workers, or the server a test's ``site`` parameter names (``SERVERS``)."""
    site = Site(tmp_path, getattr(request, "param", "wsgi"))
    try:
        yield site
    finally:
        site.stop()


def blob(tmp_path: Path, size: int) -> tuple[Path, str]:
    data = os.urandom(size)
    path = tmp_path / "video.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def open_page(browser: Any, site: Site, file: Path) -> Any:
    page = browser.new_page()
    page.goto(site.url)
    page.set_input_files("input[type=file]", str(file))
    return page


def finished(page: Any, timeout: float = 60_000) -> dict[str, Any]:
    page.wait_for_function("window.result !== null || window.failure !== null", timeout=timeout)
    state: dict[str, Any] = page.evaluate("({result: window.result, failure: window.failure, progress: window.progress,"
                         " statuses: window.statuses})")
    return state


def never_back_by_more_than_a_chunk(progress: list[int], chunk: int = CHUNK) -> bool:
    return all(later >= earlier - chunk for earlier, later in zip(progress, progress[1:]))


def cut(site: Site, mode: str, after: tuple[int, int], times: int) -> None:
    """From now on, cut the next ``times`` connections that carry ``after`` bytes (gunicorn's sync workers close each connection after one request: one PATCH, one connection).

    ASGI servers keep connections alive, and a connection the proxy accepted
    before this call is never cut: call it before the page is opened.
    """
    site.proxy.cut_probability, site.proxy.cut_after, site.proxy.modes = 1.0, after, (mode,)
    site.proxy.max_cuts = times


@pytest.mark.parametrize("site", SERVERS, indirect=True)
class TestCutConnections:
    def test_reset_connections_resume_where_the_server_stands(self, tmp_path: Path, browser: Any, site: Site) -> None:
        """Three PATCHes are reset partway; the upload retries, resumes from the server's offset and ends stored intact (on_complete run once), its progress never going back by more than a chunk."""
        path, sha256 = blob(tmp_path, 20 * MiB)
        cut(site, RESET, (MiB, 3 * MiB), 3)
        page = open_page(browser, site, path)
        page.evaluate("start()")
        state = finished(page)
        page.close()

        assert state["failure"] is None, state["failure"]
        assert site.sha256(state["result"]["url"]) == sha256
        assert site.completed(state["result"]["url"]) == 1
        assert site.proxy.counts()[RESET] == 3
        assert any(text.startswith("The connection failed; retrying") for text, _ in state["statuses"])
        assert never_back_by_more_than_a_chunk(state["progress"]), state["progress"]
        assert state["progress"][-1] == path.stat().st_size
        assert site.requests("POST") == 1  # resumed, never begun again
        assert site.proxy.bytes_up < 1.5 * path.stat().st_size
        assert "Traceback" not in site.server.log(), site.server.log()[-3000:]

    def test_a_black_holed_connection_is_given_up_after_the_stall_timeout(self, tmp_path: Path, browser: Any,
                                                                        site: Site) -> None:
        """Connections that silently stop carrying bytes are dropped after stallTimeout, saying so; the upload resumes on a new one and ends stored intact (on_complete run once)."""
        path, sha256 = blob(tmp_path, 16 * MiB)
        cut(site, BLACKHOLE, (MiB, 3 * MiB), 2)
        page = open_page(browser, site, path)
        page.evaluate("start({stallTimeout: 2})")
        state = finished(page)
        page.close()

        assert state["failure"] is None, state["failure"]
        assert site.sha256(state["result"]["url"]) == sha256
        assert site.completed(state["result"]["url"]) == 1
        assert site.proxy.counts()[BLACKHOLE] == 2
        assert any(text.startswith("Connection stalled, reconnecting\u2026") for text, _ in state["statuses"])
        assert never_back_by_more_than_a_chunk(state["progress"]), state["progress"]
        assert site.requests("POST") == 1
        assert "Traceback" not in site.server.log(), site.server.log()[-3000:]


class TestStall:
    def test_ten_seconds_without_progress_say_stalled_and_reconnect(self, tmp_path: Path, browser: Any,
                                                                    site: Site) -> None:
        """With the default stallTimeout, a PATCH whose connection goes silent is cut 10 s (on the page's clock)
        after its last sign of progress, the page says "Connection stalled, reconnecting…", and the upload resumes
        and ends stored intact."""
        path, sha256 = blob(tmp_path, 16 * MiB)
        page = browser.new_page()
        page.clock.install()  # the page's timers run on a clock this test moves: no waiting 10 s, exact times
        page.goto(site.url)
        page.set_input_files("input[type=file]", str(path))
        cut(site, BLACKHOLE, (MiB, 3 * MiB), 1)
        page.evaluate("start()")
        deadline = time.monotonic() + 30
        while not site.proxy.counts()[BLACKHOLE] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert site.proxy.counts()[BLACKHOLE] == 1
        page.clock.pause_at((page.evaluate("Date.now()") + 500) / 1000)  # Playwright for Python takes seconds
        stalled = "window.statuses.findIndex((s) => s[0].startsWith('Connection stalled'))"
        for _ in range(40):  # 40 s on the page's clock, a second at a time
            page.clock.run_for(1000)
            if page.evaluate(stalled) >= 0:
                break
        page.clock.resume()
        state = finished(page)
        index = page.evaluate(stalled)
        stalled_at, progress_at = page.evaluate("window.statusAt"), page.evaluate("window.progressAt")
        page.close()

        assert index >= 0, state["statuses"]
        assert state["statuses"][index] == ["Connection stalled, reconnecting\u2026 (attempt 2 of 10)", "retrying"]
        # The PATCH's watch is armed just before its "Uploading… N %" status or a progress event is recorded (the
        # fake clock's Date.now() may catch up with real time in between, by a real-time tick of 0.1 s or so).
        armed = max(at for at in progress_at + stalled_at[:index] if at <= stalled_at[index])
        assert 5_000 < stalled_at[index] - armed <= 10_000, (stalled_at[index] - armed, state["statuses"][:index + 1])
        assert state["failure"] is None, state["failure"]
        assert site.sha256(state["result"]["url"]) == sha256
        assert site.requests("POST") == 1

    def test_the_status_shows_live_progress_after_a_resume(self, tmp_path: Path, browser: Any, site: Site) -> None:
        """After a cut, the status text follows the upload ("Uploading… N % (resumed at M %)" with N rising past M),
        not one fixed "from M %" until the end."""
        path, sha256 = blob(tmp_path, 8 * MiB)
        page = open_page(browser, site, path)
        cut(site, RESET, (300 * 1024, 300 * 1024), 1)  # the first PATCH: one per connection
        page.evaluate(f"start({{chunkSize: {MiB // 2}}})")  # 16 PATCHes: progress shows between them
        state = finished(page)
        page.close()

        assert state["failure"] is None, state["failure"]
        assert site.sha256(state["result"]["url"]) == sha256
        texts = [text for text, kind in state["statuses"] if kind == "uploading"]
        resumed = [(int(now), int(at)) for now, at in
                   (re.fullmatch(r"Uploading\u2026 (\d+) % \(resumed at (\d+) %\)", text).groups()  # type: ignore[union-attr]
                    for text in texts if "resumed at" in text)]
        assert resumed, texts
        percents = [now for now, _ in resumed]
        assert percents == sorted(percents) and len(set(percents)) >= 3, texts
        assert percents[-1] >= 99 and all(at == resumed[0][1] for _, at in resumed), texts
        assert state["statuses"][-1] == ["Stored.", "stored"]


class TestReload:
    def test_the_same_file_resumes_after_a_page_reload(self, tmp_path: Path, browser: Any, site: Site) -> None:
        """An upload stuck in a black hole is left by reloading the page; choosing the same file again resumes at the server's offset with no new upload."""
        path, sha256 = blob(tmp_path, 16 * MiB)
        page = open_page(browser, site, path)
        cut(site, BLACKHOLE, (6 * MiB, 6 * MiB), 1)
        page.evaluate(f"start({{chunkSize: {8 * MiB}, stallTimeout: 300}})")  # stuck until the reload
        page.wait_for_function(f"window.progress.length && Math.max(...window.progress) >= {6 * MiB}",
                               timeout=30_000)
        deadline = time.monotonic() + 20
        while not site.proxy.counts()[BLACKHOLE] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert site.proxy.counts()[BLACKHOLE] == 1
        page.reload()
        page.set_input_files("input[type=file]", str(path))
        page.evaluate("start()")
        state = finished(page)
        page.close()

        assert state["failure"] is None, state["failure"]
        assert site.sha256(state["result"]["url"]) == sha256
        assert state["statuses"][0] == ["Resuming\u2026", "uploading"]
        assert state["progress"][0] >= 4 * MiB, state["progress"][:3]  # the server kept what reached it
        assert site.requests("POST") == 1


class TestCancel:
    @pytest.mark.parametrize("how", [pytest.param("window.upload.cancel()", id="cancel"),
                                     pytest.param("window.controller.abort()", id="abort-signal")])
    def test_cancel_deletes_the_upload_on_the_server(self, tmp_path: Path, browser: Any, site: Site,
                                                      how: str) -> None:
        """cancel(), or aborting the signal option, stops the upload, rejects its promise as cancelled, sends a DELETE and forgets the URL."""
        path, _ = blob(tmp_path, 16 * MiB)
        page = open_page(browser, site, path)
        cut(site, BLACKHOLE, (6 * MiB, 6 * MiB), 1)
        page.evaluate(f"start({{chunkSize: {8 * MiB}, stallTimeout: 300, "
                      f"signal: (window.controller = new AbortController()).signal}})")
        page.wait_for_function(f"window.progress.length && Math.max(...window.progress) >= {5 * MiB}",
                               timeout=30_000)
        page.evaluate(how)  # while stuck in the black hole
        state = finished(page)
        url = page.evaluate("window.url")
        remembered = page.evaluate("Object.keys(localStorage).filter((k) => k.startsWith('uploadguard:tus:'))")
        page.close()

        assert state["result"] is None
        assert state["failure"] == {"message": "Cancelled.", "status": 0, "cancelled": True}
        assert state["statuses"][-1] == ["Cancelled.", "cancelled"]
        assert remembered == []
        deadline = time.monotonic() + 10
        while site.requests("DELETE") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert site.requests("DELETE") == 1
        head = requests.head(site.server.url + urlsplit(url).path, headers={"Tus-Resumable": "1.0.0"}, timeout=10)
        assert head.status_code in (404, 410)


class TestRetryAfter:
    def test_an_unusable_storage_is_waited_out_as_retry_after_says(self, tmp_path: Path, browser: Any,
                                                                   site: Site) -> None:
        """While the storage is a file the creation gets 503 + Retry-After: 2; the page says "retrying in 2 s" and the upload ends stored once the directory is back."""
        path, sha256 = blob(tmp_path, 3 * MiB)
        shutil.rmtree(site.storage, ignore_errors=True)
        site.storage.write_text("a file where the upload storage should be")
        page = open_page(browser, site, path)
        page.evaluate("start()")
        page.wait_for_function("window.statuses.some((s) => s[1] === 'retrying')", timeout=15_000)
        started = time.monotonic()
        site.storage.unlink()
        site.storage.mkdir(exist_ok=True)
        state = finished(page)
        page.close()

        assert state["failure"] is None, state["failure"]
        assert site.sha256(state["result"]["url"]) == sha256
        retrying = [text for text, kind in state["statuses"] if kind == "retrying"]
        assert retrying[0].startswith("The server cannot take uploads right now; retrying in 2 s"), retrying
        assert time.monotonic() - started < 15

    def test_429_waits_for_retry_after(self, tmp_path: Path, browser: Any, site: Site) -> None:
        """A 429 with Retry-After: 1 on the first PATCH is sent again no sooner than a second later."""
        path, sha256 = blob(tmp_path, MiB // 2)
        patches: list[float] = []

        def limited(route: Any) -> None:
            if route.request.method == "PATCH":
                patches.append(time.monotonic())
                if len(patches) == 1:
                    route.fulfill(status=429, headers={"Retry-After": "1"}, body="slow down")
                    return
            route.continue_()

        page = open_page(browser, site, path)
        page.route("**/files/**", limited)
        page.evaluate("start()")
        state = finished(page)
        page.close()

        assert state["failure"] is None, state["failure"]
        assert site.sha256(state["result"]["url"]) == sha256
        assert len(patches) == 2 and patches[1] - patches[0] >= 0.9
        assert any(text.startswith("Too many requests; retrying in 1 s") for text, _ in state["statuses"])


class TestBoundForm:
    def test_a_form_marked_resumable_sends_each_file_through_tus(self, tmp_path: Path, browser: Any,
                                                               site: Site) -> None:
        """<form data-uploadguard data-uploadguard-resumable="/files/"> uploads each chosen file to the tus endpoint and reports its URL in the "stored" event."""
        files = []
        for n in range(2):  # blob() names every file video.bin: one directory each
            (tmp_path / str(n)).mkdir()
            files.append(blob(tmp_path / str(n), (n + 1) * MiB + n))
        page = browser.new_page()
        page.goto(site.proxy.url + "/page/form.html")
        page.set_input_files("input[type=file]", [str(path) for path, _ in files])
        page.click("button[type=submit]")
        page.wait_for_function("window.stored.length + window.failed.length === 2", timeout=30_000)
        stored, failed = page.evaluate("window.stored"), page.evaluate("window.failed")
        states = page.locator(".uploadguard-item").evaluate_all("(items) => items.map((li) => li.dataset.state)")
        page.close()

        assert failed == []
        assert sorted(site.sha256(url) or "" for url in stored) == sorted(sha256 for _, sha256 in files)
        assert states == ["stored", "stored"]
        assert site.requests("POST") == 2 and '"POST /not-used/' not in site.server.log()


class TestOptions:
    @pytest.mark.parametrize("options", [
        pytest.param("{chunkSize: 0}", id="chunkSize-0"),
        pytest.param("{chunkSize: 1.5}", id="chunkSize-fraction"),
        pytest.param("{maxAttempts: '3'}", id="maxAttempts-string"),
        pytest.param("{stallTimeout: -1}", id="stallTimeout-negative"),
    ])
    def test_bad_options_are_refused_before_anything_is_sent(self, tmp_path: Path, browser: Any, site: Site,
                                                             options: str) -> None:
        """A chunkSize, maxAttempts or stallTimeout that is not a number above 0 rejects with a RangeError naming it, and nothing is sent."""
        path, _ = blob(tmp_path, 1000)
        page = open_page(browser, site, path)
        page.evaluate(f"start({options})")
        state = finished(page, timeout=5_000)
        page.close()

        name = options.strip("{}").split(":")[0]
        assert state["failure"]["message"].startswith(f"UploadGuard.resumableUpload: {name} must be "), state
        assert site.requests("POST") == 0


class TestLostUpload:
    def test_a_remembered_url_the_server_does_not_know_starts_a_fresh_upload(self, tmp_path: Path, browser: Any,
                                                                           site: Site) -> None:
        """A URL remembered for this file that the server answers 404 for is forgotten; the file is uploaded afresh and stored."""
        path, sha256 = blob(tmp_path, 2 * MiB)
        page = open_page(browser, site, path)
        page.evaluate("""() => {
            const file = document.querySelector("input").files[0];
            const endpoint = new URL("/files/", document.baseURI).href;
            localStorage.setItem("uploadguard:tus:" + JSON.stringify([endpoint, file.name, file.size, file.lastModified]),
                                 endpoint + "AAAAAAAAAAAAAAAAAAAAAAAA");
        }""")
        page.evaluate("start()")
        state = finished(page)
        page.close()

        assert state["failure"] is None, state["failure"]
        assert state["statuses"][0] == ["Resuming\u2026", "uploading"]
        assert site.sha256(state["result"]["url"]) == sha256
        assert not state["result"]["url"].endswith("AAAAAAAAAAAAAAAAAAAAAAAA")
        assert re.search(r'"HEAD /files/AAAAAAAAAAAAAAAAAAAAAAAA HTTP/1.1" 404', site.server.log())
        assert site.requests("POST") == 1
