"""The middleware on real sockets: what only a real gunicorn and a real client show.

gunicorn sends no response at all when an ``OSError`` escapes the app, and
closes the socket after draining only 64 KiB / 2 s of an unread body, so a
client still sending sees a reset.  These tests pin that behaviour with the
bare app and show the guarded app answering instead.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import select
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import GUNICORN_CONF, ROOT, Gunicorn, tmpfs

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
LIMIT = 8 * MiB


def post(url: str, body: bytes | Iterator[bytes], *, chunked: bool = False, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """POST with the standard library's client, which (unlike urllib3) does not read early responses."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/upload", body=body, encode_chunked=chunked,
                     headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    block = b"u" * size
    while total > 0:
        yield block[: min(size, total)]
        total -= size


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    path = tmp_path / "uploads"
    path.mkdir(mode=0o700)
    return path


def serve(app: str, tmp_path: Path, upload_dir: Path, **env: str) -> Gunicorn:
    return Gunicorn(app, tmp_path=tmp_path, args=["--log-level", "info"],
                    env={"UPLOADGUARD_TEMP_DIR": str(upload_dir), "UPLOADGUARD_MAX_BODY_SIZE": str(LIMIT),
                         "UPLOADGUARD_MIN_FREE_SPACE": "0", "UPLOADGUARD_RETRY_AFTER": "1", **env})


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path, upload_dir: Path) -> Iterator[Gunicorn]:
    gunicorn = serve(request.param, tmp_path, upload_dir)
    yield gunicorn
    gunicorn.stop()


class TestOversizedBodies:
    @pytest.mark.parametrize("server", ["wsgi_apps:refuse"], indirect=True)
    def test_naive_413_is_a_reset_for_the_client(self, server: Gunicorn) -> None:
        """Pinned gunicorn behaviour: a 413 sent without reading a 2x body never reaches the client."""
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            post(server.url, b"x" * (2 * LIMIT))

    @pytest.mark.parametrize("factor", [1.5, 2.0])
    @pytest.mark.parametrize("server", ["wsgi_apps:guarded"], indirect=True)
    def test_client_reads_the_413(self, server: Gunicorn, factor: float) -> None:
        """A client streaming 1.5x and 2x the limit reads the 413, not a reset."""
        status, _, body = post(server.url, b"x" * int(factor * LIMIT))
        assert status == 413
        assert b"8M" in body

    @pytest.mark.parametrize("server", ["wsgi_apps:guarded"], indirect=True)
    def test_chunked_body_over_the_limit(self, server: Gunicorn) -> None:
        """A chunked body is cut at the limit and the client reads the 413."""
        status, _, _ = post(server.url, chunks(2 * LIMIT), chunked=True)
        assert status == 413

    @pytest.mark.parametrize("server", ["wsgi_apps:guarded"], indirect=True)
    def test_body_at_the_limit_is_stored(self, server: Gunicorn) -> None:
        """A body of exactly the limit, chunked or not, is stored."""
        assert post(server.url, b"x" * LIMIT)[0] == 200
        status, _, body = post(server.url, chunks(LIMIT), chunked=True)
        assert status == 200 and json.loads(body)["size"] == LIMIT

    @pytest.mark.parametrize("server", ["wsgi_apps:guarded"], indirect=True)
    def test_worker_survives_many_rejections(self, server: Gunicorn) -> None:
        """Repeated 413s leave the worker serving (the drain is bounded)."""
        for _ in range(5):
            assert post(server.url, b"x" * (LIMIT + 1))[0] == 413
        assert post(server.url, b"ok")[0] == 200


