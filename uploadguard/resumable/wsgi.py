"""``ResumableUploads``: the tus 1.0 / IETF-draft endpoint as WSGI middleware.

The handler is thin: headers are parsed and statuses chosen in
:mod:`~uploadguard.resumable.protocol`, bytes are stored by a
:class:`~uploadguard.resumable.store.Store`, one writer per upload is ensured
by :class:`~uploadguard.resumable.locking.FileLocker`.  What is left here is
the order of those steps and the hooks.  See :mod:`uploadguard.resumable`
for the parameters and the rules.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple
from urllib.parse import urlsplit

from ..config import Settings, parse_duration, parse_size, server_pool, stream_caps
from ..errors import BadRequest, BodyTooLarge, InternalError, TempDirUnavailable, UploadGuardError
from ..tempdir import Reason, reason_for_errno
from ..wsgi import GuardedInput, body_length, request_socket, waiting_for_continue
from . import protocol as p
from .locking import FileLocker, HeldLock, Locker, ReleaseWatcher, StreamSlots
from .s3 import RAM_PART_LIMIT as S3_RAM_PART_LIMIT
from .s3 import S3Store, is_s3_url
from .store import LocalStore, Store, UploadInfo, new_upload_id, valid_upload_id

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ResumableUploads", "Upload", "Response"]

log = logging.getLogger("uploadguard")

_EXPOSED = ("Location, Upload-Offset, Upload-Length, Upload-Metadata, Upload-Defer-Length, Upload-Expires, "
            "Upload-Concat, Upload-Complete, Upload-Draft-Interop-Version, Tus-Resumable, Tus-Version, "
            "Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm, Retry-After")
_ALLOWED_HEADERS = ("Authorization, Content-Type, Tus-Resumable, Upload-Length, Upload-Offset, Upload-Metadata, "
                    "Upload-Defer-Length, Upload-Checksum, Upload-Concat, Upload-Complete, "
                    "Upload-Draft-Interop-Version, X-HTTP-Method-Override, X-Requested-With, X-Request-ID")
_METHODS = "POST, HEAD, PATCH, DELETE, OPTIONS"


class Response(NamedTuple):
    """What :meth:`ResumableUploads.handle` answers: a WSGI status line, headers and body."""

    status: str
    headers: list[tuple[str, str]]
    body: Iterable[bytes]


class Upload:
    """A completed (or, for the store's own use, any) upload, as ``on_complete`` and :meth:`ResumableUploads.get` give it."""

    def __init__(self, info: UploadInfo, store: Store, url: str | None = None) -> None:
        self.info = info
        self._store = store
        #: The upload's URL path (``/files/<id>``), as the client knows it.
        self.url = url

    def __repr__(self) -> str:
        return f"<Upload {self.id} {self.length} bytes>"

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def length(self) -> int:
        """Bytes stored (the declared length once complete)."""
        return self.info.offset

    @property
    def metadata(self) -> dict[str, str]:
        """``Upload-Metadata`` as sent, e.g. ``{"filename": "cat.jpg", "filetype": "image/jpeg"}``."""
        return dict(self.info.metadata)

    @property
    def owner(self) -> str | None:
        return self.info.owner

    @property
    def complete(self) -> bool:
        return self.info.completed

    @property
    def path(self) -> str | None:
        """The data file on local disk, or ``None`` for a remote store."""
        return self._store.local_path(self.id)

    def open(self) -> BinaryIO:
        """The whole data, as a binary file (close it)."""
        return self._store.open(self.id)


class _Request:
    """One endpoint request: environ accessors, the dialect, and the response headers collected so far."""

    def __init__(self, environ: WSGIEnvironment, owner: str | None) -> None:
        self.environ = environ
        self.owner = owner
        self.method = p.method_of(environ)
        #: The method on the wire, which decides the response's framing: a POST overridden to HEAD
        #: still gets a body its Content-Length describes (a body-less one would desync the connection).
        self.wire_method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        self.reader: _BodyReader | None = None  # the PATCH body being read, once it is
        self.release_slot: Callable[[], None] | None = None  # the stream slot held while a body is read
        self.busy = False  # refused for want of a stream slot
        self.dialect: str | None = None
        self.interop: int | None = None
        self.headers: list[tuple[str, str]] = [("Cache-Control", "no-store")]

    def header(self, name: str) -> str | None:
        key = "HTTP_" + name.upper().replace("-", "_")
        if name.lower() == "content-type":
            key = "CONTENT_TYPE"
        value = self.environ.get(key)
        return value if isinstance(value, str) else None

    @property
    def ietf(self) -> bool:
        return self.dialect == p.Dialect.IETF

    def content_length(self) -> int | None:
        raw = self.environ.get("CONTENT_LENGTH")
        if raw in (None, ""):
            return None if self.environ.get("wsgi.input_terminated") else 0
        return p.parse_number(str(raw), "Content-Length")


#: Bytes a PATCH must bring in each ``idle_timeout`` window (0.5 KiB/s at the default 30 s).
_RATE_FLOOR = 16 * 1024
_MAX_READ = 1024 * 1024  # bytes one read of a PATCH body asks for at most (see _BodyReader)


_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in Linux's struct tcp_info (since 4.1)


def bytes_received(sock: socket.socket | None) -> int | None:
    """The bytes the kernel has received on a TCP connection so far, or ``None`` (not TCP, not Linux)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), 256)
    except OSError:
        return None
    if len(raw) < _TCPI_BYTES_RECEIVED + 8:
        return None
    value: int = struct.unpack_from("=Q", raw, _TCPI_BYTES_RECEIVED)[0]
    return value


class _BodyReader:
    """``read(n)`` over ``wsgi.input`` for the store; any end of the body (timeout, preemption, a
    vanished client) is just the end of this PATCH: the bytes before it count, nothing after is read."""

    def __init__(self, stream: Any, length: int | None, watcher: ReleaseWatcher | None,
                 window: float = 0.0, sock: socket.socket | None = None) -> None:
        self.stream = stream
        self.remaining = length  # None: chunked, read to the end
        self.watcher = watcher
        #: why the body ended early: "timeout", "slow", "preempted", "disconnect"
        self.cut: str | None = None
        self._window = window  # seconds; 0 = no rate floor
        self._window_start = time.monotonic()
        self._window_bytes = 0
        #: The most one read asks for.  The server's reader returns only once it has all it was asked
        #: (or the body ends), so bytes are counted per read: reads must return within a window for a
        #: client above the floor to be seen as one.  The first asks for the floor's worth; a quick
        #: read doubles it (up to the bytes so far, so reads end on MiB bounds), a slow one halves it.
        #: A chunked body stays at the floor: a cut makes gunicorn's chunk parser drop the read.
        self._read_size = _RATE_FLOOR
        self._total = 0
        self._counted_at = self._window_start  # when bytes were last counted
        self._counting = threading.Lock()  # the reader counts, the watcher's too_slow() rolls the window
        #: Where the kernel counts the bytes that arrived (TCP): then the floor sees a client's bytes as
        #: they come, whatever the reads wait for; elsewhere (a Unix socket) only returned reads count,
        #: so reads stay at the floor's size and a client above it always completes one per window.
        self._arrivals = sock if window and bytes_received(sock) is not None else None
        self._arrived: int = (bytes_received(self._arrivals) or 0) if self._arrivals is not None else 0

    def too_slow(self) -> bool:
        """A window of ``idle_timeout`` seconds brought less than the floor (checked by the watcher too).

        A per-read timeout alone lets a client dripping a byte a second hold a
        worker for gunicorn's whole timeout.  Ending the PATCH keeps what
        arrived; the client resumes from there.
        """
        if not self._window:
            return False
        with self._counting:
            now = time.monotonic()
            if self._arrivals is not None:
                arrived = bytes_received(self._arrivals)
                if arrived is not None and arrived > self._arrived:
                    self._window_bytes += arrived - self._arrived
                    self._arrived, self._counted_at = arrived, now
            if now - self._window_start < self._window:
                return False
            if self._window_bytes >= _RATE_FLOOR:
                # A good window: the next starts at its last counted read -- here, not only when a read
                # returns, or a client going silent after a good window would never be seen (the
                # watcher polls) -- so silence ends a PATCH one window after the last bytes counted.
                self._window_start, self._window_bytes = self._counted_at, 0
                return now - self._window_start >= self._window
            return True

    def __call__(self, size: int) -> bytes:
        if self.cut is not None or self.remaining == 0:
            return b""
        if self.too_slow():
            self.cut = "slow"
            return b""
        if self.watcher is not None and self.watcher.preempted:
            self.cut = "preempted"
            return b""
        if self.remaining is not None:
            size = min(size, self.remaining)
        if self._window:
            size = min(size, self._read_size)
        began = time.monotonic()
        try:
            data: bytes = self.stream.read(size)
        except TimeoutError:
            # Never read again after a timeout: the server's reader may have lost buffered bytes.
            self.cut = "timeout"
            return b""
        except Exception as exc:  # the server's own errors for a cut connection (OSError, NoMoreData...)
            log.debug("PATCH body ended by %r", exc)
            self.cut = "disconnect"
            return b""
        if self.watcher is not None and self.watcher.slowed and not data:
            self.cut = "slow"
        elif self.watcher is not None and self.watcher.preempted and not data:
            self.cut = "preempted"
        elif not data and self.remaining:
            self.cut = "disconnect"
        if self.remaining is not None:
            self.remaining -= len(data)
        if self._window:
            now = time.monotonic()
            if self._arrivals is None:
                with self._counting:
                    self._window_bytes += len(data)
                    if data:
                        self._counted_at = now
            self._total += len(data)
            took = now - began
            if self.remaining is None or self._arrivals is None:
                pass  # chunked, or counted by the reads: at the floor (see _read_size)
            elif took < self._window / 8:
                self._read_size = min(2 * self._read_size, max(self._read_size, self._total), _MAX_READ)
            elif took > self._window / 4:
                self._read_size = max(self._read_size // 2, _RATE_FLOOR)
        return data


class ResumableUploads:
    """The resumable-upload endpoint under ``prefix``; everything else goes to ``app``."""

    def __init__(
        self,
        app: WSGIApplication | None = None,
        *,
        prefix: str = "/files/",
        storage: str | os.PathLike[str] | Store | None = None,  # a directory, "s3://bucket/prefix", or a Store
        max_size: int | str | None = None,  # bytes per upload; None = settings.max_body_size; 0 = no limit
        expires_after: float | str | None = None,  # seconds of inactivity; None = settings (24 h); 0 = never
        on_complete: Callable[[Upload], object] | None = None,
        authorize: Callable[[WSGIEnvironment], str | None] | None = None,
        settings: Settings | None = None,
        cors_origins: Iterable[str] | str = (),  # "*" or exact origins ("https://example.com")
        lock_timeout: float = 5.0,  # seconds a request waits for a held upload before a 423
        idle_timeout: float | str | None = None,  # seconds without a byte that end a PATCH; None = settings
        keep_completed: float | str | None = None,  # seconds a completed upload is kept; None = settings; 0 = forever
        max_streams: int | str | None = None,  # bodies read at once per host; None = settings ("auto"); 0 = no cap
    ) -> None:
        self.app = app
        if not prefix.startswith("/"):
            raise ValueError(f"prefix={prefix!r} must start with '/'")
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.settings = settings if settings is not None else Settings.from_environ()
        if storage is None:
            storage = self.settings.effective_resumable_storage()
        if is_s3_url(storage):
            storage = S3Store(str(storage), temp_dir=self.settings.temp_dir, retry_after=self.settings.retry_after)
        elif isinstance(storage, (str, os.PathLike)):
            storage = LocalStore(storage, min_free_space=self.settings.min_free_space)
        self.store: Store = storage
        #: Where uploads live: a local directory, else the store's repr (for logs and 503s).
        self.directory: str = str(getattr(storage, "directory", storage))
        self.locker: Locker = storage.locker
        self.max_size = (self.settings.max_body_size if max_size is None
                         else parse_size(max_size, name="max_size"))
        self.expires_after = (self.settings.resumable_expires_after if expires_after is None
                              else parse_duration(expires_after, name="expires_after"))
        self.idle_timeout = (self.settings.resumable_idle_timeout if idle_timeout is None
                             else parse_duration(idle_timeout, name="idle_timeout"))
        self.keep_completed = (self.settings.resumable_keep_completed if keep_completed is None
                               else parse_duration(keep_completed, name="keep_completed"))
        self.on_complete = on_complete
        self.authorize = authorize
        origins = (cors_origins,) if isinstance(cors_origins, str) else tuple(cors_origins)
        self.cors_origins = frozenset(origin.rstrip("/") for origin in origins)
        if not lock_timeout >= 0:
            raise ValueError(f"lock_timeout={lock_timeout!r} must be >= 0 seconds")
        self.lock_timeout = lock_timeout
        self.max_streams = (self.settings.resumable_max_streams if max_streams is None
                            else self.settings.replace(resumable_max_streams=max_streams).resumable_max_streams)
        self._slots: StreamSlots | None = None
        self._slots_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ResumableUploads {self.prefix} -> {self.store!r}>"

    # -- WSGI ----------------------------------------------------------------------------

    def serves(self, environ: WSGIEnvironment) -> bool:
        """Whether the request is the endpoint's (under :attr:`prefix`)."""
        path = environ.get("PATH_INFO", "") or "/"
        return path.startswith(self.prefix) or path == self.prefix.rstrip("/")

    def spools_body(self, environ: WSGIEnvironment) -> bool:
        """Whether the request's body may be spooled into the guard's temp dir (see :class:`UploadGuard`).

        The endpoint's bodies go to the upload storage, whose room it checks
        itself, so a small temp dir (a tmpfs) does not refuse a PATCH the
        storage has room for.  Except: a ``multipart/form-data`` body (never a
        tus or draft upload, but what a framework hook in front of the endpoint
        -- a CSRF extension reading the form -- or an app route under the
        prefix would spool), and on S3 a checksummed chunk or a part buffer
        over 32 MiB, which are spooled there.
        """
        if self.serves(environ) and not str(environ.get("CONTENT_TYPE", "")).lower().startswith("multipart/"):
            store = self.store
            if isinstance(store, S3Store):
                return "HTTP_UPLOAD_CHECKSUM" in environ or store.part_size > S3_RAM_PART_LIMIT
            return not isinstance(store, LocalStore)  # a Store of the application's own: assume it does
        ask = getattr(self.app, "spools_body", None)
        return True if ask is None else bool(ask(environ))

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not self.serves(environ):
            if self.app is None:
                start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "10")])
                return [b"Not Found\n"]
            return self.app(environ, start_response)
        try:
            owner = self.authorize(environ) if self.authorize is not None else None
        except UploadGuardError as error:
            response = self._error(_Request(environ, None), error)
        else:
            response = self.handle(environ, owner=owner)
        start_response(response.status, response.headers)
        return response.body

    def handle(self, environ: WSGIEnvironment, *, owner: str | None = None) -> Response:
        """Serve one endpoint request as ``owner`` (``None``: anonymous); never raises for the client's doing.

        For framework integrations: call it with the identity the framework
        established (session, user) and turn the result into a response.
        """
        request = _Request(environ, owner)
        try:
            return self._serve(request)
        finally:
            if request.release_slot is not None:
                request.release_slot()

    def _serve(self, request: _Request) -> Response:
        try:
            return self._dispatch(request)
        except UploadGuardError as error:
            answer = error
        except OSError as exc:
            reason = reason_for_errno(exc.errno)
            if reason is not None:
                log.warning("resumable storage %s failed (%s): %s", self.directory, reason, exc)
                answer = TempDirUnavailable(reason, path=self.directory, retry_after=self.settings.retry_after,
                                            cause=str(exc))
            else:
                log.exception("resumable request failed")
                answer = InternalError(exc)
        self._drain(request)
        return self._error(request, answer)

    def _drain(self, request: _Request) -> None:
        """Read the rest of a refused body (bounded like the guard's drain), so the client reads the answer.

        A client still waiting for its ``100 Continue`` sent nothing; a body
        whose reading was cut (idle, too slow, preempted, gone) is not read again.
        """
        reader = request.reader
        if reader is not None and (reader.cut is not None or reader.remaining == 0):
            return
        if request.busy:
            return  # the refusal must cost the pool nothing: no worker waits for a slow body (see _admit)
        environ = request.environ
        stream = environ.get("wsgi.input")
        if stream is None or waiting_for_continue(environ):
            return
        if not isinstance(stream, GuardedInput):
            try:
                length = body_length(environ)
            except BadRequest:
                return
            if length == 0:
                return
            left = reader.remaining if reader is not None else length
            stream = GuardedInput(stream, length=left, limit=0)
        stream.drain(max_bytes=self.settings.drain_bytes, timeout=self.settings.drain_timeout,
                     sock=request_socket(environ))

    def get(self, id_or_url: str, *, owner: str | None = None) -> Upload:
        """A completed upload by id or URL (absolute, or a path under ``prefix``).

        Raises :class:`~uploadguard.resumable.protocol.UploadNotFound` for an
        unknown upload or one created by another owner (when uploads have
        owners), :class:`~uploadguard.resumable.protocol.UploadIncomplete` for
        one still being uploaded.
        """
        upload_id = self.upload_id(id_or_url)
        if upload_id is None:
            raise p.UploadNotFound(f"{id_or_url[:80]!r} does not name an upload of {self.prefix}.")
        info = self._find(upload_id, owner)
        if not info.completed:
            raise p.UploadIncomplete(f"Upload {upload_id} is not complete ({info.offset} of "
                                     f"{info.length if info.length is not None else 'unknown'} bytes).")
        return Upload(info, self.store, self.prefix + upload_id)

    def delete(self, id_or_url: str, *, owner: str | None = None) -> None:
        """Remove an upload (data, info, lock) once the application is done with it.

        Waits ``lock_timeout`` for a request that holds the upload
        (:class:`~uploadguard.resumable.protocol.UploadLocked` after that).
        Not from inside ``on_complete``: the upload is locked then (move
        ``upload.path`` away there instead, or delete later).
        """
        upload_id = self.upload_id(id_or_url)
        if upload_id is None:
            raise p.UploadNotFound(f"{id_or_url[:80]!r} does not name an upload of {self.prefix}.")
        self._find(upload_id, owner, live=False)  # an expired upload is still the app's to delete
        with self.locker.acquire(upload_id, timeout=self.lock_timeout) as lock:
            self.store.terminate(upload_id)
            self.locker.remove(lock)

    def upload_id(self, id_or_url: str) -> str | None:
        """The id in ``id_or_url`` (an id, ``/files/<id>`` or ``https://host/files/<id>``), if valid."""
        try:
            path = urlsplit(id_or_url.strip()).path if "/" in id_or_url else id_or_url.strip()
        except ValueError:  # e.g. "http://[" -- not a URL of ours
            return None
        if "/" in path:
            head, _, candidate = path.rstrip("/").rpartition("/")
            if head + "/" != self.prefix and not (head + "/").endswith(self.prefix):
                return None
        else:
            candidate = path
        return candidate if valid_upload_id(candidate) else None

    # -- dispatch ------------------------------------------------------------------------

    def _dispatch(self, request: _Request) -> Response:
        rest = str(request.environ.get("PATH_INFO", ""))[len(self.prefix):]
        method = request.method
        origin = request.header("Origin")
        if method == "OPTIONS" and origin is not None and request.header("Access-Control-Request-Method"):
            return self._preflight(request, origin)
        if method == "OPTIONS":
            return self._options(request)
        found = p.dialect_of(request.header("Tus-Resumable"), request.header("Upload-Draft-Interop-Version"))
        if found is None:
            raise p.UnsupportedVersion(f"Send Tus-Resumable: {p.TUS_VERSION} (or Upload-Draft-Interop-Version).")
        request.dialect, request.interop = found
        if request.ietf:
            request.headers.append(("Upload-Draft-Interop-Version", str(request.interop)))
        if not rest:
            if method != "POST":
                raise p.MethodNotAllowed(f"{method} is not served on {self.prefix}.", allow="POST, OPTIONS")
            return self._create(request)
        if "/" in rest or not valid_upload_id(rest):
            raise p.UploadNotFound(f"No upload {rest[:40]!r}.")
        if method == "HEAD":
            return self._head(request, rest)
        if method == "PATCH":
            return self._patch(request, rest)
        if method == "DELETE":
            return self._delete(request, rest)
        raise p.MethodNotAllowed(f"{method} is not served on an upload.", allow="HEAD, PATCH, DELETE, OPTIONS")

    def _options(self, request: _Request) -> Response:
        headers = [*request.headers, ("Tus-Resumable", p.TUS_VERSION), ("Tus-Version", p.TUS_VERSION),
                   ("Tus-Extension", ",".join(p.TUS_EXTENSIONS)),
                   ("Tus-Checksum-Algorithm", ",".join(p.CHECKSUM_ALGORITHMS))]
        if self.max_size:
            headers.append(("Tus-Max-Size", str(self.max_size)))
        return self._respond(request, "204 No Content", headers)

    def _preflight(self, request: _Request, origin: str) -> Response:
        headers = [("Cache-Control", "no-store"), ("Vary", "Origin")]
        if self._origin_allowed(origin):
            headers += [("Access-Control-Allow-Origin", origin), ("Access-Control-Allow-Methods", _METHODS),
                        ("Access-Control-Allow-Headers", _ALLOWED_HEADERS), ("Access-Control-Max-Age", "86400")]
        return Response("204 No Content", headers, [])

    # -- creation ------------------------------------------------------------------------

    def _create(self, request: _Request) -> Response:
        content_length = request.content_length()
        concat = p.parse_concat(request.header("Upload-Concat"))
        metadata = p.parse_metadata(request.header("Upload-Metadata"))
        length = p.parse_optional_number(request.header("Upload-Length"), "Upload-Length")
        complete = p.parse_upload_complete(request.header("Upload-Complete"))
        if request.ietf:
            if complete is None:
                raise BadRequest("Upload-Complete (?0 or ?1) is required.", reason="missing_header")
            if complete and content_length is not None:
                if length is not None and length != content_length:
                    raise BadRequest("Upload-Length disagrees with the complete body's length.",
                                     reason="bad_header")
                length = content_length
        else:
            defer = request.header("Upload-Defer-Length")
            if defer is not None and defer.strip() != "1":
                raise BadRequest("Upload-Defer-Length must be 1.", reason="bad_header")
            if concat is None or not concat.final:
                if (length is None) == (defer is None):
                    raise BadRequest("Send either Upload-Length or Upload-Defer-Length: 1.", reason="missing_header")
            if request.header("Content-Type") != p.OFFSET_CONTENT_TYPE:
                if content_length:
                    raise p.UnsupportedMediaType(f"A creation request's body must be {p.OFFSET_CONTENT_TYPE}.")
                content_length = 0  # no body announced as one: creation only
        too_large = p.creation_too_large({"upload-length": str(length)} if length is not None else {}, self.max_size)
        if too_large is not None:
            raise too_large
        if concat is not None and concat.final:
            return self._concatenate(request, concat, metadata)
        checksum = p.parse_checksum(request.header("Upload-Checksum"))  # a bad one creates nothing
        self._check_health(content_length or 0)
        if content_length != 0:
            self._admit(request)  # before the upload exists: a refused creation leaves nothing behind
        info = self.store.create(UploadInfo(
            id=new_upload_id(), length=length, metadata=metadata, owner=request.owner, created=time.time(),
            expires_after=self.expires_after or None, partial=concat is not None,
            keep_completed=self.keep_completed,
        ))
        request.headers.append(("Location", self._location(request, info.id)))
        log.info("created upload %s (%s bytes)", info.id,
                 length if length is not None else "deferred")
        if content_length or (content_length is None) or length == 0:
            with self.locker.acquire(info.id, timeout=self.lock_timeout) as lock:
                try:
                    info = self._append(request, lock, info, offset=0, content_length=content_length,
                                        complete=complete, checksum=checksum)
                except (BadRequest, BodyTooLarge, p.ChecksumMismatch):
                    # The body was refused (nothing of it was appended): undo the creation too, so the
                    # refused request leaves nothing behind, and name no upload in the answer.
                    self.store.terminate(info.id)
                    self.locker.remove(lock)
                    request.headers = [item for item in request.headers if item[0] != "Location"]
                    log.info("removed upload %s: its creation body was refused", info.id)
                    raise
        return self._respond(request, "201 Created", [*request.headers, *self._state(request, info)])

    def _concatenate(self, request: _Request, concat: p.Concat, metadata: dict[str, str]) -> Response:
        """Join completed partial uploads into a new, completed one; the parts are consumed.

        tus lets a server delete the parts once joined, or keep them for more
        final uploads.  Kept, a client could have one 200 MB part copied again
        and again for a few bytes of header each, every copy a completed upload
        kept for days -- so each part joins one final upload, once: the
        parts are locked (in id order: two joins never deadlock) and checked
        again under their locks, and deleted only after ``on_complete``
        returned.  If ``on_complete`` fails, the final upload goes and the
        parts stay, so the client's retry joins them again.

        The final upload's id follows from its owner and parts
        (:meth:`_final_id`), so a retry of the request finds what an earlier
        attempt left instead of making a second copy: a worker killed while
        copying left a final upload the retry completes from its offset, one
        killed between the last fsync and ``on_complete`` a completed one whose
        ``on_complete`` the retry runs, one whose answer was lost a final
        upload the retry answers again.
        """
        part_ids: list[str] = []
        for url in concat.parts:
            part_id = self.upload_id(url)
            if part_id is None:
                raise BadRequest(f"Upload-Concat names {url[:80]!r}, not an upload here.", reason="bad_concat")
            if part_id in part_ids:
                raise BadRequest(f"Upload-Concat names upload {part_id} twice.", reason="bad_concat")
            part_ids.append(part_id)
        final_id = self._final_id(request.owner, part_ids)
        if self._earlier_final(final_id, request.owner) is None:
            parts = self._joinable(part_ids, request.owner)
            total = sum(part.offset for part in parts)
            if self.max_size and total > self.max_size:
                raise BodyTooLarge(self.max_size, length=total)
            self._check_health(total)
        with contextlib.ExitStack() as held:
            lock = held.enter_context(self.locker.acquire(final_id, timeout=self.lock_timeout))
            info = self._earlier_final(final_id, request.owner)  # as it is now that nobody else can join them
            try:
                part_locks = [held.enter_context(self.locker.acquire(part_id, timeout=self.lock_timeout))
                              for part_id in sorted(part_ids)]
                if info is None or not info.completed:
                    parts = self._joinable(part_ids, request.owner)
                    total = sum(part.offset for part in parts)
                    if info is None:
                        info = self.store.create(UploadInfo(
                            id=final_id, length=total, metadata=metadata, owner=request.owner, created=time.time(),
                            expires_after=self.expires_after or None, parts=tuple(part_ids),
                            keep_completed=self.keep_completed,
                        ))
                    else:
                        log.info("completing upload %s, which an earlier join left at %d of %d bytes",
                                 final_id, info.offset, total)
                    offset, start = info.offset, 0
                    for part in parts:
                        end = start + part.offset
                        if offset < end:
                            with self.store.open(part.id) as source:
                                if offset > start:
                                    source.seek(offset - start)
                                offset = self.store.write(info.id, offset, source.read, end - offset)
                        start = end
                    if offset != total:
                        raise TempDirUnavailable(Reason.IO_ERROR, retry_after=self.settings.retry_after,
                                                 cause=f"joined {offset} of {total} bytes into {info.id}")
                    info = self.store.finish(info.id)
                info = self._completed(request, lock, info)
            except BaseException:
                if info is None or not info.hook_done:  # what on_complete took stays; else the parts count
                    with contextlib.suppress(Exception):
                        self.store.terminate(final_id)
                        self.locker.remove(lock)
                raise
            for part_lock in part_locks:
                try:
                    self.store.terminate(part_lock.upload_id)
                    self.locker.remove(part_lock)
                except Exception:  # the join stands; the part expires like any unjoined one
                    log.warning("could not delete part %s of upload %s", part_lock.upload_id, info.id,
                                exc_info=True)
        request.headers.append(("Location", self._location(request, info.id)))
        return self._respond(request, "201 Created", [*request.headers, *self._state(request, info)])

    @staticmethod
    def _final_id(owner: str | None, part_ids: list[str]) -> str:
        """The id of the final upload joining ``part_ids`` for ``owner``: the same for a retry.

        As unguessable as the part ids it is made of (a digest of them): only
        who knows the parts can name it.
        """
        digest = hashlib.sha256(json.dumps([owner, part_ids]).encode()).digest()
        return base64.urlsafe_b64encode(digest).decode()[:24]

    def _earlier_final(self, final_id: str, owner: str | None) -> UploadInfo | None:
        """What an earlier attempt of this join left (``None``: nothing); expired or not, it is resumed."""
        try:
            info = self.store.get(final_id)
        except p.UploadNotFound:
            return None
        if info.owner != owner or info.parts is None:  # never: the id is a digest of the owner and the parts
            raise p.UploadNotFound(f"No upload {final_id}.")
        return info

    def _joinable(self, part_ids: list[str], owner: str | None) -> list[UploadInfo]:
        parts = []
        for part_id in part_ids:
            part = self._find(part_id, owner)
            if not part.partial or not part.completed:
                raise BadRequest(f"Upload {part_id} is not a completed partial upload.", reason="bad_concat")
            parts.append(part)
        return parts

    # -- HEAD, PATCH, DELETE -------------------------------------------------------------

    def _head(self, request: _Request, upload_id: str) -> Response:
        self._check_health(writing=False)
        self._find(upload_id, request.owner)
        # Taking the lock preempts a stale PATCH, so the offset answered is final.
        with self.locker.acquire(upload_id, timeout=self.lock_timeout) as lock:
            info = self._find(upload_id, request.owner)
            if self._whole(info) and not info.hook_done:
                info = self._completed(request, lock, info)
        status = "204 No Content" if request.ietf else "200 OK"
        return self._respond(request, status, [*request.headers, *self._state(request, info)])

    def _patch(self, request: _Request, upload_id: str) -> Response:
        offset = p.parse_number(request.header("Upload-Offset"), "Upload-Offset")
        content_length = request.content_length()
        complete = p.parse_upload_complete(request.header("Upload-Complete"))
        length = p.parse_optional_number(request.header("Upload-Length"), "Upload-Length")
        if request.ietf:
            if complete is None:
                raise BadRequest("Upload-Complete (?0 or ?1) is required.", reason="missing_header")
            assert request.interop is not None
            p.check_partial_upload_type(request.interop, request.header("Content-Type"),
                                        has_body=content_length != 0)
        elif request.header("Content-Type") != p.OFFSET_CONTENT_TYPE:
            raise p.UnsupportedMediaType(f"A PATCH body must be {p.OFFSET_CONTENT_TYPE}.")
        checksum = p.parse_checksum(request.header("Upload-Checksum"))
        self._check_health(content_length or 0)
        info = self._find(upload_id, request.owner)
        if info.parts is not None:
            raise p.Forbidden("A final concatenated upload cannot be patched.")
        if content_length != 0:
            self._admit(request, upload_id)  # before the lock: a refused PATCH never preempts the one reading
        with self.locker.acquire(upload_id, timeout=self.lock_timeout) as lock:
            info = self._find(upload_id, request.owner)
            p.check_offset(offset, info.offset)
            declare: int | None = None  # a deferred length this PATCH declares, recorded once its body is taken
            if length is not None and info.length is None:
                if length < info.offset or (self.max_size and length > self.max_size):
                    raise BodyTooLarge(self.max_size, length=length) if length >= info.offset else BadRequest(
                        "Upload-Length is below the bytes already stored.", reason="bad_header")
                declare = length
            elif length is not None and length != info.length:
                raise BadRequest("Upload-Length differs from the upload's length.", reason="bad_header")
            if self._whole(info):
                # A retried last PATCH (or one after a crash between the last byte and finish):
                # nothing more fits, and the data may have been moved away by on_complete, so
                # answer from the info alone.
                p.check_append(offset=offset, length=info.length, max_size=self.max_size,
                               content_length=content_length)
                info = self._completed(request, lock, info)
                return self._respond(request, "204 No Content", [*request.headers, *self._state(request, info)])
            info = self._append(request, lock, info, offset=offset, content_length=content_length,
                                complete=complete, checksum=checksum, declare=declare)
        return self._respond(request, "204 No Content", [*request.headers, *self._state(request, info)])

    def _delete(self, request: _Request, upload_id: str) -> Response:
        self._check_health(writing=False)
        self.delete(upload_id, owner=request.owner)
        log.info("terminated upload %s", upload_id)
        return self._respond(request, "204 No Content", request.headers)

    # -- the steps -----------------------------------------------------------------------

    def _append(self, request: _Request, lock: HeldLock, info: UploadInfo, *, offset: int,
                content_length: int | None, complete: bool | None,
                checksum: p.Checksum | None = None, declare: int | None = None) -> UploadInfo:
        """Write the request body at ``offset`` under ``lock``; complete the upload when it is whole.

        ``declare`` is a deferred length the request states (tus ``Upload-Length``; the draft's
        ``Upload-Complete: ?1`` with a ``Content-Length``).  It bounds the body like a declared
        length, but is recorded only once the body was taken: a request refused for its body
        (413, 460, a failed write) changes nothing, so the client can retry with the right length.
        A crash between the write and the record leaves a deferred upload whose offset is the
        bytes stored; the client's next PATCH (an empty one at that offset) declares it then.
        """
        if not request.ietf:
            complete = None  # Upload-Complete is the draft's; a tus request declares lengths with Upload-Length
        if complete and info.length is None and content_length is not None:
            if self.max_size and offset + content_length > self.max_size:
                raise BodyTooLarge(self.max_size, length=offset + content_length)
            if declare is not None and declare != offset + content_length:
                raise BadRequest("Upload-Length disagrees with the complete body's length.", reason="bad_header")
            declare = offset + content_length
        elif complete and info.length is not None and content_length is not None \
                and offset + content_length != info.length:
            raise BadRequest("Upload-Complete: ?1 but the body does not end the upload.", reason="bad_header")
        length = info.length if info.length is not None else declare
        budget = p.check_append(offset=offset, length=length, max_size=self.max_size,
                                content_length=content_length)
        sock = request_socket(request.environ)
        stream = request.environ["wsgi.input"]
        previous_timeout = sock.gettimeout() if sock is not None else None
        with ReleaseWatcher(lock, sock) as watcher:
            reader = request.reader = _BodyReader(stream, content_length, watcher, self.idle_timeout, sock)
            watcher.too_slow = reader.too_slow
            if sock is not None and self.idle_timeout:
                # The watcher ends a PATCH whose window brought too few bytes by shutting the socket
                # for reading, and gunicorn's reader then returns what it had.  A socket timeout
                # would make that reader drop its partial read -- bytes that arrived -- so it is
                # only the net under the watcher, long after it.
                sock.settimeout(2 * self.idle_timeout + 5)
            try:
                new_offset = self.store.write(info.id, offset, reader, budget, checksum=checksum)
            finally:
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.settimeout(previous_timeout)
        if reader.cut is not None:
            log.info("PATCH of upload %s ended early (%s) at %d bytes", info.id, reader.cut, new_offset)
        info = self.store.get(info.id)
        if declare is not None and info.length is None:
            info = self.store.declare_length(info.id, declare)  # the body was taken: the length stands
        elif complete and info.length is None and reader.cut is None:
            info = self.store.declare_length(info.id, new_offset)  # a chunked final body: now we know
        if info.length is not None and info.offset == info.length:
            info = self._completed(request, lock, info)
        return info

    @staticmethod
    def _whole(info: UploadInfo) -> bool:
        """Every byte is stored: completed, or only not yet marked so (the worker died, or finish failed)."""
        return info.completed or (info.length is not None and info.offset == info.length)

    def _completed(self, request: _Request, lock: HeldLock, info: UploadInfo) -> UploadInfo:
        """Make a whole upload durable, then run ``on_complete`` unless it already returned once."""
        if not info.completed:
            info = self.store.finish(info.id)
            log.info("upload %s complete (%d bytes)", info.id, info.offset)
        if info.hook_done or info.partial:
            return info
        if self.on_complete is not None:
            upload = Upload(info, self.store, self.prefix + info.id)
            try:
                self.on_complete(upload)
            except Exception:
                log.exception("on_complete failed for upload %s; it runs again on the next "
                              "request for the upload", info.id)
                raise p.HookFailed("The upload is stored, but processing it failed; retry to process it again.") from None
        info = dataclasses.replace(info, hook_done=True)
        self.store.update(info)
        return info

    def _find(self, upload_id: str, owner: str | None, *, live: bool = True) -> UploadInfo:
        """The upload if ``owner`` may see it; 404 otherwise.  With ``live``, 410 once expired, or once a
        completed upload is past ``keep_completed`` (the clean-up removes it; until then it is as gone)."""
        info = self.store.get(upload_id)
        if info.owner is not None and info.owner != owner:
            raise p.UploadNotFound(f"No upload {upload_id}.")
        if not live:
            return info
        now = time.time()
        expires = info.expires
        if expires is not None and expires < now:
            raise p.UploadGone(f"Upload {upload_id} expired; start a new upload.")
        discard = info.discard_at(self.keep_completed)
        if discard is not None and discard < now:
            raise p.UploadGone(f"Upload {upload_id} was completed too long ago and is no longer kept.")
        return info

    def _stream_slots(self) -> StreamSlots | None:
        """The cap on bodies read at once, resolved on first use (gunicorn notes its pool after loading the app)."""
        if self._slots is None:
            with self._slots_lock:
                if self._slots is None:
                    total, per_process = stream_caps(self.max_streams, server_pool())
                    locker = self.locker
                    directory = (locker.directory if isinstance(locker, FileLocker)
                                 else str(self.settings.temp_dir))
                    self._slots = StreamSlots(directory, total, per_process=per_process)
                    if total or per_process:
                        log.info("resumable bodies read at once: at most %s per host%s", total or "(no cap)",
                                 f", {per_process} per process" if per_process else "")
        slots = self._slots
        return slots if slots.total or slots.per_process else None

    def _admit(self, request: _Request, upload_id: str | None = None) -> None:
        """Take a stream slot for the body about to be read, or refuse at once (503 + Retry-After).

        Under sync or gthread workers a body holds a worker for as long as
        its client takes to send it; past the cap the rest of the site would
        wait (see :func:`~uploadguard.config.stream_caps`).  The refusal reads
        nothing, so it costs a worker a few milliseconds, and tus clients
        retry a 503.  One exception: a client resuming ``upload_id`` while a
        stale request of its own (a silent drop) still holds the upload and
        its slot asks that request to let go and waits ``lock_timeout`` for
        the slot it frees.
        """
        slots = self._stream_slots()
        if slots is None:
            return
        release = slots.try_take()
        if release is None and upload_id is not None and self._held_elsewhere(upload_id):
            deadline = time.monotonic() + self.lock_timeout
            with self.locker.acquire(upload_id, timeout=self.lock_timeout):
                pass  # the stale request let go of the upload; its slot follows as it answers
            while release is None and time.monotonic() < deadline:
                time.sleep(0.05)
                release = slots.try_take()
        if release is None:
            request.busy = True
            log.warning("resumable body refused: all %s stream slots in use", slots.total or slots.per_process)
            raise TempDirUnavailable("busy", path=self.directory, retry_after=self.settings.retry_after,
                                     cause="every stream slot is in use")
        request.release_slot = release

    def _held_elsewhere(self, upload_id: str) -> bool:
        lock = self.locker.try_acquire(upload_id)
        if lock is None:
            return True
        lock.release()
        return False

    def _check_health(self, need: int = 0, *, writing: bool = True) -> None:
        """503 + Retry-After unless the storage can be used; a full disk still answers HEAD and DELETE."""
        health = self.store.health(need)
        if not health.ok and (writing or health.reason not in ("no_space", "no_inodes")):
            assert health.reason is not None
            log.warning("resumable storage %s unusable (%s): %s", health.path, health.reason,
                        health.detail)
            raise TempDirUnavailable(health.reason, path=health.path, retry_after=self.settings.retry_after,
                                     cause=health.detail)

    def _state(self, request: _Request, info: UploadInfo) -> list[tuple[str, str]]:
        """The headers that describe an upload: offset, length, expiry, metadata, completeness."""
        headers = [("Upload-Offset", str(info.offset))]
        if info.length is not None:
            headers.append(("Upload-Length", str(info.length)))
        elif not request.ietf:
            headers.append(("Upload-Defer-Length", "1"))
        if request.method == "HEAD" and info.metadata:
            headers.append(("Upload-Metadata", p.encode_metadata(info.metadata)))
        if request.method == "HEAD" and info.partial:
            headers.append(("Upload-Concat", "partial"))
        elif request.method == "HEAD" and info.parts is not None:
            headers.append(("Upload-Concat", "final;" + " ".join(self._location(request, part) for part in info.parts)))
        if info.expires is not None:
            headers.append(("Upload-Expires", p.http_date(info.expires)))
        if request.ietf:
            headers.append(("Upload-Complete", "?1" if info.completed else "?0"))
        return headers

    def _location(self, request: _Request, upload_id: str) -> str:
        """The upload's URL as a path: clients resolve it against the endpoint, so it stays right
        behind a TLS-terminating proxy that an absolute ``http://`` URL would get wrong."""
        script = str(request.environ.get("SCRIPT_NAME", "")).rstrip("/")
        return f"{script}{self.prefix}{upload_id}"

    def _origin_allowed(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin.rstrip("/") in self.cors_origins

    def _respond(self, request: _Request, status: str, headers: list[tuple[str, str]]) -> Response:
        headers = list(headers)
        if not any(name == "Tus-Resumable" for name, _ in headers) and not request.ietf:
            headers.append(("Tus-Resumable", p.TUS_VERSION))
        origin = request.header("Origin")
        if origin is not None and self._origin_allowed(origin):
            headers += [("Access-Control-Allow-Origin", origin), ("Access-Control-Expose-Headers", _EXPOSED),
                        ("Vary", "Origin")]
        if not any(name == "Content-Length" for name, _ in headers) and request.wire_method != "HEAD":
            headers.append(("Content-Length", "0"))
        return Response(status, headers, [])

    def _error(self, request: _Request, error: UploadGuardError) -> Response:
        status, headers, body = error.response(request.environ)
        if request.ietf:
            headers.append(("Upload-Draft-Interop-Version", str(request.interop)))
        # An upload created before the error (e.g. on_complete raised on a creation-with-upload)
        # is named, so the client can ask for it instead of creating it again.
        headers.extend(item for item in request.headers if item[0] == "Location")
        response = self._respond(request, status, headers)
        return Response(response.status, response.headers, [] if request.wire_method == "HEAD" else [body])
