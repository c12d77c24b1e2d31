"""``UploadGuard``: WSGI middleware that keeps uploads from failing badly.

Wrap any WSGI application::

    from uploadguard import UploadGuard
    application = UploadGuard(application)

What it guarantees for a request **with a body** (a ``Content-Length`` above 0,
or a chunked body the server terminates), in the docs' words: a 413 the
client can read for a body over the limit, a vanished temp dir recreated, a
retryable 503 + ``Retry-After`` for an unusable one, and a response -- never
gunicorn's dropped connection -- for any ``OSError`` the application raises.
Requests without a body pass straight through (no system call, no wrapper).
The options are the settings of :mod:`uploadguard.config` (the docs, "Settings
reference"), as keyword arguments; ``None`` takes the configured value.

How each decision is made, and where (the decisions themselves are plain
functions of :mod:`uploadguard.guard`, shared with the ASGI driver; the
methods below bring them the request's state):

* :func:`body_length` -- the one reading of ``Content-Length`` and
  ``Transfer-Encoding`` (400 for a malformed length, 411 for a chunked body
  the server will not deliver; under uWSGI it reads one through
  ``uwsgi.chunked_read`` where that works).
* :meth:`UploadGuard.refusal` -- the 413 or 503 a body gets before anyone reads
  it (the Django middleware asks the same method).
* :meth:`UploadGuard.answer_for` -- what an exception from the application
  deserves: a 413 for a body cut at the limit, the 503 for a temp-dir error
  (:meth:`UploadGuard.temp_dir_error`, a pure classifier), a 500 for any
  other ``OSError`` (a ``ConnectionError`` to a backend included).  Only a
  failure *reading the request body* propagates untouched: the client went
  away, and the server knows how to log that.  Exceptions other than
  ``OSError`` propagate as well.
* :meth:`UploadGuard.answer_for_caught` -- the same for an exception a
  framework caught and answered 500 itself (Django, Flask), stashed with
  :func:`remember_exception`.

**Nested guards compose.**  A guard inside another (``UploadGuard`` around a
Django site whose middleware is a guard too, or around a Flask app with the
extension) does not re-count the request, but still applies its own limit when
it is smaller and checks its own temp dir when it is another: the smallest
limit in force wins.

**Draining.**  A client that is still sending a body does not read a response
until it has sent it all; if the server closes the socket with unread data the
kernel resets the connection and the client reads nothing.  So before an early
413/503 the guard reads and discards the rest of the body, within
``drain_max`` bytes and ``drain_timeout`` seconds of wall-clock time.  Under
gunicorn the time bound holds whatever the client does: a timer shuts the
socket for reading at the deadline, so even a client that drips a byte a
second cannot hold the worker (a per-read timeout alone would not do: the
server's reader loops until it has the bytes it was asked for).  Under other
servers each read is bounded only by the server's own timeouts.

**Expect: 100-continue.**  gunicorn answers ``100 Continue`` before the
application runs.  With uploadguard's ``gunicorn_conf.py`` the hook
:func:`uploadguard.gunicorn.pre_request` defers it with :class:`ContinueOnRead`:
``100 Continue`` goes out when the application first reads the body.  A 413
or 503 decided before that reaches the client before it sends a byte --
whatever the source of the limit -- and that connection is closed afterwards.

If the response has already started when an error happens, nothing can be
changed: the error is logged and re-raised, as WSGI requires.

Per-request state lives in namespaced environ keys: ``uploadguard.guard`` (the
outermost guard, which counts the request), ``uploadguard.input`` (the
counting input stream), ``uploadguard.answered`` (the error already answered,
so no outer layer answers or counts it again) and ``uploadguard.exception``
(an exception a framework caught).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import guard
from .config import Settings
from .errors import BadRequest, BodyTooLarge, InternalError, LengthRequired, TempDirUnavailable, UploadGuardError
from .guard import printable as _printable
from .stats import Event, GuardStats
from .tempdir import Health

if TYPE_CHECKING:
    from types import TracebackType

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]

__all__ = [
    "ContinueOnRead",
    "Event",
    "GuardStats",
    "GuardedInput",
    "ServerChunks",
    "UploadGuard",
    "body_length",
    "remember_exception",
    "request_socket",
    "shut_reading",
    "waiting_for_continue",
]

log = logging.getLogger("uploadguard")

_CHUNK = 64 * 1024
ENVIRON_GUARD = "uploadguard.guard"
ENVIRON_INPUT = "uploadguard.input"
ENVIRON_ANSWERED = "uploadguard.answered"
ENVIRON_EXCEPTION = "uploadguard.exception"


def body_length(environ: WSGIEnvironment) -> int | None:
    """The request body's length: ``0`` for none, ``None`` for a chunked body of unknown length.

    The decision is :func:`uploadguard.guard.body_length` (400 for a malformed
    ``Content-Length``, 411 for a chunked body the server will not deliver);
    this driver adds what only a WSGI server can: uWSGI does not end a chunked
    body in ``wsgi.input`` (it stops at ``Content-Length``, so the application
    would read an empty body and answer as if all were well).  Where uWSGI gets
    the chunks to the worker (see :func:`_uwsgi_delivers_chunks`)
    ``wsgi.input`` becomes a :class:`ServerChunks` over
    ``uwsgi.chunked_read`` and is marked terminated; anywhere else
    :class:`~uploadguard.errors.LengthRequired` names the fix.
    """
    try:
        return guard.body_length(environ)
    except LengthRequired:
        if "uwsgi.version" not in environ:
            raise
    uwsgi = _uwsgi_module()
    if uwsgi is not None and _uwsgi_delivers_chunks(getattr(uwsgi, "opt", {})):
        environ["wsgi.input"] = ServerChunks(uwsgi.chunked_read)
        environ["wsgi.input_terminated"] = True
        return None
    raise LengthRequired("send the body with a Content-Length. (uWSGI reads a chunked body only with "
                         "--http-socket, or --http with --http-chunked-input, in the serving instance.)")


def _uwsgi_module() -> Any:
    """uWSGI's embedded ``uwsgi`` module (importable only inside a uWSGI worker), else ``None``."""
    try:
        return importlib.import_module("uwsgi")
    except ImportError:
        return None


