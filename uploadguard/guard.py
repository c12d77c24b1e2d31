"""The guard's decisions, as plain functions over plain values: one place for both drivers.

:mod:`uploadguard.wsgi` and :mod:`uploadguard.asgi` move bytes, headers and
``100 Continue``, read the temp dir's health and count; what a request gets
is decided here, so the two cannot drift:

* :func:`body_length` -- the one reading of ``Content-Length`` and
  ``Transfer-Encoding`` (400 for a malformed length, 411 for a chunked body
  the server will not deliver).
* :func:`limit_refusal` -- the 413 a body announced over the limit gets
  before anyone reads it; :func:`unavailable` -- the retryable 503 for an
  unhealthy temp dir.
* :func:`classify` -- what an exception from the application deserves (413,
  503, 500, or ``None``: let it propagate), given the body's :class:`BodyState`
  and, when :func:`needs_health` says so, the temp dir checked just now;
  :func:`temp_dir_error` is its pure 503-or-not for an ``OSError``.
  :func:`classify_status` does the same for an error *response* a framework
  made of a temp-dir failure (FastAPI answers any body-parse error 400).
* :func:`drain_plan` -- whether the rest of a refused body is read, so the
  client reads the answer.
* :func:`record` -- the one log line and count of an answered error.

Nothing here touches a socket or the disk; the health a function needs is
passed in (the driver's :meth:`~uploadguard.tempdir.TempDirGuard.preflight`
heals on the way, and the driver counts that).
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from .config import Settings, format_size
from .errors import BadRequest, BodyTooLarge, InternalError, LengthRequired, TempDirUnavailable, UploadGuardError
from .stats import Event, GuardStats
from .tempdir import Health, Reason, TempDirGuard, reason_for_errno

__all__ = [
    "BodyState",
    "Drain",
    "body_length",
    "classify",
    "classify_status",
    "drain_plan",
    "limit_refusal",
    "needs_health",
    "configure",
    "may_have_body",
    "record",
    "temp_dir_error",
    "unavailable",
]

log = logging.getLogger("uploadguard")


def body_length(environ: Mapping[str, Any]) -> int | None:
    """The request body's length: ``0`` for none, ``None`` for a chunked body of unknown length.

    The one decision about what body a request has.  A chunked body (no
    ``Content-Length``) is read where the server ends it
    (``wsgi.input_terminated``: gunicorn; waitress even dechunks it and sets
    ``Content-Length``); anywhere else the application would read an empty
    body, and :class:`~uploadguard.errors.LengthRequired` (411, naming the
    fix) is raised -- the WSGI driver first tries uWSGI's own chunk reader.
    Raises :class:`~uploadguard.errors.BadRequest` for a malformed
    ``Content-Length``.  The keys are the WSGI environ's; the ASGI driver
    passes the same names read from the scope's headers (an ASGI server
    always ends a chunked body).
    """
    raw = environ.get("CONTENT_LENGTH")
    if raw:
        if not (raw.isascii() and raw.isdigit()):
            raise BadRequest(f"Invalid Content-Length {raw!r}.")
        return int(raw)
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        if environ.get("wsgi.input_terminated") and _streams_bodies(environ):
            return None  # HTTP/2 and 3 end a body with its stream, no header needed: count it
        return 0
    if environ.get("wsgi.input_terminated"):
        return None
    raise LengthRequired("send the body with a Content-Length.")


#: Methods whose request body has no meaning (RFC 9110): under HTTP/2 a body-less one is not counted.
_BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def _streams_bodies(environ: Mapping[str, Any]) -> bool:
    """Whether a request without ``Content-Length`` may still carry a body: HTTP/2 or 3, a method with one.

    Over HTTP/1.1 a request with neither ``Content-Length`` nor chunked
    framing has no body (RFC 9112); over HTTP/2 and 3 the stream's end ends
    it, and a client may send any size so.
    """
    protocol = str(environ.get("SERVER_PROTOCOL", ""))
    return (protocol.startswith(("HTTP/2", "HTTP/3"))
            and str(environ.get("REQUEST_METHOD", "")).upper() not in _BODILESS_METHODS)


def configure(settings: Settings | None, overrides: Mapping[str, Any]) -> tuple[Settings, TempDirGuard]:
    """Both drivers' ``UploadGuard`` set-up: keywords over ``settings`` (else ``UPLOADGUARD_*``), and the
    temp-dir guard they imply; ``None`` keywords keep the setting."""
    settings = settings.replace(**overrides) if settings else Settings.from_environ(None, **overrides)
    return settings, TempDirGuard(settings.temp_dir, min_free_space=settings.min_free_space,
                                  check_interval=settings.check_interval)


def may_have_body(environ: Mapping[str, Any]) -> bool:
    """The cheap first look of every request: ``False`` means no body, nothing to guard (most GETs)."""
    return bool(environ.get("CONTENT_LENGTH") or "HTTP_TRANSFER_ENCODING" in environ
                or str(environ.get("SERVER_PROTOCOL", "")).startswith(("HTTP/2", "HTTP/3")))


def limit_refusal(limit: int, length: int | None) -> BodyTooLarge | None:
    """The 413 for a body announced over ``limit`` bytes (0: none); a chunked one (``None``) is cut later."""
    if limit and length is not None and length > limit:
        return BodyTooLarge(limit, length=length)
    return None


def unavailable(health: Health | None, *, path: str, retry_after: int, reason: str = "") -> TempDirUnavailable:
    """The retryable 503 for an unhealthy temp dir (or, without ``health``, for ``reason``)."""
    return TempDirUnavailable(
        health.reason or reason if health else reason,
        path=path,
        retry_after=retry_after,
        cause=health.detail if health else "",
    )


class BodyState(Protocol):
    """What a driver knows of the request body it counted (``GuardedInput``, the ASGI body counter)."""

    limit: int  # bytes; 0 = none
    consumed: int  # bytes the application read
    exceeded: bool  # the limit cut the body
    failed: bool  # reading the body itself raised: the client went away


def temp_dir_error(exc: OSError, health: Health, *, temp: TempDirGuard, retry_after: int,
                   spooled: int = 0) -> TempDirUnavailable | None:
    """A 503 for an ``OSError`` that is about the temp dir, else ``None``; decides, changes nothing.

    ``health`` is the temp dir checked just now (by the caller, which heals
    and counts).  The error is about the temp dir when the directory is
    unhealthy (or was just recreated), when the error names a path inside
    it (both paths, for a two-path error such as a rename), or -- for an
    error without a path, like ENOSPC from writing a spooled file -- when
    the directory could not have held the ``spooled`` bytes of body.
    """
    reason = reason_for_errno(exc.errno)
    if reason is None or isinstance(exc, ConnectionError):
        return None
    if health.ok and not health.healed:
        first, second = exc.filename, getattr(exc, "filename2", None)
        if first is not None:
            if not (temp.owns(first) and (second is None or temp.owns(second))):
                return None
        elif not (reason is Reason.NO_SPACE and spooled
                  and (health.free_bytes or 0) < spooled + temp.min_free_space):
            return None
    error = unavailable(health if not health.ok else None, path=temp.path, retry_after=retry_after, reason=reason)
    error.cause = f"{type(exc).__name__}: {exc}" + (f"; now: {health.detail}" if not health.ok else "")
    return error


def needs_health(exc: BaseException, body: BodyState | None) -> bool:
    """Whether :func:`classify` needs a fresh temp-dir check to judge ``exc`` (an ``OSError`` it may blame on the dir)."""
    if not isinstance(exc, OSError) or isinstance(exc, UploadGuardError):
        return False
    if body is not None and (body.exceeded or body.failed):
        return False
    return reason_for_errno(exc.errno) is not None


def classify(exc: BaseException, body: BodyState | None, health: Health | None, *, temp: TempDirGuard,
             retry_after: int, spooled: int = 0) -> UploadGuardError | None:
    """The response an exception from the application deserves, or ``None`` to let it propagate.

    Our own errors answer themselves; a body the limit cut is a 413 whatever
    the application made of it; an ``OSError`` is the temp dir's 503 when
    :func:`temp_dir_error` says so (``health``: checked just now, when
    :func:`needs_health`), else a 500 -- except a failure *reading the
    body*: the client went away, and the server knows how to log that.
    Exceptions other than ``OSError`` propagate.
    """
    if isinstance(exc, UploadGuardError):
        return exc
    if body is not None and body.exceeded:
        return BodyTooLarge(body.limit)
    if not isinstance(exc, OSError):
        return None
    if body is not None and body.failed:
        return None
    if health is not None and reason_for_errno(exc.errno) is not None:
        error = temp_dir_error(exc, health, temp=temp, retry_after=retry_after, spooled=spooled)
        if error is not None:
            return error
    return InternalError(exc)


def classify_status(status: int, health: Health, *, path: str, retry_after: int) -> TempDirUnavailable | None:
    """The 503 that replaces a framework's 400 for a body when the temp dir, checked just now, is to blame.

    FastAPI answers any failure to parse a body 400 -- an ``OSError``
    spooling a multipart file into a broken temp dir included -- and keeps
    the exception to itself.  A 400 for a request with a body while the dir
    is unusable (or had vanished and was just recreated) is the temp dir's
    retryable 503; any other status stays the application's.
    """
    if status != 400 or (health.ok and not health.healed):
        return None
    return unavailable(health if not health.ok else None, path=path, retry_after=retry_after,
                       reason=Reason.MISSING)


class Drain(enum.Enum):
    """What happens to the unread rest of a body before an early answer."""

    DONE = "done"  # nothing is left: the client has sent it all
    SKIP = "skip"  # do not read: the client sends nothing more, or too much to wait for
    READ = "read"  # read and discard it, within the bounds


def drain_plan(*, waiting: bool, eof: bool, remaining: int | None, max_bytes: int, timeout: float) -> Drain:
    """Whether to read the rest of a refused body, so the client (which reads only once it has sent) sees the answer.

    ``waiting``: the client still waits for a ``100 Continue`` nobody sent; it
    has sent nothing and will not.  ``remaining`` is ``None`` for a chunked
    body; one announced past ``max_bytes`` is not worth the wait.
    """
    if waiting:
        return Drain.SKIP
    if eof or remaining == 0:
        return Drain.DONE
    if remaining is not None and remaining > max_bytes:
        return Drain.SKIP
    if timeout <= 0:
        return Drain.SKIP
    return Drain.READ


def record(error: UploadGuardError, where: str, stats: GuardStats) -> None:
    """Log one line and count an error about to be answered; ``where`` is ``METHOD path``, printable."""
    if isinstance(error, BodyTooLarge):
        stats.record(Event.REJECTED)
        sent = f"Content-Length {error.length}" if error.length is not None else "chunked body"
        log.warning("413 %s: %s over the limit of %s", where, sent, format_size(error.limit))
    elif isinstance(error, TempDirUnavailable):
        stats.record(Event.UNAVAILABLE, error.reason)
        log.warning("503 %s: upload temp dir %s unusable (%s): %s",
                    where, error.path, error.reason, error.cause or error.detail)
    elif isinstance(error, LengthRequired):
        stats.record(Event.LENGTH_REQUIRED)
        log.warning("411 %s: a chunked body this server will not deliver: %s", where, error.fix)
    elif isinstance(error, BadRequest):
        stats.record(Event.BAD_REQUEST)
        log.warning("400 %s: %s", where, error.detail)
    elif isinstance(error, InternalError):
        exc = error.exception
        if isinstance(exc, OSError) and exc.errno:
            reason = errno.errorcode.get(exc.errno, str(exc.errno))
        else:
            reason = type(exc).__name__ if exc is not None else error.reason
        stats.record(Event.ERROR, reason)
        log.error("%s on %s; answering 500", reason, where, exc_info=exc)


def printable(text: object) -> str:
    """``text`` for a log line: control characters escaped, so a request path cannot forge lines."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in value)
