"""The temp-dir guard: keep the upload temp directory usable, or say why not.

The failure this exists for: under systemd's ``PrivateTmp=`` some gunicorn
workers lost their ``/tmp`` and every upload they took died with
``FileNotFoundError``.  This module checks the directory cheaply before a
request body is spooled, recreates it when it has merely vanished, and
otherwise names the reason it cannot be used, so the middleware can answer a
retryable 503 instead of a 500 or a dropped connection.

Reasons (also the ``reason`` of :class:`~uploadguard.errors.TempDirUnavailable`
and the metrics label):

``missing``          the path does not exist and could not be created (only
                     the last component is: a missing parent is named)
``not_a_directory``  the path is a file (or another non-directory)
``symlink``          the path is a symbolic link (refused: it may be swapped)
``unlinked``         a directory that was deleted while still mounted or open
                     (``st_nlink == 0``, as when a ``PrivateTmp`` mount's source
                     was removed): it looks fine, every create fails with ENOENT
``wrong_owner``      owned by neither this process's user nor root (a process
                     running as root -- gunicorn's workers without a ``user``
                     setting, as in many containers -- may use a directory of
                     any owner, e.g. a volume owned by the app user; workers
                     that switch to ``user`` judge it as that user, since the
                     check runs in the worker after the switch)
``insecure_mode``    world-writable without the sticky bit
``read_only``        on a read-only file system
``not_writable``     this process may not create files in it
``no_space``         not enough free space (or quota) for the body plus the floor
``no_inodes``        no free inodes
``io_error``         any other ``OSError`` on the directory

Usage::

    guard = TempDirGuard("/var/cache/myapp/uploads", min_free_space=16 << 20)
    health = guard.preflight(need=content_length)  # cheap: lstat + statvfs
    if not health.ok:
        ...  # health.reason, health.detail

    health = ensure_temp_dir(path)  # create + full probe (creates a file); for startup
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import os
import stat
import tempfile
import threading
import time

from .config import ConfigError, default_resumable_storage, default_temp_dir

__all__ = [
    "Health",
    "Reason",
    "TempDirGuard",
    "check_temp_dir",
    "default_dirs",
    "ensure_temp_dir",
    "probe_write",
    "reason_for_errno",
    "is_within",
    "use_as_tempdir",
]

log = logging.getLogger("uploadguard")

class Reason(enum.StrEnum):
    """Why the temp dir cannot take an upload: the module docstring's list, as one vocabulary.

    The ``reason`` of a :class:`Health`, of
    :class:`~uploadguard.errors.TempDirUnavailable`, and the metrics label; a
    ``str`` enum, so logs and JSON read the plain word.
    """

    MISSING = "missing"
    NOT_A_DIRECTORY = "not_a_directory"
    SYMLINK = "symlink"
    UNLINKED = "unlinked"
    WRONG_OWNER = "wrong_owner"
    INSECURE_MODE = "insecure_mode"
    READ_ONLY = "read_only"
    NOT_WRITABLE = "not_writable"
    NO_SPACE = "no_space"
    NO_INODES = "no_inodes"
    IO_ERROR = "io_error"


#: errno values that mean "the temp dir cannot take files", mapped to reasons.
_ERRNO_REASONS = {
    errno.ENOENT: Reason.MISSING,
    errno.ENOTDIR: Reason.NOT_A_DIRECTORY,
    errno.ENOSPC: Reason.NO_SPACE,
    errno.EDQUOT: Reason.NO_SPACE,
    errno.EROFS: Reason.READ_ONLY,
    errno.EACCES: Reason.NOT_WRITABLE,
    errno.EPERM: Reason.NOT_WRITABLE,
    errno.ELOOP: Reason.SYMLINK,
    errno.EFBIG: Reason.NO_SPACE,
    errno.EMFILE: Reason.IO_ERROR,
    errno.ENFILE: Reason.IO_ERROR,
    errno.EIO: Reason.IO_ERROR,
}

_CHECKS_ACCESS = os.access in os.supports_effective_ids

#: Directories this process has seen exist (checked or created): healing one is a re-creation,
#: anything else a first creation -- whichever check saw it (a gunicorn hook, a guard, the store).
_seen: set[str] = set()


def reason_for_errno(err: int | None) -> Reason | None:
    """The temp-dir reason an errno stands for, or ``None`` if it is not one."""
    return _ERRNO_REASONS.get(err) if err is not None else None


def is_within(path: object, directory: str) -> bool:
    """Whether ``path`` names ``directory`` or something below it (lexically)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False  # None, or a file descriptor (os.chmod(fd, ...) errors carry the int)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    path = os.path.abspath(os.fspath(path))
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


