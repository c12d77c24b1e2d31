"""The resumable endpoint under real gunicorn (the project's gunicorn_conf.py, 3 workers) and real clients.

What only a real server shows: several workers sharing uploads, a client that
goes silent mid-PATCH, workers killed, reloaded and recycled mid-upload,
the 413 before the body, and tuspy (a tus client nobody here wrote).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests
from tusclient import client as tus_client
from tusclient.storage.filestorage import FileStorage

from tests.support import GUNICORN_CONF, Gunicorn, needs_root, tmpfs
from uploadguard.resumable.locking import FileLocker

pytestmark = pytest.mark.slow

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
MiB = 1024 * 1024


def wait_until(condition: Callable[[], object], *, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout}s")
        time.sleep(0.02)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """A gunicorn running tests/resumable_apps.py, with its storage and hook log."""

    def __init__(self, tmp_path: Path, *, workers: int = 3, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.storage = tmp_path / "uploads"
        self.hook_log = tmp_path / "hooks.log"
        self.hook_fail = tmp_path / "hook-fail"
        self.hook_die = tmp_path / "hook-die"
        (tmp_path / "tmp").mkdir(exist_ok=True)
        self.gunicorn = Gunicorn(
            "resumable_apps:application", tmp_path=tmp_path, config=GUNICORN_CONF, workers=workers, args=args,
            env={"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"), "RESUMABLE_TEST_STORAGE": str(self.storage),
                 "RESUMABLE_TEST_HOOK_LOG": str(self.hook_log), "RESUMABLE_TEST_HOOK_FAIL": str(self.hook_fail),
                 "RESUMABLE_TEST_HOOK_DIE": str(self.hook_die),
                 "UPLOADGUARD_MAX_BODY_SIZE": "64M", **(env or {})},
        )
        self.port = self.gunicorn.port
        self.endpoint = f"{self.gunicorn.url}/files/"

    def create(self, length: int) -> str:
        response = requests.post(self.endpoint, headers={**TUS, "Upload-Length": str(length)}, timeout=30)
        assert response.status_code == 201, response.text
        return urljoin(self.endpoint, response.headers["Location"])

    def head(self, url: str, *, timeout: float = 30) -> requests.Response:
        return requests.head(url, headers=TUS, timeout=timeout)

    def offset(self, url: str) -> int:
        response = self.head(url)
        assert response.status_code == 200, (response.status_code, self.gunicorn.log()[-2000:])
        return int(response.headers["Upload-Offset"])

    def patch(self, url: str, offset: int, body: bytes) -> requests.Response:
        return requests.patch(url, data=body, headers={**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS},
                              timeout=60)

    def data_path(self, url: str) -> Path:
        return self.storage / (url.rsplit("/", 1)[1] + ".bin")

    def size(self, url: str) -> int:
        try:
            return self.data_path(url).stat().st_size
        except FileNotFoundError:
            return -1

    def hooks(self) -> list[list[str]]:
        return [line.split() for line in self.hook_log.read_text().splitlines()] if self.hook_log.exists() else []

    def open_patch(self, url: str, offset: int, length: int, first: bytes) -> socket.socket:
        """A raw PATCH that has sent its headers and ``first`` and then says nothing (a silent client)."""
        path = url.split(str(self.port), 1)[1]
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        sock.sendall(
            f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
            f"Content-Type: {OCTETS}\r\nContent-Length: {length}\r\n\r\n".encode() + first
        )
        return sock

    def resume_and_finish(self, url: str, data: bytes) -> None:
        """What a tus client does after a failure: HEAD, then PATCH the rest."""
        offset = self.offset(url)
        assert 0 <= offset <= len(data)
        response = self.patch(url, offset, data[offset:])
        assert response.status_code == 204, response.text
        assert response.headers["Upload-Offset"] == str(len(data))
        assert sha256(self.data_path(url).read_bytes()) == sha256(data)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    made = Server(tmp_path)
    yield made
    made.gunicorn.stop()


@pytest.fixture
def data() -> bytes:
    return os.urandom(8 * MiB)


class TestTuspy:
    def test_plain(self, server: Server, tmp_path: Path, data: bytes) -> None:
        """tuspy uploads a file in 1 MiB chunks; the stored file and the hook's view are byte-identical."""
        fh = io.BytesIO(data)
        uploader = tus_client.TusClient(server.endpoint).uploader(file_stream=fh, chunk_size=MiB,
                                                                  metadata={"filename": "f.bin"})
        uploader.upload()
        assert sha256(server.data_path(uploader.url).read_bytes()) == sha256(data)
        assert [line[:2] for line in server.hooks()] == [[uploader.url.rsplit("/", 1)[1], sha256(data)]]

    def test_checksum(self, server: Server, tmp_path: Path, data: bytes) -> None:
        """tuspy with Upload-Checksum (sha1) on every chunk."""
        fh = io.BytesIO(data)
        uploader = tus_client.TusClient(server.endpoint).uploader(file_stream=fh, chunk_size=MiB,
                                                                  upload_checksum=True)
        uploader.upload()
        assert sha256(server.data_path(uploader.url).read_bytes()) == sha256(data)

    # tuspy's URL storage needs a file path (its fingerprint closes a stream it is given), and with a
    # path tuspy leaves its own file handles to the garbage collector: not ours to fix.
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    @pytest.mark.filterwarnings("ignore::ResourceWarning")
    def test_resumed_after_an_interruption(self, server: Server, tmp_path: Path, data: bytes) -> None:
        """A tuspy uploader that stopped part-way is resumed by a new one through its URL storage."""
        (tmp_path / "f.bin").write_bytes(data)
        storage = FileStorage(str(tmp_path / "urls.json"))
        try:
            first = tus_client.TusClient(server.endpoint).uploader(
                str(tmp_path / "f.bin"), chunk_size=MiB, store_url=True, url_storage=storage)
            first.upload(stop_at=3 * MiB)
            assert server.offset(first.url) == 3 * MiB
            second = tus_client.TusClient(server.endpoint).uploader(
                str(tmp_path / "f.bin"), chunk_size=MiB, store_url=True, url_storage=storage)
            assert second.url == first.url and second.offset == 3 * MiB
            second.upload()
        finally:
            storage.close()
        assert sha256(server.data_path(first.url).read_bytes()) == sha256(data)
        assert len(server.hooks()) == 1

    def test_resumed_after_worker_kills(self, server: Server, tmp_path: Path, data: bytes) -> None:
        """tuspy's own retries carry an upload through workers SIGKILLed while it runs."""
        fh = io.BytesIO(data)
        uploader = tus_client.TusClient(server.endpoint).uploader(
            file_stream=fh, chunk_size=256 * 1024, retries=20, retry_delay=0.2)
        uploader.set_url(uploader.create_url())
        kills = 0

        def killer() -> None:
            nonlocal kills
            for threshold in (2 * MiB, 5 * MiB):
                wait_until(lambda: server.size(uploader.url) >= threshold, timeout=60, what="progress")
                for pid in server.gunicorn.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                kills += 1

        thread = threading.Thread(target=killer)
        thread.start()
        uploader.upload()
        thread.join(timeout=60)
        assert kills == 2
        assert sha256(server.data_path(uploader.url).read_bytes()) == sha256(data)


