"""One writer per upload across every worker of a host, and a way to take the upload from a stale one.

Two requests may never append to one upload at once: a PATCH holds the
upload's lock while it reads the body.  :class:`FileLocker` uses
``fcntl.flock`` on ``<id>.lock`` in the storage directory, which every
gunicorn worker on the host shares and which the kernel releases when a
worker dies, even by ``SIGKILL``.

**Preemption.**  The failure this exists for is the *silent drop*: a phone
leaves Wi-Fi mid-PATCH, no FIN and no RST ever arrive, and the worker stays
blocked in ``recv()`` holding the lock until gunicorn's timeout (600 s) -- so
the client, which has long reconnected, gets nothing but 423s.  As in tusd, a
request that finds the lock held *asks* the holder to let go: it creates
``<id>.release`` and retries for ``timeout`` seconds (default 5).  The holder
runs a :class:`ReleaseWatcher` while it reads a PATCH body; it polls the
release request every 0.2 s and, when asked, ends the read (the WSGI driver
shuts gunicorn's ``environ["gunicorn.socket"]`` down for reading: ``SHUT_RD``),
so the blocked read returns at once with what it has.  The holder keeps the
bytes already written, releases the lock and answers.

Without ``gunicorn.socket`` (other servers, in-process tests) nothing can
interrupt a blocked read: a contender waits for the lock ``timeout`` and gets
a 423 with ``Retry-After``; the holder lets go at the next idle timeout (see
``resumable_idle_timeout``) or when its client goes away.

Locks of one process are not re-entrant; a lock is never held across requests.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from types import TracebackType
from collections.abc import Callable
from typing import Protocol

from .protocol import UploadLocked

__all__ = ["HeldLock", "Locker", "FileLocker", "UploadLock", "ReleaseWatcher", "StreamSlots"]

log = logging.getLogger("uploadguard")

_POLL = 0.05  # seconds between attempts on a held lock


class HeldLock(Protocol):
    """The locker seam, a held lock: what the handler and :class:`ReleaseWatcher` use."""

    @property
    def upload_id(self) -> str: ...

    def release_requested(self) -> bool:
        """Whether another request asked for the upload."""

    def release(self) -> None: ...

    def __enter__(self) -> HeldLock: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class Locker(Protocol):
    """The locker seam: one holder per upload, preemptible (see the module docstring).

    A store offers its locker as ``store.locker``: :class:`FileLocker` for a
    local directory, a lease on object storage for a store shared by hosts.
    """

    def try_acquire(self, upload_id: str) -> HeldLock | None:
        """The lock if nobody holds it, else ``None``; never asks a holder to let go."""

    def acquire(self, upload_id: str, *, timeout: float = 5.0, retry_after: int = 1) -> HeldLock:
        """The lock, asking a holder to let go; 423 after ``timeout`` seconds."""

    def remove(self, lock: HeldLock) -> None:
        """Forget a held lock's upload for good (it was terminated)."""