class TestDrainBounds:
    def test_stalled_client_cannot_hold_the_worker(self, tmp_path: Path, upload_dir: Path) -> None:
        """A client that announces an oversized body and stops sending gets the 413 after drain_timeout,
        and the worker is free again (the socket gets the remaining time as its timeout)."""
        server = serve("wsgi_apps:guarded", tmp_path, upload_dir, UPLOADGUARD_MAX_BODY_SIZE="1000",
                       UPLOADGUARD_DRAIN_TIMEOUT="1")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
                sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1500\r\n\r\n" + b"x" * 10)
                head = sock.recv(65536)  # nothing more is sent: without the bound this waits for gunicorn's 600 s
            assert head.startswith(b"HTTP/1.1 413")
            assert post(server.url, b"ok")[0] == 200
        finally:
            server.stop()

    def test_503_reaches_the_client_with_the_limit_off(self, tmp_path: Path, upload_dir: Path) -> None:
        """With UPLOADGUARD_MAX_BODY_SIZE=0 an 8 MiB upload refused by the preflight still reads its 503."""
        shutil.rmtree(upload_dir)
        upload_dir.write_text("in the way")
        server = serve("wsgi_apps:guarded", tmp_path, upload_dir, UPLOADGUARD_MAX_BODY_SIZE="0")
        try:
            assert post(server.url, b"x" * (8 * MiB))[0] == 503
        finally:
            server.stop()


class TestTempDirFailures:
    @pytest.mark.parametrize("server", ["wsgi_apps:spool"], indirect=True)
    def test_bare_app_drops_the_connection(self, server: Gunicorn, upload_dir: Path) -> None:
        """Pinned gunicorn behaviour: an OSError escaping the app gets no response at all."""
        shutil.rmtree(upload_dir)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            post(server.url, b"x" * 1000)

    @pytest.mark.parametrize("server", ["wsgi_apps:guarded"], indirect=True)
    def test_deleted_then_replaced_by_a_file(self, server: Gunicorn, upload_dir: Path) -> None:
        """Deleted: healed and stored. A file in the way: 503 + Retry-After. Removed: stored again."""
        assert post(server.url, b"a" * 1000)[0] == 200
        shutil.rmtree(upload_dir)
        assert post(server.url, b"b" * 1000)[0] == 200
        assert upload_dir.is_dir()
        shutil.rmtree(upload_dir)
        upload_dir.write_text("in the way")
        status, headers, body = post(server.url, b"c" * 1000)
        assert (status, headers["Retry-After"], headers["Cache-Control"]) == (503, "1", "no-store")
        assert b"temporarily unavailable" in body
        upload_dir.unlink()
        assert post(server.url, b"d" * 1000)[0] == 200
        log = server.log()
        assert "503 POST /upload" in log and "not_a_directory" in log

    @pytest.mark.parametrize("server", ["wsgi_apps:guarded_broken"], indirect=True)
    def test_unrelated_oserror_is_a_500(self, server: Gunicorn) -> None:
        """An OSError that is not about the temp dir gets a 500 response and a logged traceback."""
        status, _, _ = post(server.url, b"x" * 1000)
        assert status == 500
        assert "Traceback" in server.log() and "/nonexistent-uploadguard-config" in server.log()


class TestDiskFull:
    @pytest.fixture
    def full_dir(self, tmp_path: Path) -> Iterator[Path]:
        with tmpfs(tmp_path / "small", size="2m") as path:
            yield path

    def test_bare_app_drops_the_connection(self, tmp_path: Path, full_dir: Path) -> None:
        """Pinned: a bare app spooling 3 MiB into a 2 MiB tmpfs gets the client no response."""
        server = serve("wsgi_apps:spool", tmp_path, full_dir)
        try:
            with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                post(server.url, b"x" * (3 * MiB))
        finally:
            server.stop()

    @pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
    def test_guarded_answers_503(self, tmp_path: Path, full_dir: Path, chunked: bool) -> None:
        """Known length: refused by the preflight. Chunked: ENOSPC mid-spool. Both a readable 503."""
        server = serve("wsgi_apps:guarded", tmp_path, full_dir)
        try:
            body = chunks(3 * MiB) if chunked else b"x" * (3 * MiB)
            status, headers, _ = post(server.url, body, chunked=chunked)
            assert status == 503 and headers["Retry-After"] == "1"
            assert "no_space" in server.log()
            assert post(server.url, b"small")[0] == 200  # the failed spool left nothing behind
        finally:
            server.stop()


