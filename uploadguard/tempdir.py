"""The temp-dir guard: keep the upload temp directory usable, or say why not.

The failure this exists for: under systemd's ``PrivateTmp=`` some gunicorn
workers lost their ``/tmp`` and every upload they took died with
``FileNotFoundError``.  This module checks the directory cheaply before a
request body is spooled, recreates it when it has merely vanished, and
otherwise names the reason it cannot be used, so the middleware can answer a
retryable 503 instead of a 500 or a dropped connection.

Reasons (also the ``reason`` of :class:`~uploadguard.errors.TempDirUnavailable`
and the metrics label):

``missing``          the path does not exist and could not be recreated
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
import re
import stat
import tempfile
import threading
import time

__all__ = [
    "Health",
    "Reason",
    "TempDirGuard",
    "check_temp_dir",
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


def ensure_temp_dir(
    path: str | os.PathLike[str], *, min_free_space: int = 0, mode: int = 0o700
) -> Health:
    """Create the directory if it is missing, then check it fully (with a write probe).

    Meant for startup and for healing; it never raises for an unusable
    directory -- the caller decides what an unhealthy result means.
    """
    path = os.fspath(path)
    healed = False
    if not os.path.lexists(path):
        try:
            os.makedirs(path, mode=mode, exist_ok=True)
            healed = True
        except OSError as exc:
            # ENOENT here means a parent is gone or unlinked: "missing", not healable.
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
        self._lock = threading.Lock()
        self._healthy = Health(self.path)
        self._healthy_until = 0.0  # time.monotonic() deadline of the cached verdict
        self._budget = 0  # bytes that may still be admitted under the cached verdict
        self._identity: tuple[int, int, int, int] = (0, 0, 0, 0)  # the checked inode: ino, dev, mode, uid

    def __repr__(self) -> str:
        return f"<TempDirGuard {self.path!r}>"

    def preflight(self, need: int = 0, *, fresh: bool = False) -> Health:
        """Check before a body of ``need`` bytes is read; recreate the dir if it vanished."""
        if not fresh and need <= self._budget and time.monotonic() < self._healthy_until:
            # One lstat still runs: deletion, replacement and chmod are the failures that
            # matter most, and they show in the inode's identity and mode.
            try:
                st = os.lstat(self.path)
            except OSError:
                st = None
            if st is not None and st.st_nlink and (st.st_ino, st.st_dev, st.st_mode, st.st_uid) == self._identity:
                self._budget -= need
                return self._healthy
        health = check_temp_dir(self.path, min_free_space=self.min_free_space, need=need)
        if health.reason is Reason.MISSING:
            health = self.heal(need)
        self._healthy_until = 0.0
        if health.ok and self.check_interval > 0 and health.free_bytes is not None:
            try:
                st = os.lstat(self.path)
            except OSError:
                return health
            self._identity = (st.st_ino, st.st_dev, st.st_mode, st.st_uid)
            self._healthy = dataclasses.replace(health, healed=False)
            self._budget = health.free_bytes - self.min_free_space - need
            self._healthy_until = time.monotonic() + self.check_interval
        return health

    def heal(self, need: int = 0) -> Health:
        """Recreate a missing directory (logged at INFO, counted) and probe it."""
        with self._lock:
            health = ensure_temp_dir(self.path, min_free_space=self.min_free_space, mode=self.mode)
            if health.healed and health.ok:
                log.info("recreated missing upload temp dir %s", self.path)
        if health.ok and need:
            healed = health.healed
            health = check_temp_dir(self.path, min_free_space=self.min_free_space, need=need)
            return dataclasses.replace(health, healed=healed)
        return health

    def owns(self, path: object) -> bool:
        """Whether an error's filename lies in the guarded directory."""
        return is_within(path, self.path)



# -- operations: stale-file cleanup, disk usage, mounts (used by ``uploadguard`` the CLI) --

__all__ += ["CleanResult", "DiskUsage", "Mount", "clean_old_files", "disk_usage", "mount_of", "private_mount_namespace"]