class UploadLock:
    """A held upload lock; release it with :meth:`release` or a ``with`` block."""

    def __init__(self, fd: int, upload_id: str, release_path: str) -> None:
        self._fd: int | None = fd
        self.upload_id = upload_id
        self.release_path = release_path

    def __repr__(self) -> str:
        return f"<UploadLock {self.upload_id} {'held' if self.held else 'released'}>"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release_requested(self) -> bool:
        """Whether another request asked for this upload (``<id>.release`` exists)."""
        return os.path.exists(self.release_path)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> UploadLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class FileLocker:
    """``flock``-based upload locks in ``directory`` (the local store's directory)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.path.abspath(os.fspath(directory))

    def __repr__(self) -> str:
        return f"<FileLocker {self.directory!r}>"

    def _paths(self, upload_id: str) -> tuple[str, str]:
        base = os.path.join(self.directory, upload_id)
        return base + ".lock", base + ".release"

    def try_acquire(self, upload_id: str) -> UploadLock | None:
        """The lock if nobody holds it, else ``None``; never asks a holder to let go."""
        lock_path, release_path = self._paths(upload_id)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)  # never a planted link
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The file may have been unlinked (by clean or termination) between open and flock:
        # a lock on an orphaned inode excludes nobody.  Then try again on the current file.
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(current, os.fstat(fd)):
            os.close(fd)
            return self.try_acquire(upload_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(release_path)  # any request for the previous holder is answered now
        return UploadLock(fd, upload_id, release_path)

    def acquire(self, upload_id: str, *, timeout: float = 5.0, retry_after: int = 1) -> UploadLock:  # seconds
        """The lock, asking a holder to let go; :class:`UploadLocked` (423) after ``timeout``."""
        deadline = time.monotonic() + timeout
        _, release_path = self._paths(upload_id)
        while True:
            lock = self.try_acquire(upload_id)
            if lock is not None:
                return lock
            if not os.path.exists(release_path):  # absent: first try, or a new holder took it since
                self.request_release(upload_id)
            if time.monotonic() >= deadline:
                raise UploadLocked(
                    f"Upload {upload_id} is in use by another request; retry in {retry_after} s.",
                    retry_after=retry_after,
                )
            time.sleep(_POLL)

    def request_release(self, upload_id: str) -> None:
        """Ask the holder of ``upload_id`` to let go (create ``<id>.release``)."""
        _, release_path = self._paths(upload_id)
        try:
            os.close(os.open(release_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the directory vanished: acquire() will fail on its own
                raise

    def remove(self, lock: HeldLock) -> None:
        """Unlink the lock and release files of a held lock (the upload is gone)."""
        lock_path, release_path = self._paths(lock.upload_id)
        for path in (release_path, lock_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class ReleaseWatcher:
    """While a PATCH body is read: end the read when another request asks for the upload.

    ``interrupt`` ends a read blocked in another thread (the WSGI driver shuts
    the client socket for reading); without one the watcher still records the
    request, but a blocked read cannot be interrupted.  A callback, not the
    socket, so that how a server's read is ended stays with the driver.
    """

    def __init__(self, lock: HeldLock, interrupt: Callable[[], None] | None, *,
                 interval: float = 0.2) -> None:  # seconds
        self.lock = lock
        self.interrupt = interrupt
        self.interval = interval
        self.preempted = False
        #: Polled with the release request: ``True`` ends the read as too slow (see ``_BodyReader``).
        self.too_slow: Callable[[], bool] | None = None
        self.slowed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"uploadguard-release-{lock.upload_id[:8]}",
                                        daemon=True)

    def __enter__(self) -> ReleaseWatcher:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.lock.release_requested():
                self.preempted = True
                log.info("upload %s was asked for by another request; ending this PATCH",
                         self.lock.upload_id)
                if self.interrupt is not None:
                    self.interrupt()
                return
            if self.too_slow is not None and self.too_slow():
                # The server's reader blocks until it has the bytes it asked for, however slowly
                # they drip in: only a shutdown ends such a read.
                self.slowed = True
                log.info("upload %s: the PATCH brings too few bytes; ending it", self.lock.upload_id)
                if self.interrupt is not None:
                    self.interrupt()
                return


class StreamSlots:
    """At most ``total`` request bodies read at once by the processes that share ``directory``.

    What keeps slow phones from taking a blocking worker pool down: each
    PATCH body holds a worker (or thread) for as long as its client takes to
    send it, so a body beyond the cap is refused at once (503 +
    ``Retry-After``, which tus clients retry) instead of waiting for a
    worker that the rest of the site needs.  Slot *i* is an ``flock`` on
    ``stream-slot-<i>.lock`` in ``directory``: every worker of the host
    shares them, and the kernel frees the slot of a worker that dies, even by
    ``SIGKILL``.  ``per_process`` (threads) is a cap within this process too,
    so each gthread worker keeps a thread free.  When the directory cannot be
    used the cap is not enforced (logged): uploads keep working.
    """

    def __init__(self, directory: str | os.PathLike[str], total: int, *, per_process: int = 0) -> None:
        if total < 0 or per_process < 0:
            raise ValueError(f"stream caps must not be negative (total={total}, per_process={per_process})")
        self.total = total
        self.per_process = per_process
        self._locker = FileLocker(directory)
        self._in_process = threading.BoundedSemaphore(per_process) if per_process else None
        self._warned = False

    def __repr__(self) -> str:
        return f"<StreamSlots {self.total} in {self._locker.directory!r} per_process={self.per_process}>"

    def try_take(self) -> Callable[[], None] | None:
        """A free slot's release function (call it once), or ``None`` when every slot is taken."""
        if self._in_process is not None and not self._in_process.acquire(blocking=False):
            return None
        try:
            lock = self._take_file_slot() if self.total else None
        except _AllTaken:
            if self._in_process is not None:
                self._in_process.release()
            return None
        in_process = self._in_process

        def release() -> None:
            if lock is not None:
                lock.release()
            if in_process is not None:
                in_process.release()

        return release

    def _take_file_slot(self) -> UploadLock | None:
        """A held slot; ``None`` when the slots cannot be used (not enforced); :class:`_AllTaken` when full."""
        start = os.getpid() % self.total  # workers start their search at different slots
        try:
            for step in range(self.total):
                name = f"stream-slot-{(start + step) % self.total}"
                lock = self._locker.try_acquire(name)
                if lock is not None:
                    # A fresh mtime: an age-based clean of the directory (the temp dir, for a store
                    # without local locks) never unlinks a slot somebody holds.
                    os.utime(os.path.join(self._locker.directory, name + ".lock"))
                    return lock
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot use the stream slots in %s (%s): bodies are not capped until it is fixed",
                            self._locker.directory, exc)
            return None
        raise _AllTaken


class _AllTaken(Exception):
    """Every stream slot is held."""
