from __future__ import annotations

import errno
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import webtest

from tests.support import as_user, fill, needs_root, tmpfs, traversable_dir, unlinked_dir
from uploadguard import BodyTooLarge, UploadGuard
from uploadguard.wsgi import ContinueOnRead, ServerChunks, _uwsgi_delivers_chunks

LIMIT = 1024


class Recorder:
    """A WSGI app that spools the body into the temp dir, and remembers what it saw."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self.calls = 0
        self.closed = 0
        self.raise_: BaseException | None = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.calls += 1
        if environ["REQUEST_METHOD"] == "GET":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"page"]
        body = environ["wsgi.input"].read(10)
        if self.raise_ is not None:
            raise self.raise_
        body += environ["wsgi.input"].read()
        with tempfile.NamedTemporaryFile(dir=self.temp_dir) as fh:
            fh.write(body)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return self._respond(b"stored %d" % len(body))

    def _respond(self, body: bytes) -> Iterable[bytes]:
        recorder = self

        class Body:
            def __iter__(self) -> Iterator[bytes]:
                yield body

            def close(self) -> None:
                recorder.closed += 1

        return Body()


@pytest.fixture
def temp_dir(tmp_path: Path) -> Path:
    path = tmp_path / "uploads"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def app(temp_dir: Path) -> Recorder:
    return Recorder(temp_dir)


@pytest.fixture
def guard(app: Recorder, temp_dir: Path) -> UploadGuard:
    return UploadGuard(app, temp_dir=temp_dir, max_body_size=LIMIT, min_free_space=0, retry_after=7,
                       drain_timeout=2)


@pytest.fixture
def client(guard: UploadGuard) -> webtest.TestApp:
    return webtest.TestApp(guard)


def call(guard: UploadGuard, body: bytes, *, chunked: bool = False, **extra: Any) -> tuple[str, dict[str, str], bytes, dict[str, Any]]:
    """Call the guard with a hand-made environ (webtest cannot send chunked bodies)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/upload", "SERVER_NAME": "test", "SERVER_PORT": "80",
        "wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
    }
    if chunked:
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    else:
        environ["CONTENT_LENGTH"] = str(len(body))
    environ.update(extra)
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"], seen["headers"] = status, dict(headers)
        return lambda data: None

    result = guard(environ, start_response)
    data = b"".join(result)
    if hasattr(result, "close"):
        result.close()
    return seen["status"], seen["headers"], data, environ


