"""The resumable-upload protocol rules, as tables: headers in, values or error responses out."""

from __future__ import annotations

import base64
import hashlib

import pytest

from uploadguard.errors import BadRequest, BodyTooLarge, UploadGuardError
from uploadguard.resumable import protocol as p


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class TestDialect:
    @pytest.mark.parametrize("tus, interop, expected", [
        pytest.param("1.0.0", None, ("tus", None), id="tus"),
        pytest.param(" 1.0.0 ", None, ("tus", None), id="tus-spaces"),
        pytest.param(None, "5", ("ietf", 5), id="draft-03"),
        pytest.param(None, "6", ("ietf", 6), id="draft-05"),
        pytest.param("1.0.0", "6", ("ietf", 6), id="both-draft-wins"),
        pytest.param(None, None, None, id="neither"),
    ])
    def test_recognised(self, tus: str | None, interop: str | None, expected: object) -> None:
        """Tus-Resumable 1.0.0 is tus; Upload-Draft-Interop-Version 5 or 6 is the IETF draft."""
        assert p.dialect_of(tus, interop) == expected

    @pytest.mark.parametrize("tus, interop", [
        pytest.param("0.2.2", None, id="old-tus"),
        pytest.param("1.0", None, id="short-tus"),
        pytest.param(None, "3", id="old-interop"),
        pytest.param(None, "x", id="garbage-interop"),
        pytest.param(None, "-6", id="negative-interop"),
    ])
    def test_unsupported_is_412_with_tus_version(self, tus: str | None, interop: str | None) -> None:
        """Any other version is a 412 that names the version spoken (Tus-Version)."""
        with pytest.raises(p.UnsupportedVersion) as info:
            p.dialect_of(tus, interop)
        assert info.value.status_code == 412
        assert ("Tus-Version", "1.0.0") in info.value.headers()


class TestMethod:
    @pytest.mark.parametrize("environ, expected", [
        pytest.param({"REQUEST_METHOD": "PATCH"}, "PATCH", id="plain"),
        pytest.param({"REQUEST_METHOD": "POST", "HTTP_X_HTTP_METHOD_OVERRIDE": "patch"}, "PATCH", id="override"),
        pytest.param({"REQUEST_METHOD": "POST", "HTTP_X_HTTP_METHOD_OVERRIDE": " "}, "POST", id="blank-override"),
        pytest.param({"REQUEST_METHOD": "GET", "HTTP_X_HTTP_METHOD_OVERRIDE": "DELETE"}, "GET", id="get-stays-safe"),
        pytest.param({"REQUEST_METHOD": "HEAD", "HTTP_X_HTTP_METHOD_OVERRIDE": "PATCH"}, "HEAD", id="head-stays-safe"),
    ])
    def test_method_override(self, environ: dict[str, str], expected: str) -> None:
        """X-HTTP-Method-Override replaces the method of a POST only (for clients that can only POST)."""
        assert p.method_of(environ) == expected


class TestNumbers:
    @pytest.mark.parametrize("value, expected", [
        pytest.param("0", 0, id="zero"),
        pytest.param("1048576", 1048576, id="mib"),
        pytest.param(" 12 ", 12, id="spaces"),
        pytest.param(str(2**63 - 1), 2**63 - 1, id="off_t-max"),
    ])
    def test_valid(self, value: str, expected: int) -> None:
        """Non-negative decimal numbers up to what off_t holds are accepted."""
        assert p.parse_number(value, "Upload-Offset") == expected

    @pytest.mark.parametrize("value", [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("-1", id="negative"),
        pytest.param("+1", id="plus"),
        pytest.param("1e3", id="exponent"),
        pytest.param("0x10", id="hex"),
        pytest.param("1.0", id="fraction"),
        pytest.param("١٢", id="arabic-digits"),
        pytest.param(str(2**63), id="over-off_t"),
        pytest.param("9" * 40, id="huge"),
    ])
    def test_invalid_is_400_naming_the_header(self, value: str | None) -> None:
        """Missing, negative, non-numeric or oversized offsets and lengths are a 400 naming the header."""
        with pytest.raises(BadRequest) as info:
            p.parse_number(value, "Upload-Offset")
        assert "Upload-Offset" in info.value.detail

    def test_optional_absent(self) -> None:
        """An optional header that is absent is None, not an error."""
        assert p.parse_optional_number(None, "Upload-Length") is None