#: Subdirectories deeper than this are left alone (each level holds a file descriptor).
_CLEAN_MAX_DEPTH = 64
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass
class CleanResult:
    """What :func:`clean_old_files` removed (or would remove, with ``dry_run``)."""

    path: str
    files: int = 0  # regular files and symbolic links
    directories: int = 0  # old subdirectories left empty
    bytes: int = 0  # apparent size of the removed regular files
    errors: list[str] = dataclasses.field(default_factory=list)


def clean_old_files(
    directory: str | os.PathLike[str], *, older_than: float, dry_run: bool = False, now: float | None = None
) -> CleanResult:
    """Remove files not modified for ``older_than`` seconds anywhere below ``directory``.

    What the seed's cron ``find -mtime`` did, without its races:

    * regular files and symbolic links whose ``mtime`` (of the link itself) is
      older than the cutoff are unlinked; a link's target is never touched;
    * a subdirectory is removed when it was old before the run and is empty
      after it; ``directory`` itself always stays;
    * the walk holds a file descriptor per level and opens each subdirectory
      relative to its parent with ``O_NOFOLLOW``, checking it is the directory
      it listed, so a directory swapped for a symlink mid-walk cannot lead
      outside; nothing mounted below is entered -- other file systems (a
      different ``st_dev``) nor bind mounts (same ``st_dev``, so they are found
      in ``/proc/self/mountinfo``);
    * entries that vanish meanwhile are skipped; other failures are collected
      in ``errors`` and the walk goes on.

    ``directory`` must be a real directory: its parent path is resolved, but
    if the directory itself is a symlink :class:`OSError` (``ELOOP``) is raised,
    as for a missing one (``FileNotFoundError``) or a file (``NotADirectoryError``).
    """
    if not older_than > 0:
        raise ValueError(f"older_than={older_than!r} must be a positive number of seconds")
    absolute = os.path.abspath(os.fspath(directory))
    path = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    if path == os.sep:
        raise ValueError("refusing to clean the root directory")
    cutoff = (time.time() if now is None else now) - older_than
    result = CleanResult(path)
    fd = os.open(path, _OPEN_DIR)
    try:
        fence = _Fence(os.fstat(fd).st_dev, frozenset(mount.mount_point for mount in _mounts()))
        _clean_dir(fd, path, fence, cutoff, dry_run, result, 0)
    finally:
        os.close(fd)
    return result


@dataclasses.dataclass(frozen=True)
class _Fence:
    """What a clean-up must not enter: another file system, or any mount point."""

    device: int
    mount_points: frozenset[str]

    def keeps_out(self, path: str, st: os.stat_result) -> bool:
        return st.st_dev != self.device or path in self.mount_points


def _clean_dir(fd: int, where: str, fence: _Fence, cutoff: float, dry_run: bool, result: CleanResult, depth: int) -> int:
    """Clean the directory open as ``fd``; return how many entries stay in it."""
    try:
        with os.scandir(fd) as listing:
            entries = list(listing)
    except OSError as exc:
        result.errors.append(f"cannot list {where}: {exc.strerror}")
        return 1
    remaining = 0
    for entry in entries:
        name = entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            result.errors.append(f"cannot stat {os.path.join(where, name)}: {exc.strerror}")
            remaining += 1
            continue
        old = st.st_mtime < cutoff
        if stat.S_ISDIR(st.st_mode):
            sub = os.path.join(where, name)
            if fence.keeps_out(sub, st) or depth >= _CLEAN_MAX_DEPTH:
                remaining += 1
                continue
            left = _clean_subdir(fd, name, st, sub, fence, cutoff, dry_run, result, depth + 1)
            if left is None:
                continue
            if left == 0 and old:
                removed = _remove(fd, name, where, directory=True, dry_run=dry_run, result=result)
                if removed:
                    result.directories += 1
                if removed is not False:
                    continue
        elif (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) and old:
            removed = _remove(fd, name, where, directory=False, dry_run=dry_run, result=result)
            if removed:
                result.files += 1
                result.bytes += st.st_size if stat.S_ISREG(st.st_mode) else 0
            if removed is not False:
                continue
        remaining += 1
    return remaining


