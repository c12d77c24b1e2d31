"""The upload store, the upload locks and expiry: the seams under the resumable endpoint.

:class:`TestStoreContract` is the suite every store must pass; it is
parametrised over ``STORE_FACTORIES`` so the S3 store (issue #11) adds one
factory and reuses it.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uploadguard.cli import main
from uploadguard.errors import BodyTooLarge
from uploadguard.resumable import LocalStore, UploadInfo, clean_expired
from uploadguard.resumable.locking import FileLocker, ReleaseWatcher, StreamSlots
from uploadguard.wsgi import shut_reading
from uploadguard.resumable.protocol import Checksum, ChecksumMismatch, OffsetMismatch, UploadLocked, UploadNotFound
from uploadguard.resumable.store import ID_PATTERN, Store, new_upload_id, valid_upload_id

StoreFactory = Callable[[Path], Store]

STORE_FACTORIES = [
    pytest.param(lambda path: LocalStore(path / "uploads"), id="local"),
]


def reader(data: bytes, *, step: int | None = None) -> Callable[[int], bytes]:
    """A ``read(n)`` over ``data``; ``step`` caps each read (as a slow socket would)."""
    stream = io.BytesIO(data)
    return lambda n: stream.read(min(n, step) if step else n)


def new_info(length: int | None = 10, **fields: object) -> UploadInfo:
    fields.setdefault("created", time.time())
    return UploadInfo(id=new_upload_id(), length=length, **fields)  # type: ignore[arg-type]


def data_of(store: Store, upload_id: str) -> bytes:
    with store.open(upload_id) as fh:
        return fh.read()


@pytest.fixture(params=STORE_FACTORIES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store = request.param(tmp_path)
    assert made.health().ok
    yield made


class TestStoreContract:
    def test_create_and_get(self, store: Store) -> None:
        """A created upload is found with its length, metadata, owner and offset 0."""
        info = store.create(new_info(5, metadata={"filename": "ä.txt"}, owner="alice"))
        got = store.get(info.id)
        assert (got.length, got.metadata, got.owner, got.offset, got.completed) == (5, {"filename": "ä.txt"},
                                                                                     "alice", 0, False)

    def test_unknown_is_not_found(self, store: Store) -> None:
        """An id never created is UploadNotFound."""
        with pytest.raises(UploadNotFound):
            store.get(new_upload_id())

    @pytest.mark.parametrize("bad", ["../../etc/passwd", "a" * 23, "a" * 25, "a/b" + "c" * 21, "", "." * 24])
    def test_invalid_ids_never_reach_a_path(self, store: Store, bad: str) -> None:
        """An id that fails the strict pattern is UploadNotFound before any path is built."""
        with pytest.raises(UploadNotFound):
            store.get(bad)

    def test_write_appends_and_offset_is_the_data(self, store: Store) -> None:
        """Writes append in order; the offset is what was stored."""
        info = store.create(new_info(10))
        assert store.write(info.id, 0, reader(b"hello"), 10) == 5
        assert store.write(info.id, 5, reader(b"world", step=2), 5) == 10
        assert store.get(info.id).offset == 10 and data_of(store, info.id) == b"helloworld"

    def test_wrong_offset_appends_nothing(self, store: Store) -> None:
        """A write at any offset but the stored one is a 409 and the data is unchanged."""
        info = store.create(new_info(10))
        store.write(info.id, 0, reader(b"abc"), 10)
        with pytest.raises(OffsetMismatch):
            store.write(info.id, 1, reader(b"xyz"), 9)
        assert data_of(store, info.id) == b"abc"

    def test_too_long_body_appends_nothing(self, store: Store) -> None:
        """A body longer than the budget is a 413 and not one byte of it stays."""
        info = store.create(new_info(4))
        store.write(info.id, 0, reader(b"ab"), 4)
        with pytest.raises(BodyTooLarge):
            store.write(info.id, 2, reader(b"cdef"), 2)
        assert data_of(store, info.id) == b"ab"

    def test_checksum_match_appends(self, store: Store) -> None:
        """A chunk whose checksum matches is appended."""
        info = store.create(new_info(6))
        checksum = Checksum("sha1", hashlib.sha1(b"abcdef").digest())
        assert store.write(info.id, 0, reader(b"abcdef", step=4), 6, checksum=checksum) == 6
        assert data_of(store, info.id) == b"abcdef"

    def test_checksum_mismatch_discards_the_chunk(self, store: Store) -> None:
        """A chunk whose checksum does not match is a 460 and none of it is counted."""
        info = store.create(new_info(6))
        store.write(info.id, 0, reader(b"ab"), 6)
        with pytest.raises(ChecksumMismatch):
            store.write(info.id, 2, reader(b"cdef"), 4, checksum=Checksum("md5", hashlib.md5(b"nope").digest()))
        assert store.get(info.id).offset == 2 and data_of(store, info.id) == b"ab"

    def test_append_takes_the_body_as_it_is_pushed(self, store: Store) -> None:
        """Pieces written to an appender count once committed: the offset and data are every piece, in order."""
        info = store.create(new_info(10))
        appender = store.append(info.id, 0, 10)
        for piece in (b"he", b"llo", b"wor", b"ld"):
            appender.write(piece)
        assert appender.commit() == 10
        assert store.get(info.id).offset == 10 and data_of(store, info.id) == b"helloworld"

    def test_append_at_a_wrong_offset_is_409_before_any_byte(self, store: Store) -> None:
        """An appender asked for at any offset but the stored one is a 409."""
        info = store.create(new_info(10))
        store.write(info.id, 0, reader(b"abc"), 10)
        with pytest.raises(OffsetMismatch):
            store.append(info.id, 1, 9)
        assert data_of(store, info.id) == b"abc"

    def test_append_past_its_budget_appends_nothing(self, store: Store) -> None:
        """A piece that passes the budget is a 413 and none of the body's earlier pieces stays either."""
        info = store.create(new_info(6))
        store.write(info.id, 0, reader(b"ab"), 6)
        appender = store.append(info.id, 2, 4)
        appender.write(b"cd")
        with pytest.raises(BodyTooLarge):
            appender.write(b"efg")
        appender.abort()
        assert store.get(info.id).offset == 2 and data_of(store, info.id) == b"ab"

    def test_append_with_a_checksum_counts_only_a_verified_body(self, store: Store) -> None:
        """A checksummed body pushed in pieces counts on commit when it matches, and not at all when it does not."""
        info = store.create(new_info(6))
        bad = store.append(info.id, 0, 6, checksum=Checksum("md5", hashlib.md5(b"nope").digest()))
        bad.write(b"abc")
        with pytest.raises(ChecksumMismatch):
            bad.commit()
        assert store.get(info.id).offset == 0
        good = store.append(info.id, 0, 6, checksum=Checksum("sha1", hashlib.sha1(b"abcdef").digest()))
        good.write(b"abc")
        good.write(b"def")
        assert good.commit() == 6 and data_of(store, info.id) == b"abcdef"

    def test_declare_length(self, store: Store) -> None:
        """A deferred length can be declared later."""
        info = store.create(new_info(None))
        assert store.get(info.id).length is None
        assert store.declare_length(info.id, 7).length == 7 and store.get(info.id).length == 7

    def test_finish_marks_completed(self, store: Store) -> None:
        """finish() records completion; update() persists hook state."""
        info = store.create(new_info(3))
        store.write(info.id, 0, reader(b"abc"), 3)
        done = store.finish(info.id)
        assert done.completed and store.get(info.id).completed
        store.update(dataclasses.replace(done, hook_done=True))
        assert store.get(info.id).hook_done

    def test_terminate(self, store: Store) -> None:
        """A terminated upload is gone."""
        info = store.create(new_info(3))
        store.terminate(info.id)
        with pytest.raises(UploadNotFound):
            store.get(info.id)

    def test_uploads_lists_every_upload(self, store: Store) -> None:
        """uploads() yields each upload once."""
        ids = {store.create(new_info(1)).id for _ in range(3)}
        assert {info.id for info in store.uploads()} == ids

    def test_expiry_follows_the_last_write(self, store: Store) -> None:
        """An incomplete upload expires expires_after seconds after its last write; a completed one never."""
        info = store.create(new_info(3, expires_after=60.0, created=time.time() - 3600))
        got = store.get(info.id)
        assert got.expires is not None and abs(got.expires - (got.updated + 60)) < 1e-6
        store.write(info.id, 0, reader(b"abc"), 3)
        assert store.finish(info.id).expires is None

    def test_completed_partial_still_expires(self, store: Store) -> None:
        """A complete concatenation part expires (the final upload holds the data), so parts never pile up."""
        info = store.create(new_info(1, expires_after=60.0, partial=True))
        store.write(info.id, 0, reader(b"x"), 1)
        assert store.finish(info.id).expires is not None

    def test_finish_records_when_the_upload_completed(self, store: Store) -> None:
        """finish() stores the completion time, and the keep_completed given at creation survives it."""
        info = store.create(new_info(3, keep_completed=60.0))
        store.write(info.id, 0, reader(b"abc"), 3)
        before = time.time()
        store.finish(info.id)
        got = store.get(info.id)
        assert before - 1 <= got.completed_at <= time.time() + 1 and got.keep_completed == 60.0
        discard = got.discard_at(0.0)
        assert discard is not None and abs(discard - (got.completed_at + 60.0)) < 1e-6

    def test_clean_removes_completed_uploads_past_keep_completed(self, store: Store) -> None:
        """A completed upload is removed by clean_expired() keep_completed after it completed, under its lock (busy
        while held); one kept forever (0), a partial and an incomplete one stay."""
        done = store.create(new_info(3, keep_completed=60.0))
        forever = store.create(new_info(3, keep_completed=0.0))
        for info in (done, forever):
            store.write(info.id, 0, reader(b"abc"), 3)
            store.finish(info.id)
        part = store.create(new_info(1, keep_completed=60.0, partial=True))
        store.write(part.id, 0, reader(b"x"), 1)
        store.finish(part.id)
        live = store.create(new_info(3, keep_completed=60.0))
        assert clean_expired(store, now=time.time() + 30).uploads == 0
        later = time.time() + 120
        with store.locker.try_acquire(done.id) or pytest.fail("not acquired"):
            assert clean_expired(store, now=later).busy == 1
        result = clean_expired(store, now=later)
        assert (result.uploads, result.completed, result.bytes, result.errors) == (1, 1, 3, [])
        with pytest.raises(UploadNotFound):
            store.get(done.id)
        assert {info.id for info in store.uploads()} == {forever.id, part.id, live.id}
        assert clean_expired(store, now=time.time() + 365 * 86400).completed == 0

    def test_clean_applies_its_default_to_uploads_that_recorded_no_keep_completed(self, store: Store) -> None:
        """A completed upload whose info recorded no keep_completed (written before it existed) is kept by clean's
        keep_completed; without one (0) it stays."""
        old = store.create(new_info(3))
        store.write(old.id, 0, reader(b"abc"), 3)
        store.finish(old.id)
        later = time.time() + 120
        assert clean_expired(store, now=later).uploads == 0
        assert clean_expired(store, now=later, keep_completed=60.0).completed == 1
        with pytest.raises(UploadNotFound):
            store.get(old.id)

    def test_expired_lists_only_expired_incomplete_uploads(self, store: Store) -> None:
        """expired(now) yields the incomplete uploads whose expiry is past, nothing else."""
        old = store.create(new_info(3, expires_after=60.0))
        forever = store.create(new_info(3))
        later = time.time() + 3600
        assert [info.id for info in store.expired(later)] == [old.id]
        assert list(store.expired(time.time())) == [] and forever.expires is None


