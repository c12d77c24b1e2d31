"""The resumable-upload protocols as pure functions: headers in, values or error responses out.

Nothing here touches a file, a socket or a clock, so every rule is a table
test (``tests/test_resumable_protocol.py``).  Two dialects share one endpoint:

* **tus 1.0.0** (``Tus-Resumable: 1.0.0``): https://tus.io/protocols/resumable-upload
* **the IETF draft** "Resumable Uploads for HTTP" in the interop versions that
  tus-js-client 4 speaks through its ``protocol`` option: ``ietf-draft-03``
  sends ``Upload-Draft-Interop-Version: 5``, ``ietf-draft-05`` sends ``6``.
  These requests carry no ``Tus-Resumable``; the draft's ``Upload-Complete``
  (a structured-field boolean, ``?0``/``?1``) replaces tus's lengths.

Where a status is chosen, it is chosen once:

* :func:`check_offset` -- a client's ``Upload-Offset`` against the durable offset (409);
* :func:`check_append` -- whether a PATCH of a given size may be appended at all (413, 400);
* :func:`creation_too_large` -- the 413-before-any-byte decision, from headers only (made before
  the body is read, so with the gunicorn hook's deferred ``100 Continue`` the client sends none of it).

Errors are responses (:class:`~uploadguard.errors.UploadGuardError` subclasses).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from typing import ClassVar

from ..errors import BadRequest, BodyTooLarge, UploadGuardError

__all__ = [
    "TUS_VERSION", "TUS_EXTENSIONS", "CHECKSUM_ALGORITHMS", "INTEROP_VERSIONS", "OFFSET_CONTENT_TYPE",
    "PARTIAL_UPLOAD_CONTENT_TYPE", "MAX_METADATA_SIZE",
    "ResumableError", "UnsupportedVersion", "UnsupportedMediaType", "OffsetMismatch", "ChecksumMismatch",
    "UploadLocked", "UploadNotFound", "UploadGone", "UploadIncomplete", "MethodNotAllowed", "Forbidden",
    "HookFailed",
    "Checksum", "Concat", "Dialect", "UploadInfo",
    "method_of", "dialect_of", "parse_number", "parse_optional_number", "parse_metadata", "encode_metadata",
    "parse_checksum", "parse_concat", "parse_upload_complete", "check_partial_upload_type", "check_offset",
    "check_append",
    "creation_too_large", "http_date",
]

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = (
    "creation", "creation-with-upload", "creation-defer-length", "expiration", "checksum", "termination",
    "concatenation",
)
#: Algorithms for ``Upload-Checksum``, as tus names them, mapped to :mod:`hashlib` names.
CHECKSUM_ALGORITHMS = {"sha1": "sha1", "md5": "md5", "sha256": "sha256"}
#: ``Upload-Draft-Interop-Version`` values understood (tus-js-client's ietf-draft-03 and -05).
INTEROP_VERSIONS = (5, 6)
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
#: The draft-05 (interop 6) PATCH media type; interop 5 sends none.
PARTIAL_UPLOAD_CONTENT_TYPE = "application/partial-upload"

_DIGITS = re.compile(r"[0-9]{1,19}")
_METADATA_KEY = re.compile(r"[!-+\--~]+")  # visible ASCII except "," (tus: no spaces, no commas)
_MAX_NUMBER = 2**63 - 1  # what off_t holds
#: The most ``Upload-Metadata`` may hold, decoded (keys and values, in bytes).  It is stored with the
#: upload and echoed on every HEAD: unbounded, repeated header lines (which servers join) stored
#: hundreds of KB and answered them as one header line that clients and proxies refuse.
MAX_METADATA_SIZE = 4 * 1024


class ResumableError(UploadGuardError):
    """Base of the tus statuses; ``extra`` headers ride along (``Upload-Offset``, ``Tus-Version``...)."""

    def __init__(self, detail: str, *, reason: str | None = None,
                 extra: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(detail, reason=reason)
        self.extra = extra

    def headers(self) -> list[tuple[str, str]]:
        return [*super().headers(), *self.extra]


class UnsupportedVersion(ResumableError):
    """412: neither a tus version nor a draft interop version this server speaks."""

    status_code = 412
    title = "Precondition Failed"
    reason = "unsupported_version"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, extra=(("Tus-Version", TUS_VERSION),))


class UnsupportedMediaType(ResumableError):
    """415: a PATCH body of the wrong type (tus: ``application/offset+octet-stream``, draft-05: ``partial-upload``)."""

    status_code = 415
    title = "Unsupported Media Type"
    reason = "unsupported_media_type"


class OffsetMismatch(ResumableError):
    """409: the client's ``Upload-Offset`` is not where the upload stands; it should HEAD and resume."""

    status_code = 409
    title = "Conflict"
    reason = "offset_mismatch"


