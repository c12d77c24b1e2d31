"""Where uploads live: a narrow, stream-based store interface and the local-disk store.

The interface (:class:`Store`) is what the protocol handler needs and no
more, so an object-storage store (S3 multipart: info as objects, conditional
writes) can implement it too and pass the same test suite
(``tests/test_resumable_store.py``, a class parametrised over store factories).

**How an offset is made durable** (:class:`LocalStore`): each upload is a data
file ``<id>.bin`` whose *size is the offset*.  Bytes are appended with
``os.write`` as they arrive, so whatever reached the file before a worker was
``SIGKILL``-ed, recycled or preempted counts, and a client resuming from the
offset a HEAD reports gets a byte-identical file.  The data file is fsynced
when the upload completes (:meth:`LocalStore.finish`), before anybody is told;
a power loss may cost an *unfinished* upload's unsynced tail (pass
``sync_writes=True`` to fsync every PATCH instead, at a throughput cost).

Checksummed chunks (``Upload-Checksum``) go to a side file ``<id>.chk`` first
and are appended only once verified; a mismatch discards them, and a crash
meanwhile never leaves unverified bytes counted.

The info (length, metadata, owner, state) is JSON in ``<id>.info``, written
atomically: ``<id>.info.tmp``, fsync, rename, fsync of the directory.  The
locks are ``<id>.lock`` and ``<id>.release`` beside them.  Every file written
or truncated here is opened with ``O_NOFOLLOW``: a symlink planted in the
directory is refused (a 503, ``symlink``), never followed to its target.  Ids are
:func:`secrets.token_urlsafe` strings of 144 bits and are matched against
:data:`ID_PATTERN` before they are used in a path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

from ..errors import BodyTooLarge
from ..tempdir import Health, TempDirGuard
from .locking import FileLocker, Locker
from .protocol import Checksum, ChecksumMismatch, UploadInfo, UploadNotFound, check_offset

__all__ = ["ID_PATTERN", "UploadInfo", "Store", "Appender", "LocalStore", "LocalAppender", "pump", "new_upload_id",
           "valid_upload_id"]

log = logging.getLogger("uploadguard")

#: What :func:`new_upload_id` makes: 24 URL-safe base64 characters (144 random bits).
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{24}")
_CHUNK = 1024 * 1024  # bytes read from the client per call
_WRITEBACK_EVERY = 8 * 1024 * 1024  # bytes appended between two background fdatasync calls
_INFO_TMP = ".info.tmp"  # the info is written here, then renamed over <id>.info
#: Every file an upload may have in the directory (the locker's two included).
_SUFFIXES = frozenset({"info", "bin", "chk", _INFO_TMP[1:], "lock", "release"})

Reader = Callable[[int], bytes]


def new_upload_id() -> str:
    """A fresh, unguessable upload id."""
    return secrets.token_urlsafe(18)


def valid_upload_id(upload_id: str) -> bool:
    """Whether ``upload_id`` could have come from :func:`new_upload_id` (and is safe in a path)."""
    return ID_PATTERN.fullmatch(upload_id) is not None


class Appender(Protocol):
    """Bytes of one request body on their way into an upload (:meth:`Store.append`).

    ``write`` each piece as it arrives; ``commit`` when the body ended -- by
    its end or cut short: what arrived is kept -- for the new offset;
    ``abort`` on an error (what it leaves is what a failed ``write`` leaves).
    """

    def write(self, data: bytes) -> None:
        """Append ``data``; past ``max_bytes`` a 413 (:class:`BodyTooLarge`), and nothing of the body is appended."""

    def commit(self) -> int:
        """The body ended: make its bytes count; the new offset (a checksum mismatch: 460, nothing appended)."""

    def abort(self) -> None:
        """Give up (an error elsewhere): release what the appender holds."""


def pump(read: Reader, appender: Appender, max_bytes: int) -> int:
    """Feed ``appender`` from ``read`` until the body ends; the new offset.

    At most one byte beyond ``max_bytes`` is read, to learn whether the body is too long.
    """
    written = 0
    try:
        while True:
            data = read(min(_CHUNK, max_bytes - written) if written < max_bytes else 1)
            if not data:
                break
            written += len(data)
            appender.write(data)
        return appender.commit()
    except BaseException:
        appender.abort()
        raise


class Store(Protocol):
    """The storage seam the handler uses; :class:`LocalStore` is the reference implementation.

    Every method may raise :class:`OSError` for storage failures; lookups of an
    unknown id raise :class:`~uploadguard.resumable.protocol.UploadNotFound`.
    The caller holds the upload's lock (from :attr:`locker`) around
    ``write``/``declare_length``/``finish``/``update``/``terminate``.
    """

    @property
    def locker(self) -> Locker:
        """The locks for this store's uploads (shared by everything that shares the store)."""

    def health(self, need: int = 0) -> Health:
        """Whether the store can take ``need`` more bytes now (recreating a vanished directory)."""

    def create(self, info: UploadInfo) -> UploadInfo:
        """Store a new, empty upload."""

    def get(self, upload_id: str) -> UploadInfo:
        """The upload's info with its current offset."""

    def write(self, upload_id: str, offset: int, read: Reader, max_bytes: int, *,
              checksum: Checksum | None = None) -> int:
        """Append what ``read`` yields at ``offset``; return the new offset.

        ``read(n)`` returns up to ``n`` bytes, ``b""`` at the end.  More than
        ``max_bytes`` is a 413 and appends nothing; a checksum mismatch is a
        460 and appends nothing.
        """

    def append(self, upload_id: str, offset: int, max_bytes: int, *,
               checksum: Checksum | None = None) -> Appender:
        """The push side of :meth:`write`: an :class:`Appender` the caller hands the body to as it arrives.

        ``write`` is ``pump(read, append(...), max_bytes)``: one implementation
        for the WSGI driver (which reads) and the ASGI driver (which is sent
        the body).  A wrong ``offset`` is a 409 here, before any byte.
        """

    def declare_length(self, upload_id: str, length: int) -> UploadInfo:
        """Set a deferred length."""

    def finish(self, upload_id: str) -> UploadInfo:
        """Make all bytes durable and mark the upload completed."""

    def update(self, info: UploadInfo) -> None:
        """Persist changed state (e.g. ``hook_done``)."""

    def terminate(self, upload_id: str) -> None:
        """Delete the upload and its data."""

    def open(self, upload_id: str) -> BinaryIO:
        """The data, for reading."""

    def local_path(self, upload_id: str) -> str | None:
        """Where the data lies on local disk, or ``None`` for remote stores."""

    def uploads(self) -> Iterator[UploadInfo]:
        """Every upload."""

    def expired(self, now: float) -> Iterator[UploadInfo]:
        """The incomplete uploads whose expiry (``UploadInfo.expires``) is before ``now`` (epoch seconds)."""

    def orphans(self, before: float) -> Iterator[str]:
        """Ids with something stored (data, parts, locks) but no info, all of it older than ``before``.

        What a crash between two steps leaves (a create that died before its
        info was written, a termination that died after deleting it): no
        request can reach it, so only the clean-up can; ``terminate`` removes it.
        """


