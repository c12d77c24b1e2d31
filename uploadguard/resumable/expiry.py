"""Removing expired incomplete uploads, safely while others are in progress.

An upload expires ``expires_after`` seconds (stored per upload at creation)
after its last write; completed uploads never expire here (the application
took them in ``on_complete``, or removes them itself).  An upload whose lock
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

from .protocol import UploadNotFound
from .store import Store

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
    orphans: int = 0  # leftovers of uploads without info (a crash between two steps)
    errors: list[str] = dataclasses.field(default_factory=list)


def clean_expired(store: Store, *, now: float | None = None, dry_run: bool = False) -> CleanExpiredResult:
    """Remove every expired incomplete upload of ``store`` that nobody holds (locks from ``store.locker``)."""
    now = time.time() if now is None else now
    locker = store.locker
    result = CleanExpiredResult(str(getattr(store, "directory", store)))
    for info in store.expired(now):
        try:
            lock = locker.try_acquire(info.id)
        except FileNotFoundError:
            return result  # the directory vanished: nothing left to clean
        except OSError as exc:
            result.errors.append(f"cannot lock upload {info.id}: {exc.strerror}")
            continue
        if lock is None:
            result.busy += 1
            continue
        with lock:
            try:
                current = store.get(info.id)
            except UploadNotFound:
                continue
            if current.expires is None or current.expires >= now:
                continue  # written to since it was listed
            if not dry_run:
                try:
                    store.terminate(info.id)
                    locker.remove(lock)
                except OSError as exc:
                    result.errors.append(f"cannot remove upload {info.id}: {exc.strerror}")
                    continue
                log.info("removed expired upload %s (%d bytes)", info.id, current.offset)
            result.uploads += 1
            result.bytes += current.offset
    for upload_id in store.orphans(now - ORPHAN_AGE):
        if dry_run:
            result.orphans += 1
            continue
        try:
            lock = locker.try_acquire(upload_id)
        except FileNotFoundError:
            return result
        except OSError as exc:
            result.errors.append(f"cannot lock orphaned upload {upload_id}: {exc.strerror}")
            continue
        if lock is None:
            result.busy += 1
            continue
        with lock:
            try:
                store.get(upload_id)
                continue  # created after all (the info came after the listing)
            except UploadNotFound:
                pass
            try:
                store.terminate(upload_id)
                locker.remove(lock)
            except OSError as exc:
                result.errors.append(f"cannot remove orphaned upload {upload_id}: {exc.strerror}")
                continue
        log.info("removed the leftovers of upload %s (no info: a crash between two steps)", upload_id)
        result.orphans += 1
    return result