class ChecksumMismatch(ResumableError):
    """460 (tus): the chunk's checksum did not match; the chunk was discarded."""

    status_code = 460
    title = "Checksum Mismatch"
    reason = "checksum_mismatch"


class UploadLocked(ResumableError):
    """423: another request holds the upload and did not let go in time; retry shortly."""

    status_code = 423
    title = "Locked"
    reason = "locked"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        self.retry_after = retry_after
        super().__init__(detail, extra=(("Retry-After", str(retry_after)),))


class UploadNotFound(ResumableError, LookupError):
    """404: no such upload (never created, terminated, storage lost, or someone else's)."""

    status_code = 404
    title = "Not Found"
    reason = "upload_not_found"


class UploadGone(UploadNotFound):
    """410: the upload existed but expired; the client must start again."""

    status_code = 410
    title = "Gone"
    reason = "upload_expired"


class UploadIncomplete(ResumableError):
    """400: an upload named in a form was not finished (for the app's own lookups, not tus)."""

    status_code = 400
    title = "Bad Request"
    reason = "upload_incomplete"


class MethodNotAllowed(ResumableError):
    """405: a method the endpoint does not serve on this URL."""

    status_code = 405
    title = "Method Not Allowed"
    reason = "method_not_allowed"

    def __init__(self, detail: str, *, allow: str) -> None:
        super().__init__(detail, extra=(("Allow", allow),))


class Forbidden(ResumableError):
    """403: ``authorize`` refused the requester."""

    status_code = 403
    title = "Forbidden"
    reason = "forbidden"


class HookFailed(ResumableError):
    """500: the upload is stored, but the application's ``on_complete`` raised (it runs again on the next request)."""

    status_code = 500
    title = "Internal Server Error"
    reason = "on_complete_failed"


class Dialect:
    """Which protocol a request speaks; ``interop`` is the draft's interop version or ``None`` for tus."""

    TUS: ClassVar[str] = "tus"
    IETF: ClassVar[str] = "ietf"


@dataclasses.dataclass(frozen=True)
class Checksum:
    """A parsed ``Upload-Checksum``: the algorithm (tus name) and the expected digest."""

    algorithm: str
    digest: bytes

    def new(self) -> hashlib._Hash:
        return hashlib.new(CHECKSUM_ALGORITHMS[self.algorithm])


@dataclasses.dataclass(frozen=True)
class Concat:
    """A parsed ``Upload-Concat``: ``partial``, or ``final`` with the URLs of its parts in order."""

    final: bool
    parts: tuple[str, ...] = ()


def method_of(environ: Mapping[str, object]) -> str:
    """The request method, honouring ``X-HTTP-Method-Override`` on a POST (tus, for clients stuck with POST).

    Only a POST may become another method: a GET or HEAD turned into a DELETE
    or PATCH would pass CSRF checks and CORS rules made for safe methods.
    """
    method = str(environ.get("REQUEST_METHOD", "GET")).upper()
    override = environ.get("HTTP_X_HTTP_METHOD_OVERRIDE")
    if method == "POST" and isinstance(override, str) and override.strip():
        return override.strip().upper()
    return method


def dialect_of(tus_resumable: str | None, interop: str | None) -> tuple[str, int | None] | None:
    """``(Dialect.TUS, None)``, ``(Dialect.IETF, version)``, or ``None`` when the request names neither.

    A ``Tus-Resumable`` other than 1.0.0 or an unknown interop version is a 412 (with
    ``Tus-Version``, so a tus client can see what is spoken).
    """
    if interop is not None:
        value = interop.strip()
        if not _DIGITS.fullmatch(value) or int(value) not in INTEROP_VERSIONS:
            raise UnsupportedVersion(
                f"Upload-Draft-Interop-Version {interop!r} is not supported; "
                f"this server speaks {', '.join(map(str, INTEROP_VERSIONS))} and tus {TUS_VERSION}."
            )
        return Dialect.IETF, int(value)
    if tus_resumable is not None:
        if tus_resumable.strip() != TUS_VERSION:
            raise UnsupportedVersion(
                f"Tus-Resumable {tus_resumable!r} is not supported; this server speaks {TUS_VERSION}."
            )
        return Dialect.TUS, None
    return None


def parse_number(value: str | None, name: str) -> int:
    """A required non-negative decimal header (offsets, lengths); anything else is a 400 naming it."""
    if value is None:
        raise BadRequest(f"The {name} header is missing.", reason="missing_header")
    number = value.strip()
    if not _DIGITS.fullmatch(number) or int(number) > _MAX_NUMBER:
        raise BadRequest(f"{name} must be a whole number of bytes >= 0, not {value[:40]!r}.", reason="bad_header")
    return int(number)