class TestConcurrency:
    def test_any_worker_serves_any_request(self, server: Server, data: bytes) -> None:
        """Chunks over fresh connections land on different workers and still make one whole file."""
        url = server.create(len(data))
        offset = 0
        for start in range(0, len(data), 512 * 1024):
            assert server.offset(url) == offset
            response = server.patch(url, offset, data[start:start + 512 * 1024])
            assert response.status_code == 204
            offset = int(response.headers["Upload-Offset"])
        assert sha256(server.data_path(url).read_bytes()) == sha256(data)
        assert len(server.hooks()) == 1

    def test_racing_patches_never_interleave(self, server: Server) -> None:
        """Two PATCHes at offset 0 with different bodies: exactly one appends; the other is refused (409/423)
        or, preempted before its first byte, appended nothing; the file is a prefix of one body."""
        size = 4 * MiB
        url = server.create(size)
        bodies = {"a": b"a" * size, "b": b"b" * size}
        results: dict[str, tuple[int, int]] = {}

        def send(name: str) -> None:
            response = server.patch(url, 0, bodies[name])
            results[name] = (response.status_code, int(response.headers.get("Upload-Offset", "-1")))

        threads = [threading.Thread(target=send, args=(name,)) for name in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        stored = server.data_path(url).read_bytes()
        winner = b"a" if stored[:1] == b"a" else b"b"
        assert stored == bodies[winner.decode()][:len(stored)]
        appended = [name for name, (status, offset) in results.items() if status == 204 and offset > 0]
        assert appended == [winner.decode()], results
        loser = results["b" if winner == b"a" else "a"]
        assert loser[0] in (409, 423) or loser == (204, 0), results
        server.resume_and_finish(url, bodies[winner.decode()])


class TestSilentDrop:
    def test_head_preempts_a_silent_patch(self, server: Server, data: bytes) -> None:
        """A client that sent half a PATCH and went silent (no FIN) does not hold the upload:
        a new HEAD answers within 10 s with the durable offset, and a PATCH from there completes."""
        url = server.create(len(data))
        half = len(data) // 2
        silent = server.open_patch(url, 0, len(data), data[:half])
        try:
            wait_until(lambda: server.size(url) == half, what="half the body on disk")
            started = time.monotonic()
            response = server.head(url, timeout=15)
            assert response.status_code == 200 and time.monotonic() - started < 10
            assert int(response.headers["Upload-Offset"]) == half
            server.resume_and_finish(url, data)
        finally:
            silent.close()
        assert len(server.hooks()) == 1

    def test_preemption_under_threaded_workers(self, tmp_path: Path, data: bytes) -> None:
        """With gthread workers (--threads 4) a HEAD preempts a silent PATCH just the same."""
        server = Server(tmp_path, args=("--threads", "4"))
        try:
            url = server.create(len(data))
            with server.open_patch(url, 0, len(data), data[:MiB]):
                wait_until(lambda: server.size(url) == MiB, what="1 MiB on disk")
                started = time.monotonic()
                response = server.head(url, timeout=15)
                assert response.status_code == 200 and time.monotonic() - started < 10
                assert int(response.headers["Upload-Offset"]) == MiB
                server.resume_and_finish(url, data)
        finally:
            server.gunicorn.stop()

    def test_patch_preempts_a_silent_patch(self, server: Server, data: bytes) -> None:
        """A new PATCH (the client resuming without a HEAD) also takes the upload from the silent one."""
        url = server.create(len(data))
        silent = server.open_patch(url, 0, len(data), data[:MiB])
        try:
            wait_until(lambda: server.size(url) == MiB, what="1 MiB on disk")
            started = time.monotonic()
            response = server.patch(url, MiB, data[MiB:])
            assert response.status_code == 204 and time.monotonic() - started < 10
        finally:
            silent.close()
        assert sha256(server.data_path(url).read_bytes()) == sha256(data)

    def test_idle_timeout_releases_the_upload(self, tmp_path: Path, data: bytes) -> None:
        """With nobody asking, a PATCH that receives nothing for the idle timeout ends and lets go."""
        server = Server(tmp_path, env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "1"})
        try:
            url = server.create(len(data))
            silent = server.open_patch(url, 0, len(data), data[:MiB])
            with silent:
                wait_until(lambda: server.size(url) == MiB, what="1 MiB on disk")
                locker = FileLocker(server.storage)
                upload_id = url.rsplit("/", 1)[1]

                def free() -> bool:
                    lock = locker.try_acquire(upload_id)
                    if lock is not None:
                        lock.release()
                    return lock is not None

                wait_until(free, timeout=15, what="the lock released")
                assert b"HTTP/1.1 204" in silent.recv(4096)  # the server answered and stopped reading
            server.resume_and_finish(url, data)
        finally:
            server.gunicorn.stop()