def _uwsgi_delivers_chunks(options: Any) -> bool:
    """Whether the raw chunks of a request reach this uWSGI worker, for ``uwsgi.chunked_read``.

    ``options`` is ``uwsgi.opt``, the instance's command line.  Its own HTTP
    router forwards them only with ``--http-chunked-input`` (without it the
    body is dropped and ``chunked_read`` waits for its timeout); a worker on
    ``--http-socket`` parses HTTP itself and gets them -- unless a router
    without the option shares the instance.  A router in another instance
    cannot be seen from here: not delivered.
    """
    if options.get("http-chunked-input"):
        return True
    return ("http-socket" in options or "https-socket" in options) and not ("http" in options or "https" in options)


class _Lines:
    """``readlines`` and iteration from ``readline``: the file-like rest of a WSGI input stream."""

    def readline(self, size: int | None = -1) -> bytes:
        raise NotImplementedError

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class ServerChunks(_Lines):
    """A ``wsgi.input`` over a server's chunk-at-a-time body reader (uWSGI's ``uwsgi.chunked_read``).

    ``next_chunk()`` returns the next chunk, ``b""`` at the end.  Reads
    return ``size`` bytes unless the body ends first, like gunicorn's body;
    at most ``size`` plus one chunk is held.
    """

    __slots__ = ("_next_chunk", "_buffer", "_done")

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next_chunk = next_chunk
        self._buffer = bytearray()
        self._done = False

    def _fill(self) -> bool:
        if self._done:
            return False
        chunk = self._next_chunk()
        if not chunk:
            self._done = True
            return False
        self._buffer += chunk
        return True

    def _pop(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            return self._pop(len(self._buffer))
        while len(self._buffer) < size and self._fill():
            pass
        return self._pop(size)

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None else size
        while b"\n" not in self._buffer and (limit < 0 or len(self._buffer) < limit) and self._fill():
            pass
        end = self._buffer.find(b"\n") + 1 or len(self._buffer)
        return self._pop(end if limit < 0 else min(end, limit))



def request_socket(environ: WSGIEnvironment) -> socket.socket | None:
    """This request's own client socket (gunicorn's ``environ["gunicorn.socket"]``), to time out or shut.

    ``None`` where there is none, and under HTTP/2: there the socket carries
    every stream of the connection, and a timeout or shutdown meant for one
    request would cut the others.
    """
    if str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/2"):  # set by the server, never the client
        return None
    sock = environ.get("gunicorn.socket")
    return sock if isinstance(sock, socket.socket) else None


def shut_reading(sock: socket.socket) -> None:
    """Wake any read blocked on ``sock`` (it returns EOF) while the response can still be written.

    ``ssl.SSLSocket.shutdown`` would also drop the TLS layer, and what is
    written afterwards would go out in clear text: the plain socket's
    ``shutdown`` is called for TLS sockets too.
    """
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RD)


