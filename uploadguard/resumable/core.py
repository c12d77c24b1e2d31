"""The endpoint's answers as pure functions: a request's head and an upload's state in, headers out.

:mod:`.protocol` parses headers and chooses statuses; this module composes
what the endpoint answers from them (the headers describing an upload, CORS,
``OPTIONS``, the error responses), and holds the request's head as both
drivers see it (:class:`Head`).  No file, socket or clock: ``now`` is passed
in.  The order of store and lock calls is :mod:`.engine`'s; moving bytes is
the drivers' (:mod:`.wsgi`, :mod:`.asgi`).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable
from typing import NamedTuple

from ..errors import UploadGuardError
from . import protocol as p
from .protocol import UploadInfo

__all__ = ["Head", "Response", "state_headers", "finish_headers", "options_headers", "preflight_headers",
           "error_response", "interim_headers", "final_id", "whole", "liveness", "RateFloor", "RATE_FLOOR"]

EXPOSED = ("Location, Upload-Offset, Upload-Length, Upload-Metadata, Upload-Defer-Length, Upload-Expires, "
           "Upload-Concat, Upload-Complete, Upload-Draft-Interop-Version, Tus-Resumable, Tus-Version, "
           "Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm, Retry-After")
ALLOWED_HEADERS = ("Authorization, Content-Type, Tus-Resumable, Upload-Length, Upload-Offset, Upload-Metadata, "
                   "Upload-Defer-Length, Upload-Checksum, Upload-Concat, Upload-Complete, "
                   "Upload-Draft-Interop-Version, X-HTTP-Method-Override, X-Requested-With, X-Request-ID")
METHODS = "POST, HEAD, PATCH, DELETE, OPTIONS"

#: Bytes a PATCH must bring in each ``idle_timeout`` window (0.5 KiB/s at the default 30 s).
RATE_FLOOR = 16 * 1024


class Response(NamedTuple):
    """What the endpoint answers: a status line, headers and body (``handle()``'s result under WSGI)."""

    status: str
    headers: list[tuple[str, str]]
    body: Iterable[bytes]


class Head:
    """One endpoint request as both drivers see it: method, path, headers; the dialect once known.

    ``lookup`` answers a header by its name (``None`` when absent); a driver
    builds it from a WSGI environ or an ASGI scope.  ``headers`` collects the
    response headers decided so far (``Location``, the interop version).
    """

    def __init__(self, *, method: str, wire_method: str, path: str, root: str,
                 lookup: Callable[[str], str | None], content_length: str | None, terminated: bool,
                 owner: str | None) -> None:
        #: The method, ``X-HTTP-Method-Override`` applied (see :func:`.protocol.method_of`).
        self.method = method
        #: The method on the wire, which decides the response's framing: a POST overridden to HEAD
        #: still gets a body its Content-Length describes (a body-less one would desync the connection).
        self.wire_method = wire_method
        self.path = path  # below the application's root (WSGI PATH_INFO, ASGI path minus root_path)
        self.root = root  # where the application is mounted (SCRIPT_NAME, root_path)
        self.header = lookup
        self._content_length = content_length
        self._terminated = terminated
        self.owner = owner
        self.dialect: str | None = None
        self.interop: int | None = None
        self.headers: list[tuple[str, str]] = [("Cache-Control", "no-store")]

    @property
    def ietf(self) -> bool:
        return self.dialect == p.Dialect.IETF

    def content_length(self) -> int | None:
        """The body's length; ``None`` for a body that runs to its end (chunked)."""
        raw = self._content_length
        if raw in (None, ""):
            return None if self._terminated else 0
        return p.parse_number(str(raw), "Content-Length")

    def location(self, prefix: str, upload_id: str) -> str:
        """The upload's URL as a path: clients resolve it against the endpoint, so it stays right
        behind a TLS-terminating proxy that an absolute ``http://`` URL would get wrong."""
        return f"{self.root.rstrip('/')}{prefix}{upload_id}"


def state_headers(head: Head, info: UploadInfo, location: Callable[[str], str]) -> list[tuple[str, str]]:
    """The headers that describe an upload: offset, length, expiry, metadata, completeness."""
    headers = [("Upload-Offset", str(info.offset))]
    if info.length is not None:
        headers.append(("Upload-Length", str(info.length)))
    elif not head.ietf:
        headers.append(("Upload-Defer-Length", "1"))
    if head.method == "HEAD" and info.metadata:
        headers.append(("Upload-Metadata", p.encode_metadata(info.metadata)))
    if head.method == "HEAD" and info.partial:
        headers.append(("Upload-Concat", "partial"))
    elif head.method == "HEAD" and info.parts is not None:
        headers.append(("Upload-Concat", "final;" + " ".join(location(part) for part in info.parts)))
    if info.expires is not None:
        headers.append(("Upload-Expires", p.http_date(info.expires)))
    if head.ietf:
        headers.append(("Upload-Complete", "?1" if info.completed else "?0"))
    return headers


def origin_allowed(origins: frozenset[str], origin: str) -> bool:
    return "*" in origins or origin.rstrip("/") in origins


def finish_headers(head: Head, headers: list[tuple[str, str]], origins: frozenset[str]) -> list[tuple[str, str]]:
    """``headers`` with what every answer carries: ``Tus-Resumable``, CORS, framing."""
    headers = list(headers)
    if not any(name == "Tus-Resumable" for name, _ in headers) and not head.ietf:
        headers.append(("Tus-Resumable", p.TUS_VERSION))
    origin = head.header("Origin")
    if origin is not None and origin_allowed(origins, origin):
        headers += [("Access-Control-Allow-Origin", origin), ("Access-Control-Expose-Headers", EXPOSED),
                    ("Vary", "Origin")]
    if not any(name == "Content-Length" for name, _ in headers) and head.wire_method != "HEAD":
        headers.append(("Content-Length", "0"))
    return headers


def options_headers(head: Head, max_size: int) -> list[tuple[str, str]]:
    """tus discovery: the version, extensions, checksum algorithms and the largest upload."""
    headers = [*head.headers, ("Tus-Resumable", p.TUS_VERSION), ("Tus-Version", p.TUS_VERSION),
               ("Tus-Extension", ",".join(p.TUS_EXTENSIONS)),
               ("Tus-Checksum-Algorithm", ",".join(p.CHECKSUM_ALGORITHMS))]
    if max_size:
        headers.append(("Tus-Max-Size", str(max_size)))
    return headers


def preflight_headers(origin: str, origins: frozenset[str]) -> list[tuple[str, str]]:
    """A CORS preflight's answer (complete: no other header is added)."""
    headers = [("Cache-Control", "no-store"), ("Vary", "Origin")]
    if origin_allowed(origins, origin):
        headers += [("Access-Control-Allow-Origin", origin), ("Access-Control-Allow-Methods", METHODS),
                    ("Access-Control-Allow-Headers", ALLOWED_HEADERS), ("Access-Control-Max-Age", "86400")]
    return headers


def error_response(head: Head, error: UploadGuardError, origins: frozenset[str]) -> Response:
    """An error as the endpoint answers it: the error's own response, the dialect's headers, CORS."""
    status, headers, body = error.response({"HTTP_ACCEPT": head.header("Accept") or ""})
    if head.ietf:
        headers.append(("Upload-Draft-Interop-Version", str(head.interop)))
    # An upload created before the error (e.g. on_complete raised on a creation-with-upload)
    # is named, so the client can ask for it instead of creating it again.
    headers.extend(item for item in head.headers if item[0] == "Location")
    return Response(status, finish_headers(head, headers, origins), [] if head.wire_method == "HEAD" else [body])


def interim_headers(head: Head) -> list[tuple[str, str]] | None:
    """The IETF draft's ``104 Upload Resumption Supported`` for a creation whose upload exists, else ``None``.

    Sent before the body is read, it tells the client where to resume if the
    connection breaks mid-body.  tus has no such response.
    """
    location = [item for item in head.headers if item[0] == "Location"]
    if not head.ietf or head.method != "POST" or not location:
        return None
    return [*location, ("Upload-Draft-Interop-Version", str(head.interop))]


def whole(info: UploadInfo) -> bool:
    """Every byte is stored: completed, or only not yet marked so (the worker died, or finish failed)."""
    return info.completed or (info.length is not None and info.offset == info.length)


def final_id(owner: str | None, part_ids: list[str]) -> str:
    """The id of the final upload joining ``part_ids`` for ``owner``: the same for a retry.

    As unguessable as the part ids it is made of (a digest of them): only
    who knows the parts can name it.
    """
    digest = hashlib.sha256(json.dumps([owner, part_ids]).encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:24]


def liveness(info: UploadInfo, now: float, keep_completed: float) -> p.UploadGone | None:
    """410 once an upload expired, or once a completed one is past ``keep_completed``; else ``None``."""
    expires = info.expires
    if expires is not None and expires < now:
        return p.UploadGone(f"Upload {info.id} expired; start a new upload.")
    discard = info.discard_at(keep_completed)
    if discard is not None and discard < now:
        return p.UploadGone(f"Upload {info.id} was completed too long ago and is no longer kept.")
    return None


class RateFloor:
    """Whether a body brings at least :data:`RATE_FLOOR` bytes per ``window`` seconds (0: no floor).

    A driver counts bytes as they arrive (:meth:`count`) and asks :meth:`slow`;
    a window that brought too few ends the PATCH, keeping what arrived.  After
    a good window the next starts at the last counted bytes, so silence ends a
    PATCH one window after the last bytes.
    """

    def __init__(self, window: float, now: float) -> None:
        self.window = window
        self._start = now
        self._bytes = 0
        self._counted_at = now

    def count(self, size: int, now: float) -> None:
        if size:
            self._bytes += size
            self._counted_at = now

    def deadline(self) -> float:
        """When :meth:`slow` may next turn true if nothing arrives (``inf`` without a floor)."""
        if not self.window:
            return float("inf")
        if self._bytes >= RATE_FLOOR:
            return self._counted_at + self.window
        return self._start + self.window

    def slow(self, now: float) -> bool:
        if not self.window or now - self._start < self.window:
            return False
        if self._bytes >= RATE_FLOOR:
            self._start, self._bytes = self._counted_at, 0
            return now - self._start >= self.window
        return True
