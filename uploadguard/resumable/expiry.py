"""Removing expired incomplete uploads and unclaimed completed ones, safely while others are in progress.

An incomplete upload expires ``expires_after`` seconds (stored per upload at
creation) after its last write.  A completed upload the application has not
deleted is removed ``keep_completed`` seconds (also stored at creation; 0 =
never) after it completed: the documented flows take the file in
``on_complete`` or a form's view and delete it, so what is left that long is
an upload no form ever claimed (an ``Upload-Length: 0`` creation completes at
once), and would otherwise stay for good.  An upload whose lock
is held -- a PATCH is writing it right now -- is never touched: the lock is
taken without waiting, the expiry checked again under it, and only then are
the files removed (info first, so the upload is unknown from that moment).

It also removes *orphans*: what a crash between two steps left of an upload
that has no info (a create that died before writing it, a termination that
died after deleting it) -- data, parts, multipart uploads, locks -- once all
of it is :data:`ORPHAN_AGE` old, far longer than any step takes.  No request
can reach an orphan, so without this nothing would ever remove it.

Called by ``uploadguard clean`` (see :mod:`uploadguard.cli`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from ..errors import UploadGuardError
from .protocol import UploadNotFound
from .store import Store, UploadInfo

__all__ = ["CleanExpiredResult", "clean_expired"]

log = logging.getLogger("uploadguard")

ORPHAN_AGE = 3600.0  # seconds; also covers the skew between this host's clock and S3's


@dataclasses.dataclass
class CleanExpiredResult:
    """What :func:`clean_expired` removed (or would remove, with ``dry_run``)."""

    path: str
    uploads: int = 0
    bytes: int = 0
    busy: int = 0  # expired but locked by a request in progress: left alone
    completed: int = 0  # of ``uploads``: completed ones past their keep_completed
    orphans: int = 0  # leftovers of uploads without info (a crash between two steps)
    stray_parts: int = 0  # incomplete parts no info names (S3): a PATCH that could not commit its part
    errors: list[str] = dataclasses.field(default_factory=list)


def clean_expired(store: Store, *, now: float | None = None, dry_run: bool = False,
                  keep_completed: float = 0.0) -> CleanExpiredResult:
    """Remove every expired incomplete upload of ``store``, and every completed one past its
    ``keep_completed``, that nobody holds (locks from ``store.locker``), and the leftovers of uploads
    without info.

    ``keep_completed`` (seconds; 0 = keep) applies to completed uploads whose
    info recorded none (written before uploadguard recorded it); ``uploadguard
    clean`` passes ``UPLOADGUARD_RESUMABLE_KEEP_COMPLETED``.  A failure on one
    upload (a file system error, S3 failing) is reported in ``errors`` and the
    rest are still cleaned.
    """
    now = time.time() if now is None else now
    result = CleanExpiredResult(str(getattr(store, "directory", store)))

    def due(info: UploadInfo) -> bool:
        expires = info.expires
        if expires is not None and expires < now:
            return True
        discard = info.discard_at(keep_completed)
        return discard is not None and discard < now

    def expired_still(upload_id: str) -> int | None:
        try:
            current = store.get(upload_id)
        except UploadNotFound:
            return None
        if not due(current):
            return None  # written to since it was listed
        return current.offset

    def orphaned_still(upload_id: str) -> int | None:
        try:
            store.get(upload_id)
        except UploadNotFound:
            return 0
        return None  # created after all (the info came after the listing)

    try:
        for info in store.uploads():
            if not due(info):
                continue
            removed = _remove(store, info.id, expired_still, result, dry_run=dry_run)
            if removed is not None:
                if not dry_run:
                    log.info("removed %s upload %s (%d bytes)",
                             "completed, unclaimed" if info.completed and not info.partial else "expired",
                             info.id, removed)
                result.uploads += 1
                result.bytes += removed
                if info.completed and not info.partial:
                    result.completed += 1
    except _StoreGone:
        return result
    sweep = getattr(store, "remove_stray_parts", None)  # stores that keep parts beside the info (S3)
    if sweep is not None and not dry_run:
        try:
            result.stray_parts = sweep(now - ORPHAN_AGE)
        except (OSError, UploadGuardError) as exc:
            result.errors.append(f"cannot remove stray parts: {_why(exc)}")
    try:
        for upload_id in store.orphans(now - ORPHAN_AGE):
            if _remove(store, upload_id, orphaned_still, result, dry_run=dry_run) is not None:
                if not dry_run:
                    log.info("removed the leftovers of upload %s (no info: a crash between two steps)", upload_id)
                result.orphans += 1
    except _StoreGone:
        pass
    return result


class _StoreGone(Exception):
    """The store's directory vanished mid-clean: nothing is left to clean."""


def _remove(store: Store, upload_id: str, still: Callable[[str], int | None], result: CleanExpiredResult, *,
            dry_run: bool) -> int | None:
    """Under the upload's lock, terminate it if ``still`` says so; the bytes it had, or ``None`` if left."""
    locker = store.locker
    try:
        if dry_run:
            return still(upload_id)
        lock = locker.try_acquire(upload_id)
    except FileNotFoundError:
        raise _StoreGone from None
    except (OSError, UploadGuardError) as exc:
        result.errors.append(f"cannot lock upload {upload_id}: {_why(exc)}")
        return None
    if lock is None:
        result.busy += 1
        return None
    with lock:
        try:
            size = still(upload_id)
            if size is None:
                return None
            store.terminate(upload_id)
            locker.remove(lock)
        except (OSError, UploadGuardError) as exc:
            result.errors.append(f"cannot remove upload {upload_id}: {_why(exc)}")
            return None
    return size


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "detail", None) or str(exc)
