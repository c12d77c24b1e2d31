"""``ResumableUploads``: the tus 1.0 / IETF-draft endpoint as WSGI middleware -- the WSGI driver.

The protocol (which status for which request, the order of store and lock
calls, ``on_complete`` once) is :class:`~uploadguard.resumable.engine.Endpoint`'s,
shared with the ASGI driver (:mod:`uploadguard.resumable.asgi`).  What is
left here is what only a WSGI server has: ``wsgi.input`` read in place
(with a rate floor and a watcher that shuts the socket to preempt a stale
PATCH), the drain of a refused body, and the cap on bodies read at once by a
blocking worker pool (``max_streams``).  See :mod:`uploadguard.resumable`
for the parameters and the rules.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..config import Settings, server_pool, stream_caps
from ..errors import BadRequest, TempDirUnavailable, UploadGuardError
from ..wsgi import GuardedInput, body_length, request_socket, shut_reading, waiting_for_continue
from . import protocol as p
from .core import RATE_FLOOR as _RATE_FLOOR
from .core import Head, RateFloor, Response
from .engine import Admit, Body, Effect, Endpoint, Hook, Lock, Upload, run_inline
from .locking import FileLocker, ReleaseWatcher, StreamSlots
from .store import Store

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ResumableUploads", "Upload", "Response"]

log = logging.getLogger("uploadguard")

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
        #: The floor's windows (:class:`.core.RateFloor`, the ASGI driver's too), on the monotonic clock.
        self._floor = RateFloor(window, time.monotonic())
        #: The most one read asks for.  The server's reader returns only once it has all it was asked
        #: (or the body ends), so bytes are counted per read: reads must return within a window for a
        #: client above the floor to be seen as one.  The first asks for the floor's worth; a quick
        #: read doubles it (up to the bytes so far, so reads end on MiB bounds), a slow one halves it.
        #: A chunked body stays at the floor: a cut makes gunicorn's chunk parser drop the read.
        self._read_size = _RATE_FLOOR
        self._total = 0
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
                    self._floor.count(arrived - self._arrived, now)
                    self._arrived = arrived
            # Polled by the watcher too, not only when a read returns: a client going silent after a
            # good window is seen one window after the last bytes counted.
            return self._floor.slow(now)

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
                    self._floor.count(len(data), now)
            self._total += len(data)
            took = now - began
            if self.remaining is None or self._arrivals is None:
                pass  # chunked, or counted by the reads: at the floor (see _read_size)
            elif took < self._window / 8:
                self._read_size = min(2 * self._read_size, max(self._read_size, self._total), _MAX_READ)
            elif took > self._window / 4:
                self._read_size = max(self._read_size // 2, _RATE_FLOOR)
        return data


def _head_of(environ: WSGIEnvironment, owner: str | None) -> Head:
    """The request's head from a WSGI environ (headers under their CGI names)."""

    def lookup(name: str) -> str | None:
        key = "CONTENT_TYPE" if name.lower() == "content-type" else "HTTP_" + name.upper().replace("-", "_")
        value = environ.get(key)
        return value if isinstance(value, str) else None

    raw = environ.get("CONTENT_LENGTH")
    return Head(method=p.method_of(environ), wire_method=str(environ.get("REQUEST_METHOD", "GET")).upper(),
                path=str(environ.get("PATH_INFO", "")), root=str(environ.get("SCRIPT_NAME", "")), lookup=lookup,
                content_length=None if raw is None else str(raw),
                terminated=bool(environ.get("wsgi.input_terminated")), owner=owner)


class _Request:
    """One WSGI request being served: its head, and what the driver holds while serving it."""

    def __init__(self, environ: WSGIEnvironment, owner: str | None) -> None:
        self.environ = environ
        self.head = _head_of(environ, owner)
        self.reader: _BodyReader | None = None  # the PATCH body being read, once it is
        self.release_slot: Callable[[], None] | None = None  # the stream slot held while a body is read
        self.busy = False  # refused for want of a stream slot


