"""The endpoint's steps in order, once, for both drivers: which store and lock calls a request makes.

A request is served by a *generator* (:meth:`Endpoint.serve`): it makes the
store calls itself (short, blocking: find, create, declare a length, finish,
concatenate) and *yields* an effect wherever only the driver knows how to
wait or move bytes, then goes on with what the driver sends back:

* :class:`Lock` -- the upload's lock (asking a holder to let go); the driver
  sends the held lock, or throws :class:`~.protocol.UploadLocked` (423);
* :class:`Admit` -- a stream slot before a body is read (the WSGI driver's
  cap on bodies read at once; an event loop needs none);
* :class:`Body` -- read the request body into the store at an offset; the
  driver sends ``(new offset, why the body ended early or None)``;
* :class:`Hook` -- run ``on_complete`` (a plain function, or a coroutine
  function under ASGI); the driver throws what it raised.

The WSGI driver fulfils each effect inline; the ASGI driver runs the steps
in a thread of its own pool, fulfilling there every store and lock effect
(an uncontended lock, a body's append), and comes back to the event loop to
wait for a held lock, to read a body and to run ``on_complete`` (a plain
one in a pool of its own: the application's code never holds the store's).
So the tus/IETF sequence (which status for which request, when a length is
declared, when ``on_complete`` runs) exists once; the answers themselves
are composed by :mod:`.core`, headers parsed by :mod:`.protocol`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Generator, Iterable
from typing import Any, BinaryIO, TypeVar

from ..config import Settings, is_s3_url, parse_duration, parse_size
from ..errors import BadRequest, BodyTooLarge, InternalError, TempDirUnavailable, UploadGuardError
from ..tempdir import Reason, reason_for_errno
from . import core
from . import protocol as p
from .core import Head, Response
from .locking import HeldLock, Locker
from .s3 import RAM_PART_LIMIT as S3_RAM_PART_LIMIT
from .s3 import S3Store
from .store import LocalStore, Store, UploadInfo, new_upload_id, valid_upload_id

__all__ = ["Endpoint", "Upload", "Lock", "Admit", "Body", "Hook", "Steps", "run_inline"]

log = logging.getLogger("uploadguard")

T = TypeVar("T")


class Upload:
    """A completed (or, for the store's own use, any) upload, as ``on_complete`` and ``get()`` give it."""

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


@dataclasses.dataclass(frozen=True)
class Lock:
    """Effect: the lock of ``upload_id``, asking a holder to let go; 423 after ``lock_timeout``."""

    upload_id: str


@dataclasses.dataclass(frozen=True)
class Admit:
    """Effect: a stream slot for the body about to be read (``upload_id``: a resumed upload, or ``None``)."""

    upload_id: str | None


@dataclasses.dataclass(frozen=True)
class Body:
    """Effect: append the request body at ``offset``; at most ``budget`` bytes (more: 413, nothing appended)."""

    lock: HeldLock
    upload_id: str
    offset: int
    budget: int
    checksum: p.Checksum | None
    content_length: int | None  # None: to the body's end


@dataclasses.dataclass(frozen=True)
class Hook:
    """Effect: run ``on_complete`` for ``upload`` (a raise fails the request, 500, and it runs again)."""

    upload: Upload


Effect = Lock | Admit | Body | Hook
Steps = Generator[Effect, Any, T]


def run_inline(steps: Steps[T], fulfil: Callable[[Effect], Any]) -> T:
    """Drive ``steps`` in this thread, fulfilling each effect with ``fulfil`` (the WSGI way)."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as stop:
            result: T = stop.value
            return result
        try:
            value, error = fulfil(effect), None
        except BaseException as exc:  # noqa: BLE001 -- handed to the steps, which decide
            value, error = None, exc


class Endpoint:
    """The resumable-upload endpoint's configuration and steps, without a server (see :mod:`uploadguard.resumable`)."""

    def __init__(
        self,
        *,
        prefix: str = "/files/",
        storage: str | os.PathLike[str] | Store | None = None,  # a directory, "s3://bucket/prefix", or a Store
        max_size: int | str | None = None,  # bytes per upload; None = settings.max_body_size; 0 = no limit
        expires_after: float | str | None = None,  # seconds of inactivity; None = settings (24 h); 0 = never
        on_complete: Callable[[Upload], object] | None = None,
        settings: Settings | None = None,
        cors_origins: Iterable[str] | str = (),  # "*" or exact origins ("https://example.com")
        lock_timeout: float = 5.0,  # seconds a request waits for a held upload before a 423
        idle_timeout: float | str | None = None,  # seconds without a byte that end a PATCH; None = settings
        keep_completed: float | str | None = None,  # seconds a completed upload is kept; None = settings; 0 = forever
    ) -> None:
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
        origins = (cors_origins,) if isinstance(cors_origins, str) else tuple(cors_origins)
        self.cors_origins = frozenset(origin.rstrip("/") for origin in origins)
        if not lock_timeout >= 0:
            raise ValueError(f"lock_timeout={lock_timeout!r} must be >= 0 seconds")
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.prefix} -> {self.store!r}>"

    # -- for applications ----------------------------------------------------------------

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
        run_inline(self._terminate(id_or_url, owner), self._blocking_lock)

    def _blocking_lock(self, effect: Effect) -> HeldLock:
        assert isinstance(effect, Lock)
        return self.locker.acquire(effect.upload_id, timeout=self.lock_timeout)

    def upload_id(self, id_or_url: str) -> str | None:
        """The id in ``id_or_url`` (an id, ``/files/<id>`` or ``https://host/files/<id>``), if valid."""
        from urllib.parse import urlsplit

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

    def spools(self, content_type: str | None, checksummed: bool) -> bool:
        """Whether a body sent to the endpoint may be spooled into the guard's temp dir (so needs room there).

        The endpoint's bodies go to the upload storage, whose room it checks
        itself, so a small temp dir (a tmpfs) does not refuse a PATCH the
        storage has room for.  Except: a ``multipart/form-data`` body (never a
        tus or draft upload, but what a framework hook in front of the endpoint
        -- a CSRF extension reading the form -- or an app route under the
        prefix would spool), and on S3 a checksummed chunk or a part buffer
        over 32 MiB, which are spooled there.
        """
        if (content_type or "").lower().startswith("multipart/"):
            return True
        store = self.store
        if isinstance(store, S3Store):
            return checksummed or store.part_size > S3_RAM_PART_LIMIT
        return not isinstance(store, LocalStore)  # a Store of the application's own: assume it does

    def serves_path(self, path: str) -> bool:
        """Whether ``path`` (below the application's root) is the endpoint's."""
        path = path or "/"
        return path.startswith(self.prefix) or path == self.prefix.rstrip("/")

    # -- answers -------------------------------------------------------------------------

    def classify(self, exc: Exception) -> UploadGuardError:
        """The answer for what a request raised: its own response, 503 for storage trouble, else 500."""
        if isinstance(exc, UploadGuardError):
            return exc
        if isinstance(exc, OSError):
            reason = reason_for_errno(exc.errno)
            if reason is not None:
                log.warning("resumable storage %s failed (%s): %s", self.directory, reason, exc)
                return TempDirUnavailable(reason, path=self.directory, retry_after=self.settings.retry_after,
                                          cause=str(exc))
        log.error("resumable request failed", exc_info=exc)
        return InternalError(exc)

    def error(self, head: Head, error: UploadGuardError) -> Response:
        return core.error_response(head, error, self.cors_origins)

    def _respond(self, head: Head, status: str, headers: list[tuple[str, str]]) -> Response:
        return Response(status, core.finish_headers(head, headers, self.cors_origins), [])

    def _state(self, head: Head, info: UploadInfo) -> list[tuple[str, str]]:
        return core.state_headers(head, info, lambda upload_id: self._location(head, upload_id))

    def _location(self, head: Head, upload_id: str) -> str:
        return head.location(self.prefix, upload_id)

    # -- dispatch ------------------------------------------------------------------------

    def serve(self, head: Head) -> Steps[Response]:
        """The steps of one request; raises an :class:`UploadGuardError` or ``OSError`` for the driver to answer."""
        rest = head.path[len(self.prefix):]
        method = head.method
        origin = head.header("Origin")
        if method == "OPTIONS" and origin is not None and head.header("Access-Control-Request-Method"):
            return Response("204 No Content", core.preflight_headers(origin, self.cors_origins), [])
        if method == "OPTIONS":
            return self._respond(head, "204 No Content", core.options_headers(head, self.max_size))
        found = p.dialect_of(head.header("Tus-Resumable"), head.header("Upload-Draft-Interop-Version"))
        if found is None:
            raise p.UnsupportedVersion(f"Send Tus-Resumable: {p.TUS_VERSION} (or Upload-Draft-Interop-Version).")
        head.dialect, head.interop = found
        if head.ietf:
            head.headers.append(("Upload-Draft-Interop-Version", str(head.interop)))
        if not rest:
            if method != "POST":
                raise p.MethodNotAllowed(f"{method} is not served on {self.prefix}.", allow="POST, OPTIONS")
            return (yield from self._create(head))
        if "/" in rest or not valid_upload_id(rest):
            raise p.UploadNotFound(f"No upload {rest[:40]!r}.")
        if method == "HEAD":
            return (yield from self._head(head, rest))
        if method == "PATCH":
            return (yield from self._patch(head, rest))
        if method == "DELETE":
            self._check_health(writing=False)
            yield from self._terminate(rest, head.owner)
            log.info("terminated upload %s", rest)
            return self._respond(head, "204 No Content", head.headers)
        raise p.MethodNotAllowed(f"{method} is not served on an upload.", allow="HEAD, PATCH, DELETE, OPTIONS")

    # -- creation ------------------------------------------------------------------------

    def _create(self, head: Head) -> Steps[Response]:
        content_length = head.content_length()
        concat = p.parse_concat(head.header("Upload-Concat"))
        metadata = p.parse_metadata(head.header("Upload-Metadata"))
        length = p.parse_optional_number(head.header("Upload-Length"), "Upload-Length")
        complete = p.parse_upload_complete(head.header("Upload-Complete"))
        if head.ietf:
            if complete is None:
                raise BadRequest("Upload-Complete (?0 or ?1) is required.", reason="missing_header")
            if complete and content_length is not None:
                if length is not None and length != content_length:
                    raise BadRequest("Upload-Length disagrees with the complete body's length.",
                                     reason="bad_header")
                length = content_length
        else:
            defer = head.header("Upload-Defer-Length")
            if defer is not None and defer.strip() != "1":
                raise BadRequest("Upload-Defer-Length must be 1.", reason="bad_header")
            if concat is None or not concat.final:
                if (length is None) == (defer is None):
                    raise BadRequest("Send either Upload-Length or Upload-Defer-Length: 1.", reason="missing_header")
            if head.header("Content-Type") != p.OFFSET_CONTENT_TYPE:
                if content_length:
                    raise p.UnsupportedMediaType(f"A creation request's body must be {p.OFFSET_CONTENT_TYPE}.")
                content_length = 0  # no body announced as one: creation only
        too_large = p.creation_too_large({"upload-length": str(length)} if length is not None else {}, self.max_size)
        if too_large is not None:
            raise too_large
        if concat is not None and concat.final:
            return (yield from self._concatenate(head, concat, metadata))
        checksum = p.parse_checksum(head.header("Upload-Checksum"))  # a bad one creates nothing
        self._check_health(content_length or 0)
        if content_length != 0:
            yield Admit(None)  # before the upload exists: a refused creation leaves nothing behind
        info = self.store.create(UploadInfo(
            id=new_upload_id(), length=length, metadata=metadata, owner=head.owner, created=time.time(),
            expires_after=self.expires_after or None, partial=concat is not None,
            keep_completed=self.keep_completed,
        ))
        head.headers.append(("Location", self._location(head, info.id)))
        log.debug("created upload %s (%s bytes)", info.id,
                 length if length is not None else "deferred")
        if content_length or (content_length is None) or length == 0:
            with (yield Lock(info.id)) as lock:
                try:
                    info = yield from self._append(head, lock, info, offset=0, content_length=content_length,
                                                   complete=complete, checksum=checksum)
                except (BadRequest, BodyTooLarge, p.ChecksumMismatch):
                    # The body was refused (nothing of it was appended): undo the creation too, so the
                    # refused request leaves nothing behind, and name no upload in the answer.
                    self.store.terminate(info.id)
                    self.locker.remove(lock)
                    head.headers = [item for item in head.headers if item[0] != "Location"]
                    log.info("removed upload %s: its creation body was refused", info.id)
                    raise
        return self._respond(head, "201 Created", [*head.headers, *self._state(head, info)])

    def _concatenate(self, head: Head, concat: p.Concat, metadata: dict[str, str]) -> Steps[Response]:
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
        (:func:`.core.final_id`), so a retry of the request finds what an earlier
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
        final_id = core.final_id(head.owner, part_ids)
        if self._earlier_final(final_id, head.owner) is None:
            parts = self._joinable(part_ids, head.owner)
            total = sum(part.offset for part in parts)
            if self.max_size and total > self.max_size:
                raise BodyTooLarge(self.max_size, length=total)
            self._check_health(total)
        with contextlib.ExitStack() as held:
            lock = held.enter_context((yield Lock(final_id)))
            info = self._earlier_final(final_id, head.owner)  # as it is now that nobody else can join them
            try:
                part_locks = []
                for part_id in sorted(part_ids):
                    part_locks.append(held.enter_context((yield Lock(part_id))))
                if info is None or not info.completed:
                    parts = self._joinable(part_ids, head.owner)
                    total = sum(part.offset for part in parts)
                    if info is None:
                        info = self.store.create(UploadInfo(
                            id=final_id, length=total, metadata=metadata, owner=head.owner, created=time.time(),
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
                info = yield from self._completed(lock, info)
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
        head.headers.append(("Location", self._location(head, info.id)))
        return self._respond(head, "201 Created", [*head.headers, *self._state(head, info)])

    _final_id = staticmethod(core.final_id)

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

    def _head(self, head: Head, upload_id: str) -> Steps[Response]:
        self._check_health(writing=False)
        self._find(upload_id, head.owner)
        # Taking the lock preempts a stale PATCH, so the offset answered is final.
        with (yield Lock(upload_id)) as lock:
            info = self._find(upload_id, head.owner)
            if core.whole(info) and not info.hook_done:
                info = yield from self._completed(lock, info)
        status = "204 No Content" if head.ietf else "200 OK"
        return self._respond(head, status, [*head.headers, *self._state(head, info)])

    def _patch(self, head: Head, upload_id: str) -> Steps[Response]:
        offset = p.parse_number(head.header("Upload-Offset"), "Upload-Offset")
        content_length = head.content_length()
        complete = p.parse_upload_complete(head.header("Upload-Complete"))
        length = p.parse_optional_number(head.header("Upload-Length"), "Upload-Length")
        if head.ietf:
            if complete is None:
                raise BadRequest("Upload-Complete (?0 or ?1) is required.", reason="missing_header")
            assert head.interop is not None
            p.check_partial_upload_type(head.interop, head.header("Content-Type"),
                                        has_body=content_length != 0)
        elif head.header("Content-Type") != p.OFFSET_CONTENT_TYPE:
            raise p.UnsupportedMediaType(f"A PATCH body must be {p.OFFSET_CONTENT_TYPE}.")
        checksum = p.parse_checksum(head.header("Upload-Checksum"))
        self._check_health(content_length or 0)
        info = self._find(upload_id, head.owner)
        if info.parts is not None:
            raise p.Forbidden("A final concatenated upload cannot be patched.")
        if content_length != 0:
            yield Admit(upload_id)  # before the lock: a refused PATCH never preempts the one reading
        with (yield Lock(upload_id)) as lock:
            info = self._find(upload_id, head.owner)
            p.check_offset(offset, info.offset)
            declare: int | None = None  # a deferred length this PATCH declares, recorded once its body is taken
            if length is not None and info.length is None:
                if length < info.offset or (self.max_size and length > self.max_size):
                    raise BodyTooLarge(self.max_size, length=length) if length >= info.offset else BadRequest(
                        "Upload-Length is below the bytes already stored.", reason="bad_header")
                declare = length
            elif length is not None and length != info.length:
                raise BadRequest("Upload-Length differs from the upload's length.", reason="bad_header")
            if core.whole(info):
                # A retried last PATCH (or one after a crash between the last byte and finish):
                # nothing more fits, and the data may have been moved away by on_complete, so
                # answer from the info alone.
                p.check_append(offset=offset, length=info.length, max_size=self.max_size,
                               content_length=content_length)
                info = yield from self._completed(lock, info)
                return self._respond(head, "204 No Content", [*head.headers, *self._state(head, info)])
            info = yield from self._append(head, lock, info, offset=offset, content_length=content_length,
                                           complete=complete, checksum=checksum, declare=declare)
        return self._respond(head, "204 No Content", [*head.headers, *self._state(head, info)])

    def _terminate(self, id_or_url: str, owner: str | None) -> Steps[None]:
        upload_id = self.upload_id(id_or_url)
        if upload_id is None:
            raise p.UploadNotFound(f"{id_or_url[:80]!r} does not name an upload of {self.prefix}.")
        self._find(upload_id, owner, live=False)  # an expired upload is still the app's to delete
        with (yield Lock(upload_id)) as lock:
            self.store.terminate(upload_id)
            self.locker.remove(lock)

    # -- the steps -----------------------------------------------------------------------

    def _append(self, head: Head, lock: HeldLock, info: UploadInfo, *, offset: int,
                content_length: int | None, complete: bool | None,
                checksum: p.Checksum | None = None, declare: int | None = None) -> Steps[UploadInfo]:
        """Write the request body at ``offset`` under ``lock``; complete the upload when it is whole.

        ``declare`` is a deferred length the request states (tus ``Upload-Length``; the draft's
        ``Upload-Complete: ?1`` with a ``Content-Length``).  It bounds the body like a declared
        length, but is recorded only once the body was taken: a request refused for its body
        (413, 460, a failed write) changes nothing, so the client can retry with the right length.
        A crash between the write and the record leaves a deferred upload whose offset is the
        bytes stored; the client's next PATCH (an empty one at that offset) declares it then.
        """
        if not head.ietf:
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
        new_offset, cut = yield Body(lock, info.id, offset, budget, checksum, content_length)
        if cut is not None:
            log.info("PATCH of upload %s ended early (%s) at %d bytes", info.id, cut, new_offset)
        info = self.store.get(info.id)
        if declare is not None and info.length is None:
            info = self.store.declare_length(info.id, declare)  # the body was taken: the length stands
        elif complete and info.length is None and cut is None:
            info = self.store.declare_length(info.id, new_offset)  # a chunked final body: now we know
        if info.length is not None and info.offset == info.length:
            info = yield from self._completed(lock, info)
        return info

    def _completed(self, lock: HeldLock, info: UploadInfo) -> Steps[UploadInfo]:
        """Make a whole upload durable, then run ``on_complete`` unless it already returned once."""
        if not info.completed:
            info = self.store.finish(info.id)
            log.info("upload %s complete (%d bytes)", info.id, info.offset)
        if info.hook_done or info.partial:
            return info
        if self.on_complete is not None:
            try:
                yield Hook(Upload(info, self.store, self.prefix + info.id))
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
        if live:
            gone = core.liveness(info, time.time(), self.keep_completed)
            if gone is not None:
                raise gone
        return info

    def _check_health(self, need: int = 0, *, writing: bool = True) -> None:
        """503 + Retry-After unless the storage can be used; a full disk still answers HEAD and DELETE."""
        health = self.store.health(need)
        if not health.ok and (writing or health.reason not in ("no_space", "no_inodes")):
            assert health.reason is not None
            log.warning("resumable storage %s unusable (%s): %s", health.path, health.reason,
                        health.detail)
            raise TempDirUnavailable(health.reason, path=health.path, retry_after=self.settings.retry_after,
                                     cause=health.detail)
