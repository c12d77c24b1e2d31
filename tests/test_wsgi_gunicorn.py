"""The middleware on real sockets: what only a real gunicorn and a real client show.

gunicorn sends no response at all when an ``OSError`` escapes the app, and
closes the socket after draining only 64 KiB / 2 s of an unread body, so a
client still sending sees a reset.  These tests pin that behaviour with the
bare app and show the guarded app answering instead.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, Gunicorn, tmpfs

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
    """The retrying-client recipe exactly as the README shows it."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(# Retrying uploads from Python.*?)```", text, re.S)
    assert match, "README lost its retry recipe"
    return match.group(1)


class TestPythonClientRecipe:
    def test_readme_recipe_retries_until_uploads_work(self, tmp_path: Path, upload_dir: Path) -> None:
        """The README's requests + urllib3 Retry recipe rides out a 503 spell without the caller noticing."""
        server = serve("wsgi_apps:guarded", tmp_path, upload_dir)
        try:
            shutil.rmtree(upload_dir)
            upload_dir.write_text("broken for a while")
            healer = threading.Timer(1.5, upload_dir.unlink)
            healer.start()
            namespace: dict[str, object] = {}
            exec(compile(readme_recipe(), "README.md", "exec"), namespace)
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