class TestMetadata:
    @pytest.mark.parametrize("header, expected", [
        pytest.param(None, {}, id="absent"),
        pytest.param("", {}, id="empty"),
        pytest.param(f"filename {b64('cat.jpg')}", {"filename": "cat.jpg"}, id="one"),
        pytest.param(f"filename {b64('ü ñ.txt')},filetype {b64('text/plain')}",
                     {"filename": "ü ñ.txt", "filetype": "text/plain"}, id="two-utf8"),
        pytest.param(f"is_confidential, filename {b64('a')}", {"is_confidential": "", "filename": "a"},
                     id="bare-key"),
    ])
    def test_valid(self, header: str | None, expected: dict[str, str]) -> None:
        """Comma-separated 'key base64' pairs decode to a dict of str; a bare key is an empty value."""
        assert p.parse_metadata(header) == expected

    @pytest.mark.parametrize("header", [
        pytest.param("filename not*base64", id="not-base64"),
        pytest.param("filename Y2F0LmpwZw", id="no-padding"),
        pytest.param("filename " + base64.b64encode(bytes([0xFF, 0xFE])).decode(), id="not-utf8"),
        pytest.param(f"a {b64('x')},a {b64('y')}", id="duplicate"),
        pytest.param(f"a {b64('x')} extra", id="three-parts"),
        pytest.param(f"a {b64('x')},,b {b64('y')}", id="empty-pair"),
        pytest.param(f"k\u00e9y {b64('x')}", id="non-ascii-key"),
    ])
    def test_malformed_is_400(self, header: str) -> None:
        """Malformed Upload-Metadata is a 400, never a half-parsed dict."""
        with pytest.raises(BadRequest):
            p.parse_metadata(header)

    def test_up_to_the_cap_is_accepted(self) -> None:
        """Metadata of exactly MAX_METADATA_SIZE decoded bytes (keys and values) is accepted."""
        value = "x" * (p.MAX_METADATA_SIZE - len("note") - len("k"))
        assert p.parse_metadata(f"note {b64(value)},k") == {"note": value, "k": ""}

    @pytest.mark.parametrize("header", [
        pytest.param(f"note {b64('x' * (4096 - 3))}", id="one-byte-over"),
        pytest.param(",".join(f"k{i} {b64('v' * 100)}" for i in range(90)), id="many-pairs"),
        pytest.param("a" * 9000, id="long-undecoded"),
    ])
    def test_over_the_cap_is_400_naming_it(self, header: str) -> None:
        """Metadata over MAX_METADATA_SIZE decoded bytes is a 400 whose message names the cap."""
        with pytest.raises(BadRequest) as caught:
            p.parse_metadata(header)
        assert str(p.MAX_METADATA_SIZE) in caught.value.detail and caught.value.status_code == 400

    def test_round_trip(self) -> None:
        """What HEAD sends back parses to the same dict."""
        metadata = {"filename": "a b.txt", "flag": ""}
        assert p.parse_metadata(p.encode_metadata(metadata)) == metadata


class TestChecksum:
    def test_valid(self) -> None:
        """'sha256 <base64 digest>' parses to the algorithm and the digest bytes."""
        digest = hashlib.sha256(b"x").digest()
        assert p.parse_checksum(f"sha256 {base64.b64encode(digest).decode()}") == p.Checksum("sha256", digest)

    @pytest.mark.parametrize("algorithm", ["sha1", "md5", "sha256"])
    def test_every_advertised_algorithm(self, algorithm: str) -> None:
        """Each algorithm named in Tus-Checksum-Algorithm is accepted and hashes like hashlib."""
        digest = hashlib.new(algorithm, b"abc").digest()
        checksum = p.parse_checksum(f"{algorithm} {base64.b64encode(digest).decode()}")
        assert checksum is not None
        hasher = checksum.new()
        hasher.update(b"abc")
        assert hasher.digest() == checksum.digest

    @pytest.mark.parametrize("header", [
        pytest.param("crc32 AAAAAA==", id="unsupported-algorithm"),
        pytest.param("sha256", id="no-digest"),
        pytest.param("sha256 !!!", id="not-base64"),
        pytest.param(f"sha256 {base64.b64encode(b'short').decode()}", id="wrong-length"),
    ])
    def test_invalid_is_400(self, header: str) -> None:
        """An unsupported algorithm or a malformed digest is a 400 (as tus says), not a 460."""
        with pytest.raises(BadRequest):
            p.parse_checksum(header)


class TestConcat:
    @pytest.mark.parametrize("header, expected", [
        pytest.param("partial", p.Concat(final=False), id="partial"),
        pytest.param("final;/files/a /files/b", p.Concat(final=True, parts=("/files/a", "/files/b")), id="final"),
        pytest.param("final;https://h/files/a", p.Concat(final=True, parts=("https://h/files/a",)), id="absolute"),
    ])
    def test_valid(self, header: str, expected: p.Concat) -> None:
        """'partial' and 'final;<urls>' are the two forms."""
        assert p.parse_concat(header) == expected

    @pytest.mark.parametrize("header", ["final;", "final", "whole", "partial;x"])
    def test_invalid_is_400(self, header: str) -> None:
        """Anything else is a 400."""
        with pytest.raises(BadRequest):
            p.parse_concat(header)


class TestUploadComplete:
    @pytest.mark.parametrize("header, expected", [
        pytest.param("?1", True, id="true"), pytest.param("?0", False, id="false"),
        pytest.param(None, None, id="absent"),
    ])
    def test_boolean(self, header: str | None, expected: bool | None) -> None:
        """The structured-field booleans ?1 and ?0."""
        assert p.parse_upload_complete(header) is expected

    @pytest.mark.parametrize("header", ["1", "true", "?2", "?"])
    def test_other_is_400(self, header: str) -> None:
        """Anything but ?0/?1 is a 400."""
        with pytest.raises(BadRequest):
            p.parse_upload_complete(header)


