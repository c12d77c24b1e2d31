"""The S3 store and locker against a real SeaweedFS: the shared store suite, conditional writes, locks
across hosts, storage failures, expiry and the server-side copy into Django storages.
"""

from __future__ import annotations

import functools
import hashlib
import io
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.seaweed import SeaweedFS
from tests.support import free_port
from tests.test_resumable_store import TestStoreContract as _StoreContract
from tests.test_resumable_store import data_of, new_info, reader
from uploadguard.errors import BodyTooLarge
from uploadguard.resumable import clean_expired
from uploadguard.resumable.locking import ReleaseWatcher
from uploadguard.wsgi import shut_reading
from uploadguard.resumable.protocol import UploadLocked, UploadNotFound
from uploadguard.resumable.s3 import MIN_PART, S3Store, S3Unavailable, is_s3_url, parse_s3_url, save_to_storage
from uploadguard.resumable.store import Store, new_upload_id

pytest.importorskip("boto3")

MiB = 1024 * 1024


@pytest.fixture
def aws_env(seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """boto3's standard configuration pointed at SeaweedFS, as an app host would have it."""
    env = seaweed.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def bucket(seaweed: SeaweedFS) -> str:
    return seaweed.new_bucket()


def make_store(bucket: str, **options: Any) -> S3Store:
    return S3Store(f"s3://{bucket}/uploads", **options)


def patterned(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ at every MiB, so a misplaced part shows."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    return b"".join(bytes([i % 251]) + block[1:] for i in range(size // MiB + 1))[:size]


class TestConditionalWrites:
    """What the locker builds on, checked on the real service (issue #11: verify, then rely on it)."""

    def test_seaweedfs_honours_if_none_match_and_if_match(self, seaweed: SeaweedFS, bucket: str) -> None:
        """If-None-Match: * refuses an existing key; If-Match refuses a wrong, stale or missing ETag with 412."""
        from botocore.exceptions import ClientError

        client = seaweed.client()

        def status(**kwargs: Any) -> int:
            try:
                client.put_object(Bucket=bucket, **kwargs)
            except ClientError as exc:
                return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])
            return 200

        first = client.put_object(Bucket=bucket, Key="lock", Body=b"1", IfNoneMatch="*")["ETag"]
        assert status(Key="lock", Body=b"2", IfNoneMatch="*") == 412
        assert status(Key="lock", Body=b"3", IfMatch='"0123456789abcdef0123456789abcdef"') == 412
        second = client.put_object(Bucket=bucket, Key="lock", Body=b"4", IfMatch=first)["ETag"]
        assert status(Key="lock", Body=b"5", IfMatch=first) == 412  # stale
        assert status(Key="missing", Body=b"6", IfMatch=second) == 412
        assert client.get_object(Bucket=bucket, Key="lock")["Body"].read() == b"4"


class TestTheTestService:
    """The SeaweedFS the S3 tests share must not run out of room however many buckets a run makes."""

    def test_a_new_bucket_takes_one_volume_from_a_fixed_pool(self, seaweed: SeaweedFS, bucket: str) -> None:
        """One test, one bucket, one volume: with weed's defaults (seven volumes per bucket, slots from free
        disk) the 41st bucket of a full run failed every write with InternalError on this machine."""
        from tests.seaweed import VOLUME_SLOTS

        assert len(list(seaweed.data.glob(f"{bucket}_*.dat"))) == 1
        assert f"-volume.max={VOLUME_SLOTS}" in seaweed.command()


def finished_data_of(store: Store, upload_id: str) -> bytes:
    """The suite's ``data_of`` for S3: S3 cannot read the parts of an unfinished multipart upload, so the
    upload is finished (as it stands) first; the suite reads data only at the end of a test."""
    if not store.get(upload_id).completed:
        store.finish(upload_id)
    return data_of(store, upload_id)


