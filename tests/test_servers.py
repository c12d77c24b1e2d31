"""The guard's core promises under every WSGI server it is tested with: one table of scenarios, five servers.

gunicorn (sync and gthread workers), uWSGI behind its own HTTP router
(``--http`` with ``--http-chunked-input``) and parsing HTTP itself
(``--http-socket``), and waitress each serve
``wsgi_apps:guarded`` -- an app spooling the body into the upload temp dir
behind :class:`uploadguard.UploadGuard` -- and each gets the same requests:
a body over the limit announced by ``Content-Length`` and sent chunked (the
client reads the 413), the temp dir deleted (healed, stored), replaced by a
file and full (a readable 503 + ``Retry-After``).

What differs between the servers, pinned here:

* **waitress** reads the whole body into its own buffer (memory, then a file
  in its own temp dir) before the application runs, dechunking it and setting
  ``Content-Length``: a 413 comes only after the client has sent everything,
  and the body is never read by the app.
* **uWSGI** hands a chunked body to the worker only through
  ``uwsgi.chunked_read``, and only when the chunks reach the worker (the HTTP
  router needs ``--http-chunked-input``); without it the guard answers 411
  (see :class:`TestUwsgiWithoutChunkedInput` for what the client sees).

One server of each kind serves all the scenarios of the module (a test puts
the upload dir back as it found it), so the matrix costs a start per server.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support import ROOT, TESTS, Gunicorn, free_port, raw_http, tmpfs, wait_for_port

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
LIMIT = MiB
UWSGI = Path(sys.executable).parent / "uwsgi"


class Process:
    """A server other than gunicorn (uWSGI, waitress) on a free 127.0.0.1 port, its output in ``log_path``."""

    def __init__(self, command: Sequence[str], *, port: int, log_path: Path, env: dict[str, str]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(list(command), stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     env={**os.environ, "PYTHONPATH": str(TESTS), **env}, start_new_session=True)
        try:
            wait_for_port(port, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"{command[0]} did not start:\n{self.log()}") from None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()


def guard_env(upload_dir: Path) -> dict[str, str]:
    return {"UPLOADGUARD_TEMP_DIR": str(upload_dir), "UPLOADGUARD_MAX_BODY_SIZE": str(LIMIT),
            "UPLOADGUARD_MIN_FREE_SPACE": "0", "UPLOADGUARD_RETRY_AFTER": "1"}


def uwsgi(tmp_path: Path, upload_dir: Path, *options: str, socket: str = "--http") -> Process:
    """uWSGI 2.0 serving ``wsgi_apps:guarded`` from this virtualenv through its HTTP router (or ``socket``)."""
    if not UWSGI.exists():
        pytest.skip(f"no uwsgi beside {sys.executable} (the test extra installs uWSGI; it compiles with gcc)")
    port = free_port()
    command = [str(UWSGI), "--master", "--processes", "1", "--need-app", "--die-on-term", "--virtualenv",
               sys.prefix, "--pythonpath", str(TESTS), "--module", "wsgi_apps:guarded",
               socket, f"127.0.0.1:{port}", *options]
    return Process(command, port=port, log_path=tmp_path / f"uwsgi-{port}.log", env=guard_env(upload_dir))


def waitress(tmp_path: Path, upload_dir: Path) -> Process:
    if importlib.util.find_spec("waitress") is None:
        pytest.skip("waitress is not installed (the test extra installs it)")
    port = free_port()
    command = [sys.executable, "-m", "waitress", f"--listen=127.0.0.1:{port}", "--threads=2", "wsgi_apps:guarded"]
    return Process(command, port=port, log_path=tmp_path / f"waitress-{port}.log", env=guard_env(upload_dir))


def gunicorn(tmp_path: Path, upload_dir: Path, *args: str) -> Gunicorn:
    return Gunicorn("wsgi_apps:guarded", tmp_path=tmp_path, args=["--log-level", "info", *args],
                    env=guard_env(upload_dir))


SERVERS = ["gunicorn-sync", "gunicorn-gthread", "uwsgi", "uwsgi-http-socket", "waitress"]


def start(kind: str, tmp_path: Path, upload_dir: Path) -> Gunicorn | Process:
    if kind == "gunicorn-sync":
        return gunicorn(tmp_path, upload_dir)
    if kind == "gunicorn-gthread":
        return gunicorn(tmp_path, upload_dir, "--worker-class", "gthread", "--threads", "2")
    if kind == "uwsgi":
        return uwsgi(tmp_path, upload_dir, "--http-chunked-input")
    if kind == "uwsgi-http-socket":
        return uwsgi(tmp_path, upload_dir, socket="--http-socket")
    return waitress(tmp_path, upload_dir)


class Served:
    """A running server and the upload dir its guard watches."""

    def __init__(self, kind: str, server: Gunicorn | Process, upload_dir: Path) -> None:
        self.kind = kind
        self.server = server
        self.upload_dir = upload_dir

    def post(self, body: bytes | Iterator[bytes], *, chunked: bool = False) -> tuple[int, dict[str, str], bytes]:
        return post(self.server.url, body, chunked=chunked)

    def stored(self) -> list[str]:
        """What the app left in the upload dir (its spool files are deleted when it answers)."""
        return sorted(os.listdir(self.upload_dir)) if self.upload_dir.is_dir() else []


@pytest.fixture(scope="module", params=SERVERS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp(request.param)
    upload_dir = base / "uploads"
    upload_dir.mkdir(mode=0o700)
    server = start(request.param, base, upload_dir)
    try:
        yield Served(request.param, server, upload_dir)
    finally:
        server.stop()


@pytest.fixture
def healthy(served: Served) -> Iterator[Served]:
    """The server, with its upload dir put back as a plain empty directory after the test."""
    yield served
    path = served.upload_dir
    if path.is_file():
        path.unlink()
    path.mkdir(mode=0o700, exist_ok=True)


def post(url: str, body: bytes | Iterator[bytes], *, chunked: bool = False,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """POST with the standard library's client, which sends the whole body before it reads the answer."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/upload", body=body, encode_chunked=chunked,
                     headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    block = b"u" * size
    while total > 0:
        yield block[: min(size, total)]
        total -= size