def remember_exception(environ: WSGIEnvironment, exc: BaseException) -> None:
    """Keep the first exception a framework caught, for :meth:`UploadGuard.answer_for_caught`.

    Called by the Django and Flask integrations' ``got_request_exception`` receivers.
    """
    environ.setdefault(ENVIRON_EXCEPTION, exc)


class ContinueOnRead:
    """A request body that sends ``100 Continue`` on its first read (deferred by the gunicorn hook).

    Until then :attr:`pending` is true: the client is waiting and has sent
    no body, so an early answer need not (and cannot) drain it.
    ``on_continue`` runs when the interim response goes out (the gunicorn hook
    uses it to keep the connection alive only for requests whose body was read).
    After the first read the wrapped stream's methods are bound directly, so
    reading costs nothing extra.
    """

    def __init__(self, body: Any, sock: socket.socket, on_continue: Callable[[], None] | None = None) -> None:
        self._body = body
        self._sock = sock
        self._on_continue = on_continue
        self.pending = True
        self._answered = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)  # the server's own state (gunicorn's ``failed``...) stays visible

    def response_started(self) -> None:
        """The final response has begun: no ``100 Continue`` may follow it (RFC 9110, 15.2)."""
        self._answered = True

    def _send_continue(self) -> None:
        if self.pending:
            self.pending = False
            self.read = self._body.read  # type: ignore[method-assign]
            self.readline = self._body.readline  # type: ignore[method-assign]
            self.readlines = self._body.readlines  # type: ignore[method-assign]
            if self._answered:
                return  # reading after the answer began: the client decides when to send
            self._sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if self._on_continue is not None:
                self._on_continue()

    def read(self, size: int | None = None) -> bytes:
        self._send_continue()
        return self._body.read(size)  # type: ignore[no-any-return]

    def readline(self, size: int | None = None) -> bytes:
        self._send_continue()
        return self._body.readline(size)  # type: ignore[no-any-return]

    def readlines(self, hint: int | None = None) -> list[bytes]:
        self._send_continue()
        return self._body.readlines(hint)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[bytes]:
        self._send_continue()
        return iter(self._body)