class TestS3StoreContract(_StoreContract):
    """The shared store suite (tests/test_resumable_store.py), on SeaweedFS."""

    @pytest.fixture
    def store(self, aws_env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
        import tests.test_resumable_store as suite

        monkeypatch.setattr(suite, "data_of", finished_data_of)
        made = make_store(bucket)
        assert made.health().ok
        yield made


class TestStorageUrl:
    @pytest.mark.parametrize(("url", "expected"), [
        pytest.param("s3://bucket/uploads", ("bucket", "uploads/"), id="prefix"),
        pytest.param("s3://my.bucket-1/a/b/", ("my.bucket-1", "a/b/"), id="nested"),
        pytest.param("s3://bucket", ("bucket", ""), id="no-prefix"),
    ])
    def test_parses(self, url: str, expected: tuple[str, str]) -> None:
        """An s3:// URL names a bucket and a key prefix ending in '/'."""
        assert parse_s3_url(url) == expected and is_s3_url(url)

    @pytest.mark.parametrize("url", [
        pytest.param("s3://", id="no-bucket"), pytest.param("s3://Bucket/x", id="uppercase"),
        pytest.param("s3://ab/x", id="too-short"), pytest.param("http://bucket/x", id="scheme"),
        pytest.param("s3://bucket:9000/x", id="port"), pytest.param("s3://-bucket/x", id="hyphen-first"),
    ])
    def test_refuses(self, url: str) -> None:
        """Anything but a valid bucket name in an s3:// URL is a ValueError naming the URL."""
        with pytest.raises(ValueError, match="s3://|bucket"):
            parse_s3_url(url)

    def test_part_size_bounds(self) -> None:
        """Parts below S3's 5 MiB minimum are refused at construction."""
        with pytest.raises(ValueError, match="part_size"):
            S3Store("s3://bucket/x", part_size=MIN_PART - 1)


class TestS3Store:
    def test_small_patches_are_kept_as_an_incomplete_part(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                                                          bucket: str) -> None:
        """PATCHes below 5 MiB live in one incomplete-part object (no multipart part yet) and count in the offset."""
        store = make_store(bucket)
        info = store.create(new_info(3 * MiB))
        store.write(info.id, 0, reader(b"a" * 1000), 3 * MiB)
        store.write(info.id, 1000, reader(b"b" * 1000), 3 * MiB - 1000)
        client = seaweed.client()
        [(key, upload_id)] = store.multipart_uploads()
        assert client.list_parts(Bucket=bucket, Key=key, UploadId=upload_id).get("Parts", []) == []
        tails = [k for k in (o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]) if ".tail." in k]
        assert len(tails) == 1 and store.get(info.id).offset == 2000  # the old incomplete part is deleted

    def test_parts_and_tail_make_a_byte_identical_file(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                                                       bucket: str) -> None:
        """Writes of odd sizes across part boundaries complete into the exact bytes, in parts >= 5 MiB."""
        store = make_store(bucket, part_size=5 * MiB)
        data = patterned(17 * MiB + 123)
        info = store.create(new_info(len(data)))
        offset = 0
        for size in (3 * MiB, 1, 7 * MiB + 5, 4 * MiB, len(data)):
            chunk = data[offset:offset + size]
            if not chunk:
                break
            offset = store.write(info.id, offset, reader(chunk, step=300_000), len(data) - offset)
            assert store.get(info.id).offset == offset
        key, upload_id = store.multipart_uploads()[0]
        parts = seaweed.client().list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
        assert all(part["Size"] >= MIN_PART for part in parts)
        store.finish(info.id)
        assert data_of(store, info.id) == data and store.multipart_uploads() == []

    def test_a_completed_upload_keeps_no_incomplete_part(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                                                         bucket: str) -> None:
        """Completion deletes the committed incomplete part and any a PATCH stored but never committed
        (it was preempted or killed): a completed upload never expires, so nothing else would."""
        store = make_store(bucket, part_size=5 * MiB)
        info = store.create(new_info(6))
        store.write(info.id, 0, reader(b"abc"), 6)
        seaweed.client().put_object(Bucket=bucket, Key=f"uploads/{info.id}.tail.0123456789ab", Body=b"def")
        store.write(info.id, 3, reader(b"def"), 3)
        store.finish(info.id)
        keys = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert sorted(key for key in keys if info.id in key) == [f"uploads/{info.id}", f"uploads/{info.id}.info"]
        assert data_of(store, info.id) == b"abcdef"

    def test_a_deferred_length_past_the_part_limit_is_a_413(self, aws_env: dict[str, str], bucket: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a length the parts cannot be sized to fit S3's 10,000 (here 3): the part that would need one
        number too many is a 413, the parts before it stay, and the upload still completes within the limit."""
        import uploadguard.resumable.s3 as s3

        monkeypatch.setattr(s3, "MAX_PARTS", 3)
        store = make_store(bucket, part_size=5 * MiB)
        info = store.create(new_info(None))
        data = patterned(16 * MiB)
        with pytest.raises(BodyTooLarge):
            store.write(info.id, 0, reader(data), len(data))
        assert store.get(info.id).offset == 10 * MiB
        store.write(info.id, 10 * MiB, reader(data[10 * MiB:13 * MiB]), 3 * MiB)  # the last part
        store.declare_length(info.id, 13 * MiB)
        store.finish(info.id)
        assert data_of(store, info.id) == data[:13 * MiB]

    def test_open_streams_and_seeks(self, aws_env: dict[str, str], bucket: str) -> None:
        """upload.open() is a seekable file over GetObject; the path is None."""
        store = make_store(bucket)
        data = patterned(6 * MiB + 7)
        info = store.create(new_info(len(data)))
        store.write(info.id, 0, reader(data), len(data))
        store.finish(info.id)
        assert store.local_path(info.id) is None
        with store.open(info.id) as fh:
            assert fh.read(10) == data[:10]
            fh.seek(5 * MiB)
            assert fh.read(100) == data[5 * MiB:5 * MiB + 100]
            fh.seek(-3, io.SEEK_END)
            assert fh.read() == data[-3:]
            fh.seek(0)
            assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest()

    def test_open_of_an_incomplete_upload_is_not_found(self, aws_env: dict[str, str], bucket: str) -> None:
        """Only a completed upload is one object to read."""
        store = make_store(bucket)
        info = store.create(new_info(10))
        with pytest.raises(UploadNotFound):
            store.open(info.id)

    def test_empty_upload_completes(self, aws_env: dict[str, str], bucket: str) -> None:
        """A zero-byte upload completes into an empty object (S3 completes no multipart upload without parts)."""
        store = make_store(bucket)
        info = store.create(new_info(0))
        assert store.finish(info.id).completed and data_of(store, info.id) == b""
        assert store.multipart_uploads() == []

    def test_a_long_chunked_body_appends_nothing_even_after_parts(self, aws_env: dict[str, str], bucket: str) -> None:
        """A body longer than the budget is refused whole even when parts were uploaded before the overrun."""
        store = make_store(bucket, part_size=5 * MiB)
        data = patterned(12 * MiB)
        info = store.create(new_info(12 * MiB))
        store.write(info.id, 0, reader(data[:MiB]), 12 * MiB)
        with pytest.raises(BodyTooLarge):
            store.write(info.id, MiB, reader(patterned(11 * MiB + 1, seed=1)), 11 * MiB)
        assert store.get(info.id).offset == MiB
        store.write(info.id, MiB, reader(data[MiB:]), 11 * MiB)
        store.finish(info.id)
        assert data_of(store, info.id) == data

    def test_finish_again_after_a_completion_that_was_not_recorded(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                                                                   bucket: str) -> None:
        """A finish that died after CompleteMultipartUpload but before recording it is finished again cleanly."""
        store = make_store(bucket)
        data = patterned(9 * MiB)
        info = store.create(new_info(len(data)))
        store.write(info.id, 0, reader(data), len(data))  # one part and an incomplete part
        state = store._load(info.id)
        assert state.tail is not None
        tail = seaweed.client().get_object(Bucket=bucket, Key=state.tail[0])["Body"].read()
        last = seaweed.client().upload_part(Bucket=bucket, Key=f"uploads/{info.id}", UploadId=state.multipart,
                                            PartNumber=2, Body=tail)
        seaweed.client().complete_multipart_upload(
            Bucket=bucket, Key=f"uploads/{info.id}", UploadId=state.multipart, MultipartUpload={"Parts": [
                {"PartNumber": 1, "ETag": state.parts[0][2]}, {"PartNumber": 2, "ETag": last["ETag"]}]})
        assert store.finish(info.id).completed  # the died try's work is recognised, not a 404
        assert data_of(store, info.id) == data

    def test_an_aborted_multipart_upload_is_never_marked_complete(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                                                                  bucket: str) -> None:
        """Its multipart upload aborted (a lifecycle rule), finish raises UploadNotFound and marks nothing done."""
        store = make_store(bucket)
        data = patterned(6 * MiB)
        info = store.create(new_info(len(data)))
        store.write(info.id, 0, reader(data), len(data))  # one whole part, no incomplete part
        state = store._load(info.id)
        assert state.tail is None and state.parts
        seaweed.client().abort_multipart_upload(Bucket=bucket, Key=f"uploads/{info.id}", UploadId=state.multipart)
        with pytest.raises(UploadNotFound):
            store.finish(info.id)
        assert not store.get(info.id).completed

    def test_memory_stays_within_one_part(self, aws_env: dict[str, str], bucket: str) -> None:
        """A 40 MiB PATCH allocates about one part (8 MiB, the reads kept as they came) plus a read, never the body
        or a second copy of the part."""
        store = make_store(bucket)
        info = store.create(new_info(40 * MiB))
        block = b"m" * MiB
        left = [40]

        def read(n: int) -> bytes:
            if not left[0]:
                return b""
            left[0] -= 1
            return block[:n]

        store.get(info.id)  # the client and its connections exist before measuring
        tracemalloc.start()
        try:
            assert store.write(info.id, 0, read, 40 * MiB) == 40 * MiB
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 * MiB + 4 * MiB, f"peak {peak / MiB:.1f} MiB"

    def test_s3_down_is_a_503_with_retry_after(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Nothing listening at the endpoint: health is not ok and every call is a fast S3Unavailable (503)."""
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        store = S3Store("s3://bucket/uploads", retry_after=7)
        started = time.monotonic()
        assert not store.health().ok
        with pytest.raises(S3Unavailable) as caught:
            store.get(new_upload_id())
        assert time.monotonic() - started < 20
        assert caught.value.status_code == 503 and ("Retry-After", "7") in caught.value.headers()

    def test_boto3_missing_names_the_extra(self, tmp_path: Path) -> None:
        """Without boto3 the error says which extra to install."""
        code = ("import sys; sys.modules['boto3'] = None\n"
                "from uploadguard.resumable.s3 import S3Store\n"
                "try:\n    S3Store('s3://bucket/x').client\nexcept ImportError as e:\n    print(e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
        assert "uploadguard[s3]" in out


class RacingS3:
    """A stand-in for boto3's S3 client holding objects in a dict, whose conditional PUTs lose their race
    the way AWS S3 reports it when two conditional writes of one key overlap: 409
    ``ConditionalRequestConflict`` (SeaweedFS only ever answers 412, so this is the only place it is seen)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.racing = False

    @staticmethod
    def _error(code: str, status: int, operation: str) -> Exception:
        from botocore.exceptions import ClientError

        return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           operation)

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, **conditions: str) -> dict[str, Any]:
        if conditions and self.racing:
            raise self._error("ConditionalRequestConflict", 409, "PutObject")
        self.objects[Key] = Body
        return {"ETag": '"%s"' % hashlib.md5(Body).hexdigest()}

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        import datetime
        from email.utils import formatdate

        if Key not in self.objects:
            raise self._error("NoSuchKey", 404, "GetObject")
        body = self.objects[Key]
        return {"Body": io.BytesIO(body), "ETag": '"%s"' % hashlib.md5(body).hexdigest(),
                "LastModified": datetime.datetime.now(datetime.timezone.utc),
                "ResponseMetadata": {"HTTPHeaders": {"date": formatdate(usegmt=True)}}}

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        return self.get_object(Bucket=Bucket, Key=Key)

    def delete_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self.objects.pop(Key, None)
        return {}

    def create_multipart_upload(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        return {"UploadId": "multipart-1"}


class TestConflictClassification:
    """A conditional write that lost to another request's is contention (423, retry soon), whatever S3 calls
    it -- never an S3 outage (503)."""

    def test_a_lock_lost_to_a_racing_writer_is_a_423(self) -> None:
        """AWS's 409 ConditionalRequestConflict on the lock's creation, the lock held by another: 423."""
        client = RacingS3()
        store = S3Store("s3://bucket/uploads", client=client)
        upload_id = new_upload_id()
        client.objects[f"uploads/{upload_id}.lock"] = b'{"token": "another", "serial": 0, "free": false}'
        client.racing = True
        with pytest.raises(UploadLocked) as caught:
            store.locker.acquire(upload_id, timeout=0)
        assert caught.value.status_code == 423

    def test_a_commit_lost_to_a_racing_writer_is_a_423(self) -> None:
        """AWS's 409 ConditionalRequestConflict on an info commit (If-Match): 423, as SeaweedFS's 412 is."""
        client = RacingS3()
        store = S3Store("s3://bucket/uploads", client=client)
        info = store.create(new_info(10))
        client.racing = True
        with pytest.raises(UploadLocked) as caught:
            store.update(info)
        assert caught.value.status_code == 423


class AnswerLosingProxy:
    """An HTTP proxy to SeaweedFS that forwards every request but, for the first ``losses`` conditional
    PUTs (If-None-Match / If-Match) of keys ending in ``suffix``, drops the connection instead of
    answering: the write landed, the client never heard -- what a timeout or a cut link does, and what
    boto3 answers by retrying.  With ``delay``, every such PUT is answered that many seconds after it
    was written (a slow link, or an answer that came only to a retry)."""

    def __init__(self, upstream: str, suffix: str, losses: int = 1, condition: str | None = None,
                 delay: float = 0.0) -> None:
        import http.client
        import http.server
        from urllib.parse import urlsplit

        proxy = self
        self.lost: list[str] = []
        target = urlsplit(upstream)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream_connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                try:
                    upstream_connection.request(self.command, self.path, body=body, headers=dict(self.headers))
                    response = upstream_connection.getresponse()
                    data = response.read()
                finally:
                    upstream_connection.close()
                conditional = (self.headers.get(condition) if condition else
                               self.headers.get("If-None-Match") or self.headers.get("If-Match"))
                path = self.path.split("?")[0]
                matched = self.command == "PUT" and conditional and path.endswith(suffix)
                if matched and response.status == 200 and len(proxy.lost) < losses:
                    proxy.lost.append(path)
                    self.close_connection = True  # the answer is lost
                    return
                if matched and delay:
                    time.sleep(delay)  # written already; the answer is late
                self.send_response_only(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TestRetriedConditionalWrites:
    """boto3 retries a PUT whose answer was lost; a conditional one that landed is then refused by its own
    condition (412).  Each write must recognise itself instead of taking the 412 for another's."""

    @pytest.fixture
    def losing(self, aws_env: dict[str, str], seaweed: SeaweedFS, request: pytest.FixtureRequest,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
        proxies: list[AnswerLosingProxy] = []

        def make(suffix: str, condition: str | None = None) -> AnswerLosingProxy:
            proxy = AnswerLosingProxy(seaweed.endpoint, suffix, condition=condition)
            proxies.append(proxy)
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            return proxy

        yield make
        for proxy in proxies:
            proxy.close()

    def test_a_create_whose_answer_was_lost_is_still_created(self, losing: Any, bucket: str) -> None:
        """The info's If-None-Match PUT landed, its answer was lost, the retry got 412: the create stands."""
        proxy = losing(".info")
        store = make_store(bucket)
        info = store.create(new_info(10))
        assert len(proxy.lost) == 1
        assert store.get(info.id).offset == 0 and len(store.multipart_uploads()) == 1

    def test_a_commit_whose_answer_was_lost_counts(self, losing: Any, bucket: str) -> None:
        """A PATCH's If-Match commit landed unheard: the write succeeds, with the offset it committed."""
        store = make_store(bucket)
        info = store.create(new_info(10))
        proxy = losing(".info")
        retried = make_store(bucket)
        assert retried.write(info.id, 0, reader(b"abc"), 10) == 3
        assert len(proxy.lost) == 1 and store.get(info.id).offset == 3

    def test_a_lock_whose_answer_was_lost_is_held(self, losing: Any, bucket: str) -> None:
        """The lock's If-None-Match PUT landed unheard: this request holds the lock, not a phantom rival."""
        proxy = losing(".lock")
        store = make_store(bucket)
        upload_id = new_upload_id()
        lock = store.locker.try_acquire(upload_id)
        assert lock is not None and len(proxy.lost) == 1
        assert make_store(bucket).locker.try_acquire(upload_id) is None
        lock.release()
        again = make_store(bucket).locker.try_acquire(upload_id)
        assert again is not None
        again.release()

    def test_a_renewal_whose_answer_was_lost_keeps_the_lock(self, losing: Any, bucket: str) -> None:
        """A lease renewal (If-Match) that landed unheard does not count as the lock taken over."""
        proxy = losing(".lock", condition="If-Match")
        store = make_store(bucket, lease=3)  # a renewal every second
        upload_id = new_upload_id()
        lock = store.locker.try_acquire(upload_id)
        assert lock is not None
        deadline = time.monotonic() + 30
        while (not proxy.lost or lock._renewals < 3) and time.monotonic() < deadline:
            time.sleep(0.1)
        held = not lock.lost and lock.held
        assert proxy.lost and lock._renewals >= 3 and held
        assert make_store(bucket).locker.try_acquire(upload_id) is None
        lock.release()
        again = make_store(bucket).locker.try_acquire(upload_id)
        assert again is not None  # freed by If-Match on the ETag the renewal adopted
        again.release()


class TestLeaseClock:
    """The lease runs from when the lock's write was sent, and a holder that may have outlived it writes nothing."""

    @pytest.fixture
    def slow_lock_writes(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                         monkeypatch: pytest.MonkeyPatch) -> Iterator[AnswerLosingProxy]:
        """Every conditional write of a lock (taking, renewing, freeing it) answered 1.5 s after it landed:
        more than two thirds of a 2 s lease."""
        proxy = AnswerLosingProxy(seaweed.endpoint, ".lock", losses=0, delay=1.5)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy
        proxy.close()

    def test_a_lock_answered_late_counts_its_lease_from_the_request(self, slow_lock_writes: AnswerLosingProxy,
                                                                     bucket: str) -> None:
        """A lock whose creation was answered 1.5 s after it was written has spent 1.5 s of its 2 s lease:
        it already counts as possibly lost (was: a fresh lease from the answer)."""
        store = make_store(bucket, lease=2)
        lock = store.locker.try_acquire(new_upload_id())
        assert lock is not None
        try:
            assert lock.lost and lock.release_requested()
        finally:
            lock.release()

    def test_a_holder_whose_lease_may_have_lapsed_writes_nothing(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                                                                 bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """A PATCH under a lock whose lease may have lapsed uploads no part and commits nothing: a 423, and
        the upload stands where it was."""
        store = make_store(bucket, lease=2)
        info = store.create(new_info(6 * MiB))
        proxy = AnswerLosingProxy(seaweed.endpoint, ".lock", losses=0, delay=1.5)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        try:
            holder = make_store(bucket, lease=2)  # its lock writes go through the slow link
            lock = holder.locker.try_acquire(info.id)
            assert lock is not None
            try:
                with pytest.raises(UploadLocked) as caught:
                    holder.write(info.id, 0, reader(patterned(6 * MiB)), 6 * MiB)
            finally:
                lock.release()
        finally:
            proxy.close()
        assert caught.value.status_code == 423
        assert store.get(info.id).offset == 0
        state = store._load(info.id)
        parts = store.client.list_parts(Bucket=bucket, Key=store._key(info.id), UploadId=state.multipart)
        assert not parts.get("Parts")


class TestS3Locking:
    def test_a_renewal_that_hangs_counts_as_a_lost_lease(self, aws_env: dict[str, str], bucket: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        """While a renewal hangs in S3, the holder counts its lease lost (and ends its PATCH) before it lapses."""
        store = make_store(bucket, lease=3)
        upload_id = new_upload_id()
        lock = store.locker.try_acquire(upload_id)
        assert lock is not None
        real_write = store.locker._write
        hang = threading.Event()

        def hanging_write(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("if_match") and not kwargs.get("free"):
                hang.wait(10)  # a renewal stuck in S3
            return real_write(*args, **kwargs)

        monkeypatch.setattr(store.locker, "_write", hanging_write)
        started = time.monotonic()
        while not lock.release_requested() and time.monotonic() - started < 10:
            time.sleep(0.05)
        took = time.monotonic() - started
        counted_lost = lock.lost
        hang.set()
        lock.release()
        assert counted_lost and took < 3, took  # two thirds of the lease, before another host may take it

    def test_exclusive_then_free(self, aws_env: dict[str, str], bucket: str) -> None:
        """While one holds an upload, try_acquire gets nothing; after release it does (the lock object stays, free)."""
        store = make_store(bucket)
        upload_id = new_upload_id()
        lock = store.locker.try_acquire(upload_id)
        assert lock is not None and store.locker.try_acquire(upload_id) is None
        lock.release()
        again = store.locker.try_acquire(upload_id)
        assert again is not None
        again.release()

    def test_acquire_times_out_with_423(self, aws_env: dict[str, str], bucket: str) -> None:
        """A holder that never lets go makes acquire() a 423 with Retry-After after the timeout."""
        store = make_store(bucket)
        upload_id = new_upload_id()
        with store.locker.try_acquire(upload_id) or pytest.fail("not acquired"):
            with pytest.raises(UploadLocked) as caught:
                store.locker.acquire(upload_id, timeout=0.5, retry_after=3)
        assert ("Retry-After", "3") in caught.value.headers()

    @pytest.mark.slow
    def test_lease_of_a_killed_holder_lapses(self, aws_env: dict[str, str], bucket: str) -> None:
        """A lock whose holder process was SIGKILLed is taken over once its lease lapsed (S3's clock), not before."""
        upload_id = new_upload_id()
        code = ("from uploadguard.resumable.s3 import S3Store; import time\n"
                f"lock = S3Store('s3://{bucket}/uploads', lease=3).locker.try_acquire({upload_id!r})\n"
                "print('held' if lock else 'busy', flush=True); time.sleep(120)\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
            store = make_store(bucket, lease=3)
            time.sleep(4)  # several renewals happen meanwhile: the lease is alive
            assert store.locker.try_acquire(upload_id) is None
            proc.kill()
            proc.wait(timeout=10)
            killed = time.monotonic()
            lock = store.locker.acquire(upload_id, timeout=30)
            assert time.monotonic() - killed >= 1  # the lease had to lapse first
            lock.release()
        finally:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()

    def test_contender_preempts_a_blocked_read(self, aws_env: dict[str, str], bucket: str) -> None:
        """A contender's release object makes the holder's watcher shut the socket, so a read blocked on a
        silent client returns and the contender gets the lock within seconds."""
        store = make_store(bucket)
        other_host = make_store(bucket)
        upload_id = new_upload_id()
        server, client = socket.socketpair()
        got: list[bytes] = []
        lock = store.locker.try_acquire(upload_id)
        assert lock is not None

        def holder() -> None:
            with ReleaseWatcher(lock, functools.partial(shut_reading, server), interval=0.05):  # type: ignore[arg-type]
                got.append(server.recv(10))
            lock.release()

        thread = threading.Thread(target=holder)
        thread.start()
        try:
            started = time.monotonic()
            contender = other_host.locker.acquire(upload_id, timeout=10)
            assert time.monotonic() - started < 5
            contender.release()
            thread.join(timeout=10)
            assert got == [b""]
        finally:
            server.close()
            client.close()
            thread.join(timeout=10)

    def test_a_holder_that_lost_its_lease_cannot_commit(self, aws_env: dict[str, str], bucket: str) -> None:
        """Every info commit is conditional: a writer whose state another request changed gets a 423, not a merge."""
        store = make_store(bucket)
        info = store.create(new_info(10))
        stale = store._load(info.id)
        store.write(info.id, 0, reader(b"abc"), 10)  # the "new holder"
        stale.info = stale.info.__class__(**{**stale.info.__dict__, "length": 99})
        with pytest.raises(UploadLocked):
            store._commit(stale)
        assert (store.get(info.id).length, store.get(info.id).offset) == (10, 3)


class TestS3Expiry:
    def test_clean_aborts_multipart_uploads_and_deletes_every_object(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                                                                     bucket: str) -> None:
        """clean_expired() on an S3 store aborts the expired uploads' multipart uploads and deletes their objects;
        fresh and completed uploads stay."""
        store = make_store(bucket, part_size=5 * MiB)
        old = store.create(new_info(20 * MiB, expires_after=60.0, created=time.time() - 3600))
        store.write(old.id, 0, reader(patterned(6 * MiB)), 20 * MiB)  # a part and an incomplete part
        store.locker.try_acquire(old.id).release()  # type: ignore[union-attr]  # leaves a lock object
        state = store._load(old.id)
        state.updated = time.time() - 3600
        store._commit(state, touch=False)
        fresh = store.create(new_info(10, expires_after=60.0))
        done = store.create(new_info(3, expires_after=60.0, created=time.time() - 3600))
        store.write(done.id, 0, reader(b"abc"), 3)
        store.finish(done.id)
        result = clean_expired(store)
        assert result.uploads == 1 and result.bytes == 6 * MiB
        assert {info.id for info in store.uploads()} == {fresh.id, done.id}
        keys = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert not [key for key in keys if old.id in key]
        assert [key for key, _ in store.multipart_uploads()] == [f"uploads/{fresh.id}"]

    def test_clean_removes_what_a_crash_left_of_uploads_without_info(self, aws_env: dict[str, str],
                                                                      seaweed: SeaweedFS, bucket: str) -> None:
        """A multipart upload whose create died before its info, parts and a lock whose termination died
        after deleting it: an hour later clean aborts and deletes them; uploads with info stay."""
        from uploadguard.resumable.store import new_upload_id

        client = seaweed.client()
        store = make_store(bucket, part_size=5 * MiB)
        live = store.create(new_info(20 * MiB))
        store.write(live.id, 0, reader(patterned(6 * MiB)), 20 * MiB)
        created_only = new_upload_id()  # CreateMultipartUpload, then the host died
        client.create_multipart_upload(Bucket=bucket, Key=f"uploads/{created_only}")
        half_gone = store.create(new_info(20 * MiB))  # terminate died after deleting the info
        store.write(half_gone.id, 0, reader(patterned(6 * MiB, seed=1)), 20 * MiB)
        store.locker.try_acquire(half_gone.id).release()  # type: ignore[union-attr]
        client.delete_object(Bucket=bucket, Key=f"uploads/{half_gone.id}.info")

        assert clean_expired(store).orphans == 0  # not an hour old yet: could be a create in progress
        later = time.time() + 3700
        assert clean_expired(store, now=later, dry_run=True).orphans == 2
        result = clean_expired(store, now=later)

        assert (result.uploads, result.orphans, result.errors) == (0, 2, [])
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert not [key for key in keys if created_only in key or half_gone.id in key]
        assert [key for key, _ in store.multipart_uploads()] == [f"uploads/{live.id}"]
        assert store.get(live.id).offset == 6 * MiB

    def test_clean_never_takes_another_applications_objects_for_leftovers(
            self, aws_env: dict[str, str], seaweed: SeaweedFS, bucket: str) -> None:
        """Objects and multipart uploads under the prefix whose names uploadguard never writes survive clean,
        even those that start with 24 id-like characters."""
        client = seaweed.client()
        foreign = ["uploads/Screenshot_20241129-1234.png", "uploads/report-2024-11-29-final-v2.pdf",
                   "uploads/notes.txt", "uploads/Screenshot_20241129-1234.tail.x"]
        for key in foreign:
            client.put_object(Bucket=bucket, Key=key, Body=b"theirs")
        client.create_multipart_upload(Bucket=bucket, Key="uploads/Screenshot_20241129-1234.mov")
        store = make_store(bucket)

        result = clean_expired(store, now=time.time() + 3700)

        assert (result.orphans, result.stray_parts, result.errors) == (0, 0, [])
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
        assert set(foreign) <= keys
        assert [key for key, _ in store.multipart_uploads()] == ["uploads/Screenshot_20241129-1234.mov"]

    def test_clean_removes_incomplete_parts_no_info_names(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                                                          bucket: str) -> None:
        """A part a PATCH stored but could not commit goes an hour later -- behind a completed upload (whose
        completion sweep failed) and an incomplete one alike; the part an info names stays."""
        client = seaweed.client()
        store = make_store(bucket, part_size=5 * MiB)
        done = store.create(new_info(3))
        store.write(done.id, 0, reader(b"abc"), 3)
        store.finish(done.id)
        live = store.create(new_info(10))
        store.write(live.id, 0, reader(b"abc"), 10)
        named = store._load(live.id).tail
        assert named is not None
        strays = [f"uploads/{done.id}.tail.0123456789ab", f"uploads/{live.id}.tail.ba9876543210"]
        for key in strays:
            client.put_object(Bucket=bucket, Key=key, Body=b"xyz")

        assert clean_expired(store).stray_parts == 0  # not an hour old: maybe a PATCH about to commit it
        result = clean_expired(store, now=time.time() + 3700)

        assert (result.stray_parts, result.orphans, result.uploads, result.errors) == (2, 0, 0, [])
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
        assert not keys & set(strays) and named[0] in keys
        store.write(live.id, 3, reader(b"defghij"), 7)
        store.finish(live.id)
        assert data_of(store, live.id) == b"abcdefghij" and data_of(store, done.id) == b"abc"

    def test_clean_leaves_a_locked_upload(self, aws_env: dict[str, str], bucket: str) -> None:
        """An expired upload whose lock another host holds is left alone and counted busy."""
        store = make_store(bucket)
        old = store.create(new_info(10, expires_after=1.0, created=time.time() - 3600))
        state = store._load(old.id)
        state.updated = time.time() - 3600
        store._commit(state, touch=False)
        with make_store(bucket).locker.try_acquire(old.id) or pytest.fail("not acquired"):
            result = clean_expired(store)
        assert (result.uploads, result.busy) == (0, 1) and store.get(old.id)


class TestSaveToStorage:
    def finished(self, store: S3Store, data: bytes) -> Any:
        from uploadguard.resumable import Upload

        info = store.create(new_info(len(data), metadata={"filename": "x.pdf", "filetype": "text/html"}))
        store.write(info.id, 0, reader(data), len(data))
        return Upload(store.finish(info.id), store, f"/files/{info.id}")

    @pytest.fixture
    def django_settings(self) -> None:
        from django.conf import settings

        if not settings.configured:
            settings.configure(SECRET_KEY="uploadguard-tests")  # the base the Django tests configure, whoever is first

    def test_server_side_copy_into_django_storages_s3(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                                                      bucket: str, django_settings: None) -> None:
        """Into django-storages' S3Storage on the same endpoint the upload is copied by CopyObject, not streamed."""
        from storages.backends.s3 import S3Storage

        store = make_store(bucket)
        data = patterned(6 * MiB + 1)
        upload = self.finished(store, data)
        media = seaweed.new_bucket("media")
        storage = S3Storage(bucket_name=media, location="media", endpoint_url=seaweed.endpoint,
                            access_key=aws_env["AWS_ACCESS_KEY_ID"], secret_key=aws_env["AWS_SECRET_ACCESS_KEY"],
                            region_name="us-east-1")
        calls: list[str] = []
        storage.connection.meta.client.meta.events.register(
            "before-call.s3.*", lambda model, **_: calls.append(model.name))
        name = save_to_storage(upload, storage, "docs/x.pdf")
        assert calls == ["CopyObject"]
        head = seaweed.client().head_object(Bucket=media, Key="media/docs/x.pdf")
        assert head["ContentLength"] == len(data) and head["ContentType"] == "application/pdf"  # from the name, never the client
        with storage.open(name) as fh:
            assert fh.read() == data

    def test_never_into_the_stores_own_prefix(self, aws_env: dict[str, str], seaweed: SeaweedFS, bucket: str,
                                              django_settings: None) -> None:
        """A storage whose location is inside the store's prefix is refused: there a copy named like the id
        would be the upload itself, and the clean-up and delete() remove what they find."""
        from storages.backends.s3 import S3Storage

        store = make_store(bucket)
        upload = self.finished(store, b"hello")
        storage = S3Storage(bucket_name=bucket, location="uploads", endpoint_url=seaweed.endpoint,
                            access_key=aws_env["AWS_ACCESS_KEY_ID"], secret_key=aws_env["AWS_SECRET_ACCESS_KEY"],
                            region_name="us-east-1")
        with pytest.raises(ValueError, match="inside the resumable uploads' prefix"):
            save_to_storage(upload, storage, upload.id)
        assert data_of(store, upload.id) == b"hello"

    def test_other_storages_get_a_stream(self, aws_env: dict[str, str], bucket: str, tmp_path: Path,
                                         django_settings: None) -> None:
        """Any other Django storage gets upload.open() streamed into storage.save()."""
        from django.core.files.storage import FileSystemStorage

        store = make_store(bucket)
        upload = self.finished(store, b"hello world")
        storage = FileSystemStorage(location=str(tmp_path / "media"))
        name = save_to_storage(upload, storage, "a/hello.txt")
        assert (tmp_path / "media" / name).read_bytes() == b"hello world"


def fallback(environ: dict[str, Any], start_response: Any) -> Any:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"app"]


TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"


class TestStorageSelection:
    def test_an_s3_url_selects_the_s3_store_and_its_locker(self, aws_env: dict[str, str], bucket: str,
                                                           tmp_path: Path) -> None:
        """storage="s3://bucket/prefix" makes the endpoint use an S3Store and the S3 locker."""
        from uploadguard.config import Settings
        from uploadguard.resumable import ResumableUploads
        from uploadguard.resumable.s3 import S3Locker

        settings = Settings.from_environ({"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp")})
        app = ResumableUploads(fallback, storage=f"s3://{bucket}/uploads", settings=settings)
        assert isinstance(app.store, S3Store) and app.store.prefix == "uploads/"
        assert isinstance(app.locker, S3Locker)

    def test_the_setting_selects_it_too(self, aws_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
        """UPLOADGUARD_RESUMABLE_STORAGE=s3://... is kept as a URL (not made a path) and selects the S3 store."""
        from uploadguard.config import Settings
        from uploadguard.resumable import ResumableUploads

        settings = Settings.from_environ({"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"),
                                          "UPLOADGUARD_RESUMABLE_STORAGE": f"s3://{bucket}/up"})
        assert str(settings.resumable_storage) == f"s3://{bucket}/up"
        app = ResumableUploads(fallback, settings=settings)
        assert isinstance(app.store, S3Store) and app.store.bucket == bucket
        assert not (Path.cwd() / "s3:").exists()

    def test_a_bad_s3_url_is_a_config_error(self, tmp_path: Path) -> None:
        """An invalid bucket name in the setting is refused with the setting's name."""
        from uploadguard.config import ConfigError, Settings

        with pytest.raises(ConfigError, match="UPLOADGUARD_RESUMABLE_STORAGE"):
            Settings.from_environ({"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"),
                                   "UPLOADGUARD_RESUMABLE_STORAGE": "s3://No_Such/x"})


class TestEndpointOnS3:
    """The tus endpoint in-process (webtest) on the S3 store."""

    def app(self, url: str, tmp_path: Path, completed: list[bytes] | None = None, **options: Any) -> Any:
        import webtest

        from uploadguard.config import Settings
        from uploadguard.resumable import ResumableUploads

        def on_complete(upload: Any) -> None:
            assert upload.path is None
            with upload.open() as fh:
                (completed if completed is not None else []).append(fh.read())

        settings = Settings.from_environ({"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp")})
        self.endpoint = ResumableUploads(fallback, storage=url, settings=settings, on_complete=on_complete,
                                         **options)
        return webtest.TestApp(self.endpoint)

    def test_create_patch_head_complete(self, aws_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
        """A tus upload in three PATCHes completes; on_complete reads it from S3; get() returns it."""
        completed: list[bytes] = []
        app = self.app(f"s3://{bucket}/uploads", tmp_path, completed)
        data = patterned(7 * MiB + 3)
        created = app.post("/files/", headers={**TUS, "Upload-Length": str(len(data))}, status=201)
        path = created.headers["Location"].split("localhost:80", 1)[-1]
        offset = 0
        for size in (MiB, 5 * MiB, len(data)):
            response = app.request(path, method="PATCH", body=data[offset:offset + size], status=204,
                                   headers={**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS})
            offset = int(response.headers["Upload-Offset"])
            if offset == len(data):
                break
        assert app.head(path, headers=TUS, status=200).headers["Upload-Offset"] == str(len(data))
        assert completed == [data]
        with self.endpoint.get(path).open() as fh:
            assert fh.read() == data

    def test_concatenation_joins_parts_and_consumes_them(self, aws_env: dict[str, str], seaweed: SeaweedFS,
                                                          bucket: str, tmp_path: Path) -> None:
        """Uppy's parallel mode on S3: two partial uploads (one over a part size) joined by a final one; on_complete
        reads the whole file, and nothing of the parts is left in the bucket."""
        completed: list[bytes] = []
        app = self.app(f"s3://{bucket}/uploads", tmp_path, completed)
        data = patterned(6 * MiB + 5)
        paths = []
        for chunk in (data[:6 * MiB], data[6 * MiB:]):
            created = app.post("/files/", headers={**TUS, "Upload-Length": str(len(chunk)),
                                                   "Upload-Concat": "partial"}, status=201)
            path = created.headers["Location"].split("localhost:80", 1)[-1]
            app.request(path, method="PATCH", body=chunk, status=204,
                        headers={**TUS, "Upload-Offset": "0", "Content-Type": OCTETS})
            paths.append(path)
        final = app.post("/files/", headers={**TUS, "Upload-Concat": "final;" + " ".join(paths)}, status=201)
        final_id = final.headers["Location"].rsplit("/", 1)[1]
        assert completed == [data]
        for path in paths:
            app.head(path, headers=TUS, status=404)
        keys = {o["Key"] for o in seaweed.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
        assert keys == {f"uploads/{final_id}", f"uploads/{final_id}.info", f"uploads/{final_id}.lock"}
        assert self.endpoint.store.multipart_uploads() == []

    def test_a_small_temp_dir_does_not_refuse_a_patch(self, aws_env: dict[str, str], bucket: str,
                                                      tmp_path: Path) -> None:
        """On S3 a PATCH's parts stay in memory (8 MiB parts, no checksum): behind the guard, a 1 MiB tmpfs temp
        dir takes a 3 MiB PATCH."""
        import webtest

        from tests.support import tmpfs
        from uploadguard import UploadGuard
        from uploadguard.config import Settings
        from uploadguard.resumable import ResumableUploads

        data = patterned(3 * MiB)
        with tmpfs(tmp_path / "tmp", size="1m", options="mode=700") as temp:
            settings = Settings.from_environ({}, temp_dir=temp, min_free_space=0)
            endpoint = ResumableUploads(fallback, storage=f"s3://{bucket}/uploads", settings=settings)
            app = webtest.TestApp(UploadGuard(endpoint, settings=settings))
            created = app.post("/files/", headers={**TUS, "Upload-Length": str(len(data))}, status=201)
            path = created.headers["Location"].split("localhost:80", 1)[-1]
            response = app.request(path, method="PATCH", body=data, status="*",
                                   headers={**TUS, "Upload-Offset": "0", "Content-Type": OCTETS})
        assert response.status_int == 204, response.body[:300]
        with endpoint.get(path).open() as fh:
            assert fh.read() == data

    def test_s3_down_is_503_with_retry_after(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """With nothing listening at AWS_ENDPOINT_URL, creation and HEAD answer 503 + Retry-After, never 500."""
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        app = self.app("s3://bucket/uploads", tmp_path)
        response = app.post("/files/", headers={**TUS, "Upload-Length": "10"}, status=503)
        assert int(response.headers["Retry-After"]) > 0
        response = app.head(f"/files/{new_upload_id()}", headers=TUS, status=503)
        assert int(response.headers["Retry-After"]) > 0

    def test_cli_clean_on_s3(self, aws_env: dict[str, str], bucket: str, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """`uploadguard clean` with UPLOADGUARD_RESUMABLE_STORAGE=s3://... removes expired uploads there."""
        from uploadguard.cli import main

        store = make_store(bucket)
        old = store.create(new_info(10, expires_after=60.0, created=time.time() - 3600))
        state = store._load(old.id)
        state.updated = time.time() - 3600
        store._commit(state, touch=False)
        fresh = store.create(new_info(10, expires_after=60.0))
        (tmp_path / "tmp").mkdir()
        monkeypatch.setenv("UPLOADGUARD_TEMP_DIR", str(tmp_path / "tmp"))
        monkeypatch.setenv("UPLOADGUARD_RESUMABLE_STORAGE", f"s3://{bucket}/uploads")
        assert main(["clean", "--older-than", "24h"]) == 0
        assert "removed 1 expired resumable upload " in capsys.readouterr().out
        assert [info.id for info in store.uploads()] == [fresh.id]
        assert [key for key, _ in store.multipart_uploads()] == [f"uploads/{fresh.id}"]

    def test_a_refused_patch_declares_no_length(self, aws_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
        """On S3 too, Upload-Length: 7 with a wrong checksum is a 460 that records no length; the real 9 works."""
        import base64

        completed: list[bytes] = []
        app = self.app(f"s3://{bucket}/uploads", tmp_path, completed)
        created = app.post("/files/", headers={**TUS, "Upload-Defer-Length": "1"}, status=201)
        path = created.headers["Location"]
        wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
        app.request(path, method="PATCH", body=b"abcdefg", status=460, headers={
            **TUS, "Upload-Offset": "0", "Content-Type": OCTETS, "Upload-Length": "7",
            "Upload-Checksum": f"sha1 {wrong}"})
        assert "Upload-Length" not in app.head(path, headers=TUS, status=200).headers
        app.request(path, method="PATCH", body=b"abcdefghi", status=204, headers={
            **TUS, "Upload-Offset": "0", "Content-Type": OCTETS, "Upload-Length": "9"})
        assert completed == [b"abcdefghi"]
