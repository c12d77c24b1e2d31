"""tus-js-client, the npm package nobody here wrote, uploads to ResumableUploads under real gunicorn.

``tests/js/tus_client.js`` drives tus-js-client 4 (pinned by
``tests/js/package-lock.json``; ``scripts/test`` installs it with ``npm ci
--prefix tests/js`` where npm is present) under Debian's ``node``.  The server is
``UploadGuard(ResumableUploads(...))`` (``tests/resumable_client_apps.py``)
under gunicorn with the project's ``gunicorn_conf.py`` and 3 workers; what it
stored is checked through the sha256 its ``on_complete`` hook recorded.

Covered: a plain upload (one PATCH and 1 MiB chunks), the IETF draft
dialects tus-js-client speaks (its ``protocol`` option), ``Upload-Checksum``
on every PATCH (added by an ``onBeforeRequest`` hook: tus-js-client has no
checksum option), an upload resumed by a new process after the first was
SIGKILLed, one resumed after its connection was reset mid-PATCH
(``tests/chaos_proxy.py``), and the docs' ``Retry-After`` snippet (docs/resumable.md) while the
storage directory is unusable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos_proxy import RESET, ChaosProxy
from tests.support import GUNICORN_CONF, ROOT, Gunicorn

pytest.importorskip("uploadguard.resumable")
pytestmark = pytest.mark.slow

NODE = shutil.which("node")
JS = ROOT / "tests" / "js"
CLIENT = JS / "tus_client.js"
MiB = 1024 * 1024
RETRY_AFTER = 2  # seconds the server asks for while its storage is unusable


@pytest.fixture(scope="module", autouse=True)
def _node_modules() -> None:
    if NODE is None:
        pytest.skip("needs node (apt-get install nodejs npm)")
    if not (JS / "node_modules" / "tus-js-client").is_dir():
        pytest.skip("needs tests/js/node_modules: npm ci --prefix tests/js")


class Server:
    """The endpoint under gunicorn (3 workers, gunicorn_conf.py) and where it records completed uploads."""

    def __init__(self, tmp_path: Path) -> None:
        self.storage = tmp_path / "uploads"
        self.records = tmp_path / "records"
        self.gunicorn = Gunicorn(
            "resumable_client_apps:application", tmp_path=tmp_path, config=GUNICORN_CONF, workers=3,
            env={"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"), "UPLOADGUARD_RETRY_AFTER": str(RETRY_AFTER),
                 "TEST_RESUMABLE_STORAGE": str(self.storage), "TEST_RECORDS": str(self.records)})
        self.port = self.gunicorn.port
        self.endpoint = self.gunicorn.url + "/files/"

    def record(self, url: str) -> dict[str, Any] | None:
        """What on_complete read for the upload at ``url``, or None if it never completed."""
        path = self.records / f"{url.rstrip('/').rsplit('/', 1)[-1]}.json"
        return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path)
    try:
        yield server
    finally:
        server.gunicorn.stop()


def blob(tmp_path: Path, size: int, seed: int = 0) -> tuple[Path, str]:
    data = os.urandom(size) if seed == 0 else hashlib.shake_256(str(seed).encode()).digest(size)
    path = tmp_path / f"blob-{size}-{seed}.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def run_client(timeout: float = 60.0, **options: Any) -> list[dict[str, Any]]:
    """Run tus_client.js to its end; its events, in order."""
    done = subprocess.run([str(NODE), str(CLIENT), json.dumps(options)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(JS))
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:], events[-5:])
    return events


class Client:
    """tus_client.js running in the background; its events read as they come."""

    def __init__(self, **options: Any) -> None:
        self.proc = subprocess.Popen([str(NODE), str(CLIENT), json.dumps(options)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=str(JS), start_new_session=True)
        self.events: list[dict[str, Any]] = []

    def next_event(self) -> dict[str, Any] | None:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            return None
        self.events.append(json.loads(line))
        return self.events[-1]

    def wait_for(self, predicate: Any, timeout: float = 60.0) -> dict[str, Any]:
        """Read events until one matches (the client writes one at least every few seconds while it works)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.next_event()
            if event is None:
                raise AssertionError(f"client ended first: {self.events[-5:]} {self.stderr()}")
            if predicate(event):
                return event
        raise AssertionError(f"no matching event in {timeout} s: {self.events[-5:]}")

    def finish(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while self.next_event() is not None:
            if time.monotonic() > deadline:
                break
        self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return self.events

    def stderr(self) -> str:
        return self.proc.stderr.read()[-2000:] if self.proc.stderr and self.proc.poll() is not None else ""

    def kill(self) -> None:
        """SIGKILL the client if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def requests_head(endpoint: str, location: str) -> int:
    """The status of a tus HEAD for ``location`` (relative to ``endpoint``)."""
    request = urllib.request.Request(urllib.parse.urljoin(endpoint, location), method="HEAD",
                                     headers={"Tus-Resumable": "1.0.0"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def outcome(events: list[dict[str, Any]]) -> dict[str, Any]:
    [last] = [event for event in events if event["event"] in ("success", "error")][-1:] or [{"event": "none"}]
    return last


def responses(events: list[dict[str, Any]], method: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "response" and (method is None or e["method"] == method)]


class TestPlainUpload:
    @pytest.mark.parametrize("chunk_size", [pytest.param(None, id="one-patch"), pytest.param(MiB, id="1MiB-chunks")])
    def test_upload_is_stored_intact(self, tmp_path: Path, server: Server, chunk_size: int | None) -> None:
        """tus-js-client creates an upload and PATCHes it to the end; on_complete reads exactly the bytes sent."""
        path, sha256 = blob(tmp_path, 3 * MiB + 12345)
        events = run_client(endpoint=server.endpoint, file=str(path), chunkSize=chunk_size)

        done = outcome(events)
        assert done["event"] == "success", events[-5:]
        record = server.record(done["url"]) or {}
        assert (record.get("length"), record.get("sha256")) == (path.stat().st_size, sha256)
        assert record.get("metadata") == {"filename": path.name, "filetype": "application/octet-stream"}
        patches = responses(events, "PATCH")
        assert [r["status"] for r in patches] == [204] * (4 if chunk_size else 1)
        assert patches[-1]["offset"] == str(path.stat().st_size)

    def test_parallel_parts_are_joined_and_consumed(self, tmp_path: Path, server: Server) -> None:
        """parallelUploads (Uppy's parallel mode): partial uploads at once, joined by a final one; on_complete
        sees the whole file once, and the parts are gone."""
        path, sha256 = blob(tmp_path, 3 * MiB + 7)
        events = run_client(endpoint=server.endpoint, file=str(path), parallelUploads=3)

        done = outcome(events)
        assert done["event"] == "success", events[-5:]
        record = server.record(done["url"]) or {}
        assert (record.get("length"), record.get("sha256")) == (path.stat().st_size, sha256)
        creations = responses(events, "POST")
        assert [r["status"] for r in creations] == [201] * 4  # three parts, then the final upload
        parts = [e["location"] for e in creations[:3]]
        assert all(requests_head(server.endpoint, part) == 404 for part in parts)

    @pytest.mark.parametrize("protocol", ["ietf-draft-03", "ietf-draft-05"])
    def test_ietf_draft_dialects_are_understood(self, tmp_path: Path, server: Server, protocol: str) -> None:
        """With tus-js-client's protocol option set to an IETF draft (Upload-Draft-Interop-Version), the upload is created empty, appended and stored intact."""
        path, sha256 = blob(tmp_path, 2 * MiB + 7)
        events = run_client(endpoint=server.endpoint, file=str(path), chunkSize=MiB, protocol=protocol)

        done = outcome(events)
        assert done["event"] == "success", events[-5:]
        assert (server.record(done["url"]) or {}).get("sha256") == sha256


class TestChecksums:
    @pytest.mark.parametrize("algorithm", ["sha256", "sha1", "md5"])
    def test_checksummed_chunks_are_stored(self, tmp_path: Path, server: Server, algorithm: str) -> None:
        """Every PATCH carries an Upload-Checksum of its chunk; the server verifies and keeps them all."""
        path, sha256 = blob(tmp_path, 3 * MiB + 1)
        events = run_client(endpoint=server.endpoint, file=str(path), chunkSize=MiB, checksum=algorithm)

        done = outcome(events)
        assert done["event"] == "success", events[-5:]
        assert (server.record(done["url"]) or {}).get("sha256") == sha256
        assert [r["status"] for r in responses(events, "PATCH")] == [204] * 4

    def test_a_wrong_checksum_is_refused_with_460_and_nothing_is_kept(self, tmp_path: Path, server: Server) -> None:
        """A chunk whose Upload-Checksum does not match is answered 460 and not counted: the offset stays 0."""
        path, _ = blob(tmp_path, MiB)
        events = run_client(endpoint=server.endpoint, file=str(path), chunkSize=MiB, checksum="corrupt",
                            retryDelays=[])

        assert outcome(events)["event"] == "error"
        assert [r["status"] for r in responses(events, "PATCH")] == [460]
        assert not server.records.exists() or list(server.records.iterdir()) == []


class TestResumption:
    def test_a_new_process_resumes_where_a_killed_one_stopped(self, tmp_path: Path, server: Server) -> None:
        """tus-js-client killed mid-upload; a new process with the same URL storage resumes at the server's offset and sends only the rest."""
        path, sha256 = blob(tmp_path, 24 * MiB)
        urls = tmp_path / "tus-urls.json"
        first = Client(endpoint=server.endpoint, file=str(path), chunkSize=MiB // 2, urlStorage=str(urls))
        try:
            first.wait_for(lambda e: e["event"] == "progress" and e["sent"] >= 0.3 * e["total"])
        finally:
            first.kill()
        assert outcome(first.events)["event"] == "none", "finished before it could be killed"

        events = run_client(endpoint=server.endpoint, file=str(path), chunkSize=MiB // 2, urlStorage=str(urls))

        done = outcome(events)
        assert done["event"] == "success", events[-5:]
        assert [e["event"] for e in events][0] == "resuming"
        assert responses(events, "POST") == []  # no new upload: the same URL
        assert [r["status"] for r in responses(events, "HEAD")] in ([200], [204])
        patches = responses(events, "PATCH")
        resumed_at = int(patches[0]["offset"]) - MiB // 2
        assert resumed_at >= 0.25 * path.stat().st_size, patches[:2]
        assert (server.record(done["url"]) or {}).get("sha256") == sha256

    def test_an_upload_resumes_after_its_connection_is_reset(self, tmp_path: Path, server: Server) -> None:
        """Each connection through the proxy is reset after 2.5 MiB; tus-js-client asks for the offset, continues from there, and sends little more than the file."""
        path, sha256 = blob(tmp_path, 6 * MiB)
        with ChaosProxy(server.port, cut_probability=1.0, cut_after=(5 * MiB // 2, 5 * MiB // 2),
                        modes=[RESET]) as proxy:
            events = run_client(endpoint=proxy.url + "/files/", file=str(path), retryDelays=[0, 200, 200, 200])
            cuts, forwarded = proxy.counts()[RESET], proxy.bytes_up

        done = outcome(events)
        assert done["event"] == "success", events[-8:]
        assert cuts >= 2
        assert len(responses(events, "HEAD")) >= 2
        assert (server.record(done["url"]) or {}).get("sha256") == sha256
        assert forwarded < 1.3 * path.stat().st_size, f"{forwarded} bytes forwarded for {path.stat().st_size}"


class TestRetryAfterSnippet:
    def break_storage(self, server: Server) -> None:
        shutil.rmtree(server.storage, ignore_errors=True)
        server.storage.write_text("a file where the upload storage should be")

    def test_readme_snippet_waits_out_an_unusable_storage(self, tmp_path: Path, server: Server) -> None:
        """The docs' tus-js-client hooks make every retry wait for Retry-After while the storage is a file; the upload ends stored once it is a directory again."""
        path, sha256 = blob(tmp_path, 2 * MiB)
        self.break_storage(server)
        client = Client(endpoint=server.endpoint, file=str(path), readme=str(ROOT / "docs" / "resumable.md"))
        try:
            client.wait_for(lambda e: e["event"] == "response" and e["status"] == 503)
            client.wait_for(lambda e: e["event"] == "response" and e["status"] == 503)
            server.storage.unlink()
            server.storage.mkdir(exist_ok=True)
            events = client.finish()
        finally:
            client.kill()

        done = outcome(events)
        assert done["event"] == "success", events[-8:]
        assert (server.record(done["url"]) or {}).get("sha256") == sha256
        answered = responses(events)
        unavailable = [i for i, r in enumerate(answered) if r["status"] == 503]
        assert len(unavailable) >= 2 and all(answered[i]["retryAfter"] == str(RETRY_AFTER) for i in unavailable)
        gaps = [answered[i + 1]["at"] - answered[i]["at"] for i in unavailable]
        assert min(gaps) >= RETRY_AFTER - 0.1, gaps

    def test_without_the_hooks_the_retries_are_spent_at_once(self, tmp_path: Path, server: Server) -> None:
        """The same client without the hooks (retry delays of 0) spends all its retries at once and gives up while the storage is still unusable."""
        path, _ = blob(tmp_path, MiB)
        self.break_storage(server)
        started = time.monotonic()
        events = run_client(endpoint=server.endpoint, file=str(path), retryDelays=[0] * 8)

        answered = responses(events)
        assert outcome(events)["event"] == "error"
        assert [r["status"] for r in answered] == [503] * 9
        assert answered[-1]["at"] - answered[0]["at"] < 1.0  # eight retries in well under a second
        assert time.monotonic() - started < 10
