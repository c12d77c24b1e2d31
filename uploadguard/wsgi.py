"""``UploadGuard``: WSGI middleware that keeps uploads from failing badly.

Wrap any WSGI application::

    from uploadguard import UploadGuard
    application = UploadGuard(application)

For every request **with a body** (a ``Content-Length`` above 0, or a chunked
body) it:

1. Enforces the body limit.  A ``Content-Length`` over ``max_body_size`` is
   answered **413** before the application reads a byte; a chunked body is
   counted as it is read and cut at the limit with a 413.  The limit is
   inclusive.  The 413 names the limit (JSON if the client asks for JSON).
2. Preflights the upload temp dir: a vanished directory is recreated
   (logged at INFO, counted); a directory that cannot take the body (a file,
   a symlink, unlinked, read-only, full, wrong owner, world-writable without
   the sticky bit) is answered **503** with ``Retry-After`` and
   ``Cache-Control: no-store``.
3. Turns an ``OSError`` escaping the application into a response instead of
   gunicorn's dropped connection: errors on the temp dir (a path inside it,
   or any ENOSPC/ENOENT/EROFS/EACCES/... while the dir is unhealthy) become
   the same retryable 503; other ``OSError`` s a plain 500, logged with their
   traceback.  Client disconnects (``errno`` ``None``, ``ConnectionError``)
   propagate untouched -- the server knows how to log those.

Requests without a body pass straight through (no system call, no wrapper),
so pages keep working while uploads are unavailable.

**Draining.** A client that is still sending a body does not see a response
until it has sent it all; if the server closes the socket with unread data the
kernel resets the connection and the client reads nothing.  So before an
early 413/503 the guard reads and discards the rest of the body, bounded by
``drain_max`` bytes (default: twice the limit) and ``drain_timeout`` seconds
(default 10).  A body whose remainder is known to exceed ``drain_max`` is not
drained at all.  A client that sent ``Expect: 100-continue`` is not drained
either: it sends nothing until told to (see
:func:`uploadguard.gunicorn.pre_request`, which stops gunicorn from sending
``100 Continue`` for bodies over the limit).

If the response has already started when an error happens, nothing can be
changed: the error is logged and re-raised, as WSGI requires.

Parameters (keyword-only; ``None`` takes the value from
:class:`~uploadguard.config.Settings`, i.e. the ``UPLOADGUARD_*`` environment):

``temp_dir``        the upload temp directory
``max_body_size``   bytes or ``"200M"``; ``0`` switches the limit off
``retry_after``     seconds in ``Retry-After``
``min_free_space``  bytes the file system keeps after spooling the body
``drain_max``       bytes read to let a client see an early response
``drain_timeout``   seconds spent draining at most
``check_interval``  seconds a healthy temp-dir verdict is reused (0 = every request)
``settings``        a ready :class:`~uploadguard.config.Settings` to start from

Per-request state lives in namespaced environ keys: ``uploadguard.guard``
(the guard handling the request, so nested guards do not double-handle) and
``uploadguard.input`` (the counting input stream).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .config import Settings, format_size
from .errors import BadRequest, BodyTooLarge, InternalError, TempDirUnavailable, UploadGuardError
from .tempdir import Health, TempDirGuard, reason_for_errno

if TYPE_CHECKING:
    from types import TracebackType

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]

__all__ = ["UploadGuard", "GuardStats", "GuardedInput"]

log = logging.getLogger("uploadguard")

_CHUNK = 64 * 1024
ENVIRON_GUARD = "uploadguard.guard"
ENVIRON_INPUT = "uploadguard.input"
ENVIRON_ANSWERED = "uploadguard.answered"
#: Where the Django and Flask integrations stash an exception their framework caught and answered 500.
ENVIRON_EXCEPTION = "uploadguard.exception"


class GuardStats:
    """In-process counters: requests guarded, 413s, 503s by reason, heals, 500s.

    ``listeners`` are called as ``listener(event, reason)`` for every count,
    which is how :mod:`uploadguard.metrics` exports them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.listeners: list[Callable[[str, str], None]] = []

    def record(self, event: str, reason: str = "") -> None:
        key = (event, reason)
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
        if not self.listeners:
            return
        for listener in self.listeners:
            try:
                listener(event, reason)
            except Exception:  # a metrics backend must never break a request
                log.exception("uploadguard: stats listener failed")

    def total(self, event: str) -> int:
        """All counts of ``event`` (``"guarded"``, ``"413"``, ``"503"``, ``"heal"``, ``"500"``)."""
        with self._lock:
            return sum(n for (e, _), n in self.counts.items() if e == event)

    def by_reason(self, event: str) -> dict[str, int]:
        with self._lock:
            return {r: n for (e, r), n in self.counts.items() if e == event}

    def snapshot(self) -> dict[str, Any]:
        """A plain dict for logs, tests and health endpoints."""
        return {
            "guarded": self.total("guarded"),
            "rejected_413": self.total("413"),
            "unavailable_503": self.by_reason("503"),
            "heals": self.total("heal"),
            "errors_500": self.total("500"),
        }