def readme_recipe() -> str:
    """The retrying-client recipe exactly as the docs show it (docs/guard.md)."""
    text = (ROOT / "docs" / "guard.md").read_text()
    match = re.search(r"```python\n(# Retrying uploads from Python.*?)```", text, re.S)
    assert match, "docs/guard.md lost its retry recipe"
    return match.group(1)


class TestPythonClientRecipe:
    def test_readme_recipe_retries_until_uploads_work(self, tmp_path: Path, upload_dir: Path) -> None:
        """The docs' requests + urllib3 Retry recipe rides out a 503 spell without the caller noticing."""
        server = serve("wsgi_apps:guarded", tmp_path, upload_dir)
        try:
            shutil.rmtree(upload_dir)
            upload_dir.write_text("broken for a while")
            healer = threading.Timer(1.5, upload_dir.unlink)
            healer.start()
            namespace: dict[str, object] = {}
            exec(compile(readme_recipe(), "docs/guard.md", "exec"), namespace)
            session = namespace["upload_session"]()  # type: ignore[operator]
            started = time.monotonic()
            with session:
                response = session.post(f"{server.url}/upload", data=b"photo" * 1000, timeout=30)
            healer.join()
            assert response.status_code == 200
            assert json.loads(response.content)["size"] == 5000
            assert time.monotonic() - started >= 1.0  # it really waited out Retry-After
            assert "503 POST /upload" in server.log()
        finally:
            server.stop()


def drip(port: int, head: bytes, *, every: float = 0.3, patience: float = 25.0) -> tuple[bytes, float]:
    """Send ``head``, then one body byte every ``every`` seconds; (the first response bytes, seconds they took).

    The slow client of the drain bound: each byte resets a per-read timeout,
    so only a wall-clock bound stops it.  Gives up after ``patience`` seconds.
    """
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", port), timeout=patience) as sock:
        def trickle() -> None:
            while not stop.wait(every):
                try:
                    sock.sendall(b"x")
                except OSError:
                    return

        started = time.monotonic()
        sock.sendall(head)
        dripper = threading.Thread(target=trickle, daemon=True)
        dripper.start()
        try:
            response = sock.recv(65536)
        except TimeoutError:
            response = b""
        took = time.monotonic() - started
        stop.set()
        dripper.join()
    return response, took


DRIP_PATHS = [
    pytest.param("wsgi_apps:guarded", "/upload", (), id="wsgi-sync"),
    pytest.param("wsgi_apps:guarded", "/upload", ("--worker-class", "gthread", "--threads", "2"), id="wsgi-gthread"),
    pytest.param("django_project.wsgi:application", "/upload/", (), id="django"),
    pytest.param("flask_app:app", "/upload", (), id="flask"),
]


class TestDrainWallClock:
    @pytest.mark.parametrize(("app", "path", "args"), DRIP_PATHS)
    def test_a_dripping_client_cannot_hold_the_worker(self, tmp_path: Path, upload_dir: Path, app: str, path: str,
                                                      args: tuple[str, ...]) -> None:
        """A client sending one byte every 0.3 s gets its 413 once drain_timeout (1 s) has passed, not when it stops."""
        server = Gunicorn(app, tmp_path=tmp_path, args=["--log-level", "info", *args],
                          env={"UPLOADGUARD_TEMP_DIR": str(upload_dir), "TEST_FILE_UPLOAD_TEMP_DIR": str(upload_dir),
                               "TEST_STORE_DIR": str(tmp_path / "store"), "UPLOADGUARD_MAX_BODY_SIZE": "1000",
                               "UPLOADGUARD_DRAIN_TIMEOUT": "1", "UPLOADGUARD_MIN_FREE_SPACE": "0"})
        try:
            head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                    "Content-Length: 1500\r\n\r\n").encode()
            response, took = drip(server.port, head)
            assert response.startswith(b"HTTP/1.1 413"), response[:200]
            # 1 s of drain plus start-up and scheduling on a busy machine; the drip itself would go on for 25 s.
            assert took < 1 + 1 + 3, took
            assert post(server.url, b"ok")[0] < 500  # the worker serves again
        finally:
            server.stop()


