"""The ASGI guard: the WSGI guard's promises for FastAPI, Starlette, Django ASGI and bare ASGI apps.

Fast tests drive the middleware in-process with a small stdlib harness
(:func:`call`: feeds ``receive`` messages, collects what is sent, notes how
many body reads came before the answer); the slow ones run real uvicorn and
``gunicorn -k asgi`` on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import asgi_apps
from tests.support import (GUNICORN_CONF, ROOT, Gunicorn, _read_all, fill, free_port, raw_http, tmpfs, unlinked_dir,
                           wait_for_port)
from uploadguard.asgi import UploadGuard

LIMIT = 1024


@dataclasses.dataclass
class Result:
    status: int | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    reads_before_answer: int | None = None  # receive() calls before http.response.start
    reads: int = 0  # receive() calls in all
    unread: int = 0  # body messages left unread
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def text(self) -> str:
        return self.body.decode()


def call(app: Any, *, method: str = "POST", path: str = "/", headers: dict[str, str] | None = None,
         chunks: list[bytes] | None = None, chunked: bool = False, disconnect: bool = False, stall: bool = False,
         on_read: Callable[[int], None] | None = None, http_version: str = "1.1",
         content_length: bool = True) -> Result:
    """One request through ``app``, as an ASGI server would make it.

    ``chunks`` are the body messages; without ``chunked`` a Content-Length
    of their total is sent (unless ``content_length`` is false: an HTTP/2
    body ends with its stream).  ``disconnect`` ends the body with
    ``http.disconnect`` (the client went away); ``stall`` leaves it unfinished
    (the client sends nothing more).  After the body, ``receive()``
    waits for the disconnect that follows the response, as servers do.
    ``on_read(n)`` runs before the n-th body message is handed out.
    """
    chunks = [] if chunks is None else chunks
    sent_headers = {k.lower(): v for k, v in (headers or {}).items()}
    if chunks and not chunked and content_length:
        sent_headers.setdefault("content-length", str(sum(map(len, chunks))))
    if chunked:
        sent_headers["transfer-encoding"] = "chunked"
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": http_version, "method": method, "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in sent_headers.items()],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
    }
    result = Result()
    queue: list[dict[str, Any]] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1 or disconnect or stall}
        for i, chunk in enumerate(chunks)
    ] or [{"type": "http.request", "body": b"", "more_body": disconnect}]
    if disconnect:
        queue.append({"type": "http.disconnect"})

    async def run() -> None:
        done = asyncio.Event()  # the response is complete
        position = 0

        async def receive() -> dict[str, Any]:
            nonlocal position
            result.reads += 1
            if position < len(queue):
                if on_read is not None:
                    on_read(position)
                position += 1
                return queue[position - 1]
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            result.messages.append(message)
            if message["type"] == "http.response.start":
                result.status = message["status"]
                result.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
                result.reads_before_answer = result.reads
            elif message["type"] == "http.response.body":
                result.body += message.get("body", b"")
                if not message.get("more_body"):
                    done.set()

        try:
            await app(scope, receive, send)
        finally:
            result.unread = sum(1 for m in queue[position:] if m["type"] == "http.request")

    asyncio.run(run())
    return result


@pytest.fixture
def temp_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "uploads"
    path.mkdir()
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    yield path
    tempfile.tempdir = saved[0]
    if saved[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[1]


def guarded(app: Any, temp_dir: Path, **kwargs: Any) -> UploadGuard:
    return UploadGuard(app, temp_dir=temp_dir, max_body_size=kwargs.pop("max_body_size", LIMIT),
                       check_interval=0, **kwargs)


class Recorder:
    """A bare ASGI app that records what it was given, then runs ``asgi_apps.plain`` (or raises)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, Any]] = []
        self.raise_: BaseException | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append((scope, receive, send))
        if self.raise_ is not None and scope["type"] == "http":
            await receive()
            raise self.raise_
        await asgi_apps.plain(scope, receive, send)