class LocalStore:
    """Uploads as files in one local directory, shared by every worker of the host."""

    def __init__(self, directory: str | os.PathLike[str], *, min_free_space: int = 0,
                 sync_writes: bool = False) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.sync_writes = sync_writes
        self.guard = TempDirGuard(self.directory, min_free_space=min_free_space)
        #: ``flock`` locks in the same directory, shared by every worker of the host.
        self.locker = FileLocker(self.directory)

    def __repr__(self) -> str:
        return f"<LocalStore {self.directory!r}>"

    def _path(self, upload_id: str, suffix: str) -> str:
        if not valid_upload_id(upload_id):
            raise UploadNotFound(f"No upload {upload_id[:40]!r}.")
        return os.path.join(self.directory, upload_id + suffix)

    def health(self, need: int = 0) -> Health:
        return self.guard.preflight(need)

    def create(self, info: UploadInfo) -> UploadInfo:
        data_path = self._path(info.id, ".bin")
        os.close(os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        try:
            self._write_info(info)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(data_path)  # no info, no upload: nothing may stay behind that clean would never find
            raise
        st = os.stat(data_path)  # the info is the one just written: only the data's state is read back
        return dataclasses.replace(info, offset=st.st_size, updated=st.st_mtime)

    def get(self, upload_id: str) -> UploadInfo:
        # A missing file is an unknown upload (404); a file where the directory should be (ENOTDIR) is
        # the storage being unusable, which the handler answers 503 + Retry-After: the uploads may well
        # be back once the directory is, and a 404 would make their clients start again.
        info_path, data_path = self._path(upload_id, ".info"), self._path(upload_id, ".bin")
        try:
            raw, info_mtime = _read_whole(info_path)
        except FileNotFoundError:
            raise UploadNotFound(f"No upload {upload_id}.") from None
        try:
            info = UploadInfo.from_json(raw, offset=0, updated=info_mtime)
        except (ValueError, TypeError, AttributeError) as exc:
            # Written atomically, so only outside hands get here; the client restarts cleanly on a 404.
            log.warning("upload info %s is unreadable (%s); treating the upload as unknown", info_path, exc)
            raise UploadNotFound(f"No upload {upload_id}.") from None
        try:
            st = os.stat(data_path)
        except FileNotFoundError:
            if info.completed and info.length is not None:
                # on_complete moved the data away: still complete for a client that asks again
                # (its last response may have been lost), so it never uploads the file twice.
                return dataclasses.replace(info, offset=info.length)
            raise UploadNotFound(f"No upload {upload_id}.") from None
        return dataclasses.replace(info, offset=st.st_size, updated=st.st_mtime)

    def append(self, upload_id: str, offset: int, max_bytes: int, *,
               checksum: Checksum | None = None) -> LocalAppender:
        """An :class:`Appender` at ``offset`` (409 unless it is the data's size); 404 for an unknown upload."""
        return LocalAppender(self, upload_id, offset, max_bytes, checksum)

    def write(self, upload_id: str, offset: int, read: Reader, max_bytes: int, *,
              checksum: Checksum | None = None) -> int:
        return pump(read, self.append(upload_id, offset, max_bytes, checksum=checksum), max_bytes)

    def declare_length(self, upload_id: str, length: int) -> UploadInfo:
        info = dataclasses.replace(self.get(upload_id), length=length)
        self._write_info(info)
        return info

    def finish(self, upload_id: str) -> UploadInfo:
        data_path = self._path(upload_id, ".bin")
        fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        info = dataclasses.replace(self.get(upload_id), completed=True, completed_at=time.time())
        self._write_info(info)  # fsyncs the directory too
        return info

    def update(self, info: UploadInfo) -> None:
        self.get(info.id)  # still there?
        self._write_info(info)

    def terminate(self, upload_id: str) -> None:
        # The info goes first: from then on the upload is unknown, whatever else remains.
        for suffix in (".info", ".bin", ".chk", _INFO_TMP):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(upload_id, suffix))

    def open(self, upload_id: str) -> BinaryIO:
        try:
            return open(self._path(upload_id, ".bin"), "rb")
        except FileNotFoundError:
            raise UploadNotFound(f"No data for upload {upload_id} (never stored, or moved away).") from None

    def local_path(self, upload_id: str) -> str | None:
        return self._path(upload_id, ".bin")

    def uploads(self) -> Iterator[UploadInfo]:
        try:
            names = os.listdir(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            upload_id, dot, suffix = name.partition(".")
            if suffix == "info" and dot and valid_upload_id(upload_id):
                try:
                    yield self.get(upload_id)
                except UploadNotFound:
                    continue  # vanished meanwhile, or unreadable

    def expired(self, now: float) -> Iterator[UploadInfo]:
        for info in self.uploads():
            expires = info.expires
            if expires is not None and expires < now:
                yield info

    def orphans(self, before: float) -> Iterator[str]:
        try:
            entries = list(os.scandir(self.directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        newest: dict[str, float] = {}
        with_info: set[str] = set()
        for entry in entries:
            upload_id, dot, suffix = entry.name.partition(".")
            if not (dot and suffix in _SUFFIXES and valid_upload_id(upload_id)):
                continue
            if suffix == "info":
                with_info.add(upload_id)
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            newest[upload_id] = max(mtime, newest.get(upload_id, 0.0))
        for upload_id, mtime in newest.items():
            if upload_id not in with_info and mtime < before:
                yield upload_id

    def _write_info(self, info: UploadInfo) -> None:
        path = self._path(info.id, ".info")
        # One temporary name per upload (writers of an upload hold its lock; a new id has one
        # creator), so a crash's leftover is overwritten by the next write and found by terminate.
        tmp = self._path(info.id, _INFO_TMP)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.write(fd, info.to_json())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_whole(path: str) -> tuple[bytes, float]:
    """A small file's bytes and mtime in four system calls (``open()``'s buffered file takes ten).

    Each call lets go of the GIL, which on a busy event-loop worker hands it to
    another thread and back: a burst of new uploads reads an info file three
    times per request.  An info file is replaced by rename, never written in
    place, so the size ``fstat`` gives is the size of what is read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        raw = os.read(fd, st.st_size)
        while len(raw) < st.st_size:  # a short read: only on an odd file system, but never half an info
            more = os.read(fd, st.st_size - len(raw))
            if not more:
                break
            raw += more
        return raw, st.st_mtime
    finally:
        os.close(fd)


class LocalAppender:
    """A :class:`LocalStore` body in progress: appended with ``os.write`` as it arrives, counted at once.

    The data file stays open from :meth:`LocalStore.append` to ``commit`` or
    ``abort`` (bytes written through it land in the file even if the
    directory is renamed meanwhile).  A checksummed body goes to
    ``<id>.chk`` and is appended on ``commit`` once verified.
    """

    def __init__(self, store: LocalStore, upload_id: str, offset: int, max_bytes: int,
                 checksum: Checksum | None) -> None:
        self.upload_id = upload_id
        self.offset = offset
        self.max_bytes = max_bytes
        self.written = 0
        self._sync = store.sync_writes
        try:
            fd = os.open(store._path(upload_id, ".bin"), os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UploadNotFound(f"No upload {upload_id}.") from None
        self._fd: int | None = fd
        self._side: int | None = None
        self._side_path: str | None = None
        try:
            check_offset(offset, os.fstat(fd).st_size)
            if checksum is not None:
                self._side_path = store._path(upload_id, ".chk")
                self._side = os.open(self._side_path,
                                     os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except BaseException:
            self.abort()
            raise
        self._checksum = checksum
        self._digest = checksum.new() if checksum is not None else None
        self._writeback = _Writeback(fd)

    def write(self, data: bytes) -> None:
        if not data:
            return
        assert self._fd is not None
        if self.written + len(data) > self.max_bytes:
            if self._side is None:
                os.ftruncate(self._fd, self.offset)  # nothing appended: the PATCH is refused as a whole
            raise BodyTooLarge(self.max_bytes, length=self.written + len(data))
        if self._side is not None:
            assert self._digest is not None
            self._digest.update(data)
            _write_all(self._side, data)
        else:
            _write_all(self._fd, data)
            self._writeback.wrote(len(data))
        self.written += len(data)

    def commit(self) -> int:
        fd = self._fd
        assert fd is not None
        try:
            if self._side is not None:
                self._append_verified(fd, self._side)
            else:
                self._writeback.wait()
                failed = self._writeback.failed
                if failed is not None:
                    os.ftruncate(fd, self.offset)  # this PATCH's bytes may not be on disk: not counted
                    raise OSError(failed.errno or errno.EIO,
                                  f"writing upload {self.upload_id} to disk failed: {failed.strerror}")
            if self._sync:
                os.fdatasync(fd)
            return self.offset + self.written
        finally:
            self.abort()

    def _append_verified(self, fd: int, side: int) -> None:
        assert self._checksum is not None and self._digest is not None
        if self._digest.digest() != self._checksum.digest:
            raise ChecksumMismatch(f"The chunk's {self._checksum.algorithm} checksum does not match; "
                                   "it was discarded.")
        # Verified: append it.  (sendfile and copy_file_range refuse an O_APPEND target.)
        copied = 0
        while copied < self.written:
            block = os.pread(side, min(_CHUNK, self.written - copied), copied)
            if not block:
                raise OSError(f"short copy from {self._side_path}")
            _write_all(fd, block)
            copied += len(block)

    def abort(self) -> None:
        """Close what is open; a side file goes (unverified bytes never count)."""
        self._writeback_wait()
        side, self._side = self._side, None
        if side is not None:
            os.close(side)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._side_path or "")
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _writeback_wait(self) -> None:
        writeback = getattr(self, "_writeback", None)
        if writeback is not None:
            writeback.wait()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Writeback:
    """Flushes an upload's data to disk in the background while its body still arrives.

    A completed upload is fsynced before anybody is told (:meth:`LocalStore.finish`);
    done only then, a 200 MiB upload would wait for all of it to reach the
    disk after the last byte came in.  Every ``_WRITEBACK_EVERY`` bytes one
    ``fdatasync`` runs in a thread of its own (on a duplicate of the
    descriptor, which it closes), at most one at a time, so the disk works
    while the network does and the final fsync finds little left.  Nothing
    waits for these: they only make the durable state arrive sooner.
    """

    __slots__ = ("_fd", "_since", "_busy", "failed")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._since = 0
        self._busy = threading.Event()
        #: A background flush failed.  Linux reports a writeback error once per open file, so
        #: the fsync at completion (on another descriptor) might never see it: the writer must.
        self.failed: OSError | None = None

    def wrote(self, size: int) -> None:
        self._since += size
        if self._since >= _WRITEBACK_EVERY and not self._busy.is_set():
            self._since = 0
            self._busy.set()
            copy = os.dup(self._fd)
            threading.Thread(target=self._sync, args=(copy,), name="uploadguard-writeback", daemon=True).start()

    def wait(self) -> None:
        """Let a flush still running finish (its outcome decides whether this PATCH counts)."""
        while self._busy.is_set():
            time.sleep(0.001)

    def _sync(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            self.failed = exc
        finally:
            os.close(fd)
            self._busy.clear()

