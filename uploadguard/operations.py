"""Housekeeping of the upload temp dir, for the ``uploadguard`` command and cron-like timers.

What the seed did by hand around the directory, made safe: removing stale
files (:func:`clean_old_files`, the ``find -mtime`` cron job without its
races), measuring disk usage for alerts (:func:`disk_usage`), and finding the
mount a path lives on (:func:`mount_of`, :func:`private_mount_namespace`) so
``doctor`` can tell a private ``/tmp`` from a shared one.  The per-request
check lives in :mod:`uploadguard.tempdir`; nothing here runs on a request.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import stat
import time

from .tempdir import is_within

__all__ = ["CleanResult", "DiskUsage", "Mount", "clean_old_files", "disk_usage", "mount_of", "private_mount_namespace"]

log = logging.getLogger("uploadguard")


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
        if any(_UPLOAD_INFO.fullmatch(name) for name in os.listdir(fd)):
            # Age is no measure there: a completed upload is the user's data until the application
            # took it, and an incomplete one expires by its own expiry, under its lock.
            raise ValueError(f"{path} holds resumable uploads (<id>.info files), not temp files: "
                             f"refusing to clean it by age; `uploadguard clean` without DIR removes "
                             f"the expired ones")
        same_fs = _SameFileSystem(os.fstat(fd).st_dev, frozenset(mount.mount_point for mount in _mounts()))
        _clean_dir(fd, path, same_fs, cutoff, dry_run, result, 0)
    finally:
        os.close(fd)
    return result


#: The info file of a resumable upload (``uploadguard.resumable.store``): such a directory is an upload store.
_UPLOAD_INFO = re.compile(r"[A-Za-z0-9_-]{24}\.info")


@dataclasses.dataclass(frozen=True)
class _SameFileSystem:
    """What a clean-up must not enter: another file system, or any mount point."""

    device: int
    mount_points: frozenset[str]

    def keeps_out(self, path: str, st: os.stat_result) -> bool:
        return st.st_dev != self.device or path in self.mount_points


def _clean_dir(fd: int, where: str, same_fs: _SameFileSystem, cutoff: float, dry_run: bool, result: CleanResult, depth: int) -> int:
    """Clean the directory open as ``fd``; return how many entries stay in it."""
    try:
        with os.scandir(fd) as listing:
            entries = list(listing)
    except OSError as exc:
        result.errors.append(f"cannot list {where}: {exc.strerror}")
        return 1
    if any(_UPLOAD_INFO.fullmatch(entry.name) for entry in entries):
        log.info("not cleaning %s by age: it holds resumable uploads", where)
        return len(entries)  # an upload store below DIR (e.g. the resumable storage inside the temp dir)
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
            if same_fs.keeps_out(sub, st) or depth >= _CLEAN_MAX_DEPTH:
                remaining += 1
                continue
            left = _clean_subdir(fd, name, st, sub, same_fs, cutoff, dry_run, result, depth + 1)
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
    parent: int, name: str, st: os.stat_result, where: str, same_fs: _SameFileSystem, cutoff: float, dry_run: bool,
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
        return _clean_dir(fd, where, same_fs, cutoff, dry_run, result, depth)
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
