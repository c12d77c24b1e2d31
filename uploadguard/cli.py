"""``uploadguard``: the operations command.

One tested tool instead of the seed's hand-made shell (a cron job deleting old
upload temp files, a ``df`` check mailing above 80 %, manual greps).  Installed
as the ``uploadguard`` console script; ``python -m uploadguard`` is the same.

``uploadguard clean [DIR] --older-than AGE [--dry-run] [--json]``
    Delete regular files and symbolic links not modified for ``AGE``
    (``90s``, ``30m``, ``24h``, ``7d``; at least a minute, so uploads in
    progress are safe) anywhere under ``DIR``, and old subdirectories left
    empty.  ``DIR`` itself stays.  Links are removed, never followed; nothing
    outside ``DIR`` or on another file system mounted below it is touched
    (see :func:`uploadguard.operations.clean_old_files`).  ``DIR`` defaults to
    the configured upload temp dir (``UPLOADGUARD_TEMP_DIR``), which is always
    a directory of uploadguard's own.  Prints one line: files and bytes removed.
    ``--dry-run`` removes nothing and says what it would remove.

``uploadguard check-disk [PATH ...] [--max-used PCT] [--max-inodes-used PCT] [--verbose] [--json]``
    Exit 1 and print one alert line per ``PATH`` whose file system is more
    than ``PCT`` percent full (default 80), in blocks or in inodes
    (``--max-inodes-used``, default: the same as ``--max-used``).  Usage is
    counted as ``df`` counts it: ``used / (used + available)``, where blocks
    reserved for root count as neither.  Quiet when all is well, so cron
    mails only alerts; ``--verbose`` prints a line per path anyway.  ``PATH``
    defaults to the configured upload temp dir.  A ``PATH`` that cannot be
    checked (missing, unreadable) gets an error line on stderr and the
    others are still checked and alerted on; the exit status is the worst
    one (2 over 1 over 0).

``uploadguard doctor [--temp-dir DIR] [--json]``
    Check the upload temp dir the way gunicorn's workers will use it, one
    line per check (``ok``, ``warn`` or ``FAIL`` with the fix): the settings
    parse; the directory exists, is a real directory (not a symlink, not
    deleted while mounted), has a safe owner and mode; a file can be created
    and removed; a body of the full size limit fits above the free-space
    floor; it lies outside ``/tmp`` and ``/var/tmp``; whether this process
    has a private ``/tmp`` (``PrivateTmp=``) and whether its backing
    directory was deleted; where :func:`tempfile.gettempdir` points (in this
    process: from a shell that is information, as gunicorn's workers with
    uploadguard's hooks point it at the upload temp dir themselves).  Run it
    as the service's user and with its environment -- the shipped unit runs
    it as ``ExecStartPre=`` so the answers land in the journal.

``--json`` prints one JSON object instead of the lines, for machines.

Exit status: ``0`` all well; ``1`` a problem was found (a file system over
the threshold, a failed check, files that could not be removed); ``2`` the
command could not run (bad arguments or settings, a missing ``DIR`` or
``PATH``; ``check-disk`` still checks its other paths first).  Errors are
one line on stderr, never a traceback.

Crontab, for hosts without systemd (with systemd, see ``examples/deploy/``)::

    UPLOADGUARD_TEMP_DIR=/var/cache/myapp/uploads
    17 * * * *   uploadguard clean --older-than 24h
    */5 * * * *  uploadguard check-disk /var/cache/myapp/uploads /var/lib/nginx --max-used 80
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, NamedTuple

from . import __version__
from .config import ConfigError, Settings, format_size, is_s3_url, parse_duration
from .errors import UploadGuardError
from .operations import clean_old_files, disk_usage, mount_of, private_mount_namespace
from .tempdir import Reason, check_temp_dir, default_dirs, is_within, probe_write

__all__ = ["Check", "MIN_AGE", "SHARED_TEMP_ROOTS", "doctor", "main"]

#: Ages below this would delete bodies still being received.
MIN_AGE = 60.0  # seconds
#: Directories systemd ages (systemd-tmpfiles) and makes private per service (PrivateTmp=).
SHARED_TEMP_ROOTS = ("/tmp", "/var/tmp")

_FIXES: dict[str, str] = {
    Reason.MISSING: "create it for the service's user (install -d -m 700 -o USER {path}), or let systemd "
               "(CacheDirectory=); uploadguard also recreates it on the next upload if its parent exists",
    Reason.NOT_A_DIRECTORY: "remove what is at {path}, or point UPLOADGUARD_TEMP_DIR at a directory",
    Reason.SYMLINK: "set UPLOADGUARD_TEMP_DIR to the real directory, {real}",
    Reason.UNLINKED: "the directory was deleted while mounted or in use: restart the service",
    Reason.WRONG_OWNER: "chown it to the user the app runs as; if it already is, run doctor as that user "
                   "(sudo -u USER uploadguard doctor)",
    Reason.INSECURE_MODE: "chmod 700 {path}",
    Reason.READ_ONLY: "the file system is read-only here; under ProtectSystem= add it to ReadWritePaths= "
                 "or use CacheDirectory=",
    Reason.NOT_WRITABLE: "give the service's user write access (chown USER {path}; chmod 700 {path}), "
                    "or ReadWritePaths= under ProtectSystem=",
    Reason.NO_SPACE: "free space (uploadguard clean {path} --older-than 24h) or move the temp dir to a bigger disk",
    Reason.NO_INODES: "remove stale files (uploadguard clean {path} --older-than 24h)",
    Reason.IO_ERROR: "look for disk errors in the kernel log (journalctl -k)",
}

#: The resumable storage's own advice where the temp dir's would be wrong: it is persistent data
#: (StateDirectory=, never an age-based clean-up), named by UPLOADGUARD_RESUMABLE_STORAGE.
_STORAGE_FIXES: dict[str, str] = {
    **_FIXES,
    Reason.MISSING: "create it for the service's user (install -d -m 700 -o USER {path}), or let systemd "
               "(StateDirectory=); uploadguard also creates it on the next resumable request if its parent exists",
    Reason.NOT_A_DIRECTORY: "remove what is at {path}, or point UPLOADGUARD_RESUMABLE_STORAGE at a directory",
    Reason.SYMLINK: "set UPLOADGUARD_RESUMABLE_STORAGE to the real directory, {real}",
    Reason.READ_ONLY: "the file system is read-only here; under ProtectSystem= add it to ReadWritePaths= "
                 "or use StateDirectory=",
    Reason.NO_SPACE: "free space: delete uploads the application has taken (delete_resumable), run "
                "`uploadguard clean` (no DIR: only expired ones), or move the storage to a bigger disk",
    Reason.NO_INODES: "delete uploads the application has taken, or run `uploadguard clean` (no DIR)",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``uploadguard`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_usage(sys.stderr)
        print("uploadguard: error: name a command: clean, check-disk or doctor", file=sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except ConfigError as exc:
        return _error(str(exc))
    except OSError as exc:  # something changed under a check (a path vanished meanwhile): still one line
        return _error(str(exc))


# -- clean ---------------------------------------------------------------------------


def _clean(args: argparse.Namespace) -> int:
    directory = args.dir or str(Settings.from_environ().temp_dir)
    storage = _local_resumable_storage()
    if storage is not None and args.dir:  # without DIR, a storage below the temp dir is skipped by the walk
        real, store = os.path.realpath(directory), os.path.realpath(storage)
        if is_within(real, store):  # a DIR holding it is fine: the walk skips every upload store
            return _error(f"{directory} holds the resumable uploads ({storage}): their files are not temp files "
                          f"-- completed ones are the users' data; `uploadguard clean` without DIR removes the "
                          f"expired ones")
    resumable_errors, resumable = _clean_resumable(args)
    try:
        result = clean_old_files(directory, older_than=args.older_than.seconds, dry_run=args.dry_run)
    except FileNotFoundError:
        return _error(f"{directory} does not exist")
    except OSError as exc:
        if os.path.islink(directory):
            return _error(f"{directory} is a symbolic link; name the real directory ({os.path.realpath(directory)})")
        if isinstance(exc, NotADirectoryError):
            return _error(f"{directory} is not a directory")
        return _error(f"cannot clean {directory}: {exc.strerror}")
    except ValueError as exc:
        return _error(str(exc))
    if args.json:
        _print_json({**dataclasses.asdict(result), "older_than": args.older_than.seconds, "dry_run": args.dry_run,
                     "resumable": resumable})
    else:
        verb = "would remove" if args.dry_run else "removed"
        dirs = f" and {result.directories} empty director{'y' if result.directories == 1 else 'ies'}"
        print(f"uploadguard clean: {verb} {result.files} file{'' if result.files == 1 else 's'} "
              f"({_human(result.bytes)}){dirs if result.directories else ''} older than "
              f"{args.older_than.text} from {result.path}")
    for message in result.errors:
        print(f"uploadguard clean: {message}", file=sys.stderr)
    return 1 if result.errors or resumable_errors else 0


def _local_resumable_storage() -> str | None:
    """The configured (or default) local resumable storage directory, if there is one."""
    try:
        storage = Settings.from_environ().effective_resumable_storage()
    except ConfigError:
        return None
    return None if is_s3_url(storage) else str(storage)


def _clean_resumable(args: argparse.Namespace) -> tuple[int, dict[str, Any] | None]:
    """Without ``DIR``, ``clean`` also removes expired incomplete resumable uploads.

    Returns the error count and what was removed (``None``: no storage to clean).

    Each upload expires by the ``expires_after`` it was created with (not
    ``--older-than``), a completed one by its ``keep_completed`` (uploads that
    recorded none: ``UPLOADGUARD_RESUMABLE_KEEP_COMPLETED``); an upload a
    request holds right now is left alone.
    """
    if args.dir:
        return 0, None
    try:
        settings = Settings.from_environ()
        directory = settings.effective_resumable_storage()
    except ConfigError:
        return 0, None  # no resumable storage configured and no default: nothing to clean
    from .resumable import LocalStore, S3Store, Store, clean_expired

    store: Store
    if is_s3_url(directory):
        store = S3Store(str(directory))
    elif os.path.isdir(directory):
        store = LocalStore(directory)
    else:
        return 0, None
    try:
        result = clean_expired(store, dry_run=args.dry_run, keep_completed=settings.resumable_keep_completed)
    except UploadGuardError as exc:  # the object storage failed (S3Unavailable)
        print(f"uploadguard clean: cannot clean {directory}: {getattr(exc, 'cause', '') or exc}", file=sys.stderr)
        return 1, None
    if not args.json:
        busy = f"; {result.busy} in use left alone" if result.busy else ""
        orphans = (f" and the leftovers of {result.orphans} upload{'' if result.orphans == 1 else 's'} "
                   f"a crash cut short" if result.orphans else "")
        completed = f", {result.completed} of them completed and unclaimed" if result.completed else ""
        print(f"uploadguard clean: {'would remove' if args.dry_run else 'removed'} {result.uploads} expired "
              f"resumable upload{'' if result.uploads == 1 else 's'} ({_human(result.bytes)}{completed}){orphans} "
              f"from {result.path}{busy}")
    for message in result.errors:
        print(f"uploadguard clean: {message}", file=sys.stderr)
    return len(result.errors), dataclasses.asdict(result)


# -- check-disk ----------------------------------------------------------------------


def _check_disk(args: argparse.Namespace) -> int:
    paths = args.paths
    if not paths:  # the temp dir, and the resumable storage, where completed uploads accumulate
        storage = _local_resumable_storage()
        paths = [str(Settings.from_environ().temp_dir)] + ([storage] if storage and os.path.isdir(storage) else [])
    max_inodes = args.max_used if args.max_inodes_used is None else args.max_inodes_used
    report: list[dict[str, Any]] = []
    alerts = failures = 0
    for path in paths:
        # A path that cannot be read must not hide an alert on the others (cron mails only stdout
        # alerts and stderr lines): check every path, report each failure, exit with the worst status.
        try:
            usage = disk_usage(path)
        except OSError as exc:
            failures += 1
            _error(f"cannot check {path}: {exc.strerror}")
            report.append({"path": path, "error": exc.strerror, "problems": []})
            continue
        problems = []
        if usage.used_percent > args.max_used:
            problems.append(f"{math.ceil(usage.used_percent)}% full (over {args.max_used:g}%), "
                            f"{_human(usage.free_bytes)} free of {_human(usage.total_bytes)}")
        inodes = usage.inodes_used_percent
        if inodes is not None and inodes > max_inodes:
            problems.append(f"{math.ceil(inodes)}% of inodes used (over {max_inodes:g}%), {usage.inodes_free} free")
        alerts += bool(problems)
        report.append({**dataclasses.asdict(usage), "used_percent": round(usage.used_percent, 2),
                       "inodes_used_percent": None if inodes is None else round(inodes, 2), "problems": problems})
        if args.json:
            continue
        if problems:
            print(f"uploadguard check-disk: ALERT {usage.path}: {'; '.join(problems)}")
        elif args.verbose:
            inode_text = "no inode limit" if inodes is None else f"{math.ceil(inodes)}% of inodes used"
            print(f"uploadguard check-disk: ok {usage.path}: {math.ceil(usage.used_percent)}% full, "
                  f"{_human(usage.free_bytes)} free of {_human(usage.total_bytes)}, {inode_text}")
    if args.json:
        _print_json({"ok": not alerts and not failures, "max_used": args.max_used, "max_inodes_used": max_inodes,
                     "paths": report})
    return 2 if failures else 1 if alerts else 0


# -- doctor --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of ``uploadguard doctor``: ``status`` is ``ok``, ``warn`` or ``FAIL``."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}" + (f" Fix: {self.fix}" if self.fix else "")


def doctor(settings: Settings) -> list[Check]:
    """Check the upload temp dir and its surroundings for this process; see the module docs."""
    path = str(settings.temp_dir)
    checks = []
    health = check_temp_dir(path)
    if not health.ok:
        reason = health.reason or Reason.IO_ERROR
        fix = _FIXES.get(reason, "").format(path=path, real=os.path.realpath(path))
        checks.append(Check("temp_dir", "FAIL", f"{health.detail}{_missing_parent(path)} ({reason}).", fix))
    else:
        st = os.lstat(path)
        checks.append(Check("temp_dir", "ok", f"{path} is a directory owned by uid {st.st_uid}, "
                                              f"mode {stat.S_IMODE(st.st_mode):o}."))
        probe = probe_write(path)
        if probe.ok:
            checks.append(Check("write", "ok", f"created and removed a file in {path}."))
        else:
            checks.append(Check("write", "FAIL", f"{probe.detail} ({probe.reason}).",
                                _FIXES.get(probe.reason or "", "").format(path=path, real=path)))
        checks.append(_space_check(settings))
    checks.append(_location_check(path))
    checks.append(_private_tmp_check(path))
    checks.append(_tempfile_check(path))
    checks.append(_storage_check(settings))
    return checks


def _storage_check(settings: Settings) -> Check:
    """The resumable uploads' storage, judged as the endpoint judges it (and where it must not be)."""
    try:
        storage = settings.effective_resumable_storage()
    except ConfigError as exc:
        return Check("resumable_storage", "warn", f"{exc}.", "only if you use resumable uploads")
    if is_s3_url(storage):
        return Check("resumable_storage", "ok", f"{storage} (S3: every request checks the bucket).")
    path = str(storage)
    real = os.path.realpath(path)
    chosen = settings.resumable_storage is not None or os.path.lexists(path)  # not just a default nobody uses
    for root in SHARED_TEMP_ROOTS:
        if is_within(real, root):
            return Check("resumable_storage", "FAIL" if chosen else "warn",
                         f"{path} is under {root}: uploads in progress and completed ones are aged by "
                         f"systemd-tmpfiles and lost with PrivateTmp=.",
                         "use persistent storage, e.g. StateDirectory=myapp/uploads with "
                         "UPLOADGUARD_RESUMABLE_STORAGE=/var/lib/myapp/uploads")
    if not os.path.lexists(path):
        missing = _missing_parent(path)
        if missing:
            return Check("resumable_storage", "FAIL", f"{path} does not exist{missing}.",
                         _STORAGE_FIXES[Reason.MISSING].format(path=path, real=real))
        return Check("resumable_storage", "ok", f"{path} does not exist yet; the first resumable request creates it.")
    health = check_temp_dir(path)
    if not health.ok:
        reason = health.reason or Reason.IO_ERROR
        return Check("resumable_storage", "FAIL", f"{health.detail} ({reason}).",
                     _STORAGE_FIXES.get(reason, "").format(path=path, real=real))
    probe = probe_write(path)
    if not probe.ok:
        return Check("resumable_storage", "FAIL", f"{probe.detail} ({probe.reason}).",
                     _STORAGE_FIXES.get(probe.reason or "", "").format(path=path, real=path))
    return Check("resumable_storage", "ok", f"{path} is a usable directory, {_human(disk_usage(path).free_bytes)} free.")