def expect_refusal(port: int, path: str, length: int) -> bytes:
    """Headers with ``Expect: 100-continue`` and nothing else; all the server sends until it closes."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


LIMIT_SOURCES = [
    pytest.param("wsgi_apps:guarded", "/upload", {"UPLOADGUARD_MAX_BODY_SIZE": "1M"}, id="environment"),
    pytest.param("wsgi_apps:guarded_keyword", "/upload", {}, id="keyword"),
    pytest.param("wsgi_apps:nested", "/upload", {}, id="nested-guards"),
    pytest.param("django_project.wsgi:application", "/upload/", {"TEST_DJANGO_MAX_BODY_SIZE": "1M"},
                 id="django-settings"),
    pytest.param("django_project.wsgi:guarded", "/upload/", {"TEST_DJANGO_MAX_BODY_SIZE": "1M"},
                 id="django-settings-inside-wsgi-guard"),
    pytest.param("flask_app:create_app(MAX_CONTENT_LENGTH=1048576)", "/upload", {}, id="flask-max-content-length"),
    pytest.param("flask_app:create_app(UPLOADGUARD_MAX_BODY_SIZE='1M')", "/upload", {}, id="flask-config"),
]


class TestExpectContinueForEveryLimit:
    @pytest.fixture
    def serve_conf(self, tmp_path: Path, upload_dir: Path) -> Iterator[Callable[..., Gunicorn]]:
        servers: list[Gunicorn] = []

        def start(app: str, **env: str) -> Gunicorn:
            server = Gunicorn(app, tmp_path=tmp_path, config=GUNICORN_CONF, args=["--log-level", "info"],
                              env={"UPLOADGUARD_TEMP_DIR": str(upload_dir),
                                   "TEST_FILE_UPLOAD_TEMP_DIR": str(upload_dir),
                                   "TEST_STORE_DIR": str(tmp_path / "store"), "UPLOADGUARD_MIN_FREE_SPACE": "0",
                                   "UPLOADGUARD_RETRY_AFTER": "1", **env})
            servers.append(server)
            return server

        yield start
        for server in servers:
            server.stop()

    @pytest.mark.parametrize(("app", "path", "env"), LIMIT_SOURCES)
    def test_413_before_a_byte_is_sent(self, serve_conf: Callable[..., Gunicorn], app: str, path: str,
                                       env: dict[str, str]) -> None:
        """Whatever sets the 1 MiB limit, a 3 MiB body announced with Expect gets its 413 with no 100 Continue."""
        server = serve_conf(app, **env)
        received = expect_refusal(server.port, path, 3 * MiB)
        assert received.startswith(b"HTTP/1.1 413 "), received[:300]
        assert b"100 Continue" not in received
        assert b"Connection: close" in received  # the unsent body can never be read as the next request

    @pytest.mark.parametrize(("app", "path"), [
        pytest.param("wsgi_apps:guarded", "/upload", id="wsgi"),
        pytest.param("django_project.wsgi:application", "/upload/", id="django"),
        pytest.param("flask_app:app", "/upload", id="flask"),
    ])
    def test_503_before_a_byte_is_sent(self, serve_conf: Callable[..., Gunicorn], upload_dir: Path, app: str,
                                       path: str) -> None:
        """An unusable temp dir answers the waiting client 503 + Retry-After: a retry does not resend the file."""
        server = serve_conf(app)
        shutil.rmtree(upload_dir)
        upload_dir.write_text("in the way")
        received = expect_refusal(server.port, path, 3 * MiB)
        assert received.startswith(b"HTTP/1.1 503 "), received[:300]
        assert b"Retry-After: 1" in received and b"100 Continue" not in received

    @pytest.mark.parametrize(("app", "path"), [
        pytest.param("wsgi_apps:nested", "/upload", id="wsgi-nested"),
        pytest.param("flask_app:create_app(MAX_CONTENT_LENGTH=1048576)", "/raw", id="flask"),
    ])
    def test_a_body_within_the_limit_gets_100_when_read(self, serve_conf: Callable[..., Gunicorn], app: str,
                                                        path: str) -> None:
        """Within the limit the client gets 100 Continue (once the app reads), sends the body and gets a 200."""
        server = serve_conf(app)
        body = b"u" * 1000
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(head)
            interim = b""
            while b"\r\n\r\n" not in interim:
                chunk = sock.recv(1)
                assert chunk, "closed before 100 Continue"
                interim += chunk
            sock.sendall(body)
            final = sock.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert final.startswith(b"HTTP/1.1 200 "), final[:300]

    def test_an_app_that_never_reads_sends_no_100(self, serve_conf: Callable[..., Gunicorn]) -> None:
        """An answer given without reading the body (Flask's view ignores a non-form body) comes without 100."""
        server = serve_conf("flask_app:app")
        received = expect_refusal(server.port, "/upload", 1000)
        assert received.startswith(b"HTTP/1.1 200 ") and b"100 Continue" not in received


class TestDrainOverTls:
    def test_the_answer_after_a_cut_drain_is_never_clear_text(self, tmp_path: Path, upload_dir: Path) -> None:
        """Over TLS, the drain deadline frees the worker and what follows stays encrypted on the wire.

        Shutting reading mid-record breaks the TLS stream for a client that
        drips (it gets an alert, as any client that keeps a server waiting may),
        but ``ssl.SSLSocket.shutdown`` would also drop the TLS layer and send the
        413 in clear text: the bytes on the wire are checked, not what the client
        made of them.
        """
        import ssl
        import subprocess

        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("needs the openssl command (Debian package: openssl)")
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
        server = Gunicorn("wsgi_apps:guarded", tmp_path=tmp_path,
                          args=["--log-level", "info", "--certfile", str(cert), "--keyfile", str(key)],
                          env={"UPLOADGUARD_TEMP_DIR": str(upload_dir), "UPLOADGUARD_MAX_BODY_SIZE": "1000",
                               "UPLOADGUARD_DRAIN_TIMEOUT": "1", "UPLOADGUARD_MIN_FREE_SPACE": "0"})
        wire = bytearray()  # what the server sent, as a network sniffer sees it
        listener = socket.create_server(("127.0.0.1", 0))

        def relay() -> None:
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", server.port), timeout=30)

            def pump(source: socket.socket, target: socket.socket, record: bool) -> None:
                while True:
                    try:
                        data = source.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        with contextlib.suppress(OSError):
                            target.shutdown(socket.SHUT_WR)
                        return
                    if record:
                        wire.extend(data)
                    with contextlib.suppress(OSError):
                        target.sendall(data)

            upward = threading.Thread(target=pump, args=(client, upstream, False), daemon=True)
            upward.start()
            pump(upstream, client, True)
            upward.join(5)
            client.close()
            upstream.close()

        relayer = threading.Thread(target=relay, daemon=True)
        relayer.start()
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            started = time.monotonic()
            with socket.create_connection(listener.getsockname(), timeout=20) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1500\r\n\r\n")
                # What ended the drip: the 413 decrypted, or the TLS alert of a stream cut mid-record.
                outcome: bytes | OSError | None = None
                while outcome is None and time.monotonic() - started < 25:  # one thread: a TLS socket is not shareable
                    readable, _, _ = select.select([sock], [], [], 0.3)
                    if readable or sock.pending():
                        try:
                            outcome = sock.recv(65536)
                        except OSError as exc:  # ssl.SSLError is one
                            outcome = exc
                    else:
                        with contextlib.suppress(OSError):
                            sock.sendall(b"x")
                took = time.monotonic() - started
            relayer.join(10)
        finally:
            listener.close()
            server.stop()
        answered = isinstance(outcome, ssl.SSLError) or (isinstance(outcome, bytes) and outcome.startswith(b"HTTP/1.1 413 "))
        assert answered, outcome  # not a reset, not a silent close, not nothing
        assert took < 1 + 1 + 3, took  # the drain ended at its deadline, not when the drip stopped
        assert b"413" not in wire and b"Content Too Large" not in wire  # nothing in clear text
        assert "413 POST /upload" in server.log()