def parse_optional_number(value: str | None, name: str) -> int | None:
    """As :func:`parse_number`, but an absent header is ``None``."""
    return None if value is None else parse_number(value, name)


def parse_metadata(value: str | None) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64value`` (or a bare ``key``) pairs.

    Values must be strict base64 of UTF-8 text (the API hands the app ``str``);
    keys are unique.  Anything else is a 400: a malformed header must not create
    an upload whose file name the app would then guess.  So is metadata over
    :data:`MAX_METADATA_SIZE` decoded bytes (a header this long is refused before
    it is decoded).
    """
    metadata: dict[str, str] = {}
    if value is None or not value.strip():
        return metadata
    too_large = BadRequest(f"Upload-Metadata is larger than {MAX_METADATA_SIZE} bytes decoded "
                           f"(keys and values); send less.", reason="metadata_too_large")
    if len(value) > 2 * MAX_METADATA_SIZE:  # base64 is 4/3 of the bytes: this cannot decode within the cap
        raise too_large
    size = 0
    for pair in value.split(","):
        parts = pair.strip().split(" ")
        if len(parts) > 2 or not _METADATA_KEY.fullmatch(parts[0]):
            raise BadRequest(f"Upload-Metadata has a malformed pair {pair.strip()[:60]!r}.", reason="bad_metadata")
        key = parts[0]
        if key in metadata:
            raise BadRequest(f"Upload-Metadata names {key!r} twice.", reason="bad_metadata")
        try:
            metadata[key] = base64.b64decode(parts[1], validate=True).decode("utf-8") if len(parts) == 2 else ""
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadRequest(f"Upload-Metadata value of {key!r} is not base64 of UTF-8 text.",
                             reason="bad_metadata") from None
        size += len(key) + len(metadata[key].encode())
        if size > MAX_METADATA_SIZE:
            raise too_large
    return metadata


def encode_metadata(metadata: Mapping[str, str]) -> str:
    """The ``Upload-Metadata`` header for a dict (what HEAD answers)."""
    return ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}" if value else key for key, value in metadata.items()
    )


def parse_checksum(value: str | None) -> Checksum | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``; an unknown algorithm is a 400 (tus)."""
    if value is None:
        return None
    parts = value.strip().split(" ")
    if len(parts) != 2:
        raise BadRequest("Upload-Checksum must be '<algorithm> <base64 digest>'.", reason="bad_checksum")
    algorithm = parts[0].lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise BadRequest(f"Checksum algorithm {parts[0][:20]!r} is not supported; use one of "
                         f"{', '.join(CHECKSUM_ALGORITHMS)}.", reason="bad_checksum")
    try:
        digest = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("Upload-Checksum digest is not base64.", reason="bad_checksum") from None
    if len(digest) != hashlib.new(CHECKSUM_ALGORITHMS[algorithm]).digest_size:
        raise BadRequest(f"Upload-Checksum digest has the wrong length for {algorithm}.", reason="bad_checksum")
    return Checksum(algorithm, digest)


def parse_concat(value: str | None) -> Concat | None:
    """``Upload-Concat: partial`` or ``final;<url> <url>...`` (tus concatenation)."""
    if value is None:
        return None
    text = value.strip()
    if text == "partial":
        return Concat(final=False)
    if text.startswith("final;"):
        parts = tuple(part for part in text[len("final;"):].split(" ") if part)
        if parts:
            return Concat(final=True, parts=parts)
    raise BadRequest("Upload-Concat must be 'partial' or 'final;<url> <url>...'.", reason="bad_concat")


def parse_upload_complete(value: str | None) -> bool | None:
    """The draft's ``Upload-Complete``: a structured-field boolean, ``?1`` or ``?0``."""
    if value is None:
        return None
    text = value.strip()
    if text == "?1":
        return True
    if text == "?0":
        return False
    raise BadRequest(f"Upload-Complete must be ?0 or ?1, not {value[:20]!r}.", reason="bad_header")


def check_partial_upload_type(interop: int, content_type: str | None, *, has_body: bool) -> None:
    """The draft's PATCH media type: from interop version 6 (draft-05) an append with content must be
    ``application/partial-upload`` (parameters allowed); anything else is a 415.  Interop 5 names none.
    An empty append carries no representation, so no type is required of it.
    """
    if interop < 6 or not has_body:
        return
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != PARTIAL_UPLOAD_CONTENT_TYPE:
        raise UnsupportedMediaType(f"A PATCH body of Upload-Draft-Interop-Version {interop} must be "
                                   f"{PARTIAL_UPLOAD_CONTENT_TYPE}, not {(content_type or 'none')[:60]!r}.")


