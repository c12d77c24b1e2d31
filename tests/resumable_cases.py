"""The resumable endpoint's protocol and bad-input cases, as data: one table both drivers must pass.

``tests/test_resumable_cases.py`` runs every :class:`Case` through the WSGI
endpoint and the ASGI endpoint (:mod:`uploadguard.resumable.asgi`), so the two
cannot drift.  A case is a few requests; each names the status and the
headers it must get.  ``{url}`` (``{a}``, ``{b}``) in a path or header is the
``Location`` a step saved under that name; ``stored`` is the data of ``{url}``
at the end (``None``: the upload is gone).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib

import pytest

MAX_SIZE = 1000
OCTETS = "application/offset+octet-stream"
TUS = {"Tus-Resumable": "1.0.0"}
IETF6 = {"Upload-Draft-Interop-Version": "6"}
IETF5 = {"Upload-Draft-Interop-Version": "5"}


def _sum(algorithm: str, data: bytes) -> str:
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


@dataclasses.dataclass(frozen=True)
class Step:
    method: str
    path: str
    headers: dict[str, str]
    status: int
    body: bytes | None = None  # None: no body (no Content-Length)
    expect: dict[str, str | None] = dataclasses.field(default_factory=dict)  # None: the header is absent
    save: str | None = None  # keep the answer's Location under this name
    chunked: bool = False  # the body without a Content-Length


@dataclasses.dataclass(frozen=True)
class Case:
    steps: tuple[Step, ...]
    stored: bytes | None | type[Ellipsis] = ...  # the data of {url} at the end; ...: not checked


def create(length: int | None = 10, **headers: str) -> Step:
    sent = {**TUS, **({"Upload-Length": str(length)} if length is not None else {}), **headers}
    return Step("POST", "/files/", sent, 201, save="url")


def patch(offset: int, body: bytes, status: int = 204, url: str = "{url}",
          expect: dict[str, str | None] | None = None, **headers: str) -> Step:
    sent = {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS, **headers}
    return Step("PATCH", url, sent, status, body=body, expect=expect or {})


def head(status: int = 200, url: str = "{url}", **expect: str | None) -> Step:
    return Step("HEAD", url, dict(TUS), status, expect=expect)


CASES = [
    # -- tus 1.0 ---------------------------------------------------------------------------------
    pytest.param(Case((Step("OPTIONS", "/files/", {}, 204, expect={
        "Tus-Version": "1.0.0", "Tus-Max-Size": str(MAX_SIZE), "Tus-Checksum-Algorithm": "sha1,md5,sha256"}),)),
        id="options-advertises-the-server"),
    pytest.param(Case((create(10), patch(0, b"01234", expect={"Upload-Offset": "5"}),
                       head(**{"Upload-Offset": "5", "Upload-Length": "10", "Cache-Control": "no-store"}),
                       patch(5, b"56789", expect={"Upload-Offset": "10"})), stored=b"0123456789"),
                 id="upload-in-chunks"),
    pytest.param(Case((Step("POST", "/files/", {**TUS, "Upload-Length": "3", "Content-Type": OCTETS}, 201,
                            body=b"abc", save="url", expect={"Upload-Offset": "3"}),), stored=b"abc"),
                 id="creation-with-upload"),
    pytest.param(Case((create(None, **{"Upload-Defer-Length": "1"}),
                       head(**{"Upload-Defer-Length": "1", "Upload-Length": None}),
                       patch(0, b"abc", **{"Upload-Length": "3"}),
                       head(**{"Upload-Offset": "3", "Upload-Length": "3"})), stored=b"abc"),
                 id="deferred-length-declared-by-a-patch"),
    pytest.param(Case((create(3), Step("DELETE", "{url}", dict(TUS), 204), head(404)), stored=None),
                 id="termination"),
    pytest.param(Case((create(6), patch(0, b"abcdef", **{"Upload-Checksum": _sum("sha1", b"abcdef")}),),
                      stored=b"abcdef"), id="checksum-match"),
    pytest.param(Case((Step("POST", "/files/", {**TUS, "Upload-Length": "3", "Upload-Concat": "partial"}, 201,
                            save="a"),
                       Step("POST", "/files/", {**TUS, "Upload-Length": "2", "Upload-Concat": "partial"}, 201,
                            save="b"),
                       patch(0, b"abc", url="{a}"), patch(0, b"de", url="{b}"),
                       Step("POST", "/files/", {**TUS, "Upload-Concat": "final;{a} {b}"}, 201, save="url",
                            expect={"Upload-Length": "5", "Upload-Offset": "5"}),
                       head(**{"Upload-Concat": "final;{a} {b}"})), stored=b"abcde"),
                 id="concatenation"),
    pytest.param(Case((Step("OPTIONS", "/files/", {"Origin": "https://app.example",
                                                   "Access-Control-Request-Method": "PATCH"}, 204,
                            expect={"Access-Control-Allow-Origin": "https://app.example", "Tus-Resumable": None}),)),
                 id="cors-preflight"),
    pytest.param(Case((create(3), Step("POST", "{url}", {**TUS, "X-HTTP-Method-Override": "HEAD"}, 200,
                                       expect={"Upload-Offset": "0"})),),
                 id="method-override"),
    # -- the IETF draft ----------------------------------------------------------------------------
    pytest.param(Case((Step("POST", "/files/", {**IETF6, "Upload-Complete": "?1"}, 201, body=b"hello", save="url",
                            expect={"Upload-Complete": "?1", "Upload-Offset": "5",
                                    "Upload-Draft-Interop-Version": "6", "Tus-Resumable": None}),),
                      stored=b"hello"), id="ietf6-creation-complete"),
    pytest.param(Case((Step("POST", "/files/", {**IETF5, "Upload-Complete": "?0"}, 201, body=b"he", save="url",
                            expect={"Upload-Complete": "?0"}),
                       Step("HEAD", "{url}", dict(IETF5), 204, expect={"Upload-Offset": "2", "Upload-Complete": "?0"}),
                       Step("PATCH", "{url}", {**IETF5, "Upload-Offset": "2", "Upload-Complete": "?1"}, 204,
                            body=b"llo", expect={"Upload-Complete": "?1", "Upload-Offset": "5"})), stored=b"hello"),
                 id="ietf5-resumed"),
    pytest.param(Case((Step("POST", "/files/", {**IETF6}, 400, body=b"x"),)), id="ietf-without-upload-complete"),
    pytest.param(Case((Step("POST", "/files/", {**IETF6, "Upload-Complete": "?1", "Upload-Length": "9"}, 400,
                            body=b"abc"),)), id="ietf-length-disagrees-with-body"),
    # -- bad input ---------------------------------------------------------------------------------
    pytest.param(Case((Step("POST", "/files/", {"Upload-Length": "10"}, 412),)), id="no-version"),
    pytest.param(Case((Step("POST", "/files/", {"Tus-Resumable": "0.2.2", "Upload-Length": "10"}, 412),)),
                 id="unsupported-version"),
    pytest.param(Case((Step("POST", "/files/", {**TUS, "Upload-Length": str(MAX_SIZE + 1)}, 413),)),
                 id="creation-over-max-size"),
    pytest.param(Case((Step("POST", "/files/", dict(TUS), 400),)), id="creation-without-a-length"),
    pytest.param(Case((Step("POST", "/files/", {**TUS, "Upload-Length": "5", "Upload-Defer-Length": "1"}, 400),)),
                 id="creation-with-length-and-deferral"),
    pytest.param(Case((Step("POST", "/files/", {**TUS, "Upload-Defer-Length": "2"}, 400),)),
                 id="defer-length-not-1"),
    pytest.param(Case((Step("POST", "/files/", {**TUS, "Upload-Length": "-1"}, 400),)), id="negative-length"),
    pytest.param(Case((Step("POST", "/files/", {**TUS, "Upload-Length": "5", "Upload-Metadata": "name !!!"}, 400),)),
                 id="metadata-not-base64"),
    pytest.param(Case((Step("POST", "/files/", {**TUS, "Upload-Length": "3", "Content-Type": "text/plain"}, 415,
                            body=b"abc"),)), id="creation-body-of-the-wrong-type"),
    pytest.param(Case((Step("GET", "/files/", dict(TUS), 405),)), id="get-on-the-collection"),
    pytest.param(Case((Step("GET", "/files/AAAAAAAAAAAAAAAAAAAAAAAA", dict(TUS), 405),)), id="get-on-an-upload"),
    pytest.param(Case((head(404, url="/files/AAAAAAAAAAAAAAAAAAAAAAAA"),)), id="unknown-upload"),
    pytest.param(Case((head(404, url="/files/..%2F..%2Fetc%2Fpasswd"),)), id="id-not-of-the-pattern"),
    pytest.param(Case((create(10), patch(3, b"abc", 409), head(**{"Upload-Offset": "0"})), stored=b""),
                 id="patch-at-a-wrong-offset"),
    pytest.param(Case((create(10), Step("PATCH", "{url}", {**TUS, "Content-Type": OCTETS}, 400, body=b"abc")),
                      stored=b""), id="patch-without-offset"),
    pytest.param(Case((create(10), patch(0, b"abc", 400, **{"Upload-Offset": "x1"})), stored=b""),
                 id="patch-offset-not-a-number"),
    pytest.param(Case((create(10), patch(0, b"abc", 415, **{"Content-Type": "text/plain"})), stored=b""),
                 id="patch-of-the-wrong-type"),
    pytest.param(Case((create(4), patch(0, b"abcdef", 413), head(**{"Upload-Offset": "0"})), stored=b""),
                 id="patch-past-the-length"),
    pytest.param(Case((create(4),
                       Step("PATCH", "{url}", {**TUS, "Upload-Offset": "0", "Content-Type": OCTETS}, 413,
                            body=b"abcdef", chunked=True),
                       head(**{"Upload-Offset": "0"})), stored=b""),
                 id="chunked-patch-past-the-length"),
    pytest.param(Case((create(6), patch(0, b"abcdef", 460, **{"Upload-Checksum": _sum("md5", b"nope")}),
                       head(**{"Upload-Offset": "0"})), stored=b""), id="checksum-mismatch"),
    pytest.param(Case((create(6), patch(0, b"abcdef", 400, **{"Upload-Checksum": "crc32 AAAA"})), stored=b""),
                 id="checksum-algorithm-unknown"),
    pytest.param(Case((create(3), patch(0, b"abc"), patch(3, b"d", 413)), stored=b"abc"),
                 id="patch-after-the-upload-is-complete"),
    pytest.param(Case((create(None, **{"Upload-Defer-Length": "1"}), patch(0, b"abc", 413, **{"Upload-Length": "2"})),
                      stored=b""), id="declared-length-below-the-body"),
]