class TestDecisions:
    def test_offset_equal(self) -> None:
        """The client's offset equal to the stored one appends: no error, whatever the offset."""
        for offset in (0, 10, 2**40):
            assert p.check_offset(offset, offset) is None

    @pytest.mark.parametrize("requested, current", [
        pytest.param(5, 10, id="behind"), pytest.param(11, 10, id="ahead"), pytest.param(0, 10, id="restart"),
    ])
    def test_offset_mismatch_is_409_with_the_offset(self, requested: int, current: int) -> None:
        """Any other offset is a 409 that carries the stored offset."""
        with pytest.raises(p.OffsetMismatch) as info:
            p.check_offset(requested, current)
        assert info.value.status_code == 409
        assert ("Upload-Offset", str(current)) in info.value.headers()

    @pytest.mark.parametrize("offset, length, max_size, content_length, budget", [
        pytest.param(0, 100, 0, 100, 100, id="whole"),
        pytest.param(40, 100, 0, 60, 60, id="rest"),
        pytest.param(40, 100, 0, None, 60, id="chunked"),
        pytest.param(0, None, 1000, 10, 1000, id="deferred-max"),
        pytest.param(0, None, 0, None, 2**63 - 1, id="deferred-unlimited"),
        pytest.param(100, 100, 0, 0, 0, id="complete-empty"),
    ])
    def test_budget(self, offset: int, length: int | None, max_size: int, content_length: int | None,
                    budget: int) -> None:
        """A PATCH may append up to the declared length (or the limit while deferred)."""
        assert p.check_append(offset=offset, length=length, max_size=max_size, content_length=content_length) == budget

    @pytest.mark.parametrize("offset, length, max_size, content_length", [
        pytest.param(0, 100, 0, 101, id="past-length"),
        pytest.param(99, 100, 0, 2, id="past-length-late"),
        pytest.param(0, None, 1000, 1001, id="deferred-past-max"),
    ])
    def test_past_the_length_is_413(self, offset: int, length: int | None, max_size: int,
                                    content_length: int) -> None:
        """A PATCH announcing more than fits is a 413 before any byte."""
        with pytest.raises(BodyTooLarge):
            p.check_append(offset=offset, length=length, max_size=max_size, content_length=content_length)

    @pytest.mark.parametrize("headers, max_size, refused", [
        pytest.param({"upload-length": "201"}, 200, True, id="over"),
        pytest.param({"upload-length": "200"}, 200, False, id="at-limit"),
        pytest.param({"upload-length": "201"}, 0, False, id="no-limit"),
        pytest.param({}, 200, False, id="deferred"),
        pytest.param({"upload-length": "x"}, 200, False, id="malformed-left-to-the-400"),
    ])
    def test_creation_too_large(self, headers: dict[str, str], max_size: int, refused: bool) -> None:
        """An Upload-Length over the limit is refused from the headers alone (the 100-continue rule)."""
        error = p.creation_too_large(headers, max_size)
        assert (error is not None) is refused
        if error is not None:
            assert error.status_code == 413 and error.limit == max_size


class TestErrors:
    @pytest.mark.parametrize("error, status", [
        pytest.param(p.UnsupportedVersion("x"), 412, id="412"),
        pytest.param(p.UnsupportedMediaType("x"), 415, id="415"),
        pytest.param(p.OffsetMismatch("x"), 409, id="409"),
        pytest.param(p.ChecksumMismatch("x"), 460, id="460"),
        pytest.param(p.UploadLocked("x", retry_after=2), 423, id="423"),
        pytest.param(p.UploadNotFound("x"), 404, id="404"),
        pytest.param(p.UploadGone("x"), 410, id="410"),
        pytest.param(p.Forbidden("x"), 403, id="403"),
        pytest.param(p.HookFailed("x"), 500, id="500"),
    ])
    def test_errors_are_responses(self, error: UploadGuardError, status: int) -> None:
        """Each tus status is an UploadGuardError that renders itself, uncached."""
        assert isinstance(error, UploadGuardError)
        line, headers, body = error.response({"HTTP_ACCEPT": "application/json"})
        assert line.startswith(f"{status} ") and ("Cache-Control", "no-store") in headers and body

    def test_locked_says_when_to_retry(self) -> None:
        """A 423 carries Retry-After."""
        assert ("Retry-After", "2") in p.UploadLocked("x", retry_after=2).headers()

    def test_gone_is_a_not_found(self) -> None:
        """An expired upload is also 'not found' for the app's lookups (one except clause)."""
        assert issubclass(p.UploadGone, p.UploadNotFound)

    def test_http_date(self) -> None:
        """Upload-Expires is an RFC 7231 IMF-fixdate."""
        assert p.http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
