"""Resumable uploads on S3-compatible object storage, for several app hosts behind one load balancer.

The requests of one upload land on different hosts; a local directory is not
shared, a bucket is.  :class:`S3Store` implements the same
:class:`~uploadguard.resumable.store.Store` seam as the local store (and
passes the same test suite), :class:`S3Locker` the same locker seam as
:class:`~uploadguard.resumable.locking.FileLocker` -- with nothing but S3
itself: no lock server, no Redis.  Choose it with the storage setting::

    UPLOADGUARD_RESUMABLE_STORAGE=s3://my-bucket/uploads/
    # or: ResumableUploads(app, storage="s3://my-bucket/uploads/")
    # or: ResumableUploads(app, storage=S3Store("s3://my-bucket/uploads/", part_size=16 * 2**20))

Endpoint, region and credentials come from boto3's standard configuration
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``~/.aws/config``, instance roles...).  boto3 is
imported only when an S3 store is used: ``pip install uploadguard[s3]``.

Parameters of :class:`S3Store` (keyword-only after the URL):

``part_size``      bytes per multipart part (default 8 MiB, at least 5 MiB, S3's
                   minimum).  It is the memory bound: a PATCH holds at most one part
                   (plus one 1 MiB read) in RAM; a ``part_size`` over 32 MiB is
                   buffered in an unlinked file in ``temp_dir`` instead.  An upload
                   with a known length grows its parts to fit S3's 10,000; one with a
                   deferred length holds at most 9,999 parts and a last one (~78 GiB at
                   8 MiB) and gets a 413 beyond: raise ``part_size`` for larger ones.
``temp_dir``       where a large part buffer and a checksummed chunk are spooled
                   (default: the guard's ``UPLOADGUARD_TEMP_DIR``).
``lease``          seconds a lock lasts without renewal (default 10): how long the
                   uploads a SIGKILLed host was writing stay locked.
``retry_after``    seconds in the 503's ``Retry-After`` when S3 fails (default 5).
``connect_timeout``, ``read_timeout``, ``max_attempts``  bound boto3 (2 s, 20 s, 3
                   attempts), so an unreachable S3 is a fast 503, not a hung worker.
``client``         a ready boto3 S3 client (otherwise one per process, made on first use).

**Layout** under ``s3://bucket/prefix``, per upload id: ``<id>.info`` (JSON:
the upload's info, its multipart upload id and the list of parts stored so
far), the multipart upload of the final object ``<id>``, at most one
*incomplete part* ``<id>.tail.<token>`` (bytes not yet enough for a 5 MiB
part, as tusd's S3 store keeps them), and the lock objects ``<id>.lock`` and
``<id>.release``.  The finished upload is the object ``<id>``:
``upload.open()`` streams it (a seekable file over ``GetObject``), and
``upload.path`` is ``None``.

**How an offset is made durable.**  The offset is what S3 holds: the parts
listed in ``<id>.info`` plus the incomplete part it names.  A PATCH fills one
part buffer; each full part is uploaded (``UploadPart``) and then *committed*
by rewriting ``<id>.info`` with ``If-Match`` on the ETag read before.  When
the body ends -- completely, by a timeout, a preemption or a vanished client
-- the rest is stored as the new incomplete part and committed, so every byte
received counts.  A host SIGKILLed mid-PATCH loses at most the part buffer it
had not yet committed; a HEAD through any host reports the committed offset
and the client resends from there.  Objects are deleted only after the commit
that stops naming them, so a crash never leaves a committed offset pointing at
missing bytes.  A chunked body that turns out longer than the upload is
refused whole: the info is rewritten to its state before the PATCH (parts
uploaded meanwhile are not listed, so they are overwritten or left out at
completion).  On completion the incomplete part becomes the last part and
``CompleteMultipartUpload`` assembles the listed parts.

**Coordination across hosts** uses S3's conditional writes, which SeaweedFS,
MinIO and AWS S3 (since 2024) honour: a request takes an upload by creating
``<id>.lock`` with ``If-None-Match: *``; the holder renews its lease every
``lease / 3`` seconds with ``If-Match`` on its last ETag and frees the lock the
same way.  The holder counts its lease from when each of those writes was
*sent* (a retried PUT may answer long after its first attempt wrote the
object) and deems it lost two thirds of the lease after the last renewal sent:
from then until a renewal succeeds, its PATCH writes nothing more (no part, no
commit) and answers 423, keeping what it committed.  A lock whose
``Last-Modified`` is more than ``lease`` seconds before the S3 server's own
``Date`` (one clock: hosts' clocks do not matter) is stale and taken over with
``If-Match``.  Preemption works as on one host: a
contender writes ``<id>.release``; the holder's lock thread sees it within
0.25 s and the :class:`~uploadguard.resumable.locking.ReleaseWatcher` shuts
the blocked PATCH's socket, so a client that reconnected through another host
gets its upload within seconds.  Every commit of ``<id>.info`` is itself
conditional on the ETag read under the lock, so a holder that lost its lease
(paused past it) cannot overwrite a newer holder's state: it gets a 423.
boto3 retries a request whose answer was lost; a conditional PUT that had
landed is then refused by its own condition.  So every info write carries a
unique nonce and every lock write its holder's token, and a 412 whose object
holds ours counts as success.

**Failure modes.**  S3 unreachable, timing out or answering 5xx: every request
gets **503 + Retry-After** (never a 500 or a dropped connection) and changes
nothing that was committed; once S3 is back, HEAD reports the committed
offset and the upload resumes.  A host killed while holding a lock: its
uploads answer 423 + Retry-After until the lease lapses (``lease`` seconds).
Object storage that refuses conditional writes answers the lock's creation
with an error, so requests get 503; one that silently *ignores* them would
make locks non-exclusive -- check yours (``TestConditionalWrites`` in
``tests/test_resumable_s3.py`` is the probe).  The
residual risk of a lease: the lease is checked before each ``UploadPart``, but
one call lasts up to ``max_attempts`` x (``connect_timeout`` +
``read_timeout``) (66 s by default, far past the 10 s lease); a holder stalled
that long inside it may overwrite that part number after a new holder wrote
it; AWS S3 then refuses the completion on the part's ETag (an error, not a
corrupt file) -- a store that does not check part ETags might not.  Keep
``lease`` well above the time one part takes to upload.

**Expiry**: ``uploadguard clean`` (``clean_expired(store)``) aborts the
multipart uploads of expired incomplete uploads and deletes all their objects
(and those of completed uploads past ``keep_completed``), taking each upload's
lock first; an hour after the last write it does the same
for ids without ``<id>.info`` (:meth:`S3Store.orphans`: a host died between
two steps of a create or a termination).  Completion deletes every
``<id>.tail.*``, committed or not.  Nothing leaks.

**Saving a finished upload elsewhere**: :func:`save_to_storage` copies it into a
Django storage; into an S3 storage of django-storages it is a server-side
copy (``CopyObject``, or ``UploadPartCopy`` parts above 5 GiB), the bytes never
pass through the app host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import mimetypes
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, BinaryIO

from ..config import is_s3_url, parse_s3_url
from ..errors import BodyTooLarge, TempDirUnavailable
from ..tempdir import Health, Reason
from .locking import HeldLock
from .protocol import Checksum, ChecksumMismatch, UploadLocked, UploadNotFound, check_offset
from .store import UploadInfo, pump, valid_upload_id

__all__ = ["S3Store", "S3Locker", "S3Lock", "S3Unavailable", "parse_s3_url", "is_s3_url", "save_to_storage"]

log = logging.getLogger("uploadguard")

MiB = 1024 * 1024
MIN_PART = 5 * MiB  # S3's minimum size of every part but the last
MAX_PARTS = 10_000  # S3's maximum number of parts
_READ = 1 * MiB  # bytes read from the client per call
RAM_PART_LIMIT = 32 * MiB  # larger part buffers go to a file in temp_dir
_COPY_LIMIT = 5 * 1024 * MiB  # CopyObject's maximum; above it, UploadPartCopy
_POLL = 0.25  # seconds between a lock thread's looks at <id>.release, and between acquire attempts


class S3Unavailable(TempDirUnavailable):
    """503 + ``Retry-After``: the object storage is unreachable or failing; the same request may succeed later."""

    def __repr__(self) -> str:
        return f"<S3Unavailable 503 reason={self.reason!r} path={self.path!r}: {self.cause}>"


class _Precondition(Exception):
    """A conditional write lost (HTTP 412): somebody else changed or created the object first."""


@dataclasses.dataclass
class _Object:
    body: bytes
    etag: str
    last_modified: float  # epoch seconds, the S3 server's clock
    date: float  # epoch seconds: the response's Date, the S3 server's clock


@dataclasses.dataclass
class _State:
    """An upload's ``<id>.info`` as read: the info, the S3 bookkeeping and the ETag to commit against."""

    info: UploadInfo
    multipart: str | None  # the multipart upload id; None once completed
    parts: list[tuple[int, int, str]]  # (part number, size, ETag) committed so far
    tail: tuple[str, int] | None  # (key, size) of the incomplete part
    updated: float
    etag: str

    @property
    def offset(self) -> int:
        return sum(size for _, size, _ in self.parts) + (self.tail[1] if self.tail else 0)