class TestPassThrough:
    def test_no_body_untouched(self, temp_dir: Path) -> None:
        """A request without a body reaches the app with the server's own receive and send, no check made."""
        app = Recorder()
        shutil.rmtree(temp_dir)
        result = call(guarded(app, temp_dir), method="GET")
        assert (result.status, result.text) == (200, "page")
        assert app.calls[0][1].__qualname__ == "call.<locals>.run.<locals>.receive"  # the server's own
        assert not temp_dir.exists()  # nothing looked at the temp dir

    @pytest.mark.parametrize("kind", ["lifespan", "websocket"])
    def test_other_scopes(self, temp_dir: Path, kind: str) -> None:
        """lifespan and websocket scopes go to the app as they came."""
        seen: list[tuple[Any, Any, Any]] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append((scope, receive, send))

        scope, receive, send = {"type": kind, "headers": [(b"content-length", b"999999")]}, object(), object()
        asyncio.run(guarded(app, temp_dir)(scope, receive, send))  # type: ignore[arg-type]
        assert seen == [(scope, receive, send)]


class TestLimit:
    def test_content_length_over_limit(self, temp_dir: Path) -> None:
        """A Content-Length over the limit is a 413 before the app runs; the body is read so the client sees it."""
        app = Recorder()
        result = call(guarded(app, temp_dir), chunks=[b"x" * 1000, b"x" * 1000])
        assert result.status == 413 and "1024 bytes" in result.text
        assert app.calls == []
        assert result.unread == 0 and result.reads_before_answer == 2

    def test_expect_continue_over_limit(self, temp_dir: Path) -> None:
        """With Expect: 100-continue the 413 comes before any receive(): the server never sends 100, the client no body."""
        app = Recorder()
        result = call(guarded(app, temp_dir), chunks=[b"x" * 2000], headers={"Expect": "100-continue"})
        assert result.status == 413 and result.reads_before_answer == 0 and app.calls == []

    def test_chunked_over_limit(self, temp_dir: Path) -> None:
        """A chunked body is cut as it passes the limit: 413, the rest drained, the app's spool gone."""
        result = call(guarded(asgi_apps.plain, temp_dir), chunks=[b"x" * 600] * 4, chunked=True)
        assert result.status == 413 and result.unread == 0
        assert list(temp_dir.iterdir()) == []

    def test_http2_body_without_length_is_counted(self, temp_dir: Path) -> None:
        """HTTP/2 ends a body with its stream, no Content-Length needed: such a body is still cut at the limit."""
        app = Recorder()
        result = call(guarded(app, temp_dir), chunks=[b"x" * 600] * 4, http_version="2", content_length=False)
        assert result.status == 413 and result.unread == 0

    def test_http2_get_without_length_is_untouched(self, temp_dir: Path) -> None:
        """An HTTP/2 GET (no body by its method) is passed through like any request without a body."""
        app = Recorder()
        result = call(guarded(app, temp_dir), method="GET", http_version="2", content_length=False)
        assert result.status == 200 and len(app.calls) == 1

    def test_chunked_within_limit(self, temp_dir: Path) -> None:
        """A chunked body within the limit is the app's, spooled in the guarded temp dir."""
        spooled: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            spooled.append(tempfile.gettempdir())
            await asgi_apps.plain(scope, receive, send)

        result = call(guarded(app, temp_dir), chunks=[b"x" * 500] * 2, chunked=True)
        assert (result.status, result.text) == (200, "stored 1000")
        assert spooled == [str(temp_dir)] and os.environ["TMPDIR"] == str(temp_dir)

    def test_drain_bounded(self, temp_dir: Path) -> None:
        """Past drain_max the rest is left unread (the server closes the connection)."""
        result = call(guarded(asgi_apps.plain, temp_dir, drain_max=1500), chunks=[b"x" * 600] * 10, chunked=True)
        assert result.status == 413 and 0 < result.unread < 8

    def test_stalled_client_drain_ends(self, temp_dir: Path) -> None:
        """A client that stops sending during the drain gets the 413 after drain_timeout, not a hang."""
        result = call(guarded(asgi_apps.plain, temp_dir, drain_timeout=0.05), chunks=[b"x" * 600] * 2,
                      chunked=True, stall=True)
        assert result.status == 413

    def test_swallowed_413(self, temp_dir: Path) -> None:
        """An app that catches the cut and answers something else (FastAPI: 400) answers 413 all the same."""
        app = asgi_apps.make_starlette()

        async def swallowing(scope: Any, receive: Any, send: Any) -> None:
            try:
                await app(scope, receive, send)
            except Exception:
                await send({"type": "http.response.start", "status": 400, "headers": []})
                await send({"type": "http.response.body", "body": b"bad"})

        result = call(guarded(swallowing, temp_dir), chunks=[b"x" * 600] * 3, chunked=True)
        assert result.status == 413

    def test_fastapi_multipart_over_limit(self, temp_dir: Path) -> None:
        """FastAPI's UploadFile over the limit (chunked) is a 413, not FastAPI's 400."""
        body, content_type = multipart(b"x" * 3000)
        result = call(guarded(asgi_apps.make_fastapi(), temp_dir), chunks=[body[:1000], body[1000:]], chunked=True,
                      headers={"Content-Type": content_type})
        assert result.status == 413


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "uploadguardboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class TestTempDir:
    def test_vanished_dir_healed(self, temp_dir: Path) -> None:
        """A deleted temp dir is recreated before the app reads the body; the upload succeeds."""
        shutil.rmtree(temp_dir)
        guard = guarded(asgi_apps.make_fastapi(), temp_dir, max_body_size=10 << 20)
        body, content_type = multipart(b"y" * (2 << 20))  # over Starlette's 1 MB: spooled to disk
        result = call(guard, chunks=[body], headers={"Content-Type": content_type})
        assert (result.status, result.text) == (200, f"stored {2 << 20}")
        assert temp_dir.is_dir() and guard.stats.snapshot()["heals"] == 1

    def test_cached_verdict_sees_deletion(self, temp_dir: Path) -> None:
        """With a cached healthy verdict (check_interval), a deletion is still seen and healed on the next upload."""
        guard = UploadGuard(asgi_apps.plain, temp_dir=temp_dir, max_body_size=LIMIT, check_interval=60)
        assert call(guard, chunks=[b"z" * 100]).text == "stored 100"
        shutil.rmtree(temp_dir)
        assert call(guard, chunks=[b"z" * 100]).text == "stored 100"
        assert temp_dir.is_dir() and guard.stats.snapshot()["heals"] == 1

    def test_file_instead_of_dir(self, temp_dir: Path) -> None:
        """A file where the temp dir should be: 503 + Retry-After before the app runs; GET still answered."""
        app = Recorder()
        temp_dir.rmdir()
        temp_dir.write_text("not a dir")
        guard = guarded(app, temp_dir, retry_after=9)
        result = call(guard, chunks=[b"z" * 100])
        assert result.status == 503 and result.headers["retry-after"] == "9" and app.calls == []
        assert call(guard, method="GET").status == 200

    def test_symlink(self, temp_dir: Path, tmp_path: Path) -> None:
        """A symlink in place of the temp dir (it may be swapped) is refused: 503 + Retry-After."""
        temp_dir.rmdir()
        (tmp_path / "elsewhere").mkdir()
        temp_dir.symlink_to(tmp_path / "elsewhere")
        result = call(guarded(asgi_apps.plain, temp_dir), chunks=[b"z" * 100])
        assert result.status == 503 and "retry-after" in result.headers

    def test_unlinked(self, tmp_path: Path, temp_dir: Path) -> None:
        """A temp dir deleted while mounted (st_nlink 0: every create fails) is a 503, not a 500."""
        with unlinked_dir(tmp_path / "mnt") as gone:
            result = call(guarded(asgi_apps.plain, gone), chunks=[b"z" * 100])
        assert result.status == 503 and "retry-after" in result.headers

    def test_read_only(self, tmp_path: Path, temp_dir: Path) -> None:
        """A temp dir on a read-only file system is a 503."""
        with tmpfs(tmp_path / "ro", options="ro") as readonly:
            result = call(guarded(asgi_apps.plain, readonly), chunks=[b"z" * 100])
        assert result.status == 503 and "retry-after" in result.headers

    def test_oserror_about_temp_dir(self, temp_dir: Path) -> None:
        """An OSError about the temp dir raised by the app is the 503, not a 500 or a reset."""
        app = Recorder()
        app.raise_ = FileNotFoundError(errno.ENOENT, "No such file", str(temp_dir / "spool"))
        result = call(guarded(app, temp_dir), chunks=[b"z" * 100])
        assert result.status == 503 and "retry-after" in result.headers

    def test_dir_broken_during_fastapi_parse(self, temp_dir: Path) -> None:
        """FastAPI's 400 for a multipart body it could not spool (the dir became a file meanwhile) is the 503."""
        def sabotage(position: int) -> None:
            if position == 1:
                temp_dir.rmdir()
                temp_dir.write_text("now a file")

        body, content_type = multipart(b"y" * (2 << 20))
        result = call(guarded(asgi_apps.make_fastapi(), temp_dir, max_body_size=10 << 20),
                      chunks=[body[:1000], body[1000:]], headers={"Content-Type": content_type}, on_read=sabotage)
        assert result.status == 503 and "retry-after" in result.headers

    def test_fastapi_own_400_kept(self, temp_dir: Path) -> None:
        """A 400 of the app's own (a healthy temp dir) stays the app's."""
        result = call(guarded(asgi_apps.make_fastapi(), temp_dir), chunks=[b"not multipart"],
                      headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert result.status in (400, 422) and "retry-after" not in result.headers

    def test_other_oserror_is_500(self, temp_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
        """Any other OSError is a logged 500."""
        app = Recorder()
        app.raise_ = ConnectionRefusedError(errno.ECONNREFUSED, "database down")
        with caplog.at_level(logging.ERROR, "uploadguard"):
            result = call(guarded(app, temp_dir), chunks=[b"z" * 100])
        assert result.status == 500 and "ECONNREFUSED" in caplog.text

    def test_other_exceptions_propagate(self, temp_dir: Path) -> None:
        """An exception that is not an OSError goes to the server (which logs it and answers 500)."""
        app = Recorder()
        app.raise_ = ValueError("bug")
        with pytest.raises(ValueError):
            call(guarded(app, temp_dir), chunks=[b"z" * 100])

    def test_error_after_held_start_answered(self, temp_dir: Path) -> None:
        """An OSError after the app's response start but before its body is still answered (the start is held)."""
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            raise OSError(errno.ENOSPC, "No space left on device", str(temp_dir / "x"))

        result = call(guarded(app, temp_dir), chunks=[b"z" * 100])
        assert result.status == 503 and [m["type"] for m in result.messages].count("http.response.start") == 1

    def test_error_after_body_started_raises(self, temp_dir: Path) -> None:
        """Once the app's body is out nothing can be answered: the error goes to the server."""
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
            raise OSError(errno.ENOSPC, "No space left on device", str(temp_dir / "x"))

        with pytest.raises(OSError):
            call(guarded(app, temp_dir), chunks=[b"z" * 100])


class TestClientGone:
    @pytest.mark.parametrize("make", [lambda: asgi_apps.plain, asgi_apps.make_starlette, asgi_apps.make_fastapi],
                             ids=["plain", "starlette", "fastapi"])
    def test_quiet_and_clean(self, temp_dir: Path, make: Callable[[], Any], caplog: pytest.LogCaptureFixture) -> None:
        """A client gone mid-body ends the request without an exception or traceback; nothing stays in the temp dir."""
        body, content_type = multipart(b"y" * (2 << 20))
        with caplog.at_level(logging.INFO):
            result = call(guarded(make(), temp_dir, max_body_size=10 << 20), chunks=[body[: 1 << 20 + 1]] * 2,
                          headers={"Content-Type": content_type, "Content-Length": str(len(body))}, disconnect=True)
        assert result.status in (None, 400)
        assert list(temp_dir.iterdir()) == []
        assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]


class TestNested:
    def test_smaller_inner_limit(self, temp_dir: Path) -> None:
        """A guard inside a guard is not counted again, and its smaller limit cuts a chunked body."""
        inner = guarded(asgi_apps.plain, temp_dir, max_body_size=500)
        outer = guarded(inner, temp_dir)
        result = call(outer, chunks=[b"x" * 300] * 3, chunked=True)
        assert result.status == 413 and "500 bytes" in result.text
        assert outer.stats.snapshot()["guarded"] == 1 and inner.stats.snapshot()["guarded"] == 0

    def test_inner_content_length_refusal(self, temp_dir: Path) -> None:
        """The inner guard's smaller limit refuses a Content-Length over it before the app runs."""
        app = Recorder()
        result = call(guarded(guarded(app, temp_dir, max_body_size=500), temp_dir), chunks=[b"x" * 700])
        assert result.status == 413 and app.calls == [] and result.unread == 0


# -- real servers ----------------------------------------------------------------------------

MiB = 1024 * 1024
SERVER_LIMIT = MiB  # bodies over Starlette's 1 MB in-memory spool go to the temp dir


class Uvicorn:
    """A real uvicorn on 127.0.0.1 (stdout and stderr to a log file), like :class:`tests.support.Gunicorn`."""

    def __init__(self, app: str, *, tmp_path: Path, env: dict[str, str], args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.log_path = tmp_path / f"uvicorn-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(self.port), *args, app],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=str(ROOT),
            start_new_session=True)
        try:
            wait_for_port(self.port, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"uvicorn did not start:\n{self.log()}") from None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    path = tmp_path / "uploads"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture(params=["uvicorn", "gunicorn"])
def serve(request: pytest.FixtureRequest, tmp_path: Path, upload_dir: Path) -> Iterator[Callable[[str], Any]]:
    """Start ``tests.asgi_apps:<name>`` under uvicorn or ``gunicorn -c gunicorn_conf.py -k asgi``."""
    started: list[Any] = []

    def start(name: str) -> Any:
        env = {"UPLOADGUARD_TEMP_DIR": str(upload_dir), "UPLOADGUARD_MAX_BODY_SIZE": str(SERVER_LIMIT),
               "UPLOADGUARD_MIN_FREE_SPACE": "0", "UPLOADGUARD_RETRY_AFTER": "1",
               "XDG_CACHE_HOME": str(tmp_path / "cache"), "TEST_STORE_DIR": str(tmp_path / "store")}
        if request.param == "uvicorn":
            server: Any = Uvicorn(f"tests.asgi_apps:{name}", tmp_path=tmp_path, env=env)
        else:
            server = Gunicorn(f"asgi_apps:{name}", tmp_path=tmp_path, config=GUNICORN_CONF,
                              args=["-k", "asgi", "--log-level", "info"], env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def exchange(port: int, head: bytes, body: bytes | Iterator[bytes] = b"") -> tuple[int, dict[str, str], bytes]:
    """Send a request, then read the response: status, headers (lower-case) and body."""
    raw, error = raw_http(port, head, body=body, timeout=30)
    assert raw, f"no response ({error})"
    return parse(raw)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    while raw.startswith(b"HTTP/1.1 100"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def upload_head(length: int | None, content_type: str, *, path: str = "/", extra: str = "") -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{framing}\r\n"
            f"Connection: close\r\n{extra}\r\n").encode()


def chunked(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        piece = data[start:start + size]
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def clean(log: str) -> bool:
    """No traceback and no ERROR line in a server log."""
    return "Traceback" not in log and not re.search(r"\bERROR\b|\[ERROR\]", log)


@pytest.mark.slow
class TestServers:
    @pytest.mark.parametrize("app", ["fastapi_guarded", "fastapi_added", "django_guarded"])
    def test_upload_within_limit(self, serve: Callable[[str], Any], app: str) -> None:
        """An upload within the limit is stored; the server logs no error (gunicorn's pre_request hook included)."""
        server = serve(app)
        body, content_type = multipart(b"y" * (MiB // 2))
        path = "/upload/" if app.startswith("django") else "/"
        status, _, answer = exchange(server.port, upload_head(len(body), content_type, path=path), body)
        assert status == 200 and str(MiB // 2).encode() in answer
        assert clean(server.log()), server.log()

    @pytest.mark.parametrize("app", ["fastapi_guarded", "fastapi_added", "django_guarded"])
    def test_over_limit_content_length(self, serve: Callable[[str], Any], app: str) -> None:
        """A Content-Length over the limit is a 413 the client reads after sending its body."""
        server = serve(app)
        body, content_type = multipart(b"y" * (3 * MiB // 2))
        status, _, answer = exchange(server.port, upload_head(len(body), content_type), body)
        assert status == 413 and b"1048576 bytes" in answer
        assert clean(server.log()), server.log()

    @pytest.mark.parametrize("app", ["fastapi_guarded", "django_guarded"])
    def test_over_limit_chunked(self, serve: Callable[[str], Any], app: str) -> None:
        """A chunked body is answered 413 as it passes the limit, and the client reads it."""
        server = serve(app)
        body, content_type = multipart(b"y" * (3 * MiB // 2))
        status, _, _ = exchange(server.port, upload_head(None, content_type), chunked(body))
        assert status == 413
        assert clean(server.log()), server.log()

    def test_expect_continue_over_limit(self, serve: Callable[[str], Any]) -> None:
        """With Expect: 100-continue over the limit the 413 comes instead of 100 Continue: no body is sent."""
        server = serve("fastapi_guarded")
        raw, _ = raw_http(server.port, upload_head(2 * MiB, "application/octet-stream",
                                                   extra="Expect: 100-continue\r\n"), read_early=True)
        assert raw.startswith(b"HTTP/1.1 413"), raw[:200]

    def test_django_settings_limit(self, serve: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch) -> None:
        """With settings_from_django() the limit in Django settings answers 413 before 100 Continue."""
        monkeypatch.setenv("TEST_DJANGO_MAX_BODY_SIZE", "512K")
        server = serve("django_settings_guarded")
        raw, _ = raw_http(server.port, upload_head(700 * 1024, "application/octet-stream", path="/upload/",
                                                   extra="Expect: 100-continue\r\n"), read_early=True)
        assert raw.startswith(b"HTTP/1.1 413") and b"524288 bytes" in raw, raw[:300]

    def test_expect_continue_within_limit(self, serve: Callable[[str], Any]) -> None:
        """Within the limit the server sends 100 Continue when the app first reads (pinned), then the answer."""
        server = serve("fastapi_guarded")
        body, content_type = multipart(b"y" * 1000)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(upload_head(len(body), content_type, extra="Expect: 100-continue\r\n"))
            interim = sock.recv(4096)
            assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
            sock.sendall(body)
            status, _, answer = parse(interim.split(b"\r\n\r\n", 1)[1] + _read_all(sock))
        assert (status, answer) == (200, b"stored 1000")

    @pytest.mark.parametrize("app", ["fastapi_guarded", "django_guarded"])
    def test_deleted_dir_healed(self, serve: Callable[[str], Any], upload_dir: Path, app: str) -> None:
        """A deleted temp dir is recreated and the upload succeeds."""
        server = serve(app)
        shutil.rmtree(upload_dir)
        body, content_type = multipart(b"y" * (MiB // 2 + MiB // 4))
        path = "/upload/" if app.startswith("django") else "/"
        status, _, _ = exchange(server.port, upload_head(len(body), content_type, path=path), body)
        assert status == 200 and upload_dir.is_dir()

    @pytest.mark.parametrize("app", ["fastapi_guarded", "django_guarded"])
    def test_file_instead_of_dir(self, serve: Callable[[str], Any], upload_dir: Path, app: str) -> None:
        """A file in place of the temp dir: 503 + Retry-After for the upload, the rest of the site answers."""
        server = serve(app)
        shutil.rmtree(upload_dir)
        upload_dir.write_text("not a directory")
        body, content_type = multipart(b"y" * 1000)
        status, headers, _ = exchange(server.port, upload_head(len(body), content_type), body)
        assert status == 503 and headers["retry-after"] == "1"
        if app.startswith("fastapi"):
            assert exchange(server.port, GET)[0] == 200
        assert clean(server.log()), server.log()

    def test_django_spool_in_broken_dir(self, serve: Callable[[str], Any], upload_dir: Path) -> None:
        """Django ASGI failing to spool a body (the dir became a file after the check) is the 503, not a 500."""
        server = serve("django_sabotaged")
        body, content_type = multipart(b"y" * 5000)  # over the project's FILE_UPLOAD_MAX_MEMORY_SIZE: on disk
        status, headers, _ = exchange(server.port, upload_head(len(body), content_type, path="/upload/",
                                                               extra="X-Sabotage: file\r\n"), body)
        assert status == 503 and headers["retry-after"] == "1"
        assert clean(server.log()), server.log()

    def test_full_dir(self, serve: Callable[[str], Any], upload_dir: Path) -> None:
        """A full temp dir (a small tmpfs): 503 + Retry-After."""
        with tmpfs(upload_dir, size="2m"):
            upload_dir.chmod(0o700)
            fill(upload_dir, leave=64 * 1024)
            server = serve("fastapi_guarded")
            body, content_type = multipart(b"y" * (MiB // 2))
            status, headers, _ = exchange(server.port, upload_head(len(body), content_type), body)
            server.stop()
        assert status == 503 and headers["retry-after"] == "1"

    @pytest.mark.parametrize("app", ["fastapi_guarded", "starlette_guarded", "django_guarded"])
    def test_client_gone_mid_body(self, serve: Callable[[str], Any], upload_dir: Path, app: str) -> None:
        """A client gone mid-body leaves nothing in the temp dir and no traceback in the server log."""
        server = serve(app)
        body, content_type = multipart(b"y" * (MiB - 4096))
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(upload_head(len(body), content_type))
            sock.sendall(body[: len(body) - 1000])
        deadline = time.monotonic() + 20
        while "client went away" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        assert exchange(server.port, GET)[0] in (200, 404)  # the server still answers
        assert list(upload_dir.iterdir()) == []
        assert clean(server.log()), server.log()


@pytest.mark.slow
def test_gunicorn_asgi_recycles_workers(tmp_path: Path, upload_dir: Path) -> None:
    """Under gunicorn -k asgi with gunicorn_conf.py, recycled workers (max_requests) each set up the temp dir; no error."""
    server = Gunicorn("asgi_apps:fastapi_guarded", tmp_path=tmp_path, config=GUNICORN_CONF,
                      args=["-k", "asgi", "--log-level", "info"],
                      env={"UPLOADGUARD_TEMP_DIR": str(upload_dir), "UPLOADGUARD_MIN_FREE_SPACE": "0",
                           "GUNICORN_MAX_REQUESTS": "2", "GUNICORN_MAX_REQUESTS_JITTER": "0",
                           "XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        body, content_type = multipart(b"y" * 1000)
        for _ in range(6):
            status, _, answer = exchange(server.port, upload_head(len(body), content_type), body)
            assert (status, answer) == (200, b"stored 1000")
        deadline = time.monotonic() + 20
        while server.log().count("uploadguard: upload temp dir") < 2:  # the first worker and a recycled one
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        status, _, answer = exchange(server.port, upload_head(len(body), content_type), body)
        assert (status, answer) == (200, b"stored 1000")
        assert clean(server.log()), server.log()
    finally:
        server.stop()


def completed_connections(port: int, count: int, *, within: float) -> int:
    """Open ``count`` connections at once; how many the kernel completes within ``within`` seconds.

    Nobody accepts meanwhile (the test stops the worker), so the kernel completes as many handshakes as the
    socket's accept queue holds (``backlog`` + 1 on Linux) and drops the other SYNs.
    """
    import selectors

    socks = []
    pending: set[socket.socket] = set()
    done = 0
    with selectors.DefaultSelector() as selector:
        try:
            for _ in range(count):
                sock = socket.socket()
                socks.append(sock)
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                selector.register(sock, selectors.EVENT_WRITE)
                pending.add(sock)
            deadline = time.monotonic() + within
            while pending and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    sock = key.fileobj  # type: ignore[assignment]
                    selector.unregister(sock)
                    pending.discard(sock)
                    done += sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        finally:
            for sock in socks:
                sock.close()
    return done


@pytest.mark.slow
@pytest.mark.parametrize("config", [None, GUNICORN_CONF], ids=["pinned-gunicorn-alone", "gunicorn_conf"])
def test_gunicorn_asgi_listens_with_the_configured_backlog(tmp_path: Path, upload_dir: Path,
                                                           config: Path | None) -> None:
    """gunicorn 27's ASGI worker leaves the listen queue at asyncio's 100 whatever ``backlog`` says: a burst of
    connections while the worker is busy loses SYNs, each retried a second later.  gunicorn_conf.py keeps it."""
    server = Gunicorn("asgi_apps:plain", tmp_path=tmp_path, config=config,
                      args=["-k", "asgi", "--backlog", "512"],
                      env={"UPLOADGUARD_TEMP_DIR": str(upload_dir), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        assert raw_http(server.port, GET)[0].startswith(b"HTTP/1.1 200")  # the worker serves: its listen() is done
        (worker,) = server.worker_pids()
        os.kill(worker, signal.SIGSTOP)
        try:
            completed = completed_connections(server.port, 400, within=2.0 if config is None else 20.0)
        finally:
            os.kill(worker, signal.SIGCONT)
        if config is None:
            assert completed <= 101  # asyncio's listen(100)
        else:
            assert completed == 400
        assert raw_http(server.port, GET)[0].startswith(b"HTTP/1.1 200")
        assert clean(server.log()), server.log()
    finally:
        server.stop()