class GuardedInput:
    """``wsgi.input`` wrapper that counts what is read and enforces the limit.

    With a known ``Content-Length`` reads never go past it (safe on servers
    without ``wsgi.input_terminated``); without one (chunked) the stream is
    cut at ``limit`` with :class:`~uploadguard.errors.BodyTooLarge`.
    """

    __slots__ = ("_stream", "_length", "_limit", "consumed", "exceeded", "eof", "failed")

    def __init__(self, stream: Any, *, length: int | None, limit: int) -> None:
        self._stream = stream
        self._length = length
        self._limit = limit
        self.consumed = 0
        self.exceeded = False
        self.eof = False
        #: Reading the body itself raised (the client went away): the error is the client's, not the app's.
        self.failed = False

    def _cap(self, size: int | None) -> int:
        """How many bytes this read may ask the server for (-1: no cap)."""
        if self._length is not None:
            remaining = self._length - self.consumed
            return remaining if size is None or size < 0 else min(size, remaining)
        if self._limit:
            room = self._limit + 1 - self.consumed  # one byte over proves the excess
            return room if size is None or size < 0 else min(size, room)
        return -1 if size is None else size

    def _count(self, data: bytes, asked: int) -> bytes:
        self.consumed += len(data)
        if not data and asked != 0:
            self.eof = True
        if self._limit and self._length is None and self.consumed > self._limit:
            self.exceeded = True
            raise BodyTooLarge(self._limit)
        return data

    def read(self, size: int | None = -1) -> bytes:
        length = self._length
        if length is not None:
            # The hot path (a parser reading a known-length body): kept inline.
            remaining = length - self.consumed
            size = remaining if size is None or size < 0 else min(size, remaining)
            if size <= 0:
                if remaining <= 0:
                    self.eof = True
                return b""
            try:
                data: bytes = self._stream.read(size)
            except OSError:
                self.failed = True
                raise
            if not data:
                self.eof = True
            self.consumed += len(data)
            return data
        cap = self._cap(size)
        if cap == 0:
            if size != 0:
                self.eof = True
            return b""
        if cap < 0 or (size is None or size < 0) and self._length is None:
            return self._read_all(cap)
        return self._count(self._raw(self._stream.read, cap), cap)

    def _raw(self, method: Callable[[int], bytes], size: int) -> bytes:
        try:
            return method(size)
        except OSError:
            self.failed = True
            raise

    def _read_all(self, cap: int) -> bytes:
        parts = []
        while cap != 0:
            want = _CHUNK if cap < 0 else min(_CHUNK, cap)
            data = self._count(self._raw(self._stream.read, want), want)
            if not data:
                break
            parts.append(data)
            if cap > 0:
                cap -= len(data)
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        cap = self._cap(size)
        if cap == 0:
            return b""
        return self._count(self._raw(self._stream.readline, cap), cap)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    @property
    def remaining(self) -> int | None:
        """Bytes still unread (``None`` when the length is unknown)."""
        return None if self._length is None else self._length - self.consumed

    def drain(self, *, max_bytes: int, timeout: float, sock: Any = None) -> bool:
        """Read and discard the rest of the body within the bounds; ``True`` if all was read.

        ``sock`` (gunicorn's ``environ["gunicorn.socket"]``) gets the remaining
        time as its timeout while draining, so a client that stalls cannot hold
        the worker past ``timeout``: a blocked read would never see the deadline.
        """
        if self.eof or self.remaining == 0:
            return True
        if self.remaining is not None and self.remaining > max_bytes:
            return False
        deadline = time.monotonic() + timeout
        previous = sock.gettimeout() if sock is not None else None
        try:
            return self._drain(max_bytes, deadline, sock)
        finally:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.settimeout(previous)

    def _drain(self, budget: int, deadline: float, sock: Any) -> bool:
        stream = self._stream
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
                data = stream.read(want)
            except Exception:  # the client went away or stalled, or the stream is broken: stop quietly
                return False
            if not data:
                self.eof = True
                return True
            self.consumed += len(data)
            budget -= len(data)
        return self.remaining == 0