@dataclasses.dataclass(frozen=True)
class Health:
    """Outcome of a temp-dir check: ``ok``, or a ``reason`` and a ``detail`` for people."""

    path: str
    reason: Reason | None = None
    detail: str = "ok"
    free_bytes: int | None = None
    healed: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None


def _stat_problem(path: str, st: os.stat_result) -> Health | None:
    """What is wrong with a directory's own inode, judged from ``lstat``."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return Health(path, Reason.SYMLINK, f"{path} is a symbolic link; use the real directory")
    if not stat.S_ISDIR(mode):
        return Health(path, Reason.NOT_A_DIRECTORY, f"{path} exists but is not a directory")
    if st.st_nlink == 0:
        return Health(path, Reason.UNLINKED, f"{path} was deleted while in use (st_nlink == 0); restart the service")
    euid = os.geteuid()
    if euid != 0 and st.st_uid not in (euid, 0):
        return Health(path, Reason.WRONG_OWNER, f"{path} is owned by uid {st.st_uid}, not by uid {euid} or root")
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        return Health(path, Reason.INSECURE_MODE, f"{path} is world-writable without the sticky bit (mode {mode & 0o7777:o})")
    if euid != 0:
        if st.st_uid == euid:
            writable = mode & 0o300 == 0o300
        else:  # root-owned: group or other bits decide
            writable = os.access(path, os.W_OK | os.X_OK, effective_ids=_CHECKS_ACCESS)
        if not writable:
            return Health(path, Reason.NOT_WRITABLE, f"{path} is not writable by uid {euid} (mode {mode & 0o7777:o})")
    return None


def check_temp_dir(path: str | os.PathLike[str], *, min_free_space: int = 0, need: int = 0) -> Health:
    """Check without changing anything: two system calls (``lstat``, ``statvfs``).

    ``need`` is the size of the body about to be spooled; the file system must
    have ``need + min_free_space`` bytes available.
    """
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Health(path, Reason.MISSING, f"{path} does not exist")
    except OSError as exc:
        return Health(path, reason_for_errno(exc.errno) or Reason.IO_ERROR, f"cannot stat {path}: {exc.strerror}")
    _seen.add(os.path.abspath(path))
    problem = _stat_problem(path, st)
    if problem is not None:
        return problem
    try:
        vfs = os.statvfs(path)
    except OSError as exc:
        return Health(path, reason_for_errno(exc.errno) or Reason.IO_ERROR, f"cannot statvfs {path}: {exc.strerror}")
    if vfs.f_flag & os.ST_RDONLY:
        return Health(path, Reason.READ_ONLY, f"{path} is on a read-only file system")
    free = vfs.f_bavail * vfs.f_frsize
    if free == 0 or free < need + min_free_space:
        return Health(
            path, Reason.NO_SPACE,
            f"{path} has {free} bytes free; {need} needed plus a floor of {min_free_space}",
            free_bytes=free,
        )
    if vfs.f_files and vfs.f_favail == 0:
        return Health(path, Reason.NO_INODES, f"{path} has no free inodes", free_bytes=free)
    return Health(path, free_bytes=free)


def probe_write(path: str | os.PathLike[str]) -> Health:
    """Create and delete a file in ``path``: the one test that cannot be fooled."""
    path = os.fspath(path)
    try:
        fd, name = tempfile.mkstemp(prefix=".uploadguard-probe-", dir=path)
    except OSError as exc:
        return Health(path, reason_for_errno(exc.errno) or Reason.IO_ERROR, f"cannot create a file in {path}: {exc.strerror}")
    try:
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return Health(path, reason_for_errno(exc.errno) or Reason.IO_ERROR, f"cannot remove a file in {path}: {exc.strerror}")
    return Health(path)


def default_dirs() -> set[str]:
    """uploadguard's own default directories, whose parents are uploadguard's to create too.

    ``~/.cache/uploadguard/tmp`` needs ``~/.cache`` on a fresh account; a
    path somebody configured does not get its parents made up, so a typo in
    it (``/srv/uplaods/tmp``) is an error naming the missing parent instead
    of a new directory tree nobody looks after.
    """
    found = set()
    for default in (default_temp_dir, default_resumable_storage):
        try:
            found.add(os.path.abspath(default()))
        except ConfigError:
            pass
    return found


def ensure_temp_dir(
    path: str | os.PathLike[str], *, min_free_space: int = 0, mode: int = 0o700, parents: bool | None = None
) -> Health:
    """Create the directory if it is missing, then check it fully (with a write probe).

    Only the last component is created unless ``parents`` is true; ``None``
    (the default) creates parents only for uploadguard's default directories
    (the upload temp dir and the resumable storage under ``~/.cache`` and
    ``~/.local/share``).  A missing parent is ``missing``, with a detail
    naming it.  Meant for startup and for healing; it never raises for an
    unusable directory -- the caller decides what an unhealthy result means.
    """
    path = os.fspath(path)
    healed = False
    if not os.path.lexists(path):
        if parents is None:
            parents = os.path.abspath(path) in default_dirs()
        try:
            if parents:
                os.makedirs(path, mode=mode, exist_ok=True)
            else:
                os.mkdir(path, mode=mode)
            healed = True
        except FileExistsError:
            pass  # created meanwhile by another worker: checked below like any existing directory
        except OSError as exc:
            parent = os.path.dirname(os.path.abspath(path))
            if exc.errno == errno.ENOENT and not os.path.lexists(parent):
                return Health(path, Reason.MISSING, f"cannot create {path}: its parent directory {parent} does not "
                                                    "exist (uploadguard creates only the last component of a "
                                                    "configured path; check it for a typo, or create the parent)")
            # ENOENT here otherwise means a parent was unlinked: "missing", not healable.
            return Health(path, reason_for_errno(exc.errno) or Reason.IO_ERROR, f"cannot create {path}: {exc.strerror}")
    health = check_temp_dir(path, min_free_space=min_free_space)
    if health.ok:
        probe = probe_write(path)
        if not probe.ok:
            return probe
    return dataclasses.replace(health, healed=healed) if healed else health


def use_as_tempdir(path: str | os.PathLike[str]) -> None:
    """Point :mod:`tempfile` and ``TMPDIR`` at ``path`` for this process.

    Python caches the temp dir on first use (``tempfile.tempdir``) and forked
    workers inherit the master's cache, so a stale directory would stay
    broken in every worker; setting both makes Django, Werkzeug and any
    library spool where uploadguard looks after.
    """
    path = os.fspath(path)
    tempfile.tempdir = path
    os.environ["TMPDIR"] = path


class TempDirGuard:
    """The per-request preflight: cheap when healthy, heals a vanished directory.

    A full check is two system calls (~4 us on a small VM, more than the rest
    of the guard), so a healthy verdict is reused for ``check_interval``
    seconds while the directory's inode is unchanged (one ``lstat``: a
    deletion, replacement, ``chmod`` or ``chown`` is seen at once) and the
    bodies admitted meanwhile fit in the free space it measured.  What can
    still change inside the window (a remount read-only, space taken by
    others) is caught when the application's ``OSError`` reaches the
    middleware.  ``check_interval=0`` checks fully on every request.

    Thread-safe; healing is serialised so concurrent requests do not race to
    ``mkdir``.  A result with ``healed`` set means this call recreated the directory.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, min_free_space: int = 0, mode: int = 0o700,
        check_interval: float = 0.0,  # seconds
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.min_free_space = min_free_space
        self.mode = mode
        self.check_interval = check_interval
        if os.path.lexists(self.path):
            _seen.add(self.path)
        self._parents = self.path in default_dirs()  # decided once: the defaults follow the environment
        self._lock = threading.Lock()  # serialises healing
        self._budget_lock = threading.Lock()  # the cached verdict: its budget is checked and spent in one step
        self._healthy = Health(self.path)
        self._healthy_until = 0.0  # time.monotonic() deadline of the cached verdict
        self._budget = 0  # bytes that may still be admitted under the cached verdict
        self._identity: tuple[int, int, int, int] = (0, 0, 0, 0)  # the checked inode: ino, dev, mode, uid

    def __repr__(self) -> str:
        return f"<TempDirGuard {self.path!r}>"

    def cached(self, need: int = 0) -> Health | None:
        """The cached healthy verdict if it still holds for ``need`` more bytes, else ``None``.

        One ``lstat``, no more: the ASGI driver asks this on the event loop and
        sends only a miss (a full check, maybe a heal) to a thread.
        """
        if need <= self._budget and time.monotonic() < self._healthy_until:
            # One lstat still runs: deletion, replacement and chmod are the failures that
            # matter most, and they show in the inode's identity and mode.
            try:
                st = os.lstat(self.path)
            except OSError:
                st = None
            if st is not None and st.st_nlink:
                with self._budget_lock:
                    # Checked again and taken in one step: gthread requests admitted at once must not
                    # each spend the same bytes.
                    if ((st.st_ino, st.st_dev, st.st_mode, st.st_uid) == self._identity and need <= self._budget
                            and time.monotonic() < self._healthy_until):
                        self._budget -= need
                        return self._healthy
        return None

    def preflight(self, need: int = 0, *, fresh: bool = False) -> Health:
        """Check before a body of ``need`` bytes is read; recreate the dir if it vanished."""
        if not fresh:
            cached = self.cached(need)
            if cached is not None:
                return cached
        health = check_temp_dir(self.path, min_free_space=self.min_free_space, need=need)
        if health.reason is Reason.MISSING:
            health = self.heal(need)
        with self._budget_lock:
            self._healthy_until = 0.0
        if health.ok and self.check_interval > 0 and health.free_bytes is not None:
            try:
                st = os.lstat(self.path)
            except OSError:
                return health
            with self._budget_lock:
                self._identity = (st.st_ino, st.st_dev, st.st_mode, st.st_uid)
                self._healthy = dataclasses.replace(health, healed=False)
                self._budget = health.free_bytes - self.min_free_space - need
                self._healthy_until = time.monotonic() + self.check_interval
        return health

    def heal(self, need: int = 0) -> Health:
        """Create a missing directory (logged at INFO, counted) and probe it.

        A first creation makes only the last component: a missing parent is
        ``missing`` with a detail naming it (see :func:`ensure_temp_dir`), so a
        typo in a configured path is seen.  A directory this process saw exist
        is no typo: it is recreated with its parents (an ``rm -rf`` of the
        app's directory above it, a tmp cleaner), logged as "recreated".
        """
        with self._lock:
            existed = self.path in _seen
            health = ensure_temp_dir(self.path, min_free_space=self.min_free_space, mode=self.mode,
                                     parents=self._parents or existed)
            if health.healed and health.ok:
                if existed:
                    log.info("recreated missing upload temp dir %s", self.path)
                else:
                    log.info("created upload temp dir %s", self.path)
        if health.ok and need:
            healed = health.healed
            health = check_temp_dir(self.path, min_free_space=self.min_free_space, need=need)
            return dataclasses.replace(health, healed=healed)
        return health

    def owns(self, path: object) -> bool:
        """Whether an error's filename lies in the guarded directory."""
        return is_within(path, self.path)