def _space_check(settings: Settings) -> Check:
    path = str(settings.temp_dir)
    need = settings.max_body_size
    health = check_temp_dir(path, min_free_space=settings.min_free_space, need=need)
    usage = disk_usage(path)
    inodes = "no inode limit" if not usage.inodes_total else f"{usage.inodes_free} inodes free"
    wanted = (f"a full {format_size(need)} upload" if need else "an upload (no size limit)") + \
        f" plus the {format_size(settings.min_free_space)} floor"
    if health.reason in (Reason.NO_SPACE, Reason.NO_INODES):
        return Check("space", "FAIL", f"{_human(usage.free_bytes)} free, {inodes}: {wanted} does not fit "
                                      f"({health.reason}).", _FIXES[health.reason].format(path=path))
    return Check("space", "ok", f"{_human(usage.free_bytes)} free, {inodes}: {wanted} fits.")


def _missing_parent(path: str) -> str:
    """``", nor does its parent ..."`` when uploadguard would not create ``path`` for want of its parent, else ``""``."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(parent) or os.path.abspath(path) in default_dirs():
        return ""
    return (f", nor does its parent directory {parent}: uploadguard creates only the last component of a "
            "configured path (check it for a typo)")


def _location_check(path: str) -> Check:
    real = os.path.realpath(path)
    for root in SHARED_TEMP_ROOTS:
        if is_within(real, root):
            return Check("location", "warn",
                         f"{path} is under {root}: systemd-tmpfiles ages its files and PrivateTmp= gives each "
                         f"service its own {root}, which can vanish under running workers.",
                         "use a dedicated directory, e.g. CacheDirectory=myapp/uploads with "
                         "UPLOADGUARD_TEMP_DIR=/var/cache/myapp/uploads")
    return Check("location", "ok", f"{path} is outside {' and '.join(SHARED_TEMP_ROOTS)}.")


def _private_tmp_check(path: str) -> Check:
    tmp = mount_of("/tmp")
    own_namespace = private_mount_namespace()
    bound = tmp is not None and tmp.mount_point == "/tmp" and tmp.root != "/"
    if tmp is not None and bound and tmp.deleted:
        uses_tmp = is_within(os.path.realpath(path), "/tmp") or is_within(_gettempdir() or "", "/tmp")
        return Check("private_tmp", "FAIL" if uses_tmp else "warn",
                     f"this process's /tmp is a bind mount of {tmp.root}, deleted on the host: "
                     "every file created in /tmp fails with ENOENT.",
                     "restart the service; keep uploads out of /tmp (UPLOADGUARD_TEMP_DIR)")
    if bound and tmp is not None:
        return Check("private_tmp", "ok", f"/tmp is private to this process (a bind mount of {tmp.root}); "
                                          "its files vanish when the service restarts.")
    if own_namespace:
        return Check("private_tmp", "ok", "this process has its own mount namespace; /tmp is not a bind mount.")
    known = "unknown (PID 1's namespace is not readable)" if own_namespace is None else "no"
    return Check("private_tmp", "ok", f"/tmp is not a bind mount; own mount namespace: {known}.")


def _gettempdir() -> str | None:
    try:
        return tempfile.gettempdir()
    except OSError:  # FileNotFoundError: no usable temporary directory at all
        return None


def _in_gunicorn() -> bool:
    """Whether this process runs under gunicorn: its arbiter sets ``SERVER_SOFTWARE`` for itself and its workers."""
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn")


def _tempfile_check(path: str) -> Check:
    """Where :func:`tempfile.gettempdir` points in *this* process, and what that says about the server's.

    Run from a shell (or ``ExecStartPre=``), this process's temp dir is not
    the workers': gunicorn workers started with uploadguard's hooks point
    :mod:`tempfile` and ``TMPDIR`` at the upload temp dir in
    ``post_worker_init``, so a different one here is information, not a
    problem.  Inside a gunicorn process (``doctor()`` called by the app) it
    is a warning: the hooks did not run.
    """
    current = _gettempdir()
    if current is None:
        return Check("tempfile", "FAIL", "tempfile.gettempdir() finds no usable directory "
                                         "($TMPDIR, /tmp, /var/tmp, /usr/tmp and the working directory all fail).",
                     f"set TMPDIR={path}")
    if os.path.realpath(current) == os.path.realpath(path):
        return Check("tempfile", "ok", f"tempfile.gettempdir() is the upload temp dir ({current}).")
    if not _in_gunicorn():
        source = f"TMPDIR={os.environ['TMPDIR']}" if os.environ.get("TMPDIR") else "TMPDIR is unset"
        return Check("tempfile", "ok",
                     f"this shell's temp dir (tempfile.gettempdir()) is {current} ({source}), not {path}; "
                     f"it does not apply to the server: gunicorn workers started with uploadguard's hooks "
                     f"(gunicorn_conf.py or python:uploadguard.gunicorn) point tempfile and TMPDIR at {path} "
                     f"themselves, and so does uploadguard.asgi.UploadGuard (uvicorn, gunicorn -k asgi) in the "
                     f"process it guards. Under another WSGI server (uWSGI, manage.py runserver) set TMPDIR={path} "
                     "in its environment.")
    return Check("tempfile", "warn",
                 f"tempfile.gettempdir() is {current}, not {path}: libraries that spool with tempfile "
                 "(Django, Werkzeug) write there unless the app's processes are pointed at the upload temp dir.",
                 f"run gunicorn with uploadguard's hooks (they call use_as_tempdir), or set TMPDIR={path}")


def _doctor(args: argparse.Namespace) -> int:
    checks = []
    try:
        settings = Settings.from_environ(temp_dir=args.temp_dir)
        checks.append(Check("settings", "ok", f"{settings.describe()} (uid {os.geteuid()})."))
    except ConfigError as exc:
        fallback = args.temp_dir or os.environ.get("UPLOADGUARD_TEMP_DIR") or None
        settings = Settings.from_environ({}, temp_dir=fallback)
        checks.append(Check("settings", "FAIL", f"{exc}.", "fix the variable; checking with the defaults meanwhile"))
    checks += doctor(settings)
    failed = any(check.status == "FAIL" for check in checks)
    if args.json:
        _print_json({"ok": not failed, "temp_dir": str(settings.temp_dir),
                     "checks": [dataclasses.asdict(check) for check in checks]})
    else:
        for check in checks:
            print(check.line())
    return 1 if failed else 0


# -- plumbing ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uploadguard", description="Operations for uploadguard: clean old temp files, check disks, diagnose.")
    parser.add_argument("--version", action="version", version=f"uploadguard {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    clean = commands.add_parser("clean", help="delete files older than an age under a directory",
                                description="Delete regular files and symlinks not modified for AGE under DIR "
                                            "(never following links), and old empty subdirectories.")
    clean.add_argument("dir", nargs="?", metavar="DIR", help="default: the configured upload temp dir")
    clean.add_argument("--older-than", required=True, type=_age_arg, metavar="AGE",
                       help="e.g. 90s, 30m, 24h, 7d (at least 1m)")
    clean.add_argument("--dry-run", action="store_true", help="remove nothing; say what would be removed")
    clean.add_argument("--json", action="store_true", help="print one JSON object")
    clean.set_defaults(run=_clean)

    disk = commands.add_parser("check-disk", help="alert when a file system is too full",
                               description="Exit 1 with an alert line per PATH over the threshold; quiet otherwise.")
    disk.add_argument("paths", nargs="*", metavar="PATH",
                      help="default: the configured upload temp dir and local resumable storage")
    disk.add_argument("--max-used", type=_percent_arg, default=80.0, metavar="PCT",
                      help="highest acceptable block usage in percent (default 80)")
    disk.add_argument("--max-inodes-used", type=_percent_arg, default=None, metavar="PCT",
                      help="highest acceptable inode usage in percent (default: --max-used)")
    disk.add_argument("--verbose", "-v", action="store_true", help="print a line for every path")
    disk.add_argument("--json", action="store_true", help="print one JSON object")
    disk.set_defaults(run=_check_disk)

    doc = commands.add_parser("doctor", help="check the upload temp dir and its surroundings",
                              description="One line per check (ok, warn, FAIL with the fix); exit 1 on any FAIL.")
    doc.add_argument("--temp-dir", metavar="DIR", help="default: UPLOADGUARD_TEMP_DIR")
    doc.add_argument("--json", action="store_true", help="print one JSON object")
    doc.set_defaults(run=_doctor)
    return parser


class _Age(NamedTuple):
    seconds: float
    text: str  # as given, for the report


def _age_arg(value: str) -> _Age:
    try:
        seconds = parse_duration(value, name="--older-than")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds < MIN_AGE:
        raise argparse.ArgumentTypeError(f"--older-than={value!r} is under a minute; "
                                         "that would delete uploads still being received")
    return _Age(seconds, value.strip())


def _percent_arg(value: str) -> float:
    try:
        percent = float(value.strip().rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a percentage") from None
    if not 0 <= percent <= 100:
        raise argparse.ArgumentTypeError(f"{value!r} is not between 0 and 100")
    return percent


def _error(message: str) -> int:
    print(f"uploadguard: error: {message}", file=sys.stderr)
    return 2


def _print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, default=str))


def _human(size: int) -> str:
    """``1536`` -> ``"1.5K"``: binary units, one decimal, as ``df -h`` shows them."""
    value, unit = float(size), "B"
    for bigger in "KMGT":
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f}{unit}" if unit == "B" or value >= 100 else f"{value:.1f}{unit}"