class TestWorkerLifecycle:
    def test_sigkill_mid_patch(self, server: Server, data: bytes) -> None:
        """Workers SIGKILLed mid-PATCH: the bytes on disk count, the client resumes, the file is identical."""
        url = server.create(len(data))
        sock = server.open_patch(url, 0, len(data), data[: 3 * MiB])
        try:
            wait_until(lambda: server.size(url) == 3 * MiB, what="3 MiB on disk")
            for pid in server.gunicorn.worker_pids():
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: server.head(url, timeout=10).status_code == 200, what="a new worker")
            assert server.offset(url) == 3 * MiB
            server.resume_and_finish(url, data)
        finally:
            sock.close()

    def test_sigkill_inside_on_complete_of_a_final_upload(self, server: Server) -> None:
        """A worker SIGKILLed inside on_complete of a final upload (its data already fsynced): the client's
        retry of the join runs on_complete for that final upload and consumes the parts -- one final
        upload, never a second copy left beside the first."""
        parts, data = [], [os.urandom(300_000), os.urandom(200_000)]
        for chunk in data:
            response = requests.post(server.endpoint, headers={**TUS, "Upload-Length": str(len(chunk)),
                                                               "Upload-Concat": "partial"}, timeout=30)
            assert response.status_code == 201, response.text
            url = urljoin(server.endpoint, response.headers["Location"])
            assert server.patch(url, 0, chunk).status_code == 204
            parts.append(response.headers["Location"])
        join = {**TUS, "Upload-Concat": "final;" + " ".join(parts)}
        server.hook_die.touch()
        with pytest.raises(requests.ConnectionError):
            requests.post(server.endpoint, headers=join, timeout=30)
        assert not server.hook_die.exists()  # on_complete ran, and its worker died in it

        retry = requests.post(server.endpoint, headers=join, timeout=30)

        assert retry.status_code == 201, retry.text
        final_id = retry.headers["Location"].rsplit("/", 1)[1]
        assert sorted(path.name for path in server.storage.glob("*.info")) == [f"{final_id}.info"]
        assert [hook[:2] for hook in server.hooks()] == [[final_id, sha256(b"".join(data))]]
        assert (server.storage / f"{final_id}.bin").read_bytes() == b"".join(data)

    def test_hup_mid_patch(self, server: Server, data: bytes) -> None:
        """A HUP (reload) while a PATCH hangs: the client resumes from the durable offset on the new workers."""
        url = server.create(len(data))
        sock = server.open_patch(url, 0, len(data), data[:2 * MiB])
        try:
            wait_until(lambda: server.size(url) == 2 * MiB, what="2 MiB on disk")
            old = set(server.gunicorn.worker_pids())
            server.gunicorn.signal(signal.SIGHUP)
            wait_until(lambda: len(set(server.gunicorn.worker_pids()) - old) >= 3, what="new workers")
            started = time.monotonic()
            assert server.offset(url) == 2 * MiB and time.monotonic() - started < 10
            server.resume_and_finish(url, data)
        finally:
            sock.close()

    def test_max_requests_recycling(self, tmp_path: Path, data: bytes) -> None:
        """Workers recycled every few requests (max_requests) mid-upload: the upload completes intact."""
        server = Server(tmp_path, args=("--max-requests", "3", "--max-requests-jitter", "0"))
        try:
            fh = io.BytesIO(data)
            uploader = tus_client.TusClient(server.endpoint).uploader(file_stream=fh, chunk_size=256 * 1024,
                                                                      retries=10, retry_delay=0.2)
            uploader.upload()
            assert sha256(server.data_path(uploader.url).read_bytes()) == sha256(data)
            assert server.gunicorn.log().count("Autorestarting worker") >= 3
        finally:
            server.gunicorn.stop()