class ResumableUploads(Endpoint):
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
        super().__init__(prefix=prefix, storage=storage, max_size=max_size, expires_after=expires_after,
                         on_complete=on_complete, settings=settings, cors_origins=cors_origins,
                         lock_timeout=lock_timeout, idle_timeout=idle_timeout, keep_completed=keep_completed)
        self.app = app
        self.authorize = authorize
        self.max_streams = (self.settings.resumable_max_streams if max_streams is None
                            else self.settings.replace(resumable_max_streams=max_streams).resumable_max_streams)
        self._slots: StreamSlots | None = None
        self._slots_lock = threading.Lock()

    # -- WSGI ----------------------------------------------------------------------------

    def serves(self, environ: WSGIEnvironment) -> bool:
        """Whether the request is the endpoint's (under :attr:`prefix`)."""
        return self.serves_path(str(environ.get("PATH_INFO", "")))

    def spools_body(self, environ: WSGIEnvironment) -> bool:
        """Whether the request's body may be spooled into the guard's temp dir (see :class:`UploadGuard`).

        The endpoint's own bodies: :meth:`~.engine.Endpoint.spools`; any other
        request's: the wrapped application's answer (yes when it has none).
        """
        if self.serves(environ):
            return self.spools(str(environ.get("CONTENT_TYPE", "")), "HTTP_UPLOAD_CHECKSUM" in environ)
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
            response = self.error(_head_of(environ, None), error)
        else:
            response = self.handle(environ, owner=owner)
        start_response(response.status, response.headers)
        return response.body

    def handle(self, environ: WSGIEnvironment, *, owner: str | None = None) -> Response:
        """Serve one endpoint request as ``owner`` (``None``: anonymous); never raises for the client's doing.

        For framework integrations: call it with the identity the framework
        established (session, user) and turn the result into a response.
        """
        try:
            body_length(environ)  # the one decision of what body there is: a chunked one uWSGI will not deliver
            refused: UploadGuardError | None = None  # is a 411, not an empty PATCH completing the upload
        except BadRequest as error:
            refused = error
        request = _Request(environ, owner)
        try:
            try:
                if refused is not None:
                    raise refused
                return run_inline(self.serve(request.head), lambda effect: self._fulfil(request, effect))
            except (UploadGuardError, OSError) as exc:
                answer = self.classify(exc)
            self._drain(request)
            return self.error(request.head, answer)
        finally:
            if request.release_slot is not None:
                request.release_slot()

    def _fulfil(self, request: _Request, effect: Effect) -> Any:
        if isinstance(effect, Lock):
            return self.locker.acquire(effect.upload_id, timeout=self.lock_timeout)
        if isinstance(effect, Admit):
            return self._admit(request, effect.upload_id)
        if isinstance(effect, Body):
            return self._read_body(request, effect)
        if isinstance(effect, Hook):
            assert self.on_complete is not None
            return self.on_complete(effect.upload)
        raise TypeError(f"unknown effect {effect!r}")

    def _read_body(self, request: _Request, body: Body) -> tuple[int, str | None]:
        """Append ``wsgi.input`` at the offset; a preempted, slow or vanished body keeps what arrived."""
        sock = request_socket(request.environ)
        stream = request.environ["wsgi.input"]
        previous_timeout = sock.gettimeout() if sock is not None else None
        # TLS too: the plain socket's shutdown ends the read under the TLS layer.
        interrupt = functools.partial(shut_reading, sock) if sock is not None else None
        with ReleaseWatcher(body.lock, interrupt) as watcher:
            reader = request.reader = _BodyReader(stream, body.content_length, watcher, self.idle_timeout, sock)
            watcher.too_slow = reader.too_slow
            if sock is not None and self.idle_timeout:
                # The watcher ends a PATCH whose window brought too few bytes by shutting the socket
                # for reading, and gunicorn's reader then returns what it had.  A socket timeout
                # would make that reader drop its partial read -- bytes that arrived -- so it is
                # only the net under the watcher, long after it.
                sock.settimeout(2 * self.idle_timeout + 5)
            try:
                new_offset = self.store.write(body.upload_id, body.offset, reader, body.budget,
                                              checksum=body.checksum)
            finally:
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.settimeout(previous_timeout)
        return new_offset, reader.cut

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

    # -- the cap on bodies read at once --------------------------------------------------

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
