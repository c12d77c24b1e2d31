"""The resumable endpoint in-process (webtest): tus 1.0, the IETF draft, bad input, hooks, storage failures."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import webtest

from tests.support import needs_root, tmpfs
from uploadguard.config import Settings
from uploadguard.resumable import ResumableUploads, Upload, UploadIncomplete, UploadNotFound
from uploadguard.resumable.store import UploadInfo, new_upload_id

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
LIMIT = 1000


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def fallback(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"app"]


class Hooks:
    """An on_complete that records what it was given (and can be told to fail)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, dict[str, str], bytes, str | None]] = []
        self.fail = False

    def __call__(self, upload: Upload) -> None:
        if self.fail:
            raise RuntimeError("hook failed")
        with upload.open() as fh:
            data = fh.read()
        self.calls.append((upload.id, upload.length, upload.metadata, data, upload.path))


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
def endpoint(storage: Path, hooks: Hooks, tmp_path: Path) -> ResumableUploads:
    settings = Settings.from_environ({}, temp_dir=tmp_path / "tmp", min_free_space=0)
    return ResumableUploads(fallback, storage=storage, max_size=LIMIT, on_complete=hooks, settings=settings,
                            cors_origins=["https://app.example"], lock_timeout=0.3)


@pytest.fixture
def app(endpoint: ResumableUploads) -> webtest.TestApp:
    return webtest.TestApp(endpoint)


def create(app: webtest.TestApp, length: int | None = 10, *, status: int | str = 201, **headers: str) -> Any:
    sent = {**TUS, **({"Upload-Length": str(length)} if length is not None else {}), **headers}
    return app.post("/files/", headers=sent, status=status)


def path_of(response: Any) -> str:
    location: str = response.headers["Location"]
    assert location.startswith("/files/")
    return location


def patch(app: webtest.TestApp, url: str, offset: int, body: bytes, *, status: int | str = 204,
          **headers: str) -> Any:
    sent = {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS, **headers}
    return app.patch(url, params=body, headers=sent, status=status)


def stored(storage: Path, url: str) -> bytes:
    return (storage / (url.rsplit("/", 1)[1] + ".bin")).read_bytes()


class TestTusCore:
    def test_options_advertises_the_server(self, app: webtest.TestApp) -> None:
        """OPTIONS names the version, the extensions, the limit and the checksum algorithms."""
        response = app.options("/files/", status=204)
        assert response.headers["Tus-Version"] == "1.0.0"
        assert set(response.headers["Tus-Extension"].split(",")) >= {
            "creation", "creation-with-upload", "creation-defer-length", "expiration", "checksum", "termination",
            "concatenation"}
        assert response.headers["Tus-Max-Size"] == str(LIMIT)
        assert response.headers["Tus-Checksum-Algorithm"] == "sha1,md5,sha256"

    def test_upload_in_chunks(self, app: webtest.TestApp, storage: Path, hooks: Hooks) -> None:
        """Create, PATCH in chunks with HEADs between: 204s with the new offset, the file whole at the end."""
        url = path_of(create(app, 10, **{"Upload-Metadata": f"filename {b64('a.txt')}"}))
        head = app.head(url, headers=TUS, status=200)
        assert (head.headers["Upload-Offset"], head.headers["Upload-Length"]) == ("0", "10")
        assert head.headers["Cache-Control"] == "no-store" and head.headers["Tus-Resumable"] == "1.0.0"
        assert head.headers["Upload-Metadata"] == f"filename {b64('a.txt')}"
        assert patch(app, url, 0, b"01234").headers["Upload-Offset"] == "5"
        assert app.head(url, headers=TUS).headers["Upload-Offset"] == "5"
        response = patch(app, url, 5, b"56789")
        assert response.headers["Upload-Offset"] == "10" and "Upload-Expires" not in response.headers
        assert stored(storage, url) == b"0123456789"
        assert [(c[1], c[2], c[3]) for c in hooks.calls] == [(10, {"filename": "a.txt"}, b"0123456789")]

    def test_creation_with_upload(self, app: webtest.TestApp, storage: Path, hooks: Hooks) -> None:
        """A POST with a body stores it and answers the offset (creation-with-upload)."""
        response = app.post("/files/", params=b"abc", headers={**TUS, "Upload-Length": "5", "Content-Type": OCTETS},
                            status=201)
        url = path_of(response)
        assert response.headers["Upload-Offset"] == "3" and stored(storage, url) == b"abc"
        patch(app, url, 3, b"de")
        assert len(hooks.calls) == 1

    def test_deferred_length(self, app: webtest.TestApp, hooks: Hooks) -> None:
        """Upload-Defer-Length: 1, then a PATCH declaring Upload-Length completes the upload."""
        url = path_of(create(app, None, **{"Upload-Defer-Length": "1"}))
        assert app.head(url, headers=TUS).headers["Upload-Defer-Length"] == "1"
        patch(app, url, 0, b"abc")
        patch(app, url, 3, b"de", **{"Upload-Length": "5"})
        head = app.head(url, headers=TUS)
        assert head.headers["Upload-Length"] == "5" and [c[3] for c in hooks.calls] == [b"abcde"]

    def test_expiration_header(self, app: webtest.TestApp) -> None:
        """An incomplete upload's responses carry Upload-Expires, an HTTP date in the future."""
        from email.utils import parsedate_to_datetime

        response = create(app, 10)
        expires = parsedate_to_datetime(response.headers["Upload-Expires"]).timestamp()
        assert time.time() < expires <= time.time() + 86400 + 5

    def test_termination(self, app: webtest.TestApp, storage: Path) -> None:
        """DELETE is 204 and the upload is gone (404), files and lock included."""
        url = path_of(create(app, 10))
        patch(app, url, 0, b"abc")
        app.delete(url, headers=TUS, status=204)
        app.head(url, headers=TUS, status=404)
        assert os.listdir(storage) == []

    def test_method_override(self, app: webtest.TestApp) -> None:
        """X-HTTP-Method-Override: PATCH on a POST appends."""
        url = path_of(create(app, 3))
        app.post(url, params=b"abc", headers={**TUS, "X-HTTP-Method-Override": "PATCH", "Upload-Offset": "0",
                                              "Content-Type": OCTETS}, status=204)
        assert app.head(url, headers=TUS).headers["Upload-Offset"] == "3"

    def test_zero_length_upload_completes_at_creation(self, app: webtest.TestApp, hooks: Hooks) -> None:
        """An Upload-Length: 0 upload is complete when created."""
        create(app, 0)
        assert [c[1] for c in hooks.calls] == [0]

    def test_location_is_a_path_under_script_name(self, endpoint: ResumableUploads) -> None:
        """Location is a path (right behind a TLS proxy) and includes the mount point (SCRIPT_NAME)."""
        mounted = webtest.TestApp(endpoint, extra_environ={"SCRIPT_NAME": "/app"})
        location = create(mounted, 3).headers["Location"]
        assert location.startswith("/app/files/") and len(location.rsplit("/", 1)[1]) == 24

    def test_other_paths_go_to_the_app(self, app: webtest.TestApp) -> None:
        """Requests outside the prefix reach the wrapped application."""
        assert app.get("/elsewhere").text == "app"


class TestChecksum:
    def test_match_appends(self, app: webtest.TestApp, storage: Path) -> None:
        """A PATCH with a matching Upload-Checksum is appended."""
        url = path_of(create(app, 3))
        digest = base64.b64encode(hashlib.sha256(b"abc").digest()).decode()
        patch(app, url, 0, b"abc", **{"Upload-Checksum": f"sha256 {digest}"})
        assert stored(storage, url) == b"abc"

    def test_mismatch_is_460_and_discarded(self, app: webtest.TestApp, storage: Path) -> None:
        """A mismatching checksum is a 460 and the offset stays."""
        url = path_of(create(app, 6))
        patch(app, url, 0, b"ab")
        digest = base64.b64encode(hashlib.md5(b"other").digest()).decode()
        patch(app, url, 2, b"cdef", status=460, **{"Upload-Checksum": f"md5 {digest}"})
        assert app.head(url, headers=TUS).headers["Upload-Offset"] == "2" and stored(storage, url) == b"ab"