class TestStorageFailures:
    def test_deleted_storage(self, server: Server, data: bytes) -> None:
        """The storage dir deleted with uploads in it: those are 404, new uploads work in a recreated dir."""
        url = server.create(len(data))
        assert server.patch(url, 0, data[:MiB]).status_code == 204
        import shutil

        shutil.rmtree(server.storage)
        assert server.head(url).status_code == 404
        assert server.patch(url, MiB, data[MiB:2 * MiB]).status_code == 404
        fresh = server.create(MiB)
        assert server.patch(fresh, 0, data[:MiB]).status_code == 204
        assert server.storage.is_dir()

    def test_file_in_place_is_503(self, server: Server) -> None:
        """A file where the storage dir should be: 503 + Retry-After, never a 500 or a dropped connection."""
        import shutil

        server.create(10)
        shutil.rmtree(server.storage)
        server.storage.write_text("x")
        response = requests.post(server.endpoint, headers={**TUS, "Upload-Length": "10"}, timeout=30)
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"

    def test_storage_replaced_by_a_file_mid_patch_is_503(self, server: Server) -> None:
        """The storage dir swapped for a file while a PATCH streams: the answer is 503 + Retry-After, and once the
        dir is back the upload has every byte that was sent."""
        half = 64 * 1024
        body = os.urandom(2 * half)
        url = server.create(len(body))
        data_path = server.data_path(url)
        away = server.storage.with_name("uploads.away")
        sock = server.open_patch(url, 0, len(body), body[:half])
        try:
            wait_until(lambda: data_path.exists() and data_path.stat().st_size >= half, what="first half stored")
            server.storage.rename(away)
            server.storage.write_text("not a directory")
            sock.sendall(body[half:])
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        finally:
            sock.close()
        head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        assert head.startswith("HTTP/1.1 503 "), head
        assert "\r\nRetry-After: 5" in head
        server.storage.unlink()
        away.rename(server.storage)
        assert server.offset(url) == len(body) and data_path.read_bytes() == body

    @needs_root
    def test_read_only_tmpfs_is_503(self, server: Server) -> None:
        """Storage on a read-only tmpfs: 503 + Retry-After."""
        with tmpfs(server.storage, options="ro"):
            response = requests.post(server.endpoint, headers={**TUS, "Upload-Length": "10"}, timeout=30)
            assert response.status_code == 503 and response.headers["Retry-After"] == "5"


