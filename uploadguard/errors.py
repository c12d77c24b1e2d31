"""Errors that are responses.

Each class knows its status, headers and body and is itself a WSGI
application, in the manner of Werkzeug's ``HTTPException``: the middleware
returns ``error(environ, start_response)``, the Django and Flask integrations
turn the same object into their own response type, and tests can assert on
attributes instead of parsing bodies.

The body follows the client's ``Accept`` header: JSON for clients that ask
for JSON, a tiny HTML page for browsers, plain text otherwise. Every error
response carries ``Cache-Control: no-store`` so no proxy caches a transient
failure.

* :class:`BodyTooLarge` -- 413, says the limit.
* :class:`TempDirUnavailable` -- 503 with ``Retry-After``: uploads are
  temporarily impossible (temp dir missing, full, read-only, unsafe...);
  the client should send the same request again later.
* :class:`BadRequest` -- 400, e.g. a ``Content-Length`` that is not a number.
* :class:`LengthRequired` -- 411 for a chunked body the server will not hand
  to the application (uWSGI without a way to read it); says the fix.
* :class:`InternalError` -- 500 for an ``OSError`` that is not about the temp
  dir, so the client gets an answer instead of gunicorn's dropped connection.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

#: Headers that describe a framework response's body; when an error replaces that response,
#: these go and the others (CORS, HSTS, cookies...) stay.
CONTENT_HEADERS = frozenset({
    "cache-control", "content-disposition", "content-encoding", "content-language", "content-length",
    "content-range", "content-type", "etag", "expires", "last-modified", "retry-after", "transfer-encoding",
})

__all__ = ["CONTENT_HEADERS", "UploadGuardError", "BodyTooLarge", "TempDirUnavailable", "BadRequest", "LengthRequired", "InternalError"]


class UploadGuardError(Exception):
    """Base class: an HTTP error response uploadguard answers with."""

    status_code: ClassVar[int] = 500
    title: ClassVar[str] = "Internal Server Error"
    #: Short machine-readable cause, also used as the metrics label.
    reason: str = "error"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason

    @property
    def status(self) -> str:
        return f"{self.status_code} {self.title}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.status_code} reason={self.reason!r}: {self.detail}>"

    def headers(self) -> list[tuple[str, str]]:
        return [("Cache-Control", "no-store")]

    def payload(self) -> dict[str, object]:
        """The JSON body; subclasses add their facts (limit, retry_after...)."""
        return {"error": self.reason, "status": self.status_code, "detail": self.detail}

    def render(self, accept: str = "") -> tuple[str, bytes]:
        """Content type and body for a client that sent ``accept``."""
        accept = accept.lower()
        if "json" in accept and ("text/html" not in accept or accept.find("json") < accept.find("text/html")):
            return "application/json", json.dumps(self.payload()).encode()
        if "text/html" in accept:
            page = (
                f"<!doctype html><title>{self.status}</title>"
                f"<h1>{html.escape(self.title)}</h1><p>{html.escape(self.detail)}</p>\n"
            )
            return "text/html; charset=utf-8", page.encode()
        return "text/plain; charset=utf-8", f"{self.status}: {self.detail}\n".encode()

    def response(self, environ: WSGIEnvironment) -> tuple[str, list[tuple[str, str]], bytes]:
        """Status line, headers and body for this request."""
        content_type, body = self.render(environ.get("HTTP_ACCEPT", ""))
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        headers.extend(self.headers())
        return self.status, headers, body

    def replacing(
        self, environ: WSGIEnvironment, headers: Iterable[tuple[str, str]]
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        """Status, headers and body that replace a framework's response with ``headers``.

        The replaced response's headers that do not describe its body (CORS,
        HSTS, ``Set-Cookie``...) stay; its :data:`CONTENT_HEADERS` go.  The one
        rule for the Django and Flask integrations.
        """
        status, own, body = self.response(environ)
        kept = [(name, value) for name, value in headers if name.lower() not in CONTENT_HEADERS]
        return status, kept + own, body

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        status, headers, body = self.response(environ)
        start_response(status, headers)
        return [body]


class BodyTooLarge(UploadGuardError):
    """The request body is larger than the configured limit."""

    status_code = 413
    title = "Content Too Large"
    reason = "body_too_large"

    def __init__(self, limit: int, *, length: int | None = None) -> None:
        from .config import format_size

        self.limit = limit
        self.length = length
        said = f" (the request announced {length} bytes)" if length is not None else ""
        super().__init__(
            f"The request body is larger than the limit of {format_size(limit)} ({limit} bytes){said}."
        )

    def payload(self) -> dict[str, object]:
        return {**super().payload(), "limit": self.limit}


class TempDirUnavailable(UploadGuardError):
    """Uploads cannot be spooled right now; the same request may succeed later."""

    status_code = 503
    title = "Service Unavailable"
    reason = "unavailable"

    def __init__(self, reason: str, *, path: str = "", retry_after: int = 5, cause: str = "") -> None:
        self.path = path
        self.retry_after = retry_after
        #: Why, for logs (never sent to the client: it may name server paths).
        self.cause = cause
        super().__init__(
            f"Uploads are temporarily unavailable; please retry in {retry_after} seconds.", reason=reason
        )

    def __repr__(self) -> str:
        return f"<TempDirUnavailable 503 reason={self.reason!r} path={self.path!r}: {self.cause}>"

    def headers(self) -> list[tuple[str, str]]:
        return [*super().headers(), ("Retry-After", str(self.retry_after))]

    def payload(self) -> dict[str, object]:
        return {**super().payload(), "retry_after": self.retry_after}


class BadRequest(UploadGuardError):
    """The request cannot be understood (e.g. a malformed ``Content-Length``)."""

    status_code = 400
    title = "Bad Request"
    reason = "bad_request"


class LengthRequired(BadRequest):
    """A chunked body the server will not deliver: without this answer the app would see an empty body.

    A :class:`BadRequest`, because every place that handles one answers it
    the same way: at once, with no body to drain (the server holds none for
    the application).  ``fix`` names what makes such uploads work.
    """

    status_code = 411
    title = "Length Required"
    reason = "length_required"

    def __init__(self, fix: str) -> None:
        self.fix = fix
        super().__init__(f"This server does not pass a chunked request body to the application; {fix}")

    def payload(self) -> dict[str, object]:
        return {**super().payload(), "fix": self.fix}


class InternalError(UploadGuardError):
    """An ``OSError`` unrelated to the temp dir escaped the application: a 500 instead of a dropped connection."""

    status_code = 500
    title = "Internal Server Error"
    reason = "internal_error"

    def __init__(self, exception: BaseException | None = None,
                 detail: str = "The server could not complete the request.") -> None:
        super().__init__(detail)
        #: What the application raised (logged with its traceback; never sent to the client).
        self.exception = exception