class TestEveryServer:
    def test_a_small_body_is_stored(self, healthy: Served) -> None:
        """The baseline: a body under the limit, with Content-Length or chunked, reaches the app whole."""
        status, _, body = healthy.post(b"x" * 1000)
        assert (status, json.loads(body)["size"]) == (200, 1000)
        status, _, body = healthy.post(chunks(100_000), chunked=True)
        assert (status, json.loads(body)["size"]) == (200, 100_000)

    def test_content_length_over_the_limit_is_a_readable_413(self, healthy: Served) -> None:
        """A body announced at twice the limit (the drain bound) gets a 413 the client reads after sending it all."""
        status, _, body = healthy.post(b"x" * (2 * LIMIT))
        assert status == 413 and b"1M" in body
        assert healthy.stored() == []

    def test_a_chunked_body_over_the_limit_is_a_readable_413(self, healthy: Served) -> None:
        """A chunked body is cut at the limit (waitress: refused on the length it counted) and the client reads the 413."""
        seen = len(healthy.server.log())
        status, _, body = healthy.post(chunks(2 * LIMIT), chunked=True)
        assert status == 413 and b"1M" in body
        assert healthy.stored() == []
        said = f"Content-Length {2 * LIMIT}" if healthy.kind == "waitress" else "chunked body"  # waitress dechunked it
        assert f"413 POST /upload: {said} over the limit" in healthy.server.log()[seen:]

    def test_a_vanished_temp_dir_is_healed(self, healthy: Served) -> None:
        """The upload dir deleted under a running server is recreated and the upload stored."""
        shutil.rmtree(healthy.upload_dir)
        status, _, body = healthy.post(b"x" * 1000)
        assert (status, json.loads(body)["size"]) == (200, 1000)
        assert healthy.upload_dir.is_dir()

    def test_a_file_in_place_of_the_temp_dir_is_a_503(self, healthy: Served) -> None:
        """A file where the upload dir should be: a readable 503 + Retry-After, and uploads work once it is gone."""
        shutil.rmtree(healthy.upload_dir)
        healthy.upload_dir.write_text("in the way")
        status, headers, body = healthy.post(b"x" * (2 * LIMIT // 3))
        assert (status, headers["Retry-After"]) == (503, "1")
        assert b"temporarily unavailable" in body
        healthy.upload_dir.unlink()
        assert healthy.post(b"x" * 1000)[0] == 200
        assert "not_a_directory" in healthy.server.log()

    def test_a_full_temp_dir_is_a_503(self, healthy: Served) -> None:
        """An upload dir on a 512 KiB tmpfs refuses a 900 KiB body with a readable 503 + Retry-After."""
        with tmpfs(healthy.upload_dir, size="512k", options="mode=700"):
            status, headers, _ = healthy.post(b"x" * (900 * 1024))
            assert (status, headers["Retry-After"]) == (503, "1")
            assert healthy.stored() == []
        assert "no_space" in healthy.server.log()


@pytest.fixture(scope="module")
def uwsgi_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """uWSGI's HTTP router as ``uwsgi --http`` starts it: no ``--http-chunked-input``."""
    base = tmp_path_factory.mktemp("uwsgi-plain")
    upload_dir = base / "uploads"
    upload_dir.mkdir(mode=0o700)
    server = uwsgi(base, upload_dir)
    try:
        yield server
    finally:
        server.stop()


class TestUwsgiWithoutChunkedInput:
    """uWSGI's HTTP router without ``--http-chunked-input`` drops a chunked body before the worker."""

    def test_a_chunked_upload_is_a_readable_411_not_an_empty_200(self, uwsgi_plain: Process) -> None:
        """A chunked upload sent whole gets a 411 naming --http-chunked-input and Content-Length; the app never runs.

        Sent in one piece within the router's first read (its 4 KiB buffer),
        so the client reads the answer whatever the timing.
        """
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (1000, b"u" * 1000)
        head = b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        response, error = raw_http(uwsgi_plain.port, head + body)
        assert error is None and response.startswith(b"HTTP/1.1 411 Length Required\r\n"), response[:200]
        assert b"--http-chunked-input" in response and b"Content-Length" in response
        assert "411 POST /upload" in uwsgi_plain.log()

    def test_a_large_chunked_upload_is_refused_though_the_client_may_not_read_it(self, uwsgi_plain: Process) -> None:
        """A 30 MiB chunked upload is answered 411, never 200; the client may see a reset instead.

        The router forwards none of the body, so nobody can drain it: it
        sends what the worker answers and closes the connection with the
        rest unread, and the kernel resets it under a client still sending
        (pinned: about one time in three for a mere 60 KB).
        What the guard can promise is that the app never takes the empty body
        for the upload.
        """
        seen = len(uwsgi_plain.log())
        try:
            status: int | str = post(uwsgi_plain.url, chunks(30 * MiB), chunked=True)[0]
        except (ConnectionResetError, BrokenPipeError) as exc:
            status = type(exc).__name__
        assert status in (411, "ConnectionResetError", "BrokenPipeError")
        log = uwsgi_plain.log()[seen:]
        assert "(HTTP/1.1 411)" in log and "(HTTP/1.1 200)" not in log

    def test_content_length_uploads_work_as_ever(self, uwsgi_plain: Process) -> None:
        """With a Content-Length the body reaches the app as under any server."""
        status, _, body = post(uwsgi_plain.url, b"x" * 1000)
        assert (status, json.loads(body)["size"]) == (200, 1000)