class GuardedInput(_Lines):
    """``wsgi.input`` wrapper that counts what is read and enforces the limit.

    With a known ``Content-Length`` reads never go past it (safe on servers
    without ``wsgi.input_terminated``); without one (chunked) the stream is
    cut at ``limit`` with :class:`~uploadguard.errors.BodyTooLarge`.  The
    state other layers read: ``consumed`` (bytes read), ``exceeded`` (the
    limit cut the body), ``failed`` (reading the body itself raised: the
    client went away) and ``eof``.
    """

    __slots__ = ("_stream", "_length", "limit", "consumed", "exceeded", "eof", "failed")

    def __init__(self, stream: Any, *, length: int | None, limit: int) -> None:
        self._stream = stream
        self._length = length
        self.limit = limit  # bytes; 0 = none
        self.consumed = 0
        self.exceeded = False
        self.eof = False
        self.failed = False

    def tighten(self, limit: int) -> None:
        """Apply a smaller limit (a nested guard's); a larger one or 0 changes nothing."""
        if limit and (not self.limit or limit < self.limit):
            self.limit = limit

    @property
    def remaining(self) -> int | None:
        """Bytes still unread (``None`` when the length is unknown)."""
        return None if self._length is None else self._length - self.consumed

    def _take(self, method: Callable[[int], bytes], size: int | None) -> bytes:
        """The one bounded read: at most to the end, or one byte past the limit; counted.

        One function on purpose: it is the hot path of every parser reading a body.
        """
        if self._length is not None:
            room = self._length - self.consumed
        elif self.limit:
            room = self.limit + 1 - self.consumed  # one byte over proves the excess
        else:
            room = -1 if size is None or size < 0 else size
        if size is not None and 0 <= size < room:
            room = size
        if room == 0:
            if size != 0:
                self.eof = True
            return b""
        try:
            data = method(room)
        except OSError:
            self.failed = True
            raise
        self.consumed += len(data)
        if not data:
            self.eof = True
        elif self.limit and self._length is None and self.consumed > self.limit:
            self.exceeded = True
            raise BodyTooLarge(self.limit)
        return data

    def _read_all(self) -> bytes:
        """A chunked body to its end, piecewise, so the limit cuts it in time."""
        parts = []
        while data := self._take(self._stream.read, _CHUNK):
            parts.append(data)
        return b"".join(parts)

    def read(self, size: int | None = -1) -> bytes:
        if self._length is None and (size is None or size < 0):
            return self._read_all()
        return self._take(self._stream.read, size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._take(self._stream.readline, size)


    def drain(self, *, max_bytes: int, timeout: float, sock: socket.socket | None = None) -> bool:
        """Read and discard the rest of the body within the bounds; ``True`` if all was read.

        ``timeout`` is wall-clock time.  With ``sock`` (gunicorn's
        ``environ["gunicorn.socket"]``) it holds whatever the client sends: a
        timer shuts the socket for reading at the deadline, which wakes any
        read blocked inside the server's body reader.
        """
        plan = guard.drain_plan(waiting=False, eof=self.eof, remaining=self.remaining, max_bytes=max_bytes,
                                timeout=timeout)
        if plan is not guard.Drain.READ:
            return plan is guard.Drain.DONE
        deadline = time.monotonic() + timeout
        alarm = _ReadDeadline(sock, timeout) if sock is not None else None
        previous = sock.gettimeout() if sock is not None else None
        try:
            return self._drain(max_bytes, deadline, sock)
        finally:
            if alarm is not None:
                alarm.cancel()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.settimeout(previous)

    def _drain(self, budget: int, deadline: float, sock: socket.socket | None) -> bool:
        while budget > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            want = min(_CHUNK, budget) if self._length is None else min(_CHUNK, budget, self._length - self.consumed)
            if want <= 0:
                return True
            try:
                if sock is not None:
                    sock.settimeout(left)
                data = self._stream.read(want)
            except Exception:  # the client went away or stalled, or the stream is broken: stop quietly
                return False
            if not data:
                self.eof = True
                return self._length is None or self.consumed == self._length
            self.consumed += len(data)
            budget -= len(data)
        return self.remaining == 0


class _ReadDeadline:
    """Shuts ``sock`` for reading after ``seconds``, unless cancelled first.

    Only a shutdown wakes a ``recv`` that a server's reader keeps calling
    for a client that sends a byte at a time; writing the response still works.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._cancelled = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            if not self._cancelled:
                shut_reading(self._sock)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
        self._timer.cancel()


class _Exchange:
    """Holds back ``start_response`` until the app has returned, so a late error can still be answered.

    PEP 3333 would allow calling the server's ``start_response`` again with
    ``exc_info`` instead, but gunicorn appends the second call's headers to
    the first's (two ``Content-Type`` headers), so the guard never calls it twice.
    """

    __slots__ = ("_start_response", "status", "headers", "exc_info", "sent", "_write", "_continue")

    def __init__(self, start_response: StartResponse, continue_input: ContinueOnRead | None = None) -> None:
        self._start_response = start_response
        self._continue = continue_input
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.exc_info: Any = None
        self.sent = False
        self._write: Callable[[bytes], object] | None = None

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
        if exc_info is not None and self.sent:
            raise exc_info[1].with_traceback(exc_info[2])
        self.status, self.headers, self.exc_info = status, headers, exc_info
        return self.write

    def commit(self) -> None:
        if not self.sent:
            if self.status is None:
                raise RuntimeError("the application did not call start_response")
            self.sent = True
            if self._continue is not None:
                self._continue.response_started()
            self._write = self._start_response(self.status, self.headers, self.exc_info)

    def write(self, data: bytes) -> None:
        self.commit()
        if self._write is not None:
            self._write(data)


class _ClosingChain:
    """The first chunk, then the rest of the app's iterable, with its ``close()`` kept."""

    __slots__ = ("_first", "_rest", "_source")

    def __init__(self, first: list[bytes], rest: Iterator[bytes], source: Iterable[bytes]) -> None:
        self._first = first
        self._rest = rest
        self._source = source

    def __iter__(self) -> Iterator[bytes]:
        yield from self._first
        yield from self._rest

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()


def _spooled(environ: WSGIEnvironment) -> int:
    """Body bytes read so far (counted by our stream), else the announced length: what may sit in the temp dir."""
    stream = environ.get(ENVIRON_INPUT)
    if isinstance(stream, GuardedInput) and stream.consumed:
        return stream.consumed
    raw = environ.get("CONTENT_LENGTH") or ""
    return int(raw) if raw.isascii() and raw.isdigit() else 0


def waiting_for_continue(environ: WSGIEnvironment) -> bool:
    """Whether the server's input is a :class:`ContinueOnRead` that has not sent its ``100 Continue``."""
    raw = environ.get("wsgi.input")
    while isinstance(raw, GuardedInput):
        raw = raw._stream
    return isinstance(raw, ContinueOnRead) and raw.pending


def _close_quietly(result: Iterable[bytes] | None) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("closing the application's response failed")


def _spools(environ: WSGIEnvironment) -> bool:
    """An application that says nothing may spool any body."""
    return True


def _framework_endpoint_spools(app: object) -> Callable[[WSGIEnvironment], bool] | None:
    """``spools_body`` of the resumable endpoint inside a framework app this guard wraps directly.

    ``UploadGuard(flask_app)`` and ``UploadGuard(get_wsgi_application())`` are
    documented set-ups; the endpoint lives inside them (a Flask extension,
    Django's ``ResumableUploadsMiddleware``), where ``getattr(app, ...)``
    cannot see it.
    """
    extensions = getattr(app, "extensions", None)  # a Flask app
    if isinstance(extensions, dict) and "uploadguard.resumable" in extensions:
        return extensions["uploadguard.resumable"].spools_body  # type: ignore[no-any-return]
    django = sys.modules.get("uploadguard.django")
    if django is not None and type(app).__module__.startswith("django.core.handlers"):
        endpoint = getattr(django, "_endpoint", None)
        if endpoint is not None:
            return endpoint.uploads.spools_body  # type: ignore[no-any-return]
    return None


class UploadGuard:
    """WSGI middleware; see the module documentation for what it guarantees and how."""

    def __init__(
        self,
        app: WSGIApplication,
        *,
        temp_dir: str | os.PathLike[str] | None = None,
        max_body_size: int | str | None = None,  # bytes, or "200M"; 0 = no limit
        retry_after: int | None = None,  # seconds
        min_free_space: int | str | None = None,  # bytes, or "16M"
        drain_max: int | str | None = None,  # bytes, or "400M"
        drain_timeout: float | None = None,  # seconds
        check_interval: float | None = None,  # seconds
        settings: Settings | None = None,
    ) -> None:
        self.settings, self.temp = guard.configure(settings, dict(
            temp_dir=temp_dir, max_body_size=max_body_size, retry_after=retry_after,
            min_free_space=min_free_space, drain_max=drain_max, drain_timeout=drain_timeout,
            check_interval=check_interval,
        ))
        self.app = app
        self.stats = GuardStats()
        self._spools: Callable[[WSGIEnvironment], bool] | None = None  # see spools_body()
        from . import metrics  # Prometheus counters when prometheus_client is installed; else nothing

        metrics.install(self)

    def __repr__(self) -> str:
        return f"<UploadGuard {self.settings.describe()}>"

    # -- the request path ------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not guard.may_have_body(environ):
            return self.app(environ, start_response)  # the common case, no body: nothing to guard
        outer = environ.get(ENVIRON_GUARD)
        try:
            length = body_length(environ)
        except BadRequest as malformed:
            if outer is not None:
                return self.app(environ, start_response)  # the outer guard let it through: not ours to judge
            return self._answer(environ, start_response, malformed, None)
        if length == 0:
            return self.app(environ, start_response)
        if outer is not None:
            refusal = self.nested_refusal(environ, length)
            if refusal is not None:
                return self._answer(environ, start_response, refusal, environ.get(ENVIRON_INPUT))
            return self.app(environ, start_response)
        return self._guarded(environ, start_response, length)

    def _guarded(self, environ: WSGIEnvironment, start_response: StartResponse, length: int | None) -> Iterable[bytes]:
        raw = environ["wsgi.input"]
        stream = GuardedInput(raw, length=length, limit=self.settings.max_body_size)
        refusal = self.refusal(length, spooled=self.spools_body(environ))
        if refusal is not None:
            return self._answer(environ, start_response, refusal, stream)
        environ[ENVIRON_GUARD] = self
        environ[ENVIRON_INPUT] = stream
        environ["wsgi.input"] = stream
        exchange = _Exchange(start_response, raw if isinstance(raw, ContinueOnRead) else None)
        result: Iterable[bytes] | None = None
        try:
            result = self.app(environ, exchange.start_response)
            if stream.exceeded and ENVIRON_ANSWERED not in environ:
                # The app swallowed our BodyTooLarge and answered something else.
                raise BodyTooLarge(stream.limit)
            if isinstance(result, (list, tuple)):
                body: Iterable[bytes] = result
            else:
                wrapper = environ.get("wsgi.file_wrapper")
                if isinstance(wrapper, type) and isinstance(result, wrapper):
                    exchange.commit()
                    return result
                rest = iter(result)
                body = _ClosingChain([next(rest, b"")], rest, result)
            exchange.commit()
            return body
        except Exception as exc:
            # The server never sees ``result`` now, so closing it (Django's request_finished!) is ours.
            _close_quietly(result)
            if exchange.sent:
                log.error("error after the response started (%s %s); cannot answer it",
                          _printable(environ.get("REQUEST_METHOD")), _printable(environ.get("PATH_INFO")), exc_info=True)
                raise
            error = self.answer_for(exc, environ)
            if error is None:
                raise
            return self._answer(environ, start_response, error, stream)

    # -- deciding ----------------------------------------------------------------------

    def spools_body(self, environ: WSGIEnvironment) -> bool:
        """Whether this request's body may be spooled into the temp dir, so it needs room there.

        Asks the wrapped application's ``spools_body(environ)`` when it has
        one (:class:`uploadguard.resumable.ResumableUploads` stores its bodies
        elsewhere); otherwise yes.  Either way the temp dir must be usable.
        """
        if self._spools is None:  # looked up at the first body: a framework has set its endpoint up by then
            self._spools = getattr(self.app, "spools_body", None) or _framework_endpoint_spools(self.app) or _spools
        return bool(self._spools(environ))

    def refusal(self, length: int | None, *, spooled: bool = True) -> UploadGuardError | None:
        """The 413 or 503 a body of ``length`` bytes (``None``: chunked) gets before anyone reads it.

        Counts the request as guarded and heals a vanished temp dir on the
        way; ``None`` means go ahead.  A body that will not be ``spooled``
        into the temp dir needs no room there (only a usable dir).  Also used
        by the Django middleware.
        """
        self.stats.record(Event.GUARDED)
        too_large = guard.limit_refusal(self.settings.max_body_size, length)
        if too_large is not None:
            return too_large
        health = self.temp.preflight((length or 0) if spooled else 0)
        if health.healed:
            self.stats.record(Event.HEALED)
        return None if health.ok else self.unavailable(health)

    def nested_refusal(self, environ: WSGIEnvironment, length: int | None, *,
                       spooled: bool | None = None) -> UploadGuardError | None:
        """For a request an outer guard has admitted: this guard's smaller limit, and its own temp dir.

        The request is not counted again; a smaller limit also tightens the
        outer guard's stream, so a chunked body is cut at the smallest limit.
        """
        limit = self.settings.max_body_size
        too_large = guard.limit_refusal(limit, length)
        if too_large is not None:
            return too_large
        stream = environ.get(ENVIRON_INPUT)
        if isinstance(stream, GuardedInput):
            stream.tighten(limit)
        outer = environ.get(ENVIRON_GUARD)
        if isinstance(outer, UploadGuard) and outer.temp.path == self.temp.path:
            return None
        if spooled is None:
            spooled = self.spools_body(environ)
        health = self._checked_temp_dir((length or 0) if spooled else 0)
        return None if health.ok else self.unavailable(health)

    def _checked_temp_dir(self, need: int = 0, *, fresh: bool = False) -> Health:
        """The temp dir's health (a vanished one recreated and counted)."""
        health = self.temp.preflight(need, fresh=fresh)
        if health.healed:
            self.stats.record(Event.HEALED)
        return health

    def answer_for(self, exc: BaseException, environ: WSGIEnvironment) -> UploadGuardError | None:
        """The response an exception from the application deserves, or ``None`` to let it propagate (:func:`guard.classify`)."""
        stream = environ.get(ENVIRON_INPUT)
        body = stream if isinstance(stream, GuardedInput) else None
        health = self._checked_temp_dir(fresh=True) if guard.needs_health(exc, body) else None
        return guard.classify(exc, body, health, temp=self.temp, retry_after=self.settings.retry_after,
                              spooled=_spooled(environ))

    def answer_for_caught(self, environ: WSGIEnvironment, status_code: int) -> UploadGuardError | None:
        """What replaces a framework's own error response, or ``None`` to keep it.

        Takes the exception the framework caught (:func:`remember_exception`);
        only a 5xx it produced for one of our errors or a temp-dir error is
        replaced.  The framework has logged other exceptions itself.
        """
        caught = environ.pop(ENVIRON_EXCEPTION, None)
        if caught is None or status_code < 500:
            return None
        error = self.answer_for(caught, environ)
        return None if isinstance(error, InternalError) else error

    def temp_dir_error(self, exc: OSError, health: Health, *, spooled: int = 0) -> TempDirUnavailable | None:
        """A 503 for an ``OSError`` that is about the temp dir, else ``None`` (:func:`guard.temp_dir_error`)."""
        return guard.temp_dir_error(exc, health, temp=self.temp, retry_after=self.settings.retry_after,
                                    spooled=spooled)

    def unavailable(self, health: Health | None, *, reason: str = "") -> TempDirUnavailable:
        """The retryable 503 for an unhealthy temp dir (or, without ``health``, for ``reason``)."""
        return guard.unavailable(health, path=str(self.temp.path), retry_after=self.settings.retry_after,
                                 reason=reason)

    # -- answering ---------------------------------------------------------------------

    def _answer(
        self, environ: WSGIEnvironment, start_response: StartResponse, error: UploadGuardError,
        stream: GuardedInput | None,
    ) -> Iterable[bytes]:
        self.record(error, environ)
        if stream is not None and self.should_drain(error, stream, environ):
            self.drain(stream, environ)
        return error(environ, start_response)

    @staticmethod
    def should_drain(error: UploadGuardError, stream: GuardedInput, environ: WSGIEnvironment) -> bool:
        """Whether the client may still be sending a body it must finish before it reads ``error``.

        Not a client still waiting for a ``100 Continue`` the deferring gunicorn
        hook has not sent: it has sent nothing and will not.  Any other client
        may be sending (a server without the hook sent ``100 Continue`` itself).
        """
        return not waiting_for_continue(environ)

    def drain(self, stream: GuardedInput, environ: WSGIEnvironment) -> bool:
        """Read the rest of the body within ``drain_max`` and ``drain_timeout``, so the client reads our answer."""
        return stream.drain(max_bytes=self.settings.drain_bytes, timeout=self.settings.drain_timeout,
                            sock=request_socket(environ))

    def record(self, error: UploadGuardError, environ: WSGIEnvironment) -> None:
        """Log one line and count an error about to be answered, once per request.

        Marks the request answered (``environ["uploadguard.answered"]``), so an
        outer layer does not answer or count it again.
        """
        if environ.get(ENVIRON_ANSWERED) is error:
            return
        environ[ENVIRON_ANSWERED] = error
        guard.record(error, _printable(f"{environ.get('REQUEST_METHOD', '?')} {environ.get('PATH_INFO', '')}"),
                     self.stats)