class TestLocalStore:
    def test_an_upload_completed_before_the_time_was_recorded_counts_from_its_last_write(self) -> None:
        """An info without completed_at (written before it was recorded) is kept keep_completed after its last write."""
        info = UploadInfo(id=new_upload_id(), length=3, created=100.0, completed=True, updated=500.0)
        assert info.discard_at(60.0) == 560.0 and info.discard_at(0.0) is None
        assert dataclasses.replace(info, keep_completed=0.0).discard_at(60.0) is None

    def test_ids_are_unguessable(self) -> None:
        """Ids carry at least 128 random bits and match the strict pattern."""
        upload_id = new_upload_id()
        assert len(base64.urlsafe_b64decode(upload_id)) * 8 >= 128 and ID_PATTERN.fullmatch(upload_id)
        assert len({new_upload_id() for _ in range(1000)}) == 1000

    def test_valid_upload_id(self) -> None:
        """Only the generated shape is valid."""
        assert valid_upload_id(new_upload_id()) and not valid_upload_id("x" * 23 + "/")

    def test_offset_is_the_file_size(self, tmp_path: Path) -> None:
        """Bytes appended to the data file by a process that then died still count (the size is the offset)."""
        store = LocalStore(tmp_path)
        info = store.create(new_info(10))
        with open(store.local_path(info.id) or "", "ab") as fh:  # what a killed worker left behind
            fh.write(b"1234")
        assert store.get(info.id).offset == 4

    def test_info_is_json_written_atomically(self, tmp_path: Path) -> None:
        """The info is JSON without the derived fields, and no temp file is left."""
        store = LocalStore(tmp_path)
        info = store.create(new_info(10, metadata={"a": "b"}))
        data = json.loads((tmp_path / f"{info.id}.info").read_text())
        assert data["metadata"] == {"a": "b"} and "offset" not in data
        assert sorted(os.listdir(tmp_path)) == sorted([f"{info.id}.info", f"{info.id}.bin"])

    def test_no_side_file_left(self, tmp_path: Path) -> None:
        """A checksummed write leaves no side file, matched or not."""
        store = LocalStore(tmp_path)
        info = store.create(new_info(3))
        with pytest.raises(ChecksumMismatch):
            store.write(info.id, 0, reader(b"abc"), 3, checksum=Checksum("sha1", hashlib.sha1(b"x").digest()))
        assert not (tmp_path / f"{info.id}.chk").exists()

    def test_vanished_directory_is_recreated_and_old_uploads_are_gone(self, tmp_path: Path) -> None:
        """health() recreates a deleted storage dir; the uploads that were in it are not found."""
        store = LocalStore(tmp_path / "uploads")
        store.health()
        info = store.create(new_info(3))
        subprocess.run(["rm", "-rf", str(tmp_path / "uploads")], check=True)
        assert store.health().ok and (tmp_path / "uploads").is_dir()
        with pytest.raises(UploadNotFound):
            store.get(info.id)

    def test_a_creation_and_a_completion_are_fsynced_before_anybody_is_told(self, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """A 201 names an upload a power loss cannot take back (its info and the directory entry are fsynced);
        a completion fsyncs the data, the info and the directory before on_complete or the client hears of it."""
        synced: list[str] = []
        fsync = os.fsync

        def noted(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            fsync(fd)

        monkeypatch.setattr(os, "fsync", noted)
        store = LocalStore(tmp_path)
        info = store.create(new_info(3))
        assert synced == [f"{tmp_path}/{info.id}.info.tmp", str(tmp_path)]
        synced.clear()
        store.write(info.id, 0, reader(b"abc"), 3)
        store.finish(info.id)
        assert synced == [f"{tmp_path}/{info.id}.bin", f"{tmp_path}/{info.id}.info.tmp", str(tmp_path)]

    def test_an_info_read_in_short_pieces_is_whole(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A file system that answers reads a few bytes at a time still gives the whole info: half of one
        would be an unknown upload, and its client would start again."""
        store = LocalStore(tmp_path)
        info = store.create(new_info(3, metadata={"filename": "x" * 200}))
        read = os.read
        monkeypatch.setattr(os, "read", lambda fd, size: read(fd, min(size, 7)))
        assert store.get(info.id) == info

    @pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"id": 1, "bogus": true}'])
    def test_unreadable_info_is_not_found(self, tmp_path: Path, content: bytes) -> None:
        """An info file mangled by outside hands makes the upload unknown (404), never a 500."""
        store = LocalStore(tmp_path)
        info = store.create(new_info(3))
        (tmp_path / f"{info.id}.info").write_bytes(content)
        with pytest.raises(UploadNotFound):
            store.get(info.id)
        assert list(store.uploads()) == []

    def test_completed_upload_without_its_data_stays_complete(self, tmp_path: Path) -> None:
        """A completed upload whose data was moved away still reports its full offset; open() says why not."""
        store = LocalStore(tmp_path)
        info = store.create(new_info(3))
        store.write(info.id, 0, reader(b"abc"), 3)
        store.finish(info.id)
        os.unlink(store.local_path(info.id) or "")
        assert store.get(info.id).offset == 3
        with pytest.raises(UploadNotFound, match="moved away"):
            store.open(info.id)

    def test_file_in_place_of_the_directory_is_unhealthy(self, tmp_path: Path) -> None:
        """A file where the storage dir should be is reported, not healed."""
        (tmp_path / "uploads").write_text("x")
        assert LocalStore(tmp_path / "uploads").health().reason == "not_a_directory"


class TestLocking:
    def test_exclusive(self, tmp_path: Path) -> None:
        """While one holds an upload, try_acquire gets nothing; after release it does."""
        locker = FileLocker(tmp_path)
        upload_id = new_upload_id()
        lock = locker.try_acquire(upload_id)
        assert lock is not None and locker.try_acquire(upload_id) is None
        lock.release()
        again = locker.try_acquire(upload_id)
        assert again is not None
        again.release()

    def test_exclusive_across_processes_and_released_on_kill(self, tmp_path: Path) -> None:
        """A lock held by another process excludes this one, and SIGKILL of that process frees it."""
        upload_id = new_upload_id()
        code = ("import sys, time; from uploadguard.resumable.locking import FileLocker;"
                f"lock = FileLocker({str(tmp_path)!r}).try_acquire({upload_id!r});"
                "print('held' if lock else 'busy', flush=True); time.sleep(60)")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
            locker = FileLocker(tmp_path)
            assert locker.try_acquire(upload_id) is None
            proc.kill()
            proc.wait(timeout=10)
            lock = locker.try_acquire(upload_id)
            assert lock is not None
            lock.release()
        finally:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()

    def test_acquire_times_out_with_423(self, tmp_path: Path) -> None:
        """A holder that never lets go makes acquire() a 423 with Retry-After after the timeout."""
        locker = FileLocker(tmp_path)
        upload_id = new_upload_id()
        with locker.try_acquire(upload_id) or pytest.fail("not acquired"):
            started = time.monotonic()
            with pytest.raises(UploadLocked) as info:
                locker.acquire(upload_id, timeout=0.3, retry_after=3)
            assert time.monotonic() - started >= 0.3
            assert ("Retry-After", "3") in info.value.headers()

    def test_contender_asks_and_watcher_ends_a_blocked_read(self, tmp_path: Path) -> None:
        """A contender's release request makes the holder's watcher shut the socket, so a read
        blocked on a client that sends nothing returns at once and the contender gets the lock."""
        import socket

        locker = FileLocker(tmp_path)
        upload_id = new_upload_id()
        server, client = socket.socketpair()
        got: list[bytes] = []
        lock = locker.try_acquire(upload_id)
        assert lock is not None

        def holder() -> None:
            with ReleaseWatcher(lock, functools.partial(shut_reading, server), interval=0.05):
                got.append(server.recv(10))  # blocks: the client sends nothing
            lock.release()

        thread = threading.Thread(target=holder)
        thread.start()
        try:
            started = time.monotonic()
            contender = locker.acquire(upload_id, timeout=10)
            assert time.monotonic() - started < 5
            contender.release()
            thread.join(timeout=10)
            assert got == [b""] and not (tmp_path / f"{upload_id}.release").exists()
        finally:
            server.close()
            client.close()
            thread.join(timeout=10)

    def test_watcher_without_a_request_changes_nothing(self, tmp_path: Path) -> None:
        """A watcher nobody asks leaves the read alone."""
        import socket

        lock = FileLocker(tmp_path).try_acquire(new_upload_id())
        assert lock is not None
        server, client = socket.socketpair()
        interrupt = functools.partial(shut_reading, server)
        with server, client, lock, ReleaseWatcher(lock, interrupt, interval=0.01) as watcher:
            client.sendall(b"data")
            time.sleep(0.05)  # several polls pass; nothing must happen
            assert server.recv(10) == b"data" and not watcher.preempted


class TestStreamSlots:
    def test_at_most_total_at_once(self, tmp_path: Path) -> None:
        """Two slots: two takers, the third gets None; a release frees one slot for the next taker."""
        slots = StreamSlots(tmp_path, 2)
        first, second = slots.try_take(), slots.try_take()
        assert first is not None and second is not None and slots.try_take() is None
        first()
        third = slots.try_take()
        assert third is not None and slots.try_take() is None
        second()
        third()

    def test_shared_across_processes_and_freed_on_kill(self, tmp_path: Path) -> None:
        """A slot held by another process (a worker) counts here; SIGKILL of that process frees it."""
        code = ("import time; from uploadguard.resumable.locking import StreamSlots;"
                f"held = StreamSlots({str(tmp_path)!r}, 1).try_take();"
                "print('held' if held else 'busy', flush=True); time.sleep(60)")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
            slots = StreamSlots(tmp_path, 1)
            assert slots.try_take() is None
            proc.kill()
            proc.wait(timeout=10)
            release = slots.try_take()
            assert release is not None
            release()
        finally:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()

    def test_per_process_cap(self, tmp_path: Path) -> None:
        """per_process=1 admits one body in this process even when the host has slots to spare."""
        slots = StreamSlots(tmp_path, 5, per_process=1)
        release = slots.try_take()
        assert release is not None and slots.try_take() is None
        release()
        again = slots.try_take()
        assert again is not None
        again()

    def test_a_taken_slot_is_never_old(self, tmp_path: Path) -> None:
        """Taking a slot refreshes its file's mtime, so an age-based clean of the directory leaves it alone."""
        StreamSlots(tmp_path, 1).try_take()()  # type: ignore[misc]
        slot = next(tmp_path.glob("stream-slot-*.lock"))
        os.utime(slot, (time.time() - 3 * 86400,) * 2)
        release = StreamSlots(tmp_path, 1).try_take()
        assert release is not None and time.time() - slot.stat().st_mtime < 3600
        release()

    def test_unusable_directory_does_not_refuse(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """Slots in a directory that is gone are not enforced (logged once): uploads keep working."""
        slots = StreamSlots(tmp_path / "gone", 1)
        first, second = slots.try_take(), slots.try_take()
        assert first is not None and second is not None
        assert sum("stream slots" in record.getMessage() for record in caplog.records) == 1
        first()
        second()


class TestExpiry:
    def make(self, store: LocalStore, *, age: float, expires_after: float | None = 60.0, data: bytes = b"ab",
             length: int = 10) -> UploadInfo:
        info = store.create(new_info(length, expires_after=expires_after, created=time.time() - age))
        store.write(info.id, 0, reader(data), length)
        path = store.local_path(info.id) or ""
        os.utime(path, (time.time() - age, time.time() - age))
        return store.get(info.id)

    def test_removes_expired_incomplete_only(self, tmp_path: Path) -> None:
        """Expired incomplete uploads and their locks go; fresh, never-expiring and completed ones stay."""
        store = LocalStore(tmp_path)
        old = self.make(store, age=3600)
        FileLocker(tmp_path).try_acquire(old.id).release()  # type: ignore[union-attr]  # leaves a .lock file
        fresh = self.make(store, age=0)
        forever = self.make(store, age=3600, expires_after=None)
        done = self.make(store, age=3600, data=b"0123456789")
        store.finish(done.id)
        result = clean_expired(store)
        assert (result.uploads, result.bytes) == (1, 2)
        assert {info.id for info in store.uploads()} == {fresh.id, forever.id, done.id}
        assert not any(name.startswith(old.id) for name in os.listdir(tmp_path))

    def test_never_removes_a_locked_upload(self, tmp_path: Path) -> None:
        """An expired upload whose lock is held (a PATCH in progress) is left alone and counted busy."""
        store = LocalStore(tmp_path)
        old = self.make(store, age=3600)
        with FileLocker(tmp_path).try_acquire(old.id) or pytest.fail("not acquired"):
            result = clean_expired(store)
        assert (result.uploads, result.busy) == (0, 1) and store.get(old.id)

    def test_dry_run(self, tmp_path: Path) -> None:
        """A dry run counts and removes nothing."""
        store = LocalStore(tmp_path)
        old = self.make(store, age=3600)
        assert clean_expired(store, dry_run=True).uploads == 1 and store.get(old.id)

    def test_removes_what_a_crash_left_of_uploads_without_info(self, tmp_path: Path) -> None:
        """Data, checksum spool, half-written info and locks of ids with no info go once an hour old;
        a younger leftover (a create in progress) and every upload with info stay."""
        store = LocalStore(tmp_path)
        live = self.make(store, age=7200, expires_after=None)
        hour_old = time.time() - 3601
        crashed = {new_upload_id(): (".bin",), new_upload_id(): (".lock", ".release"),
                   new_upload_id(): (".bin", ".chk", ".info.tmp")}
        for upload_id, suffixes in crashed.items():
            for suffix in suffixes:
                (tmp_path / (upload_id + suffix)).write_bytes(b"x" * 10)
                os.utime(tmp_path / (upload_id + suffix), (hour_old, hour_old))
        creating = new_upload_id()
        (tmp_path / f"{creating}.bin").write_bytes(b"")
        (tmp_path / "unrelated.txt").write_bytes(b"not ours")

        assert clean_expired(store, dry_run=True).orphans == 3
        result = clean_expired(store)

        assert (result.uploads, result.orphans, result.errors) == (0, 3, [])
        assert sorted(os.listdir(tmp_path)) == sorted([f"{live.id}.bin", f"{live.id}.info", f"{creating}.bin",
                                                       "unrelated.txt"])
        assert store.get(live.id).offset == 2

    def test_an_orphan_being_locked_is_left_alone(self, tmp_path: Path) -> None:
        """A leftover whose lock a request holds is not touched (counted busy)."""
        store = LocalStore(tmp_path)
        upload_id = new_upload_id()
        (tmp_path / f"{upload_id}.bin").write_bytes(b"abc")
        os.utime(tmp_path / f"{upload_id}.bin", (time.time() - 7200,) * 2)
        with FileLocker(tmp_path).try_acquire(upload_id) or pytest.fail("not acquired"):
            os.utime(tmp_path / f"{upload_id}.lock", (time.time() - 7200,) * 2)
            result = clean_expired(store)
        assert (result.orphans, result.busy) == (0, 1) and (tmp_path / f"{upload_id}.bin").exists()

    def test_a_half_written_info_neither_blocks_nor_outlives_its_upload(self, tmp_path: Path) -> None:
        """A crash mid info write leaves <id>.info.tmp: the next write replaces it, termination removes it."""
        store = LocalStore(tmp_path)
        info = store.create(new_info(10))
        (tmp_path / f"{info.id}.info.tmp").write_bytes(b"{half")
        store.update(dataclasses.replace(store.get(info.id), metadata={"name": "a"}))
        assert store.get(info.id).metadata == {"name": "a"}
        (tmp_path / f"{info.id}.info.tmp").write_bytes(b"{half")
        store.terminate(info.id)
        assert not any(name.startswith(info.id) for name in os.listdir(tmp_path))

    def test_cli_clean_by_age_never_touches_an_upload_store(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
        """`uploadguard clean DIR --older-than` on the resumable storage, a parent of it, or any directory holding
        upload info is refused (exit 2): by age it would delete completed uploads -- the users' data."""
        (tmp_path / "data").mkdir()
        store = LocalStore(tmp_path / "data" / "uploads")
        store.health()
        done = self.make(store, age=3 * 86400, data=b"0123456789")
        store.finish(done.id)
        old = time.time() - 3 * 86400
        for name in os.listdir(store.directory):
            os.utime(os.path.join(store.directory, name), (old, old))
        copy = tmp_path / "copy"
        copy.mkdir()
        (copy / f"{done.id}.info").write_bytes((tmp_path / "data" / "uploads" / f"{done.id}.info").read_bytes())
        os.utime(copy / f"{done.id}.info", (old, old))
        monkeypatch.setenv("UPLOADGUARD_RESUMABLE_STORAGE", store.directory)
        monkeypatch.setenv("UPLOADGUARD_TEMP_DIR", str(tmp_path / "tmp"))

        for directory in (store.directory, str(copy)):
            assert main(["clean", directory, "--older-than", "24h"]) == 2
            assert "resumable uploads" in capsys.readouterr().err
        junk = tmp_path / "data" / "old.tmp"
        junk.write_bytes(b"x")
        os.utime(junk, (old, old))
        assert main(["clean", str(tmp_path / "data"), "--older-than", "24h"]) == 0  # a parent: the store is skipped
        assert not junk.exists()
        assert store.get(done.id).completed and data_of(store, done.id) == b"0123456789"
        assert (copy / f"{done.id}.info").exists()

    def test_cli_clean_skips_a_storage_inside_the_temp_dir(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
        """With the resumable storage below the temp dir, `uploadguard clean` (no DIR) cleans the temp dir's old
        files, expires uploads by their own expiry, and never ages out a completed upload."""
        temp = tmp_path / "tmp"
        temp.mkdir()
        store = LocalStore(temp / "resumable")
        store.health()
        done = self.make(store, age=3 * 86400, data=b"0123456789")
        store.finish(done.id)
        expired = self.make(store, age=3 * 86400)
        old = time.time() - 3 * 86400
        for name in os.listdir(store.directory):
            os.utime(os.path.join(store.directory, name), (old, old))
        (temp / "stale.upload").write_bytes(b"x" * 5)
        os.utime(temp / "stale.upload", (old, old))
        monkeypatch.setenv("UPLOADGUARD_TEMP_DIR", str(temp))
        monkeypatch.setenv("UPLOADGUARD_RESUMABLE_STORAGE", str(temp / "resumable"))

        assert main(["clean", "--older-than", "24h"]) == 0

        assert not (temp / "stale.upload").exists()
        assert data_of(store, done.id) == b"0123456789"
        with pytest.raises(UploadNotFound):
            store.get(expired.id)

    def test_cli_clean_json_reports_the_resumable_storage(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
        """Without DIR, --json carries the resumable clean-up too (one object for machines)."""
        store = LocalStore(tmp_path / "uploads")
        store.health()
        self.make(store, age=3600)
        (tmp_path / "tmp").mkdir()
        monkeypatch.setenv("UPLOADGUARD_TEMP_DIR", str(tmp_path / "tmp"))
        monkeypatch.setenv("UPLOADGUARD_RESUMABLE_STORAGE", str(tmp_path / "uploads"))
        assert main(["clean", "--older-than", "24h", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["files"] == 0 and report["resumable"]["uploads"] == 1 and report["resumable"]["bytes"] == 2

    def test_cli_clean_removes_expired_uploads(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
        """`uploadguard clean` without DIR also removes expired resumable uploads from the configured storage."""
        store = LocalStore(tmp_path / "uploads")
        store.health()
        old = self.make(store, age=3600)
        fresh = self.make(store, age=0)
        (tmp_path / "tmp").mkdir()
        monkeypatch.setenv("UPLOADGUARD_TEMP_DIR", str(tmp_path / "tmp"))
        monkeypatch.setenv("UPLOADGUARD_RESUMABLE_STORAGE", str(tmp_path / "uploads"))
        assert main(["clean", "--older-than", "24h"]) == 0
        assert "removed 1 expired resumable upload " in capsys.readouterr().out
        assert {info.id for info in store.uploads()} == {fresh.id}
        with pytest.raises(UploadNotFound):
            store.get(old.id)

    def test_cli_clean_removes_unclaimed_completed_uploads(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
        """`uploadguard clean` removes a completed upload past the keep_completed it recorded, and one that recorded
        none past UPLOADGUARD_RESUMABLE_KEEP_COMPLETED; a fresh completed upload stays."""
        store = LocalStore(tmp_path / "uploads")
        store.health()
        uploads = {}
        for name, keep, age in (("recorded", 3600.0, 7200), ("legacy", None, 7200), ("fresh", 3600.0, 0)):
            info = store.create(new_info(2, keep_completed=keep))
            store.write(info.id, 0, reader(b"ab"), 2)
            done = store.finish(info.id)
            store.update(dataclasses.replace(done, completed_at=done.completed_at - age))
            uploads[name] = info.id
        (tmp_path / "tmp").mkdir()
        monkeypatch.setenv("UPLOADGUARD_TEMP_DIR", str(tmp_path / "tmp"))
        monkeypatch.setenv("UPLOADGUARD_RESUMABLE_STORAGE", str(tmp_path / "uploads"))
        monkeypatch.setenv("UPLOADGUARD_RESUMABLE_KEEP_COMPLETED", "1h")
        assert main(["clean", "--older-than", "24h"]) == 0
        assert "removed 2 expired resumable uploads (4B, 2 of them completed and unclaimed)" in capsys.readouterr().out
        assert [info.id for info in store.uploads()] == [uploads["fresh"]]

    def test_cli_clean_with_dir_leaves_uploads(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """`uploadguard clean DIR` cleans only DIR."""
        store = LocalStore(tmp_path / "uploads")
        store.health()
        old = self.make(store, age=3600)
        (tmp_path / "other").mkdir()
        monkeypatch.setenv("UPLOADGUARD_RESUMABLE_STORAGE", str(tmp_path / "uploads"))
        assert main(["clean", str(tmp_path / "other"), "--older-than", "24h"]) == 0
        assert store.get(old.id)


class TestLocalStoreLeftovers:
    def test_a_creation_that_cannot_record_its_info_leaves_nothing(self, tmp_path: Path) -> None:
        """On a full file system the info write fails: the error is raised and the empty data file goes too."""
        from tests.support import fill, tmpfs

        with tmpfs(tmp_path / "full", size="1m") as directory:
            store = LocalStore(directory)
            fill(directory)
            with pytest.raises(OSError):
                store.create(UploadInfo(id="A" * 24, length=10))
            assert sorted(p.name for p in directory.iterdir()) == ["filler"]