class TestBadInputOverASocket:
    def test_over_the_limit_is_413_before_the_body(self, server: Server) -> None:
        """A creation-with-upload whose Upload-Length is over the limit gets its 413 before sending a byte."""
        length = 65 * MiB
        request = (f"POST /files/ HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\nUpload-Length: {length}\r\n"
                   f"Content-Type: {OCTETS}\r\nContent-Length: {MiB}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(request)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert not server.storage.exists() or os.listdir(server.storage) == []

    def test_no_100_continue_for_an_upload_over_the_limit(self, server: Server) -> None:
        """With Expect: 100-continue, an Upload-Length over the limit is a 413 and never a 100 Continue."""
        request = (f"POST /files/ HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
                   f"Upload-Length: {65 * MiB}\r\nContent-Type: {OCTETS}\r\nContent-Length: {MiB}\r\n"
                   "Expect: 100-continue\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(request)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]

    def test_100_continue_for_an_upload_within_the_limit(self, server: Server) -> None:
        """With Expect: 100-continue, a creation-with-upload within the limit gets 100 Continue, then 201."""
        body = os.urandom(1000)
        request = (f"POST /files/ HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
                   f"Upload-Length: {len(body)}\r\nContent-Type: {OCTETS}\r\nContent-Length: {len(body)}\r\n"
                   "Expect: 100-continue\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(body)
            assert sock.recv(65536).startswith(b"HTTP/1.1 201 ")
        assert [line[1] for line in server.hooks()] == [sha256(body)]


class TestRefusalsReachTheClient:
    @pytest.mark.parametrize("headers", [
        pytest.param({"Tus-Resumable": "1.0.0"}, id="unknown-upload-404"),
        pytest.param({}, id="no-tus-resumable-412"),
    ])
    def test_a_refused_patch_body_is_drained(self, server: Server, headers: dict[str, str]) -> None:
        """A client streaming 20 MiB to a PATCH the endpoint refuses reads the refusal, not a broken pipe."""
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            conn.request("PATCH", "/files/" + "A" * 24, body=b"x" * (20 * MiB), headers={
                **headers, "Upload-Offset": "0", "Content-Type": OCTETS})
            status = conn.getresponse().status
        finally:
            conn.close()
        assert status in (404, 412)


def raw_patch(server: Server, url: str, framing: str) -> bytes:
    """The head of a PATCH from offset 0 written by hand (``framing``: its Content-Length or chunked line),
    for clients no library would be: dripping, stalling, crawling."""
    path = url.split(str(server.port), 1)[1]
    return (f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
            f"Content-Type: {OCTETS}\r\n{framing}\r\n\r\n").encode()


class TestRateFloor:
    @pytest.mark.parametrize("args", [(), ("--worker-class", "gthread", "--threads", "2")], ids=["sync", "gthread"])
    def test_a_dripping_patch_is_ended_and_keeps_its_bytes(self, tmp_path: Path, args: tuple[str, ...]) -> None:
        """A PATCH dripping a byte every 0.3 s is answered once an idle_timeout window (2 s) brought too
        little -- gunicorn's reader would otherwise wait for all 100,000 bytes -- and the bytes count."""
        server = Server(tmp_path, workers=1, args=args, env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "2"})
        try:
            url = server.create(100_000)
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(raw_patch(server, url, "Content-Length: 100000"))
                answer = b""
                while not answer and time.monotonic() - started < 25:
                    readable, _, _ = select.select([sock], [], [], 0.3)
                    if readable:
                        answer = sock.recv(65536)
                    else:
                        with contextlib.suppress(OSError):
                            sock.sendall(b"x")
            took = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 204"), answer[:200]
            assert took < 2 + 1 + 4, took  # one window, the watcher's poll, a busy machine
            assert 0 < server.offset(url) < 100_000
        finally:
            server.gunicorn.stop()


    @pytest.mark.parametrize("rate", [3, 8], ids=["3x-the-floor", "8x-the-floor"])
    def test_a_slow_client_above_the_floor_is_not_cut(self, tmp_path: Path, rate: int) -> None:
        """A client sending 3 or 8 times the floor (16 KiB per 4 s window), far below what one 1 MiB read
        would need to return within a window, sends its whole body in one PATCH."""
        server = Server(tmp_path, workers=1, env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "4"})
        per_tick = rate * 512  # bytes every 0.125 s: rate x 4 KiB/s
        size = per_tick * 8 * 8  # eight seconds, two windows
        try:
            url = server.create(size)
            with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
                sock.sendall(raw_patch(server, url, f"Content-Length: {size}"))
                for _ in range(size // per_tick):
                    sock.sendall(bytes(per_tick))
                    time.sleep(0.125)
                answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 204"), answer[:200]
            assert f"Upload-Offset: {size}".encode() in answer, answer[:300]
        finally:
            server.gunicorn.stop()

    def test_a_client_slowing_down_after_a_fast_start_is_not_cut(self, tmp_path: Path) -> None:
        """3 MiB at full speed (reads grow to 1 MiB), then 100 KB/s -- 12 times the floor of 16 KiB per 2 s
        window, but a 1 MiB read now takes 10 s: bytes are counted as they reach the socket, not as
        reads return, so the PATCH runs to its end instead of being cut as too slow."""
        server = Server(tmp_path, workers=1, env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "2"})
        fast, tick, ticks = 3 * MiB, 10_000, 60  # then 10 KB every 0.1 s for 6 s (three windows)
        size = fast + tick * ticks
        try:
            url = server.create(size)
            with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
                sock.sendall(raw_patch(server, url, f"Content-Length: {size}") + bytes(fast))
                for _ in range(ticks):
                    sock.sendall(bytes(tick))
                    time.sleep(0.1)
                answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 204"), answer[:200]
            assert f"Upload-Offset: {size}".encode() in answer, answer[:300]
        finally:
            server.gunicorn.stop()

    @pytest.mark.parametrize("sent", [1000, 65_000, 99_000])
    def test_a_stalled_patch_keeps_every_byte_that_arrived(self, tmp_path: Path, sent: int) -> None:
        """A client that sends part of its PATCH body and goes silent: when the idle window ends the PATCH,
        every byte that reached the server counts -- gunicorn's reader drops a partial read on a socket
        timeout, so the watcher's shutdown, not the timeout, must end it."""
        server = Server(tmp_path, workers=1, env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "2"})
        try:
            url = server.create(100_000)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(raw_patch(server, url, "Content-Length: 100000") + bytes(sent))
                answer = sock.recv(65536)  # blocks until the server gives up on the rest (30 s at most)
            assert answer.startswith(b"HTTP/1.1 204"), answer[:200]
            assert server.offset(url) == sent
        finally:
            server.gunicorn.stop()

    def test_a_stalled_chunked_patch_keeps_all_but_the_read_in_progress(self, tmp_path: Path) -> None:
        """A chunked PATCH going silent: gunicorn's chunk parser drops the read the cut interrupts, so chunked
        reads stay at the floor (16 KiB) -- at most that much is lost, the rest counts, and the PATCH ends."""
        server = Server(tmp_path, workers=1, env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "2"})
        sent = 200_000
        try:
            url = server.create(300_000)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(raw_patch(server, url, "Transfer-Encoding: chunked"))
                for _ in range(sent // 10_000):
                    sock.sendall(b"%x\r\n" % 10_000 + bytes(10_000) + b"\r\n")
                answer = sock.recv(65536)  # blocks until the server gives up on the rest (30 s at most)
            assert answer.startswith(b"HTTP/1.1 204"), answer[:200]
            assert sent - 16 * 1024 <= server.offset(url) <= sent
        finally:
            server.gunicorn.stop()


class TestAdmission:
    """Slow phones cannot take a sync worker pool: bodies read at once stay below the worker count."""

    @staticmethod
    def hold(server: Server, url: str, length: int) -> socket.socket:
        """A PATCH that is admitted and being read (its first 64 KiB on disk), then goes quiet."""
        sock = server.open_patch(url, 0, length, bytes(64 * 1024))
        wait_until(lambda: server.size(url) == 64 * 1024, what="the held PATCH's first bytes on disk")
        return sock

    def test_the_site_answers_while_slow_patches_fill_every_slot(self, tmp_path: Path) -> None:
        """3 sync workers read at most 2 bodies at once: a third PATCH is answered 503 + Retry-After at once,
        reading nothing, and GET / is served -- without the cap the held PATCHes (idle timeout 120 s) would
        keep all 3 workers and the GET would wait minutes."""
        server = Server(tmp_path, workers=3, env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "120"})
        try:
            urls = [server.create(MiB) for _ in range(3)]
            held = [self.hold(server, url, MiB) for url in urls[:2]]
            try:
                refused = server.patch(urls[2], 0, bytes(MiB))
                assert refused.status_code == 503, refused.text
                assert refused.headers["Retry-After"] == "5"
                assert server.size(urls[2]) == 0  # nothing was read into the upload
                for _ in range(5):  # any worker that answers: the free one
                    assert requests.get(server.gunicorn.url + "/", timeout=20).text == "app"
            finally:
                for sock in held:
                    sock.close()
            # The slots come back as the held PATCHes end: the refused client's retry goes through.
            wait_until(lambda: server.patch(urls[2], 0, bytes(MiB)).status_code == 204, timeout=30,
                       what="the refused upload accepted on retry")
        finally:
            server.gunicorn.stop()

    def test_a_client_resuming_its_own_held_upload_is_admitted(self, tmp_path: Path, data: bytes) -> None:
        """Every slot held, one by a silent PATCH of this very upload: its client's resume takes the upload
        (and the slot it frees) instead of a 503 until the idle timeout."""
        server = Server(tmp_path, workers=3, env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "120"})
        try:
            mine, other = server.create(len(data)), server.create(MiB)
            with self.hold(server, mine, len(data)), self.hold(server, other, MiB):
                response = server.patch(mine, 64 * 1024, data[64 * 1024:])
                assert response.status_code == 204, response.text
            assert server.offset(mine) == len(data)
        finally:
            server.gunicorn.stop()

    def test_threaded_workers_keep_a_thread_each(self, tmp_path: Path) -> None:
        """gthread, 1 worker x 3 threads: 2 bodies at once, the third is refused and GET / still answers."""
        server = Server(tmp_path, workers=1, args=("--threads", "3"),
                        env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "120"})
        try:
            urls = [server.create(MiB) for _ in range(3)]
            held = [self.hold(server, url, MiB) for url in urls[:2]]
            try:
                assert server.patch(urls[2], 0, bytes(MiB)).status_code == 503
                assert requests.get(server.gunicorn.url + "/", timeout=20).text == "app"
            finally:
                for sock in held:
                    sock.close()
        finally:
            server.gunicorn.stop()

    def test_an_explicit_cap_and_no_cap(self, tmp_path: Path) -> None:
        """UPLOADGUARD_RESUMABLE_MAX_STREAMS=1 admits one body on 3 workers; 0 turns the cap off."""
        server = Server(tmp_path, workers=3, env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "120",
                                                  "UPLOADGUARD_RESUMABLE_MAX_STREAMS": "1"})
        try:
            first, second = server.create(MiB), server.create(MiB)
            with self.hold(server, first, MiB):
                assert server.patch(second, 0, bytes(MiB)).status_code == 503
        finally:
            server.gunicorn.stop()
        (tmp_path / "off").mkdir()
        server = Server(tmp_path / "off", workers=2, env={"UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "120",
                                                          "UPLOADGUARD_RESUMABLE_MAX_STREAMS": "0"})
        try:
            first, second = server.create(MiB), server.create(MiB)
            with self.hold(server, first, MiB):
                assert server.patch(second, 0, bytes(MiB)).status_code == 204
        finally:
            server.gunicorn.stop()