class S3Store:
    """Uploads in an S3 bucket under a prefix: multipart uploads, info as objects, conditional writes."""

    def __init__(
        self,
        url: str,
        *,
        part_size: int = 8 * MiB,  # bytes per part: the memory bound of a PATCH
        temp_dir: str | os.PathLike[str] | None = None,  # spool for big part buffers; None = the guard's
        lease: float = 10.0,  # seconds a lock lasts without renewal
        retry_after: int = 5,  # seconds, in the 503 when S3 fails
        connect_timeout: float = 2.0,  # seconds
        read_timeout: float = 20.0,  # seconds
        max_attempts: int = 3,  # boto3 attempts per call, the first included (S3 asks clients to retry 5xx)
        client: Any = None,  # a boto3 S3 client; None = one per process from boto3's standard configuration
    ) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.bucket, self.prefix = parse_s3_url(url)
        if not MIN_PART <= part_size <= 5 * 1024 * MiB:
            raise ValueError(f"part_size={part_size!r} must be between 5 MiB and 5 GiB (S3's part limits)")
        if not lease > 1:
            raise ValueError(f"lease={lease!r} must be more than 1 second (S3's clock has 1 s steps)")
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts!r} must be at least 1")
        self.part_size = part_size
        self.temp_dir = None if temp_dir is None else os.fspath(temp_dir)
        self.lease = lease
        self.retry_after = retry_after
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self._client = client
        self._client_pid = os.getpid() if client is not None else 0
        if client is None:
            _require_boto3()  # at startup, not on the first upload
        self._client_lock = threading.Lock()
        self._healthy_until = 0.0
        #: The locker for this store's uploads (what the handler and ``clean`` use).
        self.locker = S3Locker(self)

    def __repr__(self) -> str:
        return f"<S3Store {self.url}>"

    # -- S3 calls ------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 client: made on first use in each process (gunicorn forks after the app is loaded)."""
        if self._client is None or self._client_pid != os.getpid():
            with self._client_lock:
                if self._client is None or self._client_pid != os.getpid():
                    self._client = self._make_client()
                    self._client_pid = os.getpid()
        return self._client

    def _make_client(self) -> Any:
        _require_boto3()
        import boto3  # type: ignore[import-untyped, unused-ignore]
        from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]

        options: dict[str, Any] = {}
        # botocore >= 1.36 adds CRC trailers many S3-compatible stores reject; keep them only where
        # the operation requires them, unless the standard configuration says otherwise.
        if "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ:
            options["request_checksum_calculation"] = "when_required"
        if "AWS_RESPONSE_CHECKSUM_VALIDATION" not in os.environ:
            options["response_checksum_validation"] = "when_required"
        config = Config(connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                        retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
                        max_pool_connections=32, **options)
        return boto3.session.Session().client("s3", config=config)

    def _unavailable(self, exc: BaseException) -> S3Unavailable:
        self._healthy_until = 0.0
        return S3Unavailable(Reason.IO_ERROR, path=self.url, retry_after=self.retry_after,
                             cause=f"{type(exc).__name__}: {exc}")

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """One S3 call; 412 -> :class:`_Precondition`, a missing key -> ``None``, any other failure -> 503."""
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except ImportError:
            raise
        except Exception as exc:
            code, status = _error_code(exc)
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise _Precondition(str(exc)) from None
            if code in ("NoSuchKey", "NoSuchUpload", "NotFound") or status == 404:
                return None
            log.warning("S3 %s on %s failed: %s", operation, self.url, exc)
            raise self._unavailable(exc) from None

    def _key(self, upload_id: str, suffix: str = "") -> str:
        if not valid_upload_id(upload_id):
            raise UploadNotFound(f"No upload {upload_id[:40]!r}.")
        return f"{self.prefix}{upload_id}{suffix}"

    def _get(self, key: str) -> _Object | None:
        response = self._call("get_object", Key=key)
        if response is None:
            return None
        try:
            body = response["Body"].read()
        except Exception as exc:
            raise self._unavailable(exc) from None
        return _Object(body, response["ETag"], response["LastModified"].timestamp(),
                       _response_date(response))

    def _put(self, key: str, body: bytes, **conditions: str) -> str:
        response = self._call("put_object", Key=key, Body=body, **conditions)
        if response is None:  # If-Match on a key that is gone
            raise _Precondition(key)
        return str(response["ETag"])

    def _landed(self, key: str, field: str, value: object) -> str | None:
        """After a 412: the object's ETag if it holds *our* write (``field`` is ``value``), else ``None``.

        boto3 retries a request whose answer was lost (a timeout, a dropped
        connection, a 5xx after the write); a conditional PUT that did land is
        then refused by its own condition.  The unique field tells our write
        from another's.
        """
        got = self._get(key)
        if got is None:
            return None
        try:
            ours = json.loads(got.body).get(field) == value
        except (ValueError, AttributeError):
            return None
        return got.etag if ours else None

    def _delete(self, key: str) -> None:
        self._call("delete_object", Key=key)

    # -- the info object -----------------------------------------------------------------

    def _load(self, upload_id: str) -> _State:
        got = self._get(self._key(upload_id, ".info"))
        if got is None:
            raise UploadNotFound(f"No upload {upload_id}.")
        try:
            doc = json.loads(got.body)
            state = _State(
                info=UploadInfo.from_json(json.dumps(doc["info"]).encode(), offset=0, updated=0.0),
                multipart=doc["multipart"], parts=[(int(n), int(s), str(e)) for n, s, e in doc["parts"]],
                tail=(str(doc["tail"][0]), int(doc["tail"][1])) if doc["tail"] else None,
                updated=float(doc["updated"]), etag=got.etag,
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("upload info %s%s.info is unreadable (%s); treating the upload as unknown",
                        self.url, upload_id, exc)
            raise UploadNotFound(f"No upload {upload_id}.") from None
        state.info = dataclasses.replace(state.info, offset=state.offset, updated=state.updated)
        return state

    def _commit(self, state: _State, *, touch: bool = True, create: bool = False) -> _State:
        """Write ``state`` as ``<id>.info``, conditional on the ETag it was read with."""
        if touch:
            state.updated = time.time()
        nonce = secrets.token_hex(8)  # the ETag is an MD5 of the body: make every commit's unique
        doc = {"info": json.loads(state.info.to_json()), "multipart": state.multipart,
               "parts": [list(part) for part in state.parts], "tail": list(state.tail) if state.tail else None,
               "updated": state.updated, "nonce": nonce}
        body = json.dumps(doc, sort_keys=True).encode()
        key = self._key(state.info.id, ".info")
        try:
            state.etag = self._put(key, body, **({"IfNoneMatch": "*"} if create else {"IfMatch": state.etag}))
        except _Precondition:
            etag = self._landed(key, "nonce", nonce)
            if etag is None:
                raise UploadLocked(f"Upload {state.info.id} was changed by another request; retry.",
                                   retry_after=1) from None
            state.etag = etag
        state.info = dataclasses.replace(state.info, offset=state.offset, updated=state.updated)
        return state

    # -- the Store interface ---------------------------------------------------------------

    def health(self, need: int = 0) -> Health:
        """Whether the bucket answers (a ``HeadBucket``; a success is trusted for one second)."""
        if time.monotonic() < self._healthy_until:
            return Health(self.url)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ImportError:
            raise
        except Exception as exc:
            return Health(self.url, Reason.IO_ERROR, f"S3 bucket {self.bucket!r} is not usable: {exc}")
        self._healthy_until = time.monotonic() + 1.0
        return Health(self.url)

    def create(self, info: UploadInfo) -> UploadInfo:
        key = self._key(info.id)
        response = self._call("create_multipart_upload", Key=key)
        if response is None:
            raise self._unavailable(RuntimeError("CreateMultipartUpload answered 404"))
        state = _State(info=info, multipart=str(response["UploadId"]), parts=[], tail=None,
                       updated=time.time(), etag="")
        try:
            self._commit(state, touch=False, create=True)
        except (UploadLocked, S3Unavailable) as exc:
            with contextlib.suppress(S3Unavailable):  # no info names it: clean would never find it
                self._call("abort_multipart_upload", Key=key, UploadId=state.multipart)
            if isinstance(exc, S3Unavailable):
                raise
            raise self._unavailable(RuntimeError(f"upload id {info.id} exists already")) from None
        return self.get(info.id)

    def get(self, upload_id: str) -> UploadInfo:
        return self._load(upload_id).info

    def append(self, upload_id: str, offset: int, max_bytes: int, *,
               checksum: Checksum | None = None) -> S3Appender:
        return S3Appender(self, upload_id, offset, max_bytes, checksum)

    def write(self, upload_id: str, offset: int, read: Callable[[int], bytes], max_bytes: int, *,
              checksum: Checksum | None = None) -> int:
        return pump(read, self.append(upload_id, offset, max_bytes, checksum=checksum), max_bytes)

    def _part_size(self, info: UploadInfo) -> int:
        """``part_size``, or larger when the upload's length would need more than S3's 10,000 parts."""
        if info.length is None:
            return self.part_size
        return max(self.part_size, -(-info.length // (MAX_PARTS - 1)))

    def _check_lease(self, upload_id: str) -> None:
        """423 if this process's lock on the upload may have lapsed: another host may be writing it now.

        Checked before every write a PATCH makes (a part, the incomplete part,
        a commit): a holder whose renewals hang stops writing, keeping what it
        committed, before a contender may take the lease over.
        """
        lock = self.locker.holding(upload_id)
        if lock is not None and lock.lost:
            log.warning("the lease of upload %s may have lapsed; stopping its PATCH", upload_id)
            raise UploadLocked(f"Upload {upload_id} was held too long without a renewed lease; retry.",
                               retry_after=1)

    def _upload_part(self, state: _State, buffer: _PartBuffer) -> None:
        number = (state.parts[-1][0] + 1) if state.parts else 1
        response = self._call("upload_part", Key=self._key(state.info.id), UploadId=state.multipart,
                              PartNumber=number, Body=buffer.body(), ContentLength=buffer.size)
        if response is None:
            raise UploadNotFound(f"The multipart upload of {state.info.id} is gone.")
        state.parts.append((number, buffer.size, str(response["ETag"])))
        buffer.reset()

    def declare_length(self, upload_id: str, length: int) -> UploadInfo:
        state = self._load(upload_id)
        state.info = dataclasses.replace(state.info, length=length)
        return self._commit(state, touch=False).info

    def finish(self, upload_id: str) -> UploadInfo:
        state = self._load(upload_id)
        if state.info.completed:
            return state.info
        key = self._key(upload_id)
        tail = state.tail
        try:
            if tail is not None:  # the incomplete part becomes the last part (any size may be last)
                got = self._get(tail[0])
                if got is None:
                    raise self._unavailable(RuntimeError(f"incomplete part {tail[0]} is missing"))
                buffer = _PartBuffer(max(tail[1], 1), self.temp_dir)
                try:
                    buffer.write(got.body[:tail[1]])
                    self._upload_part(state, buffer)
                finally:
                    buffer.close()
                state.tail = None
            if state.parts:
                done = self._call("complete_multipart_upload", Key=key, UploadId=state.multipart, MultipartUpload={
                    "Parts": [{"PartNumber": n, "ETag": etag} for n, _, etag in state.parts]})
                if done is None:  # NoSuchUpload: aborted (a lifecycle rule, a racing terminate) -- or completed
                    raise UploadNotFound(f"The multipart upload of {upload_id} is gone.")
        except (S3Unavailable, UploadNotFound):
            head = self._call("head_object", Key=key)  # completed by a try that died before its commit?
            if head is None or int(head["ContentLength"]) != state.offset:
                raise
        if not state.parts and state.offset == 0:  # an empty upload: S3 completes no multipart upload without parts
            self._call("abort_multipart_upload", Key=key, UploadId=state.multipart)
            self._put(key, b"")
        state.multipart = None
        state.info = dataclasses.replace(state.info, completed=True, completed_at=time.time())
        self._commit(state, touch=False)
        with contextlib.suppress(S3Unavailable):
            # The committed incomplete part, and any a PATCH stored but could not commit (preempted,
            # killed): a completed upload stays keep_completed, and nothing else looks for them meanwhile.
            for stray in self._keys(self._key(upload_id, ".tail.")):
                self._delete(stray)
        return state.info

    def update(self, info: UploadInfo) -> None:
        state = self._load(info.id)
        state.info = dataclasses.replace(info, offset=state.offset, updated=state.updated)
        self._commit(state, touch=False)

    def terminate(self, upload_id: str) -> None:
        """Delete the info first (from then on the upload is unknown), abort the multipart upload, delete the rest."""
        try:
            state: _State | None = self._load(upload_id)
        except UploadNotFound:
            state = None
        self._delete(self._key(upload_id, ".info"))
        if state is not None and state.multipart is not None:
            self._call("abort_multipart_upload", Key=self._key(upload_id), UploadId=state.multipart)
        for key in self._keys(self._key(upload_id)):
            match = _KEY.fullmatch(key[len(self.prefix):])
            if match is not None and match["id"] == upload_id:  # never another's <id>.png
                self._delete(key)
        for upload in self._multipart_uploads(self._key(upload_id)):  # any left by a create that died
            if upload["Key"] == self._key(upload_id):
                self._call("abort_multipart_upload", Key=upload["Key"], UploadId=upload["UploadId"])

    def open(self, upload_id: str) -> BinaryIO:
        state = self._load(upload_id)
        if not state.info.completed:
            raise UploadNotFound(f"Upload {upload_id} is not complete; its data is not one object yet.")
        return io.BufferedReader(S3File(self, self._key(upload_id), state.offset), buffer_size=_READ)

    def local_path(self, upload_id: str) -> str | None:
        return None

    def uploads(self) -> Iterator[UploadInfo]:
        for key in self._keys(self.prefix):
            name = key[len(self.prefix):]
            upload_id, dot, suffix = name.partition(".")
            if dot and suffix == "info" and valid_upload_id(upload_id):
                try:
                    yield self.get(upload_id)
                except UploadNotFound:
                    continue

    def expired(self, now: float) -> Iterator[UploadInfo]:
        for info in self.uploads():
            expires = info.expires
            if expires is not None and expires < now:
                yield info

    def multipart_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload in progress under the prefix (for checks and tests)."""
        return [(upload["Key"], upload["UploadId"]) for upload in self._multipart_uploads(self.prefix)]

    def orphans(self, before: float) -> Iterator[str]:
        """Ids with objects or a multipart upload but no ``<id>.info``, none newer than ``before``.

        Only names this store writes count (``<id>``, ``<id>.lock``,
        ``<id>.release``, ``<id>.tail.<hex>``): the prefix must be the store's
        alone, but a stray ``photo.png`` is still never taken for an upload.
        Ages are S3's ``LastModified`` and ``Initiated`` against this host's
        clock; S3 refuses requests signed more than 15 minutes off its own
        clock, so the caller's hour of margin covers every skew it accepts.
        """
        inventory = self._inventory()
        for upload_id, newest in inventory.newest.items():
            if upload_id not in inventory.with_info and newest < before:
                yield upload_id

    def remove_stray_parts(self, before: float) -> int:
        """Delete incomplete parts no info names any more, older than ``before``; return how many.

        A PATCH that stored its incomplete part and then could not commit it
        (preempted, killed, S3 failing) leaves one behind; completion deletes
        them, but a completion whose sweep failed, or a completed upload, never
        comes back for them.  An hour after it was written, a part is either
        named by its upload's info or never will be.
        """
        inventory = self._inventory()
        removed = 0
        for upload_id, tails in inventory.tails.items():
            old = [key for key, when in tails if when < before]
            if not old or upload_id not in inventory.with_info:
                continue  # no info: the whole id is an orphan, terminated as one
            try:
                named = self._load(upload_id).tail
            except UploadNotFound:
                continue
            for key in old:
                if named is None or key != named[0]:
                    self._delete(key)
                    removed += 1
        return removed

    def _inventory(self) -> _Inventory:
        inventory = _Inventory(self.prefix)
        for item in self._objects(self.prefix):
            inventory.add(str(item["Key"]), item["LastModified"].timestamp())
        for upload in self._multipart_uploads(self.prefix):
            inventory.add(str(upload["Key"]), upload["Initiated"].timestamp(), multipart=True)
        return inventory

    def _keys(self, prefix: str) -> Iterator[str]:
        for item in self._objects(prefix):
            yield str(item["Key"])

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            response = self._call("list_objects_v2", Prefix=prefix,
                                  **({"ContinuationToken": token} if token else {}))
            if response is None:
                return
            yield from response.get("Contents", [])
            token = response.get("NextContinuationToken")
            if not response.get("IsTruncated") or not token:
                return

    def _multipart_uploads(self, prefix: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        markers: dict[str, str] = {}
        while True:
            response = self._call("list_multipart_uploads", Prefix=prefix, **markers)
            if response is None:
                return found
            found += response.get("Uploads", [])
            if not response.get("IsTruncated"):
                return found
            markers = {"KeyMarker": response["NextKeyMarker"], "UploadIdMarker": response["NextUploadIdMarker"]}


#: The names this store writes under its prefix: ``<id>`` (the finished object), its info, its
#: lock objects and its incomplete parts.  Nothing else there is ever taken for an upload's.
_KEY = re.compile(r"(?P<id>[A-Za-z0-9_-]{24})(?:\.(?P<suffix>info|lock|release|tail\.[0-9a-f]{12}))?")


@dataclasses.dataclass
class _Inventory:
    """One listing of the prefix, by upload id (for the clean-up)."""

    prefix: str
    newest: dict[str, float] = dataclasses.field(default_factory=dict)  # id -> its newest name but the info
    with_info: set[str] = dataclasses.field(default_factory=set)
    tails: dict[str, list[tuple[str, float]]] = dataclasses.field(default_factory=dict)  # id -> (key, time)

    def add(self, key: str, when: float, *, multipart: bool = False) -> None:
        match = _KEY.fullmatch(key[len(self.prefix):]) if key.startswith(self.prefix) else None
        if match is None or (multipart and match["suffix"] is not None):
            return  # not a name this store writes (a multipart upload is only ever of <id> itself)
        upload_id, suffix = match["id"], match["suffix"]
        if suffix == "info":
            self.with_info.add(upload_id)
            return
        self.newest[upload_id] = max(when, self.newest.get(upload_id, 0.0))
        if suffix is not None and suffix.startswith("tail."):
            self.tails.setdefault(upload_id, []).append((key, when))


class S3Appender:
    """An :class:`S3Store` body in progress: parts uploaded as they fill, the incomplete rest on ``commit``.

    A checksummed body is spooled (under ``temp_dir``) and appended on
    ``commit`` once verified.  Every write to S3 first checks that this
    process's lease on the upload still holds.
    """

    def __init__(self, store: S3Store, upload_id: str, offset: int, max_bytes: int,
                 checksum: Checksum | None) -> None:
        self._store = store
        self._state = state = store._load(upload_id)
        check_offset(offset, state.offset)
        self._before = dataclasses.replace(state, parts=list(state.parts))
        self._start = offset
        self._max = max_bytes
        self._written = 0
        self._part_size = store._part_size(state.info)
        self._buffer: _PartBuffer | None = None
        self._obsolete: list[str] = []
        self._checksum = checksum
        self._digest = checksum.new() if checksum is not None else None
        self._spool: Any = None
        if checksum is not None and state.multipart is not None:
            self._spool = tempfile.SpooledTemporaryFile(max_size=store.part_size, dir=store.temp_dir)

    def write(self, data: bytes) -> None:
        if not data:
            return
        state = self._state
        if state.multipart is None:  # completed: there is nowhere to append, and nothing may come
            raise BodyTooLarge(0, length=len(data))
        if self._written + len(data) > self._max:
            length = self._written + len(data)
            if self._spool is None:
                self._obsolete = []
                if state.etag != self._before.etag:  # forget the parts uploaded meanwhile: nothing appended
                    self._before.etag = state.etag
                    self._store._commit(self._before, touch=False)
            raise BodyTooLarge(self._max, length=length)
        self._written += len(data)
        if self._spool is not None:
            assert self._digest is not None
            self._digest.update(data)
            self._spool.write(data)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        store, state = self._store, self._state
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = _PartBuffer(self._part_size, store.temp_dir)
            if state.tail is not None:
                got = store._get(state.tail[0])
                if got is None or len(got.body) < state.tail[1]:
                    raise store._unavailable(RuntimeError(f"incomplete part {state.tail[0]} is missing"))
                buffer.write(got.body[:state.tail[1]])
                self._obsolete.append(state.tail[0])
        buffer.write(data)
        if buffer.size >= self._part_size:
            if len(state.parts) >= MAX_PARTS - 1:  # the last number is the final part's
                # Only a deferred length gets here (a known one sizes its parts to fit): a clear 413,
                # not S3's refusal of part 10,001 on every retry.
                raise BodyTooLarge(sum(size for _, size, _ in state.parts) + self._part_size - 1,
                                   length=state.offset + buffer.size)
            store._check_lease(state.info.id)
            store._upload_part(state, buffer)
            state.tail = None
            store._check_lease(state.info.id)
            store._commit(state)

    def commit(self) -> int:
        store, state = self._store, self._state
        if state.multipart is None:
            return self._start
        try:
            if self._spool is not None:
                assert self._checksum is not None and self._digest is not None
                spool, self._spool = self._spool, None
                with spool:
                    if self._digest.digest() != self._checksum.digest:
                        raise ChecksumMismatch(f"The chunk's {self._checksum.algorithm} checksum does not match; "
                                               "it was discarded.")
                    spool.seek(0)
                    while data := spool.read(_READ):
                        self._feed(data)
            if not self._written:
                return self._start  # nothing came: nothing changes
            buffer = self._buffer
            assert buffer is not None
            store._check_lease(state.info.id)
            if buffer.size >= MIN_PART:
                store._upload_part(state, buffer)
                state.tail = None
            elif buffer.size:
                key = store._key(state.info.id, f".tail.{secrets.token_hex(6)}")
                store._put(key, buffer.getvalue())
                state.tail = (key, buffer.size)
            else:
                state.tail = None
            store._check_lease(state.info.id)
            store._commit(state)
        finally:
            self.abort()
        for key in self._obsolete:
            if state.tail is None or key != state.tail[0]:
                with contextlib.suppress(S3Unavailable):
                    store._delete(key)
        return self._start + self._written

    def abort(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None


class _PartBuffer:
    """One part's bytes: the reads themselves, kept as they came (no copy), up to 32 MiB; an unlinked
    file in ``temp_dir`` above.  ``body()`` is a seekable file over them for boto3 (which reads it
    twice: to sign, then to send)."""

    def __init__(self, part_size: int, temp_dir: str | None) -> None:
        self._chunks: list[bytes] | None = [] if part_size <= RAM_PART_LIMIT else None
        self._file = tempfile.TemporaryFile(dir=temp_dir) if self._chunks is None else None
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._chunks is not None:
            self._chunks.append(data)
        else:
            assert self._file is not None
            self._file.write(data)
        self.size += len(data)

    def body(self) -> BinaryIO:
        if self._chunks is not None:
            return io.BufferedReader(_ChunksFile(self._chunks))  # type: ignore[return-value, unused-ignore]
        assert self._file is not None
        self._file.flush()
        self._file.seek(0)
        return self._file

    def getvalue(self) -> bytes:
        if self._chunks is not None:
            return b"".join(self._chunks)
        return self.body().read()

    def reset(self) -> None:
        self.size = 0
        if self._chunks is not None:
            self._chunks = []
        elif self._file is not None:
            self._file.seek(0)
            self._file.truncate()

    def close(self) -> None:
        self._chunks = None
        if self._file is not None:
            self._file.close()


class _SeekableReader(io.RawIOBase):
    """A read-only binary file of ``size`` bytes whose subclasses fetch them in ``readinto``."""

    size = 0
    _position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def _target(self, offset: int, whence: int) -> int:
        """Where a ``seek(offset, whence)`` lands (never before 0)."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        return max(0, base + offset)


class _ChunksFile(_SeekableReader):
    """A seekable read-only file over a list of ``bytes``, without joining them."""

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self.size = sum(len(chunk) for chunk in chunks)
        self._position = 0
        self._index = 0  # the chunk holding _position
        self._within = 0  # _position's offset in that chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = min(self._target(offset, whence), self.size)
        self._index, self._within, left = 0, 0, self._position
        while self._index < len(self._chunks) and left >= len(self._chunks[self._index]):
            left -= len(self._chunks[self._index])
            self._index += 1
        self._within = left
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._index < len(self._chunks):
            chunk = self._chunks[self._index]
            take = min(len(view) - done, len(chunk) - self._within)
            view[done:done + take] = chunk[self._within:self._within + take]
            done += take
            self._within += take
            if self._within == len(chunk):
                self._index, self._within = self._index + 1, 0
        self._position += done
        return done


class S3File(_SeekableReader):
    """A finished upload's object as a seekable binary file, streamed by ``GetObject`` (ranged after a seek)."""

    def __init__(self, store: S3Store, key: str, size: int) -> None:
        super().__init__()
        self.store = store
        self.key = key
        self.size = size
        self.name = f"s3://{store.bucket}/{key}"
        self._position = 0
        self._stream: Any = None

    def __repr__(self) -> str:
        return f"<S3File {self.name} {self.size} bytes>"

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = self._target(offset, whence)
        if position != self._position:
            self._drop()
            self._position = position
        return position

    def readinto(self, buffer: Any) -> int:
        if self._position >= self.size or len(buffer) == 0:
            return 0
        if self._stream is None:
            extra = {"Range": f"bytes={self._position}-"} if self._position else {}
            response = self.store._call("get_object", Key=self.key, **extra)
            if response is None:
                raise FileNotFoundError(f"{self.name} is gone")
            self._stream = response["Body"]
        try:
            data = self._stream.read(len(buffer))
        except Exception as exc:
            self._drop()
            raise self.store._unavailable(exc) from None
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    def close(self) -> None:
        self._drop()
        super().close()


class S3Lock:
    """A held upload lock on S3: a thread renews the lease and watches for release requests."""

    def __init__(self, locker: S3Locker, upload_id: str, etag: str, token: str, *, sent: float) -> None:
        self.locker = locker
        self.upload_id = upload_id
        self._etag = etag
        self._token = token
        self._renewals = 0
        self._held = True
        self._requested = False
        self._lost = False
        #: time.monotonic() when the write that took the lock was sent: the object may have been written
        #: from then on (a retried PUT returns long after its first attempt landed), so the lease runs from it.
        self._renewed = sent
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"uploadguard-s3lock-{upload_id[:8]}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<S3Lock {self.upload_id} {'held' if self.held else 'released'}>"

    @property
    def held(self) -> bool:
        return self._held

    @property
    def lost(self) -> bool:
        """Whether another request took the lock, or the lease may have lapsed.

        Judged by time as well as by answers: a renewal that hangs in S3 (up
        to boto3's timeouts) must not leave this holder writing after the
        lease ran out and another host took over.  Two thirds of the lease
        after the last renewal was *sent*, the lock counts as lost.
        """
        return self._lost or time.monotonic() - self._renewed > self.locker.store.lease * 2 / 3

    def release_requested(self) -> bool:
        """Whether another request asked for this upload (``<id>.release`` seen), or the lease was lost."""
        return self._requested or self.lost

    def _run(self) -> None:
        store = self.locker.store
        renew_every = store.lease / 3
        next_renewal = self._renewed + renew_every
        while not self._stop.wait(_POLL):
            try:
                if not self._requested and self.locker.release_pending(self.upload_id):
                    self._requested = True
                    log.info("upload %s was asked for by another request", self.upload_id)
                if time.monotonic() >= next_renewal:
                    sent = time.monotonic()  # the lease runs from about here, whenever the answer comes
                    with self._mutex:
                        if not self._held:
                            return
                        self._renewals += 1
                        self._etag = self.locker._write(self.upload_id, self._token, self._renewals,
                                                        if_match=self._etag)
                    self._renewed = sent
                    next_renewal = time.monotonic() + renew_every
            except _Precondition:
                self._lost = True
                log.warning("the lock of upload %s was taken over; ending this request", self.upload_id)
                return
            except S3Unavailable:
                if time.monotonic() - self._renewed > store.lease * 2 / 3:
                    self._lost = True
                    log.warning("the lock of upload %s could not be renewed; ending this request",
                                self.upload_id)
                    return
                next_renewal = time.monotonic() + _POLL

    def release(self) -> None:
        """Stop renewing and free the lock (``If-Match``: never another request's lock)."""
        with self._mutex:
            if not self._held:
                return
            self._held = False
        self.locker._forget(self)
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self._lost:
            return
        try:
            self.locker._write(self.upload_id, self._token, self._renewals + 1, if_match=self._etag, free=True)
        except (_Precondition, S3Unavailable) as exc:  # taken over, gone, or S3 down: the lease lapses anyway
            log.info("could not free the lock of upload %s (%r); it lapses after the lease",
                     self.upload_id, exc)

    def __enter__(self) -> S3Lock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class S3Locker:
    """Upload locks as objects with conditional writes: the same seam as :class:`~.locking.FileLocker`."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self._holding: dict[str, S3Lock] = {}  # the locks this process holds, by upload id
        self._holding_mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"<S3Locker {self.store.url}>"

    def holding(self, upload_id: str) -> S3Lock | None:
        """The lock this process holds on ``upload_id``, if any (the store checks its lease before writing)."""
        with self._holding_mutex:
            return self._holding.get(upload_id)

    def _forget(self, lock: S3Lock) -> None:
        with self._holding_mutex:
            if self._holding.get(lock.upload_id) is lock:
                del self._holding[lock.upload_id]

    def _write(self, upload_id: str, token: str, serial: int, *, if_match: str | None = None,
               free: bool = False) -> str:
        """Create (``if_match=None``) or overwrite the lock object; :class:`_Precondition` if it is not ours.

        After a 412 on an overwrite the object is read back: if it holds this
        holder's token in the state written (held or free), the write landed
        -- boto3 retried one whose answer was lost, or an earlier renewal
        landed unheard and left the ETag stale -- and its ETag is adopted.
        A creation's 412 is sorted out by :meth:`try_acquire`, which reads
        the object anyway.
        """
        body = json.dumps({"token": token, "serial": serial, "free": free, "host": socket.gethostname(),
                           "pid": os.getpid()}).encode()
        key = self.store._key(upload_id, ".lock")
        if if_match is None:
            return self.store._put(key, body, IfNoneMatch="*")
        try:
            return self.store._put(key, body, IfMatch=if_match)
        except _Precondition:
            current = self.store._get(key)
            doc = _lock_doc(current.body) if current is not None else {}
            if current is None or doc.get("token") != token or bool(doc.get("free")) != free:
                raise
            return current.etag

    def try_acquire(self, upload_id: str) -> S3Lock | None:
        """The lock if it is free or its lease lapsed, else ``None``; never asks a holder to let go."""
        store = self.store
        token = secrets.token_hex(12)
        sent = time.monotonic()  # before the request: whenever its answer comes, the object may be older
        try:
            etag = self._write(upload_id, token, 0)
        except _Precondition:
            current = store._get(store._key(upload_id, ".lock"))
            if current is None:
                return None  # freed and removed meanwhile: the next attempt creates it
            doc = _lock_doc(current.body)
            if doc.get("token") == token:  # our creation landed; its answer was lost and boto3's retry refused
                etag = current.etag
            else:
                free = bool(doc.get("free"))
                if not free and current.date - current.last_modified <= store.lease + 1:
                    return None
                if not free:
                    log.warning("the lock of upload %s lapsed (a host died holding it?); taking it over",
                                upload_id)
                sent = time.monotonic()
                try:
                    etag = self._write(upload_id, token, 0, if_match=current.etag)
                except _Precondition:
                    return None
        lock = S3Lock(self, upload_id, etag, token, sent=sent)
        with self._holding_mutex:
            self._holding[upload_id] = lock
        with contextlib.suppress(S3Unavailable):
            store._delete(store._key(upload_id, ".release"))  # any request for the previous holder is answered now
        return lock

    def acquire(self, upload_id: str, *, timeout: float = 5.0, retry_after: int = 1) -> S3Lock:  # seconds
        """The lock, asking a holder to let go; :class:`UploadLocked` (423) after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            lock = self.try_acquire(upload_id)
            if lock is not None:
                return lock
            self.request_release(upload_id)
            if time.monotonic() >= deadline:
                raise UploadLocked(f"Upload {upload_id} is in use by another request; retry in {retry_after} s.",
                                   retry_after=retry_after)
            time.sleep(_POLL)

    def request_release(self, upload_id: str) -> None:
        """Ask the holder of ``upload_id`` to let go (write ``<id>.release``)."""
        self.store._put(self.store._key(upload_id, ".release"), b"release")

    def release_pending(self, upload_id: str) -> bool:
        """Whether ``<id>.release`` exists."""
        return self.store._call("head_object", Key=self.store._key(upload_id, ".release")) is not None

    def remove(self, lock: HeldLock) -> None:
        """Delete the lock objects of a held lock (the upload is gone)."""
        lock.release()
        for suffix in (".release", ".lock"):
            self.store._delete(self.store._key(lock.upload_id, suffix))


def save_to_storage(upload: Any, storage: Any, name: str) -> str:
    """Save a finished upload into a Django ``storage`` as ``name``; return the name the storage chose.

    Into django-storages' S3 storage (anything with ``bucket_name``, ``location``
    and ``connection``), when the upload lives in an :class:`S3Store` on the
    same endpoint, the copy is server-side: ``CopyObject`` up to 5 GiB,
    ``UploadPartCopy`` parts above -- the bytes never pass through the app host.
    Anything else streams ``upload.open()`` into ``storage.save``.
    """
    store = getattr(upload, "_store", None)
    if isinstance(store, S3Store) and _same_endpoint(store, storage):
        target = storage.get_available_name(name)
        location = str(storage.location or "").strip("/")
        key = f"{location}/{target}" if location else target
        if storage.bucket_name == store.bucket and key.startswith(store.prefix):
            # The prefix is the store's alone: there the copy could *be* the upload's own object
            # (a name equal to its id), and the clean-up and delete() remove what they find there.
            raise ValueError(f"s3://{storage.bucket_name}/{key} is inside the resumable uploads' prefix "
                             f"{store.url}: give the storage another location")
        client = storage.connection.meta.client
        source = {"Bucket": store.bucket, "Key": store._key(upload.id)}
        size = int(upload.length)
        extra: dict[str, Any] = {}
        # From the stored name, as django-storages does -- never the client's metadata: a "filetype" of
        # text/html on avatar.png would make the bucket serve a script (and a CR LF in it a 500).
        content_type = mimetypes.guess_type(name)[0]
        if content_type:
            extra["ContentType"] = content_type
        if size <= _COPY_LIMIT:
            client.copy_object(Bucket=storage.bucket_name, Key=key, CopySource=source,
                               **({"MetadataDirective": "REPLACE", **extra} if extra else {}))
        else:
            _copy_in_parts(client, source, storage.bucket_name, key, size, extra)
        log.info("upload %s copied server-side to s3://%s/%s", upload.id, storage.bucket_name, key)
        return str(target)
    from django.core.files import File  # type: ignore[import-untyped, unused-ignore]

    with upload.open() as fh:
        return str(storage.save(name, File(fh, name=os.path.basename(name))))


def _same_endpoint(store: S3Store, storage: Any) -> bool:
    """Whether ``storage`` is django-storages' S3 storage on the endpoint ``store`` uses (a copy can stay there)."""
    if not all(hasattr(storage, attr) for attr in ("bucket_name", "location", "connection")):
        return False
    try:
        theirs = storage.connection.meta.client.meta.endpoint_url
    except AttributeError:
        return False
    return bool(theirs == store.client.meta.endpoint_url)


def _copy_in_parts(client: Any, source: dict[str, str], bucket: str, key: str, size: int,
                   extra: dict[str, Any]) -> None:
    """A server-side copy above CopyObject's 5 GiB: a multipart upload of ``UploadPartCopy`` ranges."""
    part = max(_COPY_LIMIT // 5, -(-size // MAX_PARTS))  # 1 GiB ranges
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **extra)["UploadId"]
    try:
        parts = []
        for number, start in enumerate(range(0, size, part), start=1):
            end = min(start + part, size) - 1
            response = client.upload_part_copy(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                               CopySource=source, CopySourceRange=f"bytes={start}-{end}")
            parts.append({"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]})
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def _lock_doc(body: bytes) -> dict[str, Any]:
    """A lock object's JSON (``{}`` if unreadable: then it is nobody's, and not free)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _require_boto3() -> None:
    try:
        import boto3  # type: ignore[import-untyped, unused-ignore]  # noqa: F401
    except ImportError as exc:
        raise ImportError("S3 storage needs boto3: pip install 'uploadguard[s3]'") from exc


def _error_code(exc: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a botocore ``ClientError``; ("", 0) for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _response_date(response: dict[str, Any]) -> float:
    """The S3 server's ``Date`` of a response (epoch seconds); this host's clock if it sent none."""
    raw = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if raw:
        with contextlib.suppress(TypeError, ValueError):
            return parsedate_to_datetime(raw).timestamp()
    return time.time()