def _clean_subdir(
    parent: int, name: str, st: os.stat_result, where: str, fence: _Fence, cutoff: float, dry_run: bool,
    result: CleanResult, depth: int,
) -> int | None:
    """Open ``name`` below ``parent`` without following links and clean it.

    Returns how many entries stay in it, or ``None`` if it vanished meanwhile.
    A directory swapped for something else since it was listed is left alone.
    """
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            log.info("%s was replaced while being cleaned; left alone", where)
        else:
            result.errors.append(f"cannot open {where}: {exc.strerror}")
        return 1
    try:
        if not os.path.samestat(st, os.fstat(fd)):
            log.info("%s was replaced while being cleaned; left alone", where)
            return 1
        return _clean_dir(fd, where, fence, cutoff, dry_run, result, depth)
    finally:
        os.close(fd)


def _remove(fd: int, name: str, where: str, *, directory: bool, dry_run: bool, result: CleanResult) -> bool | None:
    """Remove ``name`` below ``fd``: ``True`` done, ``None`` already gone, ``False`` kept."""
    if dry_run:
        return True
    try:
        if directory:
            os.rmdir(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # a new file arrived: keep the directory
            result.errors.append(f"cannot remove {os.path.join(where, name)}: {exc.strerror}")
        return False
    return True


@dataclasses.dataclass(frozen=True)
class DiskUsage:
    """Space and inodes of the file system holding ``path``, counted as ``df`` counts them."""

    path: str
    total_bytes: int
    used_bytes: int
    free_bytes: int  # available to unprivileged users
    inodes_total: int  # 0: the file system has no fixed inode table (btrfs, some network FS)
    inodes_used: int
    inodes_free: int

    @property
    def used_percent(self) -> float:
        """``used / (used + available)``: blocks reserved for root count as neither, as in ``df``."""
        usable = self.used_bytes + self.free_bytes
        return 100.0 * self.used_bytes / usable if usable else 0.0

    @property
    def inodes_used_percent(self) -> float | None:
        """Used inodes in percent, ``None`` without an inode table."""
        return 100.0 * self.inodes_used / self.inodes_total if self.inodes_total else None


def disk_usage(path: str | os.PathLike[str]) -> DiskUsage:
    """``statvfs`` of ``path`` as a :class:`DiskUsage`; raises :class:`OSError`."""
    path = os.fspath(path)
    vfs = os.statvfs(path)
    return DiskUsage(
        path=path,
        total_bytes=vfs.f_blocks * vfs.f_frsize,
        used_bytes=(vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize,
        free_bytes=vfs.f_bavail * vfs.f_frsize,
        inodes_total=vfs.f_files,
        inodes_used=vfs.f_files - vfs.f_ffree,
        inodes_free=vfs.f_ffree,
    )


@dataclasses.dataclass(frozen=True)
class Mount:
    """A line of ``/proc/self/mountinfo``: what is mounted where."""

    mount_point: str
    root: str  # the directory of the source file system shown here: "/" unless a bind mount of a subdirectory
    fs_type: str
    source: str

    @property
    def deleted(self) -> bool:
        """The bind-mounted directory was deleted at its source (the kernel appends ``//deleted``)."""
        return self.root.endswith("//deleted")


_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """Every line of ``mountinfo``, in mount order; empty if it cannot be read."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        mounts.append(Mount(_unescape(fields[4]), _unescape(fields[3]), fields[sep + 1], _unescape(fields[sep + 2])))
    return mounts


def mount_of(path: str | os.PathLike[str], *, mountinfo: str = "/proc/self/mountinfo") -> Mount | None:
    """The mount ``path`` lies on in this process's mount namespace; ``None`` if unknown.

    Under systemd's ``PrivateTmp=``, ``mount_of("/tmp").root`` is the host
    directory ``/tmp/systemd-private-…/tmp``; once that is deleted it ends in
    ``//deleted`` and every file created in ``/tmp`` fails with ``ENOENT``.
    """
    target = os.path.abspath(os.fspath(path))
    best: Mount | None = None
    for mount in _mounts(mountinfo):
        # Later lines are mounted on top of earlier ones, so ">=" keeps the visible one.
        if is_within(target, mount.mount_point) and (best is None or len(mount.mount_point) >= len(best.mount_point)):
            best = mount
    return best


def private_mount_namespace() -> bool | None:
    """Whether this process has a mount namespace of its own (as under ``PrivateTmp=``).

    ``None`` when PID 1's namespace cannot be read (not root, or ``/proc`` hidden).
    """
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt")
    except OSError:
        return None