class TestBodyLimit:
    def test_body_at_the_limit_passes(self, client: webtest.TestApp) -> None:
        """The limit is inclusive: a body of exactly the limit reaches the app."""
        assert client.post("/upload", b"x" * LIMIT).text == f"stored {LIMIT}"

    def test_content_length_over_the_limit(self, client: webtest.TestApp, app: Recorder) -> None:
        """Content-Length over the limit is a 413 and the app is never called."""
        response = client.post("/upload", b"x" * (LIMIT + 1), status=413)
        assert app.calls == 0
        assert "1K (1024 bytes)" in response.text
        assert response.headers["Cache-Control"] == "no-store"

    @pytest.mark.parametrize(
        ("accept", "content_type", "marker"),
        [
            pytest.param("application/json", "application/json", '"limit": 1024', id="json"),
            pytest.param("text/html,application/xhtml+xml,*/*", "text/html; charset=utf-8", "<h1>", id="browser"),
            pytest.param("*/*", "text/plain; charset=utf-8", "413 Content Too Large", id="curl"),
        ],
    )
    def test_413_follows_accept(self, client: webtest.TestApp, accept: str, content_type: str, marker: str) -> None:
        """The 413 says the limit in JSON for JSON clients, HTML for browsers, text otherwise."""
        response = client.post("/upload", b"x" * 2000, headers={"Accept": accept}, status=413)
        assert response.headers["Content-Type"] == content_type
        assert marker in response.text
        if content_type == "application/json":
            assert json.loads(response.text)["limit"] == LIMIT

    def test_chunked_body_cut_at_the_limit(self, guard: UploadGuard, app: Recorder) -> None:
        """A chunked body is counted as it is read and answered 413 once it passes the limit."""
        status, _, body, environ = call(guard, b"x" * (LIMIT * 3), chunked=True)
        assert status.startswith("413")
        assert app.calls == 1
        assert environ["uploadguard.input"].consumed == LIMIT * 3  # the rest was drained

    def test_chunked_body_at_the_limit_passes(self, guard: UploadGuard) -> None:
        """A chunked body of exactly the limit is accepted."""
        status, _, body, _ = call(guard, b"x" * LIMIT, chunked=True)
        assert (status, body) == ("200 OK", b"stored %d" % LIMIT)

    def test_app_that_swallows_the_limit_still_gets_413(self, temp_dir: Path) -> None:
        """If the app catches the 413 and answers something else, the client still gets the 413."""
        def forgiving(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            try:
                environ["wsgi.input"].read()
            except BodyTooLarge:
                pass
            start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"bad form"]

        guard = UploadGuard(forgiving, temp_dir=temp_dir, max_body_size=LIMIT, min_free_space=0)
        assert call(guard, b"x" * 5000, chunked=True)[0].startswith("413")

    def test_chunked_body_the_server_will_not_deliver_is_411(self, guard: UploadGuard, app: Recorder) -> None:
        """A chunked body the server does not end in wsgi.input (uWSGI's way) is a 411 naming the fix, not an empty 200."""
        status, headers, body, environ = call(guard, b"x" * 10, chunked=True, HTTP_ACCEPT="application/json",
                                              **{"wsgi.input_terminated": False})
        assert status == "411 Length Required" and app.calls == 0
        assert headers["Cache-Control"] == "no-store" and "uploadguard.input" not in environ
        assert json.loads(body)["error"] == "length_required"
        assert "Content-Length" in json.loads(body)["fix"]
        assert guard.stats.snapshot()["length_required_411"] == 1

    def test_411_names_the_uwsgi_options(self, guard: UploadGuard, app: Recorder) -> None:
        """Under uWSGI the 411 says which options get a chunked body to the application."""
        status, _, body, _ = call(guard, b"x" * 10, chunked=True, **{"wsgi.input_terminated": False,
                                                                     "uwsgi.version": b"2.0.31"})
        assert status.startswith("411") and b"--http-chunked-input" in body and b"--http-socket" in body

    def test_a_chunked_body_without_transfer_encoding_chunked_is_no_body(self, guard: UploadGuard,
                                                                          app: Recorder) -> None:
        """Transfer-Encoding without chunked and no Content-Length carries no body to guard (as before)."""
        status, _, body, _ = call(guard, b"", chunked=True, HTTP_TRANSFER_ENCODING="identity",
                                  **{"wsgi.input_terminated": False})
        assert status == "200 OK" and body == b"stored 0"

    @pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
    def test_bad_content_length(self, guard: UploadGuard, value: str, app: Recorder) -> None:
        """A Content-Length that is not a whole number is a 400, never a traceback."""
        status, _, _, _ = call(guard, b"x", CONTENT_LENGTH=value)
        assert status.startswith("400") and app.calls == 0

    def test_limit_off(self, app: Recorder, temp_dir: Path) -> None:
        """max_body_size=0 switches the limit off."""
        client = webtest.TestApp(UploadGuard(app, temp_dir=temp_dir, max_body_size=0, min_free_space=0))
        assert client.post("/upload", b"x" * 5000).text == "stored 5000"

    def test_a_client_still_waiting_for_100_is_not_drained(self, guard: UploadGuard) -> None:
        """Refused while its deferred 100 Continue is unsent, the client has sent nothing: no 100, no drain."""
        import socket

        server, client = socket.socketpair()
        with server, client:
            body = io.BytesIO(b"x" * 1500)
            waiting = ContinueOnRead(body, server)
            status, _, _, _ = call(guard, b"", HTTP_EXPECT="100-continue", CONTENT_LENGTH="1500",
                                   **{"wsgi.input": waiting})
            client.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.recv(100)  # no 100 Continue was sent
        assert status.startswith("413") and body.tell() == 0 and waiting.pending

    def test_expect_without_the_deferring_hook_is_drained(self, guard: UploadGuard) -> None:
        """Without the hook the server sent 100 Continue itself, so the client is sending: it is drained."""
        status, _, _, environ = call(guard, b"x" * 1500, HTTP_EXPECT="100-continue")
        assert status.startswith("413")
        assert environ["wsgi.input"].tell() == 1500

    def test_no_100_continue_once_the_response_started(self, temp_dir: Path) -> None:
        """An app that starts streaming its answer, then reads the body, gets no interim 100 inside it."""
        import socket

        def streams_then_reads(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"working..."
            yield environ["wsgi.input"].read()

        guard = UploadGuard(streams_then_reads, temp_dir=temp_dir, min_free_space=0)
        server, client = socket.socketpair()
        with server, client:
            waiting = ContinueOnRead(io.BytesIO(b"body"), server)
            _, _, body, _ = call(guard, b"", HTTP_EXPECT="100-continue", CONTENT_LENGTH="4",
                                 **{"wsgi.input": waiting})
            client.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.recv(100)
        assert body == b"working...body"

    def test_oversized_body_is_drained_within_the_bound(self, guard: UploadGuard) -> None:
        """Without Expect, the rest of an oversized body is read so the client can read the 413."""
        body = io.BytesIO(b"x" * 2000)
        status, _, _, _ = call(guard, b"", CONTENT_LENGTH="2000", **{"wsgi.input": body})
        assert status.startswith("413") and body.tell() == 2000

    def test_drain_is_bounded(self, guard: UploadGuard) -> None:
        """A body whose remainder exceeds drain_max (2 x limit here) is not read at all."""
        body = io.BytesIO(b"x" * 5000)
        status, _, _, _ = call(guard, b"", CONTENT_LENGTH="5000", **{"wsgi.input": body})
        assert status.startswith("413") and body.tell() == 0


class TestTempDirPreflight:
    def test_get_is_untouched_while_uploads_are_down(self, client: webtest.TestApp, temp_dir: Path) -> None:
        """Requests without a body pass even when the temp dir is broken: the site keeps working."""
        temp_dir.rmdir()
        temp_dir.write_text("in the way")
        assert client.get("/").text == "page"

    def test_missing_dir_is_healed(self, client: webtest.TestApp, guard: UploadGuard, temp_dir: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
        """A vanished temp dir is recreated, logged at INFO and counted; the upload succeeds."""
        temp_dir.rmdir()
        with caplog.at_level(logging.INFO, logger="uploadguard"):
            assert client.post("/upload", b"abc").text == "stored 3"
        assert temp_dir.is_dir()
        assert guard.stats.snapshot()["heals"] == 1
        assert any(r.levelno == logging.INFO and "recreated" in r.getMessage() for r in caplog.records)

    def test_a_configured_dir_with_a_missing_parent_is_a_503_naming_it(
            self, app: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """A temp dir whose parent is missing (a typo) is not created: a retryable 503 whose logged cause names the parent."""
        guard = UploadGuard(app, temp_dir=tmp_path / "typo" / "uploads", retry_after=7)
        with caplog.at_level(logging.INFO, logger="uploadguard"):
            self.assert_503(webtest.TestApp(guard), app, "missing", guard)
        assert not (tmp_path / "typo").exists()
        assert f"its parent directory {tmp_path / 'typo'} does not exist" in caplog.text

    def assert_503(self, client: webtest.TestApp, app: Recorder, reason: str, guard: UploadGuard) -> None:
        response = client.post("/upload", b"abc", status=503)
        assert response.headers["Retry-After"] == "7"
        assert response.headers["Cache-Control"] == "no-store"
        assert "temporarily unavailable" in response.text
        assert app.calls == 0
        assert guard.stats.by_reason("503") == {reason: 1}

    @pytest.mark.parametrize("breakage", ["file", "symlink", "world-writable"])
    def test_unusable_dir(self, client: webtest.TestApp, app: Recorder, guard: UploadGuard, temp_dir: Path,
                          tmp_path: Path, breakage: str) -> None:
        """An unusable temp dir is a retryable 503 with Retry-After and no-store, and the app is not called."""
        reason = {"file": "not_a_directory", "symlink": "symlink", "world-writable": "insecure_mode"}[breakage]
        if breakage == "file":
            temp_dir.rmdir()
            temp_dir.write_text("x")
        elif breakage == "symlink":
            temp_dir.rmdir()
            (tmp_path / "elsewhere").mkdir()
            temp_dir.symlink_to(tmp_path / "elsewhere")
        else:
            temp_dir.chmod(0o777)
        self.assert_503(client, app, reason, guard)

    def test_not_enough_space_for_the_body(self, app: Recorder, temp_dir: Path) -> None:
        """A body larger than the free space left above the floor is a 503 'no_space'."""
        free = os.statvfs(temp_dir).f_bavail * os.statvfs(temp_dir).f_frsize
        # Twice the free space and a GiB: other processes on a shared machine may free some meanwhile.
        guard = UploadGuard(app, temp_dir=temp_dir, max_body_size=0, min_free_space=2 * free + 2**30, retry_after=7)
        self.assert_503(webtest.TestApp(guard), app, "no_space", guard)

    @needs_root
    def test_unlinked_dir(self, app: Recorder, tmp_path: Path) -> None:
        """A deleted-but-mounted temp dir (the PrivateTmp failure) is a 503 'unlinked'."""
        with unlinked_dir(tmp_path) as path:
            guard = UploadGuard(app, temp_dir=path, min_free_space=0, retry_after=7)
            self.assert_503(webtest.TestApp(guard), app, "unlinked", guard)

    @needs_root
    def test_read_only(self, app: Recorder, tmp_path: Path) -> None:
        """A temp dir on a read-only file system is a 503 'read_only'."""
        with tmpfs(tmp_path / "ro", options="ro") as path:
            guard = UploadGuard(app, temp_dir=path, min_free_space=0, retry_after=7)
            self.assert_503(webtest.TestApp(guard), app, "read_only", guard)

    @needs_root
    def test_full(self, app: Recorder, tmp_path: Path) -> None:
        """A full temp dir is a 503 'no_space'."""
        with tmpfs(tmp_path / "full", size="1m") as path:
            fill(path)
            guard = UploadGuard(app, temp_dir=path, min_free_space=0, retry_after=7)
            self.assert_503(webtest.TestApp(guard), app, "no_space", guard)

    @needs_root
    def test_wrong_owner(self) -> None:
        """A worker running as one user answers 503 'wrong_owner' for a temp dir another user owns."""
        with traversable_dir() as base:
            temp_dir = base / "uploads"
            temp_dir.mkdir(mode=0o1777)
            os.chown(temp_dir, 65533, 65533)

            def upload() -> tuple[int, str]:
                guard = UploadGuard(Recorder(temp_dir), temp_dir=temp_dir, max_body_size=LIMIT, min_free_space=0)
                response = webtest.TestApp(guard).post("/upload", b"abc", status="*",
                                                       headers={"Accept": "application/json"})
                return response.status_int, response.json["error"]

            assert as_user(65534, upload) == (503, "wrong_owner")

    @needs_root
    def test_root_workers_use_a_temp_dir_owned_by_the_app_user(self, client: webtest.TestApp, app: Recorder,
                                                                 temp_dir: Path) -> None:
        """Workers running as root (no gunicorn ``user``) upload into a volume the app user owns."""
        os.chown(temp_dir, 65534, 65534)
        client.post("/upload", b"abc", status=200)


class TestErrorsFromTheApp:
    @pytest.mark.parametrize(
        ("error", "reason"),
        [
            pytest.param(FileNotFoundError(errno.ENOENT, "No such file", "{dir}/tmpab.upload.jpg"), "missing", id="ENOENT"),
            pytest.param(OSError(errno.EDQUOT, "Disk quota exceeded", "{dir}/x"), "no_space", id="EDQUOT"),
            pytest.param(OSError(errno.EROFS, "Read-only file system", "{dir}/x"), "read_only", id="EROFS"),
            pytest.param(PermissionError(errno.EACCES, "Permission denied", "{dir}/x"), "not_writable", id="EACCES"),
            pytest.param(NotADirectoryError(errno.ENOTDIR, "Not a directory", "{dir}/x"), "not_a_directory", id="ENOTDIR"),
        ],
    )
    def test_temp_dir_errors_become_503(self, guard: UploadGuard, app: Recorder, temp_dir: Path,
                                        error: OSError, reason: str) -> None:
        """An OSError about the temp dir escaping the app is the retryable 503, and the body is drained."""
        if error.filename:
            error.filename = error.filename.format(dir=temp_dir)
        app.raise_ = error
        status, headers, _, environ = call(guard, b"x" * 800)
        assert status.startswith("503")
        assert headers["Retry-After"] == "7"
        assert environ["uploadguard.input"].consumed == 800
        assert guard.stats.by_reason("503") == {reason: 1}

    def test_dir_deleted_mid_upload_heals_for_the_retry(self, temp_dir: Path) -> None:
        """When the dir vanishes under the app, the client gets the 503 and the retry finds the dir back."""
        def unlucky(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            environ["wsgi.input"].read()
            if not environ.get("QUERY_STRING"):
                temp_dir.rmdir()  # another process cleaned up at the worst moment
            with tempfile.NamedTemporaryFile(dir=temp_dir):
                pass
            start_response("200 OK", [])
            return [b"stored"]

        guard = UploadGuard(unlucky, temp_dir=temp_dir, min_free_space=0)
        assert call(guard, b"abc")[0].startswith("503")
        assert temp_dir.is_dir()
        assert call(guard, b"abc", QUERY_STRING="retry")[0] == "200 OK"
        assert guard.stats.snapshot()["heals"] == 1

    def test_other_oserror_is_a_500_not_a_dropped_connection(self, guard: UploadGuard, app: Recorder,
                                                             caplog: pytest.LogCaptureFixture) -> None:
        """An unrelated OSError gets a plain 500 response, logged with its traceback."""
        app.raise_ = FileNotFoundError(errno.ENOENT, "No such file", "/etc/myapp/settings.ini")
        with caplog.at_level(logging.ERROR, logger="uploadguard"):
            status, _, body, _ = call(guard, b"abc")
        assert status.startswith("500") and b"could not complete" in body
        assert caplog.records[-1].exc_info is not None
        assert guard.stats.total("500") == 1

    @needs_root
    def test_enospc_without_a_path_when_the_dir_cannot_hold_the_body(self, app: Recorder, tmp_path: Path) -> None:
        """ENOSPC from writing a spooled file (no path in the error) is the 503 when the dir cannot hold what was read."""
        with tmpfs(tmp_path / "small", size="1m") as path:
            free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
            guard = UploadGuard(app, temp_dir=path, min_free_space=free - 5, retry_after=7)
            app.raise_ = OSError(errno.ENOSPC, "No space left on device")
            status, headers, _, _ = call(guard, b"x" * 800, chunked=True)
        assert status.startswith("503") and guard.stats.by_reason("503") == {"no_space": 1}

    @pytest.mark.parametrize(
        "error",
        [
            pytest.param(OSError(errno.ENOSPC, "No space left on device"), id="ENOSPC-elsewhere-eg-dev-full"),
            pytest.param(OSError(errno.ENOENT, "No such file", "{dir}/tmp1", None, "/srv/media-not-mounted/x"),
                         id="rename-out-of-the-dir-to-a-missing-place"),
            pytest.param(PermissionError(errno.EPERM, "Operation not permitted", 4), id="fd-as-filename"),
            pytest.param(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), id="backend-down"),
            pytest.param(OSError("<urlopen error timed out>"), id="errno-None-from-the-app"),
        ],
    )
    def test_the_apps_own_oserrors_are_a_500(self, guard: UploadGuard, app: Recorder, temp_dir: Path,
                                              error: OSError) -> None:
        """OSErrors not about a healthy temp dir (other disks, backends, fds) get a 500 response, not a retryable 503."""
        if isinstance(error.filename, str):
            error.filename = error.filename.format(dir=temp_dir)
        app.raise_ = error
        status, _, _, _ = call(guard, b"x" * 800)
        assert status.startswith("500")
        assert guard.stats.by_reason("503") == {} and guard.stats.total("500") == 1

    @pytest.mark.parametrize(
        "error",
        [
            pytest.param(OSError("No more data after: b''"), id="errno-None-like-gunicorn-NoMoreData"),
            pytest.param(ConnectionResetError(errno.ECONNRESET, "reset"), id="ECONNRESET"),
        ],
    )
    def test_client_disconnects_propagate(self, guard: UploadGuard, error: OSError) -> None:
        """An error from reading the body (the client went away) is not answered: the server logs it."""
        class Vanishing(io.BytesIO):
            def read(self, size: int | None = -1) -> bytes:
                raise error

        with pytest.raises(type(error)):
            call(guard, b"", CONTENT_LENGTH="800", **{"wsgi.input": Vanishing()})
        assert guard.stats.total("500") == 0

    def test_non_oserrors_propagate(self, guard: UploadGuard, app: Recorder) -> None:
        """An app bug that is not an OSError is the server's to report, as without the guard."""
        app.raise_ = ValueError("app bug")
        with pytest.raises(ValueError):
            call(guard, b"abc")

    def test_propagating_error_still_closes_the_response(self, temp_dir: Path) -> None:
        """When an error propagates, the app's iterable is closed all the same (Django's request_finished)."""
        closed = []

        class Failing:
            def __iter__(self) -> Iterator[bytes]:
                raise ValueError("broken stream")

            def close(self) -> None:
                closed.append(True)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            start_response("200 OK", [])
            return Failing()

        guard = UploadGuard(app, temp_dir=temp_dir, min_free_space=0)
        with pytest.raises(ValueError):
            call(guard, b"abc")
        assert closed == [True]

    def test_error_in_the_first_chunk(self, temp_dir: Path) -> None:
        """An OSError raised while the response body starts is still answered with the 503."""
        def lazy(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
            start_response("200 OK", [])
            raise OSError(errno.ENOSPC, "No space left on device", str(temp_dir / "spool"))
            yield b""  # pragma: no cover

        guard = UploadGuard(lazy, temp_dir=temp_dir, min_free_space=0)
        assert call(guard, b"abc")[0].startswith("503")

    def test_error_after_the_response_started_propagates(self, temp_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
        """Once the app has written bytes nothing can be changed: logged, then re-raised."""
        def writer(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            write = start_response("200 OK", [])
            write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(temp_dir / "spool"))

        guard = UploadGuard(writer, temp_dir=temp_dir, min_free_space=0)
        with caplog.at_level(logging.ERROR, logger="uploadguard"), pytest.raises(OSError):
            call(guard, b"abc")
        assert "after the response started" in caplog.text

    def test_close_is_called(self, client: webtest.TestApp, app: Recorder) -> None:
        """The app's response iterable is closed, as WSGI requires."""
        client.post("/upload", b"abc")
        assert app.closed == 1


class TestLoggingAndStats:
    def test_one_warning_per_rejection(self, client: webtest.TestApp, temp_dir: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
        """Each 413 and 503 logs exactly one WARNING naming the reason and the path."""
        with caplog.at_level(logging.WARNING, logger="uploadguard"):
            client.post("/upload", b"x" * 2000, status=413)
            temp_dir.chmod(0o777)
            client.post("/upload", b"x", status=503)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert "413 POST /upload" in warnings[0] and "1K" in warnings[0]
        assert "503 POST /upload" in warnings[1] and "insecure_mode" in warnings[1] and str(temp_dir) in warnings[1]

    def test_snapshot(self, client: webtest.TestApp, guard: UploadGuard) -> None:
        """The counters are readable from the guard object."""
        client.get("/")
        client.post("/upload", b"abc")
        client.post("/upload", b"x" * 2000, status=413)
        assert guard.stats.snapshot() == {
            "guarded": 2, "rejected_413": 1, "unavailable_503": {}, "bad_requests_400": 0,
            "length_required_411": 0, "heals": 0, "errors_500": 0,
        }

    def test_listeners_see_events_and_cannot_break_requests(self, client: webtest.TestApp, guard: UploadGuard) -> None:
        """Stats listeners get every event; one that raises is logged and ignored."""
        seen: list[tuple[str, str]] = []
        guard.stats.listeners.append(lambda event, reason: seen.append((event, reason)))
        guard.stats.listeners.append(lambda event, reason: 1 / 0)
        client.post("/upload", b"x" * 2000, status=413)
        assert seen == [("guarded", ""), ("413", "")]


class TestNesting:
    def test_nested_guards_handle_once(self, app: Recorder, temp_dir: Path) -> None:
        """An inner guard passes a request an outer guard already handles: counted once."""
        inner = UploadGuard(app, temp_dir=temp_dir, max_body_size=LIMIT, min_free_space=0)
        outer = UploadGuard(inner, temp_dir=temp_dir, max_body_size=LIMIT, min_free_space=0)
        webtest.TestApp(outer).post("/upload", b"abc")
        assert outer.stats.total("guarded") == 1 and inner.stats.total("guarded") == 0

    def test_repr(self, guard: UploadGuard) -> None:
        """The guard's repr shows its effective settings."""
        assert "max_body_size=1K" in repr(guard)


class TestReviewFindings:
    def test_a_path_cannot_forge_log_lines(self, guard: UploadGuard, caplog: pytest.LogCaptureFixture) -> None:
        """A newline in the request path is escaped in the 413 line, so no second log line is made."""
        with caplog.at_level(logging.WARNING, logger="uploadguard"):
            call(guard, b"x" * 2000, PATH_INFO="/x\n[2026-11-29 00:00:00 +0000] [1] [ERROR] forged")
        [line] = [r.getMessage() for r in caplog.records if r.name == "uploadguard"]
        assert "\n" not in line and "\\n[2026" in line

    def test_the_deferred_input_shows_the_servers_state(self) -> None:
        """ContinueOnRead hides nothing of the server's body: gunicorn reads its ``failed`` flag after a bad body."""
        import socket

        class Body(io.BytesIO):
            failed = True

        server, client = socket.socketpair()
        with server, client:
            assert ContinueOnRead(Body(b""), server).failed is True


class TestHttp2:
    def test_an_http2_stream_never_times_out_or_shuts_the_shared_socket(self, guard: UploadGuard) -> None:
        """Under HTTP/2 the connection's socket carries other streams: the drain leaves it alone."""
        import socket

        from uploadguard.wsgi import request_socket

        server, client = socket.socketpair()
        with server, client:
            assert request_socket({"gunicorn.socket": server, "SERVER_PROTOCOL": "HTTP/2.0"}) is None
            assert request_socket({"gunicorn.socket": server, "SERVER_PROTOCOL": "HTTP/1.1"}) is server
            # A client's "Version: 2" header (HTTP_VERSION) must not switch the bounds off.
            assert request_socket({"gunicorn.socket": server, "SERVER_PROTOCOL": "HTTP/1.1",
                                   "HTTP_VERSION": "2"}) is server
            call(guard, b"x" * 1500, **{"gunicorn.socket": server, "SERVER_PROTOCOL": "HTTP/2.0"})
            assert server.gettimeout() is None
            client.sendall(b"still open")
            assert server.recv(100) == b"still open"


    def test_a_body_without_length_is_counted_under_http2(self, guard: UploadGuard, app: Recorder) -> None:
        """HTTP/2 ends a body with its stream: without Content-Length or chunked framing it is still cut at the
        limit (over HTTP/1.1 such a request has no body at all)."""
        environ_extra = {"SERVER_PROTOCOL": "HTTP/2.0", "CONTENT_LENGTH": ""}
        status, _, _, _ = call(guard, b"x" * (2 * LIMIT), **environ_extra)
        assert status.startswith("413")


class TestServerChunks:
    """uWSGI hands a chunked body over one chunk at a time (``uwsgi.chunked_read``); the reader is a file."""

    @staticmethod
    def reader(*chunks: bytes) -> ServerChunks:
        parts = iter(chunks)
        return ServerChunks(lambda: next(parts, b""))

    def test_read_sizes_span_chunks(self) -> None:
        """read(n) gives n bytes across chunk borders until the body ends, then b""."""
        body = self.reader(b"abc", b"defg", b"h")
        assert [body.read(3), body.read(4), body.read(5), body.read(5)] == [b"abc", b"defg", b"h", b""]

    def test_read_all_and_lines(self) -> None:
        """read() takes the rest; readline and iteration split on newlines across chunks."""
        assert self.reader(b"a\nb", b"c\n", b"d").readlines() == [b"a\n", b"bc\n", b"d"]
        body = self.reader(b"one\ntw", b"o\nthree")
        assert body.readline() == b"one\n" and body.readline(2) == b"tw" and body.read() == b"o\nthree"

    def test_the_guard_cuts_it_at_the_limit(self, guard: UploadGuard, app: Recorder) -> None:
        """Behind the guard, a body read from server chunks is counted and cut at the limit like any other."""
        chunks = [b"x" * 500] * 4
        status, _, _, _ = call(guard, b"", chunked=True, **{"wsgi.input": self.reader(*chunks)})
        assert status.startswith("413")

    @pytest.mark.parametrize(("options", "delivers"), [
        pytest.param({"http": b"127.0.0.1:8000"}, False, id="router"),
        pytest.param({"http": b"127.0.0.1:8000", "http-chunked-input": True}, True, id="router-chunked-input"),
        pytest.param({"http-socket": b"127.0.0.1:8000"}, True, id="http-socket"),
        pytest.param({"http-socket": b"127.0.0.1:8000", "http": b"127.0.0.1:8001"}, False,
                     id="http-socket-beside-a-router"),
        pytest.param({"socket": b"/run/app.sock"}, False, id="uwsgi-protocol"),
    ])
    def test_which_uwsgi_set_ups_deliver_chunks(self, options: dict[str, object], delivers: bool) -> None:
        """Only the in-instance router with --http-chunked-input, or --http-socket alone, get chunks to the worker."""
        assert _uwsgi_delivers_chunks(options) is delivers