class TestConcatenation:
    def test_partials_then_final(self, app: webtest.TestApp, hooks: Hooks) -> None:
        """Two partial uploads concatenated by a final one: one hook call, with the joined data."""
        first = path_of(create(app, 3, **{"Upload-Concat": "partial"}))
        second = path_of(create(app, 2, **{"Upload-Concat": "partial"}))
        patch(app, first, 0, b"abc")
        patch(app, second, 0, b"de")
        assert hooks.calls == []
        final = create(app, None, **{"Upload-Concat": f"final;{first} http://localhost{second}"})
        head = app.head(path_of(final), headers=TUS)
        assert (head.headers["Upload-Offset"], head.headers["Upload-Length"]) == ("5", "5")
        assert head.headers["Upload-Concat"] == f"final;{first} {second}"
        assert [c[3] for c in hooks.calls] == [b"abcde"]

    def test_a_part_joins_one_final_upload_only(self, app: webtest.TestApp, hooks: Hooks) -> None:
        """The parts are consumed by the final upload (the spec allows it): otherwise a few bytes of header
        would copy a 200 MB part again and again, each copy a completed upload that never expires.  The same
        join again (a retry whose answer was lost) is answered with that final upload, not a second copy."""
        part = path_of(create(app, 3, **{"Upload-Concat": "partial"}))
        patch(app, part, 0, b"abc")
        final = path_of(create(app, None, **{"Upload-Concat": f"final;{part}"}))
        app.head(part, headers=TUS, status=404)
        assert path_of(create(app, None, **{"Upload-Concat": f"final;{part}"})) == final
        other = path_of(create(app, 3, **{"Upload-Concat": "partial"}))
        patch(app, other, 0, b"def")
        create(app, None, status=404, **{"Upload-Concat": f"final;{part} {other}"})  # another join of it: gone
        assert app.head(final, headers=TUS).headers["Upload-Offset"] == "3"
        assert [c[3] for c in hooks.calls] == [b"abc"]

    def test_a_failing_hook_keeps_the_parts_for_the_retry(self, app: webtest.TestApp, hooks: Hooks,
                                                          endpoint: ResumableUploads) -> None:
        """on_complete raising on the final upload: a 500, the final goes, the parts stay; the client's retry
        joins them again and the hook sees the whole file -- nothing is lost, nothing is left over."""
        part = path_of(create(app, 3, **{"Upload-Concat": "partial"}))
        patch(app, part, 0, b"abc")
        hooks.fail = True
        create(app, None, status=500, **{"Upload-Concat": f"final;{part}"})
        assert [info.id for info in endpoint.store.uploads()] == [part.rsplit("/", 1)[1]]
        hooks.fail = False
        final = path_of(create(app, None, **{"Upload-Concat": f"final;{part}"}))
        assert [c[3] for c in hooks.calls] == [b"abc"]
        assert [info.id for info in endpoint.store.uploads()] == [final.rsplit("/", 1)[1]]

    def test_two_joins_of_one_part_at_once_make_one_final_upload(self, endpoint: ResumableUploads, hooks: Hooks,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """While one final upload copies a part (its lock held), another join of that part is refused: one
        final upload, one hook call, the part gone, and the refused join leaves nothing behind."""
        app = webtest.TestApp(endpoint)
        part = path_of(create(app, 3, **{"Upload-Concat": "partial"}))
        patch(app, part, 0, b"abc")
        copying, go_on = threading.Event(), threading.Event()
        real_open = endpoint.store.open

        def slow_open(upload_id: str) -> Any:
            copying.set()
            go_on.wait(30)
            return real_open(upload_id)

        monkeypatch.setattr(endpoint.store, "open", slow_open)
        first: list[Any] = []
        joiner = threading.Thread(target=lambda: first.append(
            create(webtest.TestApp(endpoint), None, **{"Upload-Concat": f"final;{part}"})))
        joiner.start()
        assert copying.wait(30)
        second = create(webtest.TestApp(endpoint), None, status="*", **{"Upload-Concat": f"final;{part}"})
        go_on.set()
        joiner.join(30)

        assert second.status_int == 423 and first[0].status_int == 201
        assert [c[3] for c in hooks.calls] == [b"abc"]
        assert [info.id for info in endpoint.store.uploads()] == [path_of(first[0]).rsplit("/", 1)[1]]

    def test_a_final_upload_left_half_copied_is_completed_by_the_retry(self, app: webtest.TestApp, hooks: Hooks,
                                                                       endpoint: ResumableUploads) -> None:
        """What a worker killed while joining leaves -- the final upload with the first part and a byte of
        the second -- is completed from its offset by the client's retry: one final upload, the whole data."""
        first = path_of(create(app, 3, **{"Upload-Concat": "partial"}))
        second = path_of(create(app, 2, **{"Upload-Concat": "partial"}))
        patch(app, first, 0, b"abc")
        patch(app, second, 0, b"de")
        part_ids = [first.rsplit("/", 1)[1], second.rsplit("/", 1)[1]]
        left = endpoint._final_id(None, part_ids)  # the killed join's final upload, as it had made it
        endpoint.store.create(UploadInfo(id=left, length=5, metadata={}, owner=None, created=time.time(),
                                         parts=tuple(part_ids)))
        endpoint.store.write(left, 0, io.BytesIO(b"abcd").read, 4)

        final = path_of(create(app, None, **{"Upload-Concat": f"final;{first} {second}"}))

        assert final == f"/files/{left}"
        assert [c[3] for c in hooks.calls] == [b"abcde"]
        assert [info.id for info in endpoint.store.uploads()] == [left]

    def test_a_part_named_twice_is_refused(self, app: webtest.TestApp, hooks: Hooks) -> None:
        """final;<a> <a> would double a part's bytes at no cost to the client: 400, nothing created."""
        part = path_of(create(app, 3, **{"Upload-Concat": "partial"}))
        patch(app, part, 0, b"abc")
        create(app, None, status=400, **{"Upload-Concat": f"final;{part} {part}"})
        assert app.head(part, headers=TUS).headers["Upload-Offset"] == "3" and hooks.calls == []

    def test_incomplete_part_is_refused(self, app: webtest.TestApp) -> None:
        """A final upload naming an unfinished part is a 400."""
        part = path_of(create(app, 3, **{"Upload-Concat": "partial"}))
        create(app, None, status=400, **{"Upload-Concat": f"final;{part}"})


class TestIetfDraft:
    @pytest.mark.parametrize("interop", ["5", "6"])
    def test_create_empty_then_append(self, app: webtest.TestApp, storage: Path, hooks: Hooks,
                                      interop: str) -> None:
        """An empty Upload-Complete: ?0 creation, then appends; the last says ?1 (what works without 104)."""
        draft = {"Upload-Draft-Interop-Version": interop}
        created = app.post("/files/", headers={**draft, "Upload-Complete": "?0", "Upload-Length": "6"}, status=201)
        url = path_of(created)
        assert "Tus-Resumable" not in created.headers
        head = app.head(url, headers=draft, status=204)
        assert (head.headers["Upload-Offset"], head.headers["Upload-Complete"]) == ("0", "?0")
        app.patch(url, params=b"abc", headers={**draft, "Upload-Offset": "0", "Upload-Complete": "?0",
                                               "Content-Type": "application/partial-upload"}, status=204)
        done = app.patch(url, params=b"def", status=204, headers={
            **draft, "Upload-Offset": "3", "Upload-Complete": "?1", "Content-Type": "application/partial-upload"})
        assert (done.headers["Upload-Offset"], done.headers["Upload-Complete"]) == ("6", "?1")
        assert stored(storage, url) == b"abcdef" and len(hooks.calls) == 1

    def test_whole_file_in_the_creation_request(self, app: webtest.TestApp, hooks: Hooks) -> None:
        """Upload-Complete: ?1 on a creation with a body stores the whole file at once."""
        app.post("/files/", params=b"whole", headers={"Upload-Draft-Interop-Version": "6", "Upload-Complete": "?1"},
                 status=201)
        assert [c[3] for c in hooks.calls] == [b"whole"]

    def test_length_unknown_until_complete(self, app: webtest.TestApp, hooks: Hooks) -> None:
        """Without Upload-Length, the length is known when a PATCH says ?1."""
        draft = {"Upload-Draft-Interop-Version": "6"}
        url = path_of(app.post("/files/", headers={**draft, "Upload-Complete": "?0"}, status=201))
        partial = {**draft, "Content-Type": "application/partial-upload"}
        app.patch(url, params=b"ab", headers={**partial, "Upload-Offset": "0", "Upload-Complete": "?0"})
        app.patch(url, params=b"c", headers={**partial, "Upload-Offset": "2", "Upload-Complete": "?1"})
        assert [c[3] for c in hooks.calls] == [b"abc"]

    @pytest.mark.parametrize("content_type", [None, OCTETS, "application/octet-stream"])
    def test_draft_05_append_needs_partial_upload(self, app: webtest.TestApp, storage: Path,
                                                   content_type: str | None) -> None:
        """An interop-6 (draft-05) PATCH with a body of another media type, or none, is a 415 and appends nothing."""
        draft = {"Upload-Draft-Interop-Version": "6"}
        url = path_of(app.post("/files/", headers={**draft, "Upload-Complete": "?0"}, status=201))
        typed = {"Content-Type": content_type} if content_type else {}
        response = app.patch(url, params=b"ab", status=415,
                             headers={**draft, **typed, "Upload-Offset": "0", "Upload-Complete": "?0"})
        assert "application/partial-upload" in response.text and stored(storage, url) == b""

    def test_draft_05_media_type_may_carry_parameters_and_draft_03_needs_none(self, app: webtest.TestApp,
                                                                             storage: Path) -> None:
        """application/partial-upload with a parameter is accepted under interop 6; interop 5 needs no type."""
        for interop, headers in (("6", {"Content-Type": "Application/Partial-Upload; x=1"}), ("5", {})):
            draft = {"Upload-Draft-Interop-Version": interop}
            url = path_of(app.post("/files/", headers={**draft, "Upload-Complete": "?0"}, status=201))
            app.patch(url, params=b"ab", status=204,
                      headers={**draft, **headers, "Upload-Offset": "0", "Upload-Complete": "?0"})
            assert stored(storage, url) == b"ab"

    def test_missing_upload_complete_is_400(self, app: webtest.TestApp) -> None:
        """A draft creation without Upload-Complete is a 400."""
        app.post("/files/", headers={"Upload-Draft-Interop-Version": "6"}, status=400)


class TestBadInput:
    @pytest.mark.parametrize("headers, status", [
        pytest.param({"Upload-Length": "10"}, 412, id="no-version"),
        pytest.param({**TUS, "Tus-Resumable": "0.2.2", "Upload-Length": "10"}, 412, id="old-version"),
        pytest.param({**TUS, "Upload-Length": str(LIMIT + 1)}, 413, id="over-max"),
        pytest.param({**TUS, "Upload-Length": "-1"}, 400, id="negative-length"),
        pytest.param({**TUS, "Upload-Length": "ten"}, 400, id="non-numeric-length"),
        pytest.param({**TUS}, 400, id="no-length"),
        pytest.param({**TUS, "Upload-Length": "5", "Upload-Defer-Length": "1"}, 400, id="both-lengths"),
        pytest.param({**TUS, "Upload-Defer-Length": "2"}, 400, id="bad-defer"),
        pytest.param({**TUS, "Upload-Length": "5", "Upload-Metadata": "name !!"}, 400, id="bad-metadata"),
        pytest.param({**TUS, "Upload-Length": "5", "Upload-Concat": "whole"}, 400, id="bad-concat"),
    ])
    def test_creation(self, app: webtest.TestApp, storage: Path, headers: dict[str, str], status: int) -> None:
        """A bad creation request gets its status and creates nothing."""
        app.post("/files/", headers=headers, status=status)
        assert not storage.exists() or os.listdir(storage) == []

    def test_over_max_is_refused_before_any_byte(self, app: webtest.TestApp, storage: Path) -> None:
        """A creation-with-upload over the limit is a 413 naming the limit; nothing is stored."""
        response = app.post("/files/", params=b"x" * 10, headers={
            **TUS, "Upload-Length": str(LIMIT + 1), "Content-Type": OCTETS, "Accept": "application/json"},
            status=413)
        assert response.json["limit"] == LIMIT
        assert not storage.exists() or os.listdir(storage) == []

    @pytest.mark.parametrize("headers, status", [
        pytest.param({"Upload-Offset": "3"}, 409, id="offset-ahead"),
        pytest.param({"Upload-Offset": "1"}, 409, id="offset-behind"),
        pytest.param({"Upload-Offset": "-2"}, 400, id="negative-offset"),
        pytest.param({"Upload-Offset": "two"}, 400, id="non-numeric-offset"),
        pytest.param({"Upload-Offset": ""}, 400, id="empty-offset"),
        pytest.param({"Content-Type": "application/octet-stream"}, 415, id="wrong-type"),
        pytest.param({"Tus-Resumable": "2.0.0"}, 412, id="wrong-version"),
        pytest.param({"Upload-Checksum": "crc32 AAAAAA=="}, 400, id="unsupported-checksum"),
        pytest.param({"Upload-Length": "9"}, 400, id="changed-length"),
    ])
    def test_patch(self, app: webtest.TestApp, storage: Path, headers: dict[str, str], status: int) -> None:
        """A bad PATCH gets its status and appends nothing."""
        url = path_of(create(app, 5))
        patch(app, url, 0, b"ab")
        sent = {**TUS, "Upload-Offset": "2", "Content-Type": OCTETS, **headers}
        response = app.patch(url, params=b"cd", headers=sent, status=status)
        assert stored(storage, url) == b"ab"
        if status == 409:
            assert response.headers["Upload-Offset"] == "2"

    def test_missing_offset_is_400(self, app: webtest.TestApp, storage: Path) -> None:
        """A PATCH without Upload-Offset is a 400."""
        url = path_of(create(app, 5))
        app.patch(url, params=b"ab", headers={**TUS, "Content-Type": OCTETS}, status=400)
        assert stored(storage, url) == b""

    def test_patch_past_the_length_appends_nothing(self, app: webtest.TestApp, storage: Path) -> None:
        """A PATCH that would pass Upload-Length is a 413 and nothing of it is appended."""
        url = path_of(create(app, 5))
        patch(app, url, 0, b"ab")
        patch(app, url, 2, b"cdefgh", status=413)
        assert stored(storage, url) == b"ab"

    @pytest.mark.parametrize("url", [
        pytest.param(lambda: "/files/" + new_upload_id(), id="unknown"),
        pytest.param(lambda: "/files/..%2F..%2Fetc%2Fpasswd", id="traversal"),
        pytest.param(lambda: "/files/short", id="malformed"),
    ])
    def test_unknown_upload_is_404(self, app: webtest.TestApp, url: Any) -> None:
        """HEAD, PATCH and DELETE of an upload that does not exist are 404."""
        target = url()
        app.head(target, headers=TUS, status=404)
        patch(app, target, 0, b"x", status=404)
        app.delete(target, headers=TUS, status=404)

    def test_get_on_an_upload_is_405(self, app: webtest.TestApp) -> None:
        """GET is not part of the protocol: 405 with Allow."""
        url = path_of(create(app, 5))
        assert "PATCH" in app.get(url, headers=TUS, status=405).headers["Allow"]


class TestUndeliveredChunkedBody:
    """A server that does not end a chunked body (uWSGI without its chunked input: no wsgi.input_terminated,
    no CONTENT_LENGTH) would hand the endpoint an empty body: the request is a 411, never an empty PATCH."""

    @staticmethod
    def environ(path: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
        environ: dict[str, Any] = {
            "REQUEST_METHOD": "PATCH", "PATH_INFO": path, "SERVER_NAME": "test", "SERVER_PORT": "80",
            "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": io.StringIO(),
            "HTTP_TRANSFER_ENCODING": "chunked", "CONTENT_TYPE": "application/partial-upload",
        }
        environ.update({"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()})
        return environ

    def test_a_chunked_final_patch_is_411_and_completes_nothing(self, app: webtest.TestApp,
                                                              endpoint: ResumableUploads) -> None:
        """An IETF PATCH with Upload-Complete: ?1 sent chunked: 411, the upload still at its offset, incomplete."""
        ietf = {"Upload-Draft-Interop-Version": "6"}
        url = path_of(app.post("/files/", b"hello ", headers={**ietf, "Upload-Complete": "?0",
                                                               "Content-Type": "application/partial-upload"},
                               status=201))
        response = endpoint.handle(self.environ(url, {**ietf, "Upload-Complete": "?1", "Upload-Offset": "6"},
                                                b"5\r\nworld\r\n0\r\n\r\n"))
        assert response.status.startswith("411")
        head = app.head(url, headers=ietf, status=204)
        assert head.headers["Upload-Offset"] == "6" and head.headers["Upload-Complete"] == "?0"

    def test_a_chunked_tus_patch_is_411(self, app: webtest.TestApp, endpoint: ResumableUploads) -> None:
        """The same for tus: a 411 naming the fix, not a 204 that stored nothing."""
        url = path_of(create(app, 10))
        response = endpoint.handle(self.environ(url, {"Tus-Resumable": "1.0.0", "Upload-Offset": "0"}, b""))
        assert response.status.startswith("411") and b"Content-Length" in b"".join(response.body)


class TestOnComplete:
    def test_once_even_if_the_last_patch_is_retried(self, app: webtest.TestApp, hooks: Hooks) -> None:
        """A retried final PATCH (empty, at the final offset) and later HEADs never run the hook again."""
        url = path_of(create(app, 3))
        patch(app, url, 0, b"abc")
        patch(app, url, 3, b"")
        app.head(url, headers=TUS)
        assert len(hooks.calls) == 1

    def test_exception_is_500_and_runs_again_until_it_returns(self, app: webtest.TestApp, hooks: Hooks,
                                                              endpoint: ResumableUploads,
                                                              caplog: pytest.LogCaptureFixture) -> None:
        """A hook that raises is logged and answered 500; the upload stays; the next HEAD runs it again."""
        url = path_of(create(app, 3))
        hooks.fail = True
        with caplog.at_level(logging.ERROR, logger="uploadguard"):
            response = patch(app, url, 0, b"abc", status=500, Accept="application/json")
        assert response.json["error"] == "on_complete_failed" and "on_complete failed" in caplog.text
        app.head(url, headers=TUS, status=500)
        upload_id = url.rsplit("/", 1)[1]
        with endpoint.get(upload_id).open() as fh:
            assert fh.read() == b"abc"  # retrievable meanwhile
        hooks.fail = False
        assert app.head(url, headers=TUS, status=200).headers["Upload-Offset"] == "3"
        app.head(url, headers=TUS, status=200)
        assert len(hooks.calls) == 1

    def test_hook_may_move_the_data_away(self, app: webtest.TestApp, endpoint: ResumableUploads,
                                         tmp_path: Path) -> None:
        """on_complete may move upload.path away; the upload still answers as complete, so a client whose
        last response was lost never uploads again; delete() then removes what is left."""
        endpoint.on_complete = lambda upload: os.rename(upload.path or "", tmp_path / upload.id)
        url = path_of(create(app, 3))
        patch(app, url, 0, b"abc")
        upload_id = url.rsplit("/", 1)[1]
        assert (tmp_path / upload_id).read_bytes() == b"abc"
        assert app.head(url, headers=TUS).headers["Upload-Offset"] == "3"
        assert patch(app, url, 3, b"").headers["Upload-Offset"] == "3"  # a retried empty last PATCH
        assert patch(app, url, 0, b"abc", status=409).headers["Upload-Offset"] == "3"  # a retried last chunk
        assert endpoint.get(url).length == 3
        endpoint.delete(url)
        app.head(url, headers=TUS, status=404)
        assert [name for name in os.listdir(endpoint.directory)] == []

    def test_error_after_creation_names_the_upload(self, app: webtest.TestApp, hooks: Hooks) -> None:
        """A hook failing on a creation-with-upload still gives the client the Location of the stored upload."""
        hooks.fail = True
        response = app.post("/files/", params=b"abc", headers={**TUS, "Upload-Length": "3", "Content-Type": OCTETS},
                            status=500)
        hooks.fail = False
        assert app.head(path_of(response), headers=TUS).headers["Upload-Offset"] == "3"
        assert len(hooks.calls) == 1

    def test_data_is_durable_before_the_hook(self, app: webtest.TestApp, storage: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """The data file is fsynced (and the upload marked complete) before on_complete runs."""
        events: list[str] = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
        endpoint: ResumableUploads = app.app
        endpoint.on_complete = lambda upload: events.append(f"hook complete={upload.complete}")
        url = path_of(create(app, 2))
        events.clear()
        patch(app, url, 0, b"ab")
        assert events[0] == "fsync" and "hook complete=True" in events


class TestGet:
    def test_by_id_and_by_url(self, app: webtest.TestApp, endpoint: ResumableUploads) -> None:
        """A completed upload is fetched by id, path or absolute URL, with its data, metadata and path."""
        response = create(app, 2, **{"Upload-Metadata": f"filename {b64('x.bin')}"})
        url = path_of(response)
        patch(app, url, 0, b"hi")
        upload_id = url.rsplit("/", 1)[1]
        for name in (upload_id, url, "https://example.com" + url):
            upload = endpoint.get(name)
            assert (upload.id, upload.length, upload.metadata) == (upload_id, 2, {"filename": "x.bin"})
            assert upload.path is not None and Path(upload.path).read_bytes() == b"hi"

    def test_incomplete_and_unknown(self, app: webtest.TestApp, endpoint: ResumableUploads) -> None:
        """An unfinished upload is UploadIncomplete; an unknown or foreign URL is UploadNotFound."""
        url = path_of(create(app, 5))
        with pytest.raises(UploadIncomplete, match="not complete"):
            endpoint.get(url)
        for name in ("/files/" + new_upload_id(), "/other/" + url.rsplit("/", 1)[1], "nonsense"):
            with pytest.raises(UploadNotFound):
                endpoint.get(name)


class TestAuthorize:
    @pytest.fixture
    def owned(self, storage: Path, hooks: Hooks, tmp_path: Path) -> webtest.TestApp:
        settings = Settings.from_environ({}, temp_dir=tmp_path / "tmp", min_free_space=0)

        def authorize(environ: dict[str, Any]) -> str | None:
            user = environ.get("HTTP_X_USER")
            if user == "banned":
                from uploadguard.resumable.protocol import Forbidden
                raise Forbidden("no uploads for you")
            return user

        return webtest.TestApp(ResumableUploads(fallback, storage=storage, on_complete=hooks, settings=settings,
                                                authorize=authorize))

    def test_only_the_creator_sees_the_upload(self, owned: webtest.TestApp) -> None:
        """An upload created by alice is 404 for bob and for anonymous requests."""
        url = path_of(create(owned, 2, **{"X-User": "alice"}))
        owned.head(url, headers={**TUS, "X-User": "alice"}, status=200)
        owned.head(url, headers={**TUS, "X-User": "bob"}, status=404)
        owned.head(url, headers=TUS, status=404)
        patch(owned, url, 0, b"xx", status=404, **{"X-User": "bob"})
        patch(owned, url, 0, b"ab", **{"X-User": "alice"})
        endpoint: ResumableUploads = owned.app
        assert endpoint.get(url, owner="alice").length == 2
        with pytest.raises(UploadNotFound):
            endpoint.get(url, owner="bob")

    def test_anonymous_upload_is_usable_by_its_url(self, owned: webtest.TestApp) -> None:
        """An upload created anonymously (authorize returned None) belongs to nobody: its URL is the key."""
        url = path_of(create(owned, 2))
        owned.head(url, headers={**TUS, "X-User": "alice"}, status=200)
        patch(owned, url, 0, b"ab")

    def test_authorize_may_refuse(self, owned: webtest.TestApp) -> None:
        """An UploadGuardError raised by authorize is the response."""
        create(owned, 2, status=403, **{"X-User": "banned"})


class TestCors:
    def test_preflight(self, app: webtest.TestApp) -> None:
        """An allowed origin's preflight is answered with the methods and tus headers."""
        response = app.options("/files/", headers={"Origin": "https://app.example",
                                                   "Access-Control-Request-Method": "PATCH"}, status=204)
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "PATCH" in response.headers["Access-Control-Allow-Methods"]
        assert "Upload-Offset" in response.headers["Access-Control-Allow-Headers"]

    def test_exposes_the_protocol_headers(self, app: webtest.TestApp) -> None:
        """Responses to an allowed origin expose Location, Upload-*, Tus-* and Retry-After."""
        response = create(app, 5, Origin="https://app.example")
        exposed = {name.strip() for name in response.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"Location", "Upload-Offset", "Upload-Length", "Upload-Expires", "Retry-After",
                "Tus-Resumable"} <= exposed

    def test_other_origins_get_nothing(self, app: webtest.TestApp) -> None:
        """An origin not configured gets no CORS headers."""
        response = app.options("/files/", headers={"Origin": "https://evil.example",
                                                   "Access-Control-Request-Method": "PATCH"})
        assert "Access-Control-Allow-Origin" not in response.headers


class TestLocked:
    def test_held_upload_is_423_with_retry_after(self, app: webtest.TestApp, endpoint: ResumableUploads) -> None:
        """Without gunicorn's socket a held upload cannot be preempted: 423 + Retry-After after the timeout."""
        url = path_of(create(app, 5))
        with endpoint.locker.try_acquire(url.rsplit("/", 1)[1]) or pytest.fail("not acquired"):
            response = patch(app, url, 0, b"ab", status=423)
            assert response.headers["Retry-After"] == "1"
            app.head(url, headers=TUS, status=423)
        patch(app, url, 0, b"ab")


class TestErrorsAreResponses:
    @pytest.mark.parametrize("err, status", [
        pytest.param(28, 503, id="ENOSPC-503"),
        pytest.param(30, 503, id="EROFS-503"),
        pytest.param(22, 500, id="EINVAL-500"),
    ])
    def test_storage_oserror(self, app: webtest.TestApp, endpoint: ResumableUploads, err: int, status: int,
                             monkeypatch: pytest.MonkeyPatch) -> None:
        """An OSError from the store is a retryable 503 when it is about storage, else a logged 500; never raised."""
        url = path_of(create(app, 5))

        def broken(upload_id: str) -> None:
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(endpoint.store, "get", broken)
        response = app.head(url, headers=TUS, status=status)
        assert ("Retry-After" in response.headers) is (status == 503)


class TestSettings:
    def test_from_the_environment(self, tmp_path: Path) -> None:
        """UPLOADGUARD_RESUMABLE_* set the storage, expiry and idle timeout; the limit is the body limit."""
        settings = Settings.from_environ({
            "UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"), "UPLOADGUARD_MAX_BODY_SIZE": "20M",
            "UPLOADGUARD_RESUMABLE_STORAGE": str(tmp_path / "store"),
            "UPLOADGUARD_RESUMABLE_EXPIRES_AFTER": "2h", "UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "45s"})
        endpoint = ResumableUploads(fallback, settings=settings)
        assert (endpoint.directory, endpoint.expires_after, endpoint.idle_timeout, endpoint.max_size) == (
            str(tmp_path / "store"), 7200.0, 45.0, 20 * 1024**2)

    def test_default_storage_is_persistent_per_user_data(self, tmp_path: Path) -> None:
        """The default storage is $XDG_DATA_HOME/uploadguard/uploads (else ~/.local/share/...), not /tmp."""
        from uploadguard.config import default_resumable_storage

        assert Settings.from_environ({}).resumable_storage is None  # resolved when resumable uploads are used
        assert default_resumable_storage({"XDG_DATA_HOME": str(tmp_path / "data")}) == (
            tmp_path / "data" / "uploadguard" / "uploads")
        assert default_resumable_storage({}) == Path.home() / ".local/share/uploadguard/uploads"
        assert Settings.from_environ({}).resumable_expires_after == 86400.0

    @pytest.mark.parametrize("name, value", [
        pytest.param("UPLOADGUARD_RESUMABLE_EXPIRES_AFTER", "soon", id="expiry"),
        pytest.param("UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT", "-3", id="idle"),
    ])
    def test_bad_values_name_the_variable(self, name: str, value: str) -> None:
        """A bad value is a ConfigError naming the variable."""
        from uploadguard.config import ConfigError

        with pytest.raises(ConfigError, match=name):
            Settings.from_environ({name: value})

    def test_a_store_brings_its_locker(self, tmp_path: Path, endpoint: ResumableUploads) -> None:
        """storage= may be a Store; the endpoint locks with the store's own locker (the seam S3 uses)."""
        from uploadguard.resumable import LocalStore

        store = LocalStore(tmp_path / "given")
        made = ResumableUploads(fallback, storage=store, settings=endpoint.settings)
        assert made.store is store and made.locker is store.locker
        url = path_of(create(webtest.TestApp(made), 2))
        assert (tmp_path / "given" / (url.rsplit("/", 1)[1] + ".info")).exists()

    def test_keyword_arguments_win(self, endpoint: ResumableUploads, storage: Path) -> None:
        """Keyword arguments override the settings (sizes and durations in their text form too)."""
        made = ResumableUploads(fallback, storage=storage, max_size="1K", expires_after="30m", idle_timeout=5,
                                keep_completed="2d", settings=endpoint.settings)
        assert (made.max_size, made.expires_after, made.idle_timeout, made.keep_completed) == (
            1024, 1800.0, 5.0, 2 * 86400.0)

    def test_keep_completed_is_a_finite_setting(self, tmp_path: Path) -> None:
        """keep_completed defaults to 7 days, comes from UPLOADGUARD_RESUMABLE_KEEP_COMPLETED (0 = forever), and a bad
        value names the variable."""
        from uploadguard.config import ConfigError

        assert Settings.from_environ({}).resumable_keep_completed == 7 * 86400.0
        settings = Settings.from_environ({"UPLOADGUARD_RESUMABLE_KEEP_COMPLETED": "0"}, temp_dir=tmp_path)
        assert ResumableUploads(fallback, storage=tmp_path / "s", settings=settings).keep_completed == 0.0
        with pytest.raises(ConfigError, match="UPLOADGUARD_RESUMABLE_KEEP_COMPLETED"):
            Settings.from_environ({"UPLOADGUARD_RESUMABLE_KEEP_COMPLETED": "a while"})


class TestKeepCompleted:
    """Completed uploads the application never deletes are kept keep_completed after they completed, then go."""

    @staticmethod
    def age(endpoint: ResumableUploads, url: str, seconds: float) -> None:
        """Make the upload as if it completed ``seconds`` ago."""
        import dataclasses

        info = endpoint.store.get(url.rsplit("/", 1)[1])
        endpoint.store.update(dataclasses.replace(info, completed_at=info.completed_at - seconds))

    def test_past_keep_completed_a_completed_upload_is_gone(self, endpoint: ResumableUploads,
                                                           app: webtest.TestApp) -> None:
        """HEAD of a completed upload past keep_completed (7 days by default) is a 410 and get() raises
        UploadNotFound; before that it is a 200; the application may still delete it."""
        url = path_of(create(app, 3))
        patch(app, url, 0, b"abc")
        self.age(endpoint, url, 6 * 86400)
        assert app.head(url, headers=TUS, status=200).headers["Upload-Offset"] == "3"
        self.age(endpoint, url, 2 * 86400)
        app.head(url, headers=TUS, status=410)
        with pytest.raises(UploadNotFound):
            endpoint.get(url)
        endpoint.delete(url)
        app.head(url, headers=TUS, status=404)

    def test_unclaimed_empty_uploads_are_cleaned(self, endpoint: ResumableUploads, app: webtest.TestApp,
                                                 storage: Path, hooks: Hooks) -> None:
        """The issue's reproduction: Upload-Length: 0 creations complete at once; a year later clean_expired() has
        removed them (the default keep_completed applies), leaving an empty storage."""
        from uploadguard.resumable import clean_expired

        for _ in range(20):
            create(app, 0)
        assert len(hooks.calls) == 20 and len(list(endpoint.store.uploads())) == 20
        assert clean_expired(endpoint.store, now=time.time() + 6 * 86400).uploads == 0
        result = clean_expired(endpoint.store, now=time.time() + 365 * 86400)
        assert (result.uploads, result.completed, result.errors) == (20, 20, [])
        assert [name for name in os.listdir(storage) if not name.startswith(".")] == []

    def test_an_upload_moved_away_by_on_complete_is_cleaned_later(self, tmp_path: Path, storage: Path,
                                                                  endpoint: ResumableUploads) -> None:
        """The documented flow (on_complete moves the file away) keeps working, and the info it leaves is removed
        keep_completed later."""
        import shutil

        from uploadguard.resumable import clean_expired

        kept = tmp_path / "media"
        kept.mkdir()

        def stored(upload: Upload) -> None:
            shutil.move(upload.path or "", kept / upload.id)

        made = ResumableUploads(fallback, storage=storage, on_complete=stored, settings=endpoint.settings)
        client = webtest.TestApp(made)
        url = path_of(create(client, 3))
        patch(client, url, 0, b"abc")
        assert client.head(url, headers=TUS).headers["Upload-Offset"] == "3"
        assert (kept / url.rsplit("/", 1)[1]).read_bytes() == b"abc"
        assert clean_expired(made.store, now=time.time() + 8 * 86400).completed == 1
        assert [name for name in os.listdir(storage) if not name.startswith(".")] == []
        assert (kept / url.rsplit("/", 1)[1]).read_bytes() == b"abc"


class TestStacking:
    def test_under_the_guard(self, endpoint: ResumableUploads, storage: Path, hooks: Hooks) -> None:
        """UploadGuard(ResumableUploads(app)) serves uploads; a chunk over the guard's body limit is its 413."""
        from uploadguard import UploadGuard

        guarded = webtest.TestApp(UploadGuard(endpoint, max_body_size=4, temp_dir=endpoint.settings.temp_dir))
        url = path_of(create(guarded, 6))
        patch(guarded, url, 0, b"abc")
        patch(guarded, url, 3, b"defgh", status=413)
        patch(guarded, url, 3, b"def")
        assert [c[3] for c in hooks.calls] == [b"abcdef"]
        assert guarded.get("/elsewhere").text == "app"


    @needs_root
    def test_a_small_temp_dir_does_not_refuse_a_patch_the_storage_holds(self, storage: Path, hooks: Hooks,
                                                                         tmp_path: Path) -> None:
        """The endpoint's bodies go to the storage: a 1 MiB tmpfs temp dir still takes a 3 MiB PATCH (tus-js-client
        sends a whole file in one by default), while a body the app may spool there still needs the room."""
        from uploadguard import UploadGuard

        with tmpfs(tmp_path / "tmp", size="1m") as temp:
            settings = Settings.from_environ({}, temp_dir=temp, min_free_space=0)
            endpoint = ResumableUploads(fallback, storage=storage, on_complete=hooks, settings=settings)
            guarded = webtest.TestApp(UploadGuard(endpoint, settings=settings))
            data = os.urandom(3 * 1024 * 1024)
            url = path_of(create(guarded, len(data)))
            patch(guarded, url, 0, data)
            refused = guarded.post("/elsewhere", params=data, headers={"Accept": "application/json"}, status=503)
            # A form under the prefix is no upload of the endpoint's: a framework hook in front of it, or an
            # app route there, would spool it -- it needs the room.
            form = guarded.request(url, method="POST", body=data, content_type="multipart/form-data; boundary=x",
                                   headers={"Accept": "application/json"}, status=503)

        assert [c[3] for c in hooks.calls] == [data]
        assert refused.json["error"] == form.json["error"] == "no_space"


class TestStorage:
    def test_storage_replaced_by_a_file_during_a_patch_is_503(self, endpoint: ResumableUploads,
                                                                app: webtest.TestApp, storage: Path,
                                                                hooks: Hooks) -> None:
        """The storage dir swapped for a file while a PATCH streams: 503 + Retry-After (not a 404 that makes the
        client start again), and once the dir is back every byte is there and the upload completes."""
        import io

        url = path_of(create(app, 6))
        away = storage.with_name("uploads.away")

        class Swapping(io.BytesIO):
            def read(self, size: int | None = -1) -> bytes:
                if self.tell() == 3 and not away.exists():
                    storage.rename(away)
                    storage.write_text("not a directory")
                return super().read(min(size, 3) if size is not None and size >= 0 else 3)

        environ = {"REQUEST_METHOD": "PATCH", "PATH_INFO": url, "HTTP_TUS_RESUMABLE": "1.0.0",
                   "HTTP_UPLOAD_OFFSET": "0", "CONTENT_TYPE": OCTETS, "CONTENT_LENGTH": "6",
                   "wsgi.input": Swapping(b"abcdef")}
        status, headers, _ = endpoint.handle(environ)
        assert status.startswith("503 ") and ("Retry-After", "5") in headers
        storage.unlink()
        away.rename(storage)
        head = app.head(url, headers=TUS, status=200)
        assert head.headers["Upload-Offset"] == "6" and [c[3] for c in hooks.calls] == [b"abcdef"]

    def test_vanished_storage_404_then_new_uploads_work(self, app: webtest.TestApp, storage: Path) -> None:
        """Uploads in a deleted storage dir are 404; the dir is recreated and new uploads work."""
        url = path_of(create(app, 5))
        patch(app, url, 0, b"ab")
        subprocess.run(["rm", "-rf", str(storage)], check=True)
        app.head(url, headers=TUS, status=404)
        patch(app, url, 2, b"cd", status=404)
        fresh = path_of(create(app, 2))
        patch(app, fresh, 0, b"ok")
        assert stored(storage, fresh) == b"ok"

    def test_file_in_place_is_503(self, app: webtest.TestApp, storage: Path) -> None:
        """A file where the storage dir should be: 503 with Retry-After for every request, never a 500."""
        url = path_of(create(app, 5))
        subprocess.run(["rm", "-rf", str(storage)], check=True)
        storage.write_text("not a dir")
        for response in (create(app, 5, status=503), app.head(url, headers=TUS, status=503),
                         patch(app, url, 0, b"x", status=503)):
            assert response.headers["Retry-After"] == "5"

    @needs_root
    def test_read_only_is_503(self, app: webtest.TestApp, storage: Path, tmp_path: Path) -> None:
        """A storage dir on a read-only file system: 503 with Retry-After."""
        with tmpfs(storage, options="ro"):
            assert create(app, 5, status=503).headers["Retry-After"] == "5"

    @needs_root
    def test_full_disk_mid_patch_keeps_what_was_written(self, app: webtest.TestApp, storage: Path) -> None:
        """ENOSPC while appending a chunked body is a 503; the bytes that fit count and the client resumes."""
        import io

        with tmpfs(storage, size="64k"):
            endpoint = ResumableUploads(fallback, storage=storage, max_size=0, settings=app.app.settings)
            client = webtest.TestApp(endpoint)
            url = path_of(create(client, 200_000))
            environ = {"REQUEST_METHOD": "PATCH", "PATH_INFO": url, "HTTP_TUS_RESUMABLE": "1.0.0",
                       "HTTP_UPLOAD_OFFSET": "0", "CONTENT_TYPE": OCTETS, "wsgi.input_terminated": True,
                       "wsgi.input": io.BytesIO(os.urandom(200_000))}
            status, headers, _ = endpoint.handle(environ)
            assert status.startswith("503 ") and ("Retry-After", "5") in headers
            offset = int(client.head(url, headers=TUS).headers["Upload-Offset"])
            assert 0 < offset < 200_000


IETF = {"Upload-Draft-Interop-Version": "6"}


class TestReviewFindings:
    """Each pinned by a reproduction from a hostile review."""

    def test_upload_complete_cannot_declare_past_max_size(self, app: webtest.TestApp, storage: Path) -> None:
        """A deferred-length upload closed with Upload-Complete: ?1 and a body over max_size is a 413, nothing kept."""
        url = path_of(create(app, None, **{"Upload-Defer-Length": "1"}))
        patch(app, url, 0, b"x" * 900)
        app.patch(url, params=b"y" * 4000, headers={**IETF, "Upload-Offset": "900", "Upload-Complete": "?1",
                                                    "Content-Type": "application/partial-upload"}, status=413)
        assert len(stored(storage, url)) == 900

    def test_upload_complete_is_ignored_on_tus_requests(self, app: webtest.TestApp, storage: Path) -> None:
        """The draft's Upload-Complete on a tus creation does not declare a length past max_size."""
        response = app.post("/files/", params=b"z" * 5000, status="*", headers={
            **TUS, "Upload-Defer-Length": "1", "Upload-Complete": "?1", "Content-Type": OCTETS})
        assert response.status_int == 413 or int(response.headers.get("Upload-Offset", "0")) <= LIMIT

    def test_a_whole_but_unfinished_upload_is_finished_on_the_next_head(
            self, endpoint: ResumableUploads, app: webtest.TestApp, hooks: Hooks) -> None:
        """Every byte stored but finish never ran (a worker killed in between): HEAD completes it, hook included."""
        url = path_of(create(app, 5))
        upload_id = url.rsplit("/", 1)[1]
        pieces = iter([b"abcde", b""])
        endpoint.store.write(upload_id, 0, lambda size: next(pieces), 5)  # as if the worker died here
        app.head(url, headers=TUS, status=200)
        assert [c[3] for c in hooks.calls] == [b"abcde"]
        assert endpoint.get(url).length == 5

    @pytest.mark.parametrize("method", ["GET", "HEAD"])
    def test_only_a_post_may_be_overridden(self, app: webtest.TestApp, storage: Path, method: str) -> None:
        """X-HTTP-Method-Override on a GET or HEAD never deletes or writes (CSRF and CORS treat those as safe)."""
        url = path_of(create(app, 10))
        app.request(url, method=method, headers={**TUS, "X-HTTP-Method-Override": "DELETE"}, status="*")
        assert app.head(url, headers=TUS, status=200)

    def test_a_malformed_concat_url_is_a_400(self, app: webtest.TestApp, endpoint: ResumableUploads) -> None:
        """Upload-Concat naming 'http://[' is a 400, not a 500; get() of it is UploadNotFound."""
        create(app, None, status=400, **{"Upload-Concat": "final;http://[/files/x"})
        with pytest.raises(UploadNotFound):
            endpoint.get("http://[/files/x")

    def test_creation_with_upload_checks_the_checksum(self, app: webtest.TestApp, storage: Path) -> None:
        """A creation-with-upload body with a wrong Upload-Checksum is a 460 and nothing is kept."""
        wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
        response = app.post("/files/", params=b"abc", status="*", headers={
            **TUS, "Upload-Length": "5", "Content-Type": OCTETS, "Upload-Checksum": f"sha1 {wrong}"})
        assert response.status_int == 460

    def test_concat_parts_carry_the_script_name(self, app: webtest.TestApp) -> None:
        """HEAD of a final upload lists its parts with SCRIPT_NAME, as Location does."""
        extra = {"SCRIPT_NAME": "/app"}
        parts = []
        for body in (b"ab", b"cd"):
            response = app.post("/files/", headers={**TUS, "Upload-Length": "2", "Upload-Concat": "partial"},
                                extra_environ=extra, status=201)
            location = response.headers["Location"]
            assert location.startswith("/app/files/")
            app.patch(location.removeprefix("/app"), params=body, extra_environ=extra,
                      headers={**TUS, "Upload-Offset": "0", "Content-Type": OCTETS}, status=204)
            parts.append(location)
        final = app.post("/files/", headers={**TUS, "Upload-Concat": "final;" + " ".join(parts)},
                         extra_environ=extra, status=201)
        head = app.head(final.headers["Location"].removeprefix("/app"), headers=TUS, extra_environ=extra)
        assert head.headers["Upload-Concat"] == "final;" + " ".join(parts)


class TestRateFloor:
    def test_a_dripping_body_ends_after_a_window(self) -> None:
        """A body bringing less than the floor in an idle_timeout window is cut ('slow'); what came counts."""
        from uploadguard.resumable.wsgi import _BodyReader

        class Drip:
            def read(self, size: int) -> bytes:
                time.sleep(0.05)
                return b"x"

        reader = _BodyReader(Drip(), 10_000, None, window=0.3)
        received = b""
        started = time.monotonic()
        while chunk := reader(1024):
            received += chunk
            assert time.monotonic() - started < 30, "never cut"
        assert reader.cut == "slow" and 0 < len(received) < 10_000


class TestRefusedRequestsChangeNothing:
    """A PATCH refused for its body (460, 413) records none of its headers: the client retries with the truth."""

    def test_a_wrong_checksum_does_not_declare_the_length(self, app: webtest.TestApp, storage: Path,
                                                          hooks: Hooks) -> None:
        """Upload-Length: 7 with a wrong Upload-Checksum is a 460, HEAD shows no length, and the real length 9 works."""
        url = path_of(create(app, None, **{"Upload-Defer-Length": "1"}))
        wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
        patch(app, url, 0, b"abcdefg", status=460, **{"Upload-Length": "7", "Upload-Checksum": f"sha1 {wrong}"})
        head = app.head(url, headers=TUS, status=200)
        assert "Upload-Length" not in head.headers and head.headers["Upload-Defer-Length"] == "1"
        right = base64.b64encode(hashlib.sha1(b"abcdefghi").digest()).decode()
        patch(app, url, 0, b"abcdefghi", **{"Upload-Length": "9", "Upload-Checksum": f"sha1 {right}"})
        assert app.head(url, headers=TUS).headers["Upload-Length"] == "9"
        assert [c[3] for c in hooks.calls] == [b"abcdefghi"]

    @pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
    def test_a_413_does_not_declare_the_length(self, endpoint: ResumableUploads, app: webtest.TestApp,
                                               hooks: Hooks, chunked: bool) -> None:
        """Upload-Length: 7 with a 9-byte body is a 413 (before the body, or after a chunked one), and changes
        nothing: HEAD shows no length, and the real length 9 then completes the upload."""
        import io

        url = path_of(create(app, None, **{"Upload-Defer-Length": "1"}))
        if chunked:
            environ = {"REQUEST_METHOD": "PATCH", "PATH_INFO": url, "HTTP_TUS_RESUMABLE": "1.0.0",
                       "HTTP_UPLOAD_OFFSET": "0", "HTTP_UPLOAD_LENGTH": "7", "CONTENT_TYPE": OCTETS,
                       "wsgi.input_terminated": True, "wsgi.input": io.BytesIO(b"abcdefghi")}
            assert endpoint.handle(environ).status.startswith("413 ")
        else:
            app.patch(url, params=b"abcdefghi", status=413,
                      headers={**TUS, "Upload-Offset": "0", "Content-Type": OCTETS, "Upload-Length": "7"})
        head = app.head(url, headers=TUS, status=200)
        assert "Upload-Length" not in head.headers and head.headers["Upload-Offset"] == "0"
        patch(app, url, 0, b"abcdefghi", **{"Upload-Length": "9"})
        assert [c[3] for c in hooks.calls] == [b"abcdefghi"]

    def test_ietf_complete_with_a_wrong_checksum_declares_nothing(self, app: webtest.TestApp,
                                                                   hooks: Hooks) -> None:
        """The draft's Upload-Complete: ?1 PATCH refused with a 460 leaves the length unknown; the right body
        then completes the upload."""
        url = path_of(app.post("/files/", headers={**IETF, "Upload-Complete": "?0"}, status=201))
        wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
        draft_patch = {**IETF, "Upload-Offset": "0", "Upload-Complete": "?1",
                       "Content-Type": "application/partial-upload"}
        app.patch(url, params=b"abcdefg", headers={**draft_patch, "Upload-Checksum": f"sha1 {wrong}"}, status=460)
        head = app.head(url, headers=IETF, status=204)
        assert "Upload-Length" not in head.headers and head.headers["Upload-Complete"] == "?0"
        app.patch(url, params=b"abcdefghi", headers=draft_patch, status=204)
        assert [c[3] for c in hooks.calls] == [b"abcdefghi"]

    def test_a_crash_between_the_write_and_the_length_is_resumed(self, endpoint: ResumableUploads,
                                                                 app: webtest.TestApp, hooks: Hooks) -> None:
        """Every byte stored but the declared length never recorded (a worker killed in between): HEAD shows the
        offset, and an empty PATCH declaring the length completes the upload."""
        url = path_of(create(app, None, **{"Upload-Defer-Length": "1"}))
        upload_id = url.rsplit("/", 1)[1]
        pieces = iter([b"abcde", b""])
        endpoint.store.write(upload_id, 0, lambda size: next(pieces), 5)  # as if the worker died here
        head = app.head(url, headers=TUS, status=200)
        assert head.headers["Upload-Offset"] == "5" and "Upload-Length" not in head.headers
        patch(app, url, 5, b"", **{"Upload-Length": "5"})
        assert [c[3] for c in hooks.calls] == [b"abcde"]


class TestMetadataCap:
    def test_large_metadata_is_400_and_stores_nothing(self, app: webtest.TestApp, storage: Path) -> None:
        """A creation whose Upload-Metadata decodes to more than 4 KiB is a 400 naming the cap; nothing is stored."""
        from uploadguard.resumable.protocol import MAX_METADATA_SIZE

        metadata = ",".join(f"k{i} {b64('v' * 100)}" for i in range(90))
        response = create(app, 10, status=400, **{"Upload-Metadata": metadata})
        assert str(MAX_METADATA_SIZE) in response.text
        assert not storage.exists() or [name for name in os.listdir(storage) if not name.startswith(".")] == []


class TestMethodOverrideFraming:
    @pytest.mark.parametrize("known", [False, True], ids=["unknown-upload", "known-upload"])
    def test_a_post_overridden_to_head_gets_the_body_its_length_says(self, app: webtest.TestApp,
                                                                     known: bool) -> None:
        """POST + X-HTTP-Method-Override: HEAD answers with HEAD's headers, framed as the POST it is on the wire:
        Content-Length matches the body sent (a body-less answer would desync a keep-alive connection)."""
        url = path_of(create(app, 3)) if known else f"/files/{new_upload_id()}"
        response = app.post(url, headers={**TUS, "X-HTTP-Method-Override": "HEAD"}, status=200 if known else 404)
        assert response.headers["Content-Length"] == str(len(response.body))
        if known:
            assert response.headers["Upload-Offset"] == "0" and response.headers["Upload-Length"] == "3"


class TestPlantedSymlinks:
    """A symlink planted under an upload's side-file names is refused (503), never followed to its target."""

    def test_checksum_side_file(self, app: webtest.TestApp, storage: Path, tmp_path: Path) -> None:
        """<id>.chk linked to another file: a checksummed PATCH is a 503 and the target is neither truncated
        nor written."""
        url = path_of(create(app, 3))
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        (storage / (url.rsplit("/", 1)[1] + ".chk")).symlink_to(victim)
        digest = base64.b64encode(hashlib.sha256(b"abc").digest()).decode()
        response = patch(app, url, 0, b"abc", status=503, **{"Upload-Checksum": f"sha256 {digest}"})
        assert int(response.headers["Retry-After"]) > 0
        assert victim.read_bytes() == b"precious"
        assert app.head(url, headers=TUS).headers["Upload-Offset"] == "0"

    def test_lock_file(self, app: webtest.TestApp, storage: Path, tmp_path: Path) -> None:
        """<id>.lock linked to a path that does not exist: a PATCH is a 503 and nothing is created there."""
        url = path_of(create(app, 3))
        victim = tmp_path / "created-by-nobody"
        (storage / (url.rsplit("/", 1)[1] + ".lock")).symlink_to(victim)
        response = patch(app, url, 0, b"abc", status=503)
        assert int(response.headers["Retry-After"]) > 0 and not os.path.lexists(victim)

    def test_release_file(self, app: webtest.TestApp, endpoint: ResumableUploads, storage: Path,
                          tmp_path: Path) -> None:
        """<id>.release linked to a path that does not exist while the upload is held: a contending HEAD is a 503
        and nothing is created there."""
        url = path_of(create(app, 3))
        upload_id = url.rsplit("/", 1)[1]
        victim = tmp_path / "created-by-nobody"
        with endpoint.locker.try_acquire(upload_id) or pytest.fail("not acquired"):
            (storage / (upload_id + ".release")).symlink_to(victim)
            response = app.head(url, headers=TUS, status=503)
        assert int(response.headers["Retry-After"]) > 0 and not os.path.lexists(victim)

    def test_data_file(self, app: webtest.TestApp, storage: Path, tmp_path: Path) -> None:
        """<id>.bin replaced by a link to an empty file: a PATCH is a 503 and the target gets no byte."""
        url = path_of(create(app, 3))
        victim = tmp_path / "victim"
        victim.write_bytes(b"")
        data = storage / (url.rsplit("/", 1)[1] + ".bin")
        data.unlink()
        data.symlink_to(victim)
        patch(app, url, 0, b"abc", status=503)
        assert victim.read_bytes() == b""


class TestRefusedCreationsLeaveNothing:
    """A creation refused for its headers or its body leaves no upload behind and names none."""

    @pytest.mark.parametrize("headers, body, status", [
        pytest.param({"Upload-Checksum": "sha1 " + base64.b64encode(hashlib.sha1(b"other").digest()).decode()},
                     b"abc", 460, id="wrong-checksum"),
        pytest.param({"Upload-Checksum": "crc32 AAAA"}, b"abc", 400, id="unknown-checksum-algorithm"),
        pytest.param({}, b"abcdefghi", 413, id="body-past-the-length"),
    ])
    def test_tus(self, app: webtest.TestApp, storage: Path, headers: dict[str, str], body: bytes,
                 status: int) -> None:
        """tus creation-with-upload refused (460, 400, 413): no Location, and no upload in the storage."""
        response = app.post("/files/", params=body, status=status,
                            headers={**TUS, "Upload-Length": "5", "Content-Type": OCTETS, **headers})
        assert "Location" not in response.headers
        assert not storage.exists() or not list(storage.glob("*.info"))

    def test_ietf_complete_with_a_wrong_checksum(self, app: webtest.TestApp, storage: Path) -> None:
        """The draft's Upload-Complete: ?1 creation with a wrong checksum is a 460 and leaves no upload."""
        wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
        response = app.post("/files/", params=b"whole", status=460, headers={
            **IETF, "Upload-Complete": "?1", "Upload-Checksum": f"sha1 {wrong}"})
        assert "Location" not in response.headers
        assert not storage.exists() or not list(storage.glob("*.info"))