def check_offset(requested: int, current: int) -> None:
    """A PATCH's ``Upload-Offset`` against the durable offset: anything but equal is a 409.

    The 409 carries the server's offset so a client may resume without a HEAD;
    the bytes are never appended at another position (that would corrupt the file).
    """
    if requested != current:
        raise OffsetMismatch(
            f"Upload-Offset is {requested} but the upload stands at {current}; send a HEAD and resume from there.",
            extra=(("Upload-Offset", str(current)),),
        )


def check_append(*, offset: int, length: int | None, max_size: int, content_length: int | None) -> int:
    """How many bytes a PATCH at ``offset`` may append; refuse one that cannot fit.

    ``length`` is the declared ``Upload-Length`` (``None`` while deferred);
    ``max_size`` the endpoint's limit (0: none).  A ``Content-Length`` that would
    pass the length or the limit is a 413 before any byte is read.  Returns the
    byte budget; a chunked body longer than it is refused after the fact.
    """
    if length is not None:
        budget = length - offset
        if content_length is not None and content_length > budget:
            raise BodyTooLarge(budget, length=content_length)
        return budget
    if max_size:
        budget = max_size - offset
        if content_length is not None and content_length > budget:
            raise BodyTooLarge(max_size, length=offset + content_length)
        return budget
    return _MAX_NUMBER - offset


def creation_too_large(headers: Mapping[str, str], max_size: int) -> BodyTooLarge | None:
    """The 413 an upload-creating request deserves from its headers alone, or ``None``.

    ``headers`` maps lower-case names to values.  An ``Upload-Length`` over
    ``max_size`` (0: no limit) is refused before any byte, so a server that
    would answer ``100 Continue`` should not.
    """
    if not max_size:
        return None
    raw = headers.get("upload-length")
    if raw is None:
        return None
    value = raw.strip()
    if _DIGITS.fullmatch(value) and int(value) > max_size:
        return BodyTooLarge(max_size, length=int(value))
    return None


def http_date(timestamp: float) -> str:
    """An RFC 7231 IMF-fixdate, as ``Upload-Expires`` wants it."""
    from email.utils import formatdate

    return formatdate(timestamp, usegmt=True)


#: The format of ``<id>.info`` (:meth:`UploadInfo.to_json`).
_INFO_VERSION = 1


@dataclasses.dataclass(frozen=True)
class UploadInfo:
    """What the store knows about an upload.  ``offset`` and ``updated`` come from the data itself."""

    id: str
    length: int | None  # bytes; None while Upload-Defer-Length
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    owner: str | None = None
    created: float = 0.0  # epoch seconds
    expires_after: float | None = None  # seconds of inactivity before an incomplete upload expires
    partial: bool = False  # a tus concatenation part
    parts: tuple[str, ...] | None = None  # ids of the parts of a final concatenation
    completed: bool = False  # all bytes in and fsynced
    hook_done: bool = False  # on_complete returned
    #: seconds a completed upload is kept after it completed (0 = forever); ``None``: not recorded
    #: (an info written before uploadguard recorded it), so the reader's default applies
    keep_completed: float | None = None
    completed_at: float = 0.0  # epoch seconds of the completion; 0 = not completed, or not recorded
    offset: int = 0  # bytes stored
    updated: float = 0.0  # epoch seconds of the last write

    @property
    def expires(self) -> float | None:
        """When the upload expires (epoch seconds), or ``None`` (completed, or no expiry).

        A concatenation part expires even when complete: once the final upload
        joined it, nobody asks for it again.
        """
        if (self.completed and not self.partial) or self.expires_after is None:
            return None
        return max(self.created, self.updated) + self.expires_after

    def discard_at(self, default_keep: float) -> float | None:
        """When a completed upload the application never deleted is removed (epoch seconds), or ``None``.

        ``keep_completed`` seconds after it completed (``default_keep`` when the
        info recorded none; 0 = never).  Without it, every completed upload no
        form ever claims -- an ``Upload-Length: 0`` creation completes at once --
        would stay for good.  Concatenation parts expire by :attr:`expires`
        instead.  An upload completed before the time was recorded counts from
        its last write.
        """
        if not self.completed or self.partial:
            return None
        keep = default_keep if self.keep_completed is None else self.keep_completed
        if not keep:
            return None
        return (self.completed_at or max(self.created, self.updated)) + keep

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        for derived in ("offset", "updated"):
            del data[derived]
        data["version"] = _INFO_VERSION
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, offset: int, updated: float) -> UploadInfo:
        data = json.loads(raw)
        data.pop("version", None)
        if data.get("parts") is not None:
            data["parts"] = tuple(data["parts"])
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}, offset=offset, updated=updated)