class _Exchange:
    """Holds back ``start_response`` until the app has returned, so a late error can still be answered.

    PEP 3333 would allow calling the server's ``start_response`` again with
    ``exc_info`` instead, but gunicorn appends the second call's headers to
    the first's (two ``Content-Type`` headers), so the guard never calls it twice.
    """

    __slots__ = ("_start_response", "status", "headers", "exc_info", "sent", "_write")

    def __init__(self, start_response: StartResponse) -> None:
        self._start_response = start_response
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
            self._write = self._start_response(self.status, self.headers, self.exc_info)

    def write(self, data: bytes) -> None:
        self.commit()
        assert self._write is not None
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
    try:
        return max(0, int(environ.get("CONTENT_LENGTH") or 0))
    except ValueError:
        return 0


class UploadGuard:
    """WSGI middleware; see the module documentation for what it guarantees."""

    def __init__(
        self,
        app: WSGIApplication,
        *,
        temp_dir: str | os.PathLike[str] | None = None,
        max_body_size: int | str | None = None,  # bytes, or "200M"
        retry_after: int | None = None,  # seconds
        min_free_space: int | str | None = None,  # bytes, or "16M"
        drain_max: int | str | None = None,  # bytes, or "400M"
        drain_timeout: float | None = None,  # seconds
        check_interval: float | None = None,  # seconds
        settings: Settings | None = None,
    ) -> None:
        overrides: dict[str, Any] = dict(
            temp_dir=temp_dir, max_body_size=max_body_size, retry_after=retry_after,
            min_free_space=min_free_space, drain_max=drain_max, drain_timeout=drain_timeout,
            check_interval=check_interval,
        )
        self.settings = settings.replace(**overrides) if settings else Settings.from_environ(None, **overrides)
        self.app = app
        self.temp = TempDirGuard(self.settings.temp_dir, min_free_space=self.settings.min_free_space,
                                 check_interval=self.settings.check_interval)
        self.stats = GuardStats()
        from . import metrics  # Prometheus counters when prometheus_client is installed; else nothing

        metrics.install(self)

    def __repr__(self) -> str:
        return f"<UploadGuard {self.settings.describe()}>"

    # -- the request path ------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        raw_length = environ.get("CONTENT_LENGTH")
        if not raw_length and not (
            # A body without a length can only be read safely where the server says it ends it.
            environ.get("wsgi.input_terminated") and "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        ):
            return self.app(environ, start_response)  # no body: nothing to guard
        if environ.get(ENVIRON_GUARD) is not None:
            return self.app(environ, start_response)  # an outer guard has this request
        return self._guarded(environ, start_response, raw_length)

    def _guarded(self, environ: WSGIEnvironment, start_response: StartResponse, raw_length: str | None) -> Iterable[bytes]:
        settings = self.settings
        length: int | None = None
        if raw_length:
            try:
                length = int(raw_length)
                if length < 0:
                    raise ValueError(raw_length)
            except ValueError:
                return self._reject(environ, start_response, BadRequest(f"Invalid Content-Length {raw_length!r}."), None)
            if length == 0:
                return self.app(environ, start_response)
        stream = GuardedInput(environ["wsgi.input"], length=length, limit=settings.max_body_size)
        refusal = self.admit(length)
        if refusal is not None:
            return self._reject(environ, start_response, refusal, stream)

        environ[ENVIRON_GUARD] = self
        environ[ENVIRON_INPUT] = stream
        environ["wsgi.input"] = stream
        exchange = _Exchange(start_response)
        result: Iterable[bytes] | None = None
        try:
            result = self.app(environ, exchange.start_response)
            if stream.exceeded and ENVIRON_ANSWERED not in environ:
                # The app swallowed our BodyTooLarge and answered something else.
                raise BodyTooLarge(settings.max_body_size)
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
            if result is not None and hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    log.exception("uploadguard: closing the application's response failed")
            if exchange.sent:
                log.error("uploadguard: error after the response started (%s %s); cannot answer it",
                          environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), exc_info=True)
                raise
            error = self.error_for(exc, environ)
            if error is None:
                raise
            return self._reject(environ, start_response, error, stream)

    # -- deciding and answering ------------------------------------------------------

    def admit(self, length: int | None) -> UploadGuardError | None:
        """The 413 or 503 a body of ``length`` bytes (``None``: chunked) gets before anyone reads it.

        Counts the request as guarded and heals a vanished temp dir on the
        way; ``None`` means go ahead.  Also used by the Django middleware.
        """
        self.stats.record("guarded")
        limit = self.settings.max_body_size
        if limit and length is not None and length > limit:
            return BodyTooLarge(limit, length=length)
        health = self.temp.preflight(length or 0)
        if health.healed:
            self.stats.record("heal")
        return None if health.ok else self.unavailable(health)

    def error_for(self, exc: BaseException, environ: WSGIEnvironment) -> UploadGuardError | None:
        """The response an exception from the application deserves, or ``None`` to let it propagate.

        Also used by the Django and Flask integrations, which see exceptions
        the WSGI layer never does.  Logs and counts the 500 case here; 413 and
        503 are logged and counted when answered.
        """
        stream = environ.get(ENVIRON_INPUT)
        if isinstance(exc, UploadGuardError):
            return exc
        if isinstance(stream, GuardedInput) and stream.exceeded:
            return BodyTooLarge(self.settings.max_body_size)
        if not isinstance(exc, OSError):
            return None
        if isinstance(stream, GuardedInput) and stream.failed:
            return None  # reading the body failed: the client went away; the server logs that itself
        unavailable = self.temp_dir_error(exc, spooled=_spooled(environ))
        if unavailable is not None:
            return unavailable
        log.error("uploadguard: %s on %s %s; answering 500", type(exc).__name__,
                  environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), exc_info=exc)
        self.stats.record("500", errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__)
        return InternalError()

    def replacement(self, environ: WSGIEnvironment, status_code: int) -> UploadGuardError | None:
        """What replaces a framework's response, or ``None`` to keep it.

        Takes the exception the framework caught (stashed under
        ``environ["uploadguard.exception"]``); only a 5xx response it produced
        for one of ours or a temp-dir error is replaced.
        """
        caught = environ.pop(ENVIRON_EXCEPTION, None)
        if caught is None or status_code < 500:
            return None
        return self.caught_error(caught, environ)

    def caught_error(self, exc: BaseException, environ: WSGIEnvironment) -> UploadGuardError | None:
        """The answer to an exception a framework caught and answered 500 itself, or ``None`` to keep that 500.

        For the Django and Flask integrations: uploadguard's own errors and
        temp-dir errors are answered; everything else the framework has
        answered and logged already.
        """
        if isinstance(exc, UploadGuardError):
            return exc
        if isinstance(exc, OSError):
            return self.temp_dir_error(exc, spooled=_spooled(environ))
        return None

    def temp_dir_error(self, exc: OSError, *, spooled: int = 0) -> TempDirUnavailable | None:
        """A 503 for an ``OSError`` that is about the temp dir, else ``None``.

        It is about the temp dir when the directory is unhealthy right now
        (checked afresh; a vanished one is healed on the way, so the client's
        retry succeeds), or when the error names a path inside it (both paths,
        for a two-path error such as a rename), or -- for an error without a
        path, like ENOSPC from writing a spooled file -- when the directory
        could not have held the ``spooled`` bytes of body read so far.
        """
        reason = reason_for_errno(exc.errno)
        if reason is None or isinstance(exc, ConnectionError):
            return None
        health = self.temp.preflight(fresh=True)
        if health.healed:
            self.stats.record("heal")
        if health.ok and not health.healed:
            first, second = exc.filename, getattr(exc, "filename2", None)
            if first is not None:
                if not (self.temp.owns(first) and (second is None or self.temp.owns(second))):
                    return None
            elif not (reason == "no_space" and spooled
                      and (health.free_bytes or 0) < spooled + self.temp.min_free_space):
                return None
        unavailable = self.unavailable(health if not health.ok else None, reason=reason)
        unavailable.cause = f"{type(exc).__name__}: {exc}" + (f"; now: {health.detail}" if not health.ok else "")
        return unavailable

    def unavailable(self, health: Health | None, *, reason: str = "") -> TempDirUnavailable:
        """The retryable 503 for an unhealthy temp dir (or, without ``health``, for ``reason``)."""
        return TempDirUnavailable(
            health.reason or reason if health else reason,
            path=str(self.temp.path),
            retry_after=self.settings.retry_after,
            cause=health.detail if health else "",
        )

    def _reject(
        self, environ: WSGIEnvironment, start_response: StartResponse, error: UploadGuardError,
        stream: GuardedInput | None,
    ) -> Iterable[bytes]:
        self.note(error, environ)
        if stream is not None and not (
            isinstance(error, BodyTooLarge) and stream.consumed == 0
            and environ.get("HTTP_EXPECT", "").lower() == "100-continue"
        ):
            self.drain(stream, environ)
        return error(environ, start_response)

    def drain(self, stream: GuardedInput, environ: WSGIEnvironment) -> bool:
        """Read the rest of the body within ``drain_max``/``drain_timeout``, so the client reads our answer."""
        return stream.drain(max_bytes=self.settings.drain_bytes, timeout=self.settings.drain_timeout,
                            sock=environ.get("gunicorn.socket"))

    def note(self, error: UploadGuardError, environ: WSGIEnvironment) -> None:
        """Log (one WARNING line) and count a 413/503/400 about to be answered.

        Marks the request answered (``environ["uploadguard.answered"]``), so an
        outer guard does not answer (and count) it again.
        """
        environ[ENVIRON_ANSWERED] = error
        where = f"{environ.get('REQUEST_METHOD', '?')} {environ.get('PATH_INFO', '')}"
        if isinstance(error, BodyTooLarge):
            self.stats.record("413")
            sent = f"Content-Length {error.length}" if error.length is not None else "chunked body"
            log.warning("uploadguard: 413 %s: %s over the limit of %s", where, sent, format_size(error.limit))
        elif isinstance(error, TempDirUnavailable):
            self.stats.record("503", error.reason)
            log.warning("uploadguard: 503 %s: upload temp dir %s unusable (%s): %s",
                        where, error.path, error.reason, error.cause or error.detail)
        elif isinstance(error, BadRequest):
            self.stats.record("400")
            log.warning("uploadguard: 400 %s: %s", where, error.detail)