class TestOnComplete:
    def test_once_and_500_then_retrievable(self, server: Server) -> None:
        """A raising hook: the final PATCH is a 500 (a response, not a dropped connection), the data stays,
        the next HEAD runs it again, and once it returned it never runs again."""
        data = os.urandom(MiB)
        url = server.create(len(data))
        server.hook_fail.write_text("fail")
        response = server.patch(url, 0, data)
        assert response.status_code == 500
        assert server.head(url).status_code == 500
        assert sha256(server.data_path(url).read_bytes()) == sha256(data)
        server.hook_fail.unlink()
        assert server.offset(url) == len(data)
        assert server.patch(url, len(data), b"").status_code == 204  # a retried final PATCH
        assert server.offset(url) == len(data)
        assert [line[:2] for line in server.hooks()] == [[url.rsplit("/", 1)[1], sha256(data)]]


class TestMetadataCapOverASocket:
    def test_repeated_metadata_lines_are_refused(self, server: Server) -> None:
        """Upload-Metadata on 90 header lines (gunicorn joins them) is a 400 naming the cap, and nothing is stored."""
        lines = "".join(f"Upload-Metadata: n{i} {'dmFsdWVz' * 10}\r\n" for i in range(90))  # 60 bytes each
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(f"POST /files/ HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
                         f"Upload-Length: 10\r\n{lines}Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
        assert b"4096" in answer
        assert not server.storage.exists() or not list(server.storage.glob("*.info"))


def read_head(reader: io.BufferedReader) -> tuple[int, dict[str, str]]:
    """The status and (lower-cased) headers of one HTTP/1.1 response read from ``reader``."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


class TestMethodOverrideOverASocket:
    @pytest.mark.parametrize("args", [pytest.param((), id="sync"), pytest.param(("--threads", "2"), id="gthread")])
    def test_a_post_overridden_to_head_keeps_the_connection_usable(self, tmp_path: Path,
                                                                   args: tuple[str, ...]) -> None:
        """POST + X-HTTP-Method-Override: HEAD for an unknown upload: the 404's body matches its Content-Length, and
        the connection is then either kept alive and answers the next request (gthread) or closed cleanly (sync)."""
        from uploadguard.resumable.store import new_upload_id

        server = Server(tmp_path, args=args)
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock, \
                    sock.makefile("rb") as reader:
                sock.sendall(f"POST /files/{new_upload_id()} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
                             "X-HTTP-Method-Override: HEAD\r\nContent-Length: 0\r\n\r\n".encode())
                status, headers = read_head(reader)
                body = reader.read(int(headers["content-length"]))  # short (a timeout) if the body were missing
                assert status == 404 and len(body) == int(headers["content-length"]) > 0
                if headers.get("connection", "").lower() == "close":
                    assert reader.read() == b""  # closed cleanly: nothing after the answer
                    assert args == ()
                    return
                sock.sendall(b"OPTIONS /files/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
                status, headers = read_head(reader)
                assert status == 204 and headers["tus-version"] == "1.0.0"
        finally:
            server.gunicorn.stop()
