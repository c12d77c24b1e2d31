"""Resumable uploads (tus 1.0 and the IETF draft) on the guarded stack.

A dropped connection costs seconds, not the upload: the client asks how far
the server got (``HEAD``) and sends the rest (``PATCH``).  Real clients speak
this protocol -- tus-js-client, Uppy, tuspy, TUSKit, tus-android-client -- and
Apple's URLSession speaks its IETF successor.

Plain WSGI::

    from uploadguard.resumable import ResumableUploads

    def stored(upload):            # called once per completed upload, after fsync
        shutil.move(upload.path, f"/srv/media/{upload.id}")   # or upload.open()

    application = ResumableUploads(application, on_complete=stored)
    # later, e.g. when a form names the upload URL:
    upload = application.get(request.POST["upload_url"], owner=user_id)

On ASGI (FastAPI, Starlette, Django ASGI; uvicorn or ``gunicorn -k asgi``) the same
endpoint, keywords and storage are :class:`uploadguard.resumable.asgi.ResumableUploads`.
Both drivers run one protocol: :mod:`.core` composes the answers, :mod:`.engine`
orders the store and lock calls, :mod:`.wsgi` and :mod:`.asgi` move the bytes.

Parameters of :class:`ResumableUploads` (keyword-only; ``None`` takes the
value from :class:`~uploadguard.config.Settings`, i.e. ``UPLOADGUARD_*``):

``prefix``         URL path of the endpoint (default ``/files/``); requests under it
                   are the endpoint, everything else goes to the wrapped app.
``storage``        directory of the uploads (``UPLOADGUARD_RESUMABLE_STORAGE``, default
                   ``~/.local/share/uploadguard/uploads``): persistent storage shared by
                   every worker, not ``/tmp``.  Or ``s3://bucket/prefix`` for several
                   hosts (:mod:`uploadguard.resumable.s3`, ``pip install uploadguard[s3]``),
                   or a :class:`Store` (e.g. an :class:`S3Store` with its own options).
``max_size``       largest upload in bytes or ``"200M"`` (default: ``UPLOADGUARD_MAX_BODY_SIZE``);
                   ``0`` = no limit.
``expires_after``  seconds (or ``"24h"``) of inactivity after which an *incomplete*
                   upload expires (``UPLOADGUARD_RESUMABLE_EXPIRES_AFTER``, default 24 h;
                   0 = never).  Requests for it get 410; ``uploadguard clean`` removes it.
``on_complete``    ``on_complete(upload)``, see below.
``keep_completed`` seconds (or ``"7d"``) a *completed* upload the application has not
                   deleted is kept after it completed (``UPLOADGUARD_RESUMABLE_KEEP_COMPLETED``,
                   default 7 days; 0 = until the application deletes it).  Then requests
                   for it get 410 and ``uploadguard clean`` removes it.  Finite by default
                   because an ``Upload-Length: 0`` creation completes at once: unbounded,
                   uploads no form ever claims would fill the storage.  The documented
                   flows take the file in ``on_complete`` (copy or move it) or in the
                   form's view and then delete the upload, long before.
``authorize``      ``authorize(environ) -> str | None``: the requester's identity.  An
                   upload created by identity X is visible only to requests of X; anybody
                   else gets 404.  May raise an :class:`~uploadguard.errors.UploadGuardError`
                   (e.g. :class:`~uploadguard.resumable.protocol.Forbidden`) to refuse.
                   An upload created anonymously (``None``) is usable by whoever holds
                   its URL (144 random bits): return an identity to tie it to someone.
``settings``       a ready :class:`~uploadguard.config.Settings`.

The upload URL (``Location``) is a path, ``<SCRIPT_NAME><prefix><id>``; clients
resolve it against the endpoint, so it stays right behind a TLS-terminating proxy.
``cors_origins``   origins allowed cross-origin (``"*"`` or exact ``https://host``);
                   preflights are answered, and ``Location``, ``Upload-Offset``,
                   ``Upload-Length``, ``Tus-*``, ``Upload-Expires``, ``Retry-After`` exposed.
                   Credentials (cookies) are not allowed cross-origin: authenticate
                   cross-origin clients with a header that ``authorize`` reads.
``lock_timeout``   seconds a request waits for an upload another request holds (5).
``idle_timeout``   seconds without a byte that end a PATCH
                   (``UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT``, default 30).

Framework integrations call :meth:`ResumableUploads.handle` (``environ`` and
``owner`` in, ``(status, headers, body)`` out) from inside the framework, so
sessions, CSRF and authentication apply.

**The upload object** (:class:`Upload`): ``id``, ``length`` (bytes),
``metadata`` (``dict[str, str]`` from ``Upload-Metadata``, e.g. ``filename``: the
client's word, never a path to use as is),
``open()`` (a binary file of the whole data), ``path`` (the file on local
disk, or ``None`` for a remote store), ``url`` (``/files/<id>``), ``owner``.
:meth:`ResumableUploads.get` returns one for an id or URL, or raises
:class:`UploadNotFound` (unknown, another owner's, expired) or
:class:`UploadIncomplete`.  Completed uploads stay until the application
removes them (or ``keep_completed`` passes): ``on_complete`` may move ``upload.path`` away (a rename on the
same file system costs nothing; the upload keeps answering as complete, so a
client whose last response was lost does not upload it again), and
:meth:`ResumableUploads.delete` removes what is left (not from inside
``on_complete``, where the upload is locked).

**on_complete runs exactly once** per completed upload: after the data is
fsynced, under the upload's lock, and it is recorded as done only once it
*returned*.  A retried final PATCH, or a HEAD after it, does not run it again.
If it raises, the exception is logged, the request gets a **500** (never a
dropped connection), the upload stays stored and retrievable, and the hook
runs again on the next HEAD or PATCH for that upload -- until it returns.  A
worker killed after the hook returned but before that was recorded runs it
again: make the hook idempotent by ``upload.id`` if that matters.

**Protocol.**  tus 1.0.0 with the extensions creation, creation-with-upload,
creation-defer-length, expiration, checksum (sha1, md5, sha256; 460 and the
chunk discarded), termination and concatenation; ``X-HTTP-Method-Override``.
The IETF draft in the interop versions 5 and 6 (tus-js-client's
``protocol: "ietf-draft-03"`` / ``"ietf-draft-05"``), recognised by
``Upload-Draft-Interop-Version``.  gunicorn's WSGI interface cannot send the
draft's ``104 Upload Resumption Supported`` interim response (``wsgi.early_hints``
writes 103 only), so a client that sends the whole file in the creation
request learns the upload URL only from the final response: if that
connection drops it cannot resume and starts again.  What works: creating the
upload with an empty ``Upload-Complete: ?0`` POST (tus-js-client does this when
``uploadDataDuringCreation`` is off, its default), then appending with PATCH.

**Reliability.**  State lives on disk (:mod:`.store`), never in a process:
any worker serves any request.  One request at a time holds an upload
(:mod:`.locking`); a new HEAD or PATCH *preempts* a stale PATCH whose client
vanished without a FIN, so the client resumes within seconds, not after
gunicorn's timeout.  Preemption needs gunicorn (``environ["gunicorn.socket"]``);
elsewhere a request for a held upload waits ``lock_timeout`` and gets a 423
with ``Retry-After``.  A PATCH that receives no byte for ``idle_timeout``
ends, keeping what arrived.  The offset is the size of the data file, so
what reached it before a worker was killed counts.  The storage directory is
checked like the temp dir: recreated if it vanished (the uploads in it are
404 then, so clients start again cleanly), 503 + ``Retry-After`` if unusable.

**Bad input changes nothing**: an ``Upload-Length`` over ``max_size`` is a 413
before any byte is read (:func:`~uploadguard.resumable.protocol.creation_too_large`;
with uploadguard's gunicorn hooks ``100 Continue`` waits for the first read,
so an ``Expect`` client never sends it); a PATCH that would
pass ``Upload-Length`` is refused whole; malformed offsets, lengths and
metadata are 400; unknown uploads 404; ids are 144 random bits checked
against a strict pattern before they reach a path.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .expiry import CleanExpiredResult as CleanExpiredResult
    from .expiry import clean_expired as clean_expired
    from .locking import FileLocker as FileLocker
    from .protocol import UploadIncomplete as UploadIncomplete
    from .protocol import UploadInfo as UploadInfo
    from .protocol import UploadLocked as UploadLocked
    from .protocol import UploadNotFound as UploadNotFound
    from .s3 import S3Store as S3Store
    from .store import LocalStore as LocalStore
    from .store import Store as Store
    from .wsgi import ResumableUploads as ResumableUploads
    from .wsgi import Upload as Upload

#: Each public name and the module it lives in.  Loaded on first use (PEP 562): importing
#: ``uploadguard.resumable.core`` runs this file, and the pure core must not pull in the
#: stores, S3 or the WSGI driver with it.
_PUBLIC = {
    "CleanExpiredResult": "expiry",
    "FileLocker": "locking",
    "LocalStore": "store",
    "ResumableUploads": "wsgi",
    "S3Store": "s3",
    "Store": "store",
    "Upload": "wsgi",
    "UploadIncomplete": "protocol",
    "UploadInfo": "protocol",
    "UploadLocked": "protocol",
    "UploadNotFound": "protocol",
    "clean_expired": "expiry",
}

__all__ = [
    "CleanExpiredResult",
    "FileLocker",
    "LocalStore",
    "ResumableUploads",
    "S3Store",
    "Store",
    "Upload",
    "UploadIncomplete",
    "UploadInfo",
    "UploadLocked",
    "UploadNotFound",
    "clean_expired",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
