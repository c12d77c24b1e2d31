"""Several app hosts, one upload: two gunicorn "hosts" behind real nginx (round robin) on SeaweedFS.

Each host is a gunicorn master with ``gunicorn_conf.py`` and its own local
directories (temp dir, no shared disk); they share only the bucket,
``UPLOADGUARD_RESUMABLE_STORAGE=s3://bucket/uploads``.  nginx runs the shipped
site (examples/deploy/myapp.nginx.conf) with both hosts in its upstream.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos_proxy import ChaosProxy
from tests.seaweed import SeaweedFS
from tests.support import GUNICORN_CONF, Gunicorn, free_port
from tests.test_deploy import SITE, NginxConf, running_nginx, tool

pytest.importorskip("boto3")
pytestmark = pytest.mark.slow

MiB = 1024 * 1024
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"


def wait_until(condition: Callable[[], object], *, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout}s")
        time.sleep(0.05)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request(port: int, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None,
            timeout: float = 60) -> tuple[int, dict[str, str]]:
    """One request on a fresh connection; ``(0, {})`` when the server closed it before answering
    (a server may answer a refused PATCH and close without reading the rest of the body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers={**TUS, **(headers or {})})
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
        return 0, {}
    finally:
        conn.close()


class Cluster:
    """SeaweedFS, two gunicorn hosts on one bucket, nginx round-robin in front."""

    def __init__(self, tmp_path: Path, seaweed: SeaweedFS, *, lock_timeout: float = 5.0) -> None:
        self.tmp_path = tmp_path
        self.seaweed = seaweed
        self.bucket = seaweed.new_bucket()
        self.hook_log = tmp_path / "hooks.log"
        self.lock_timeout = lock_timeout
        tool("nginx")
        self.hosts: list[Gunicorn] = []
        try:
            for name in ("host1", "host2"):
                self.hosts.append(self.start_host(name))
            two = render_upstreams(SITE.read_text(), self.hosts[1].port)
            (tmp_path / "lb").mkdir()
            self.nginx = NginxConf(tmp_path / "lb", two, listen=free_port(), upstream=self.hosts[0].port)
        except BaseException:
            self.stop()
            raise
        self.port = self.nginx.port

    def start_host(self, name: str) -> Gunicorn:
        home = self.tmp_path / name
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        env = {**self.seaweed.env(), "UPLOADGUARD_TEMP_DIR": str(home / "tmp"), "XDG_DATA_HOME": str(home / "data"),
               "UPLOADGUARD_RESUMABLE_STORAGE": f"s3://{self.bucket}/uploads", "UPLOADGUARD_MAX_BODY_SIZE": "64M",
               "RESUMABLE_TEST_HOOK_LOG": str(self.hook_log), "RESUMABLE_TEST_HOST": name,
               "RESUMABLE_TEST_LOCK_TIMEOUT": str(self.lock_timeout)}
        return Gunicorn("resumable_apps:application", tmp_path=home, config=GUNICORN_CONF, workers=2, env=env)

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()

    def create(self, length: int, port: int | None = None) -> str:
        status, headers = request(port or self.port, "POST", "/files/", headers={"Upload-Length": str(length)})
        assert status == 201, (status, headers)
        return "/files/" + headers["location"].rsplit("/", 1)[1]

    def head(self, path: str, port: int | None = None) -> tuple[int, dict[str, str]]:
        return request(port or self.port, "HEAD", path)

    def offset(self, path: str, port: int | None = None, *, timeout: float = 60) -> int:
        """HEAD until it answers 200 (423 and 503 carry Retry-After: wait and ask again, as clients do)."""
        deadline = time.monotonic() + timeout
        while True:
            status, headers = self.head(path, port)
            if status == 200:
                return int(headers["upload-offset"])
            assert status in (423, 502, 503), (status, headers)
            if time.monotonic() > deadline:
                raise TimeoutError(f"HEAD {path} still answers {status} after {timeout}s")
            time.sleep(min(float(headers.get("retry-after", 1)), 1.0))

    def patch(self, path: str, offset: int, body: bytes, port: int | None = None) -> tuple[int, dict[str, str]]:
        return request(port or self.port, "PATCH", path, body=body,
                       headers={"Upload-Offset": str(offset), "Content-Type": OCTETS})

    def object_data(self, path: str) -> bytes:
        key = f"uploads/{path.rsplit('/', 1)[1]}"
        return bytes(self.seaweed.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def hooks(self) -> list[list[str]]:
        return [line.split() for line in self.hook_log.read_text().splitlines()] if self.hook_log.exists() else []

    def served(self, host: Gunicorn, method: str) -> int:
        return host.log().count(f'"{method} /files/')

    def stored_offset(self, path: str) -> int:
        from uploadguard.resumable.s3 import S3Store

        store = S3Store(f"s3://{self.bucket}/uploads", client=self.seaweed.client())
        return store.get(path.rsplit("/", 1)[1]).offset


def render_upstreams(site: str, second_port: int) -> str:
    """The shipped site with a second server in each upstream, the site's and /files/' (nginx's default:
    round robin); both hosts serve the whole project, /files/ included."""
    for marker in ("    server 127.0.0.1:8000;\n", "    server 127.0.0.1:8001;\n"):
        assert marker in site, "the site's upstreams changed"
        site = site.replace(marker, marker + f"    server 127.0.0.1:{second_port};\n", 1)
    return site


def open_patch(port: int, path: str, offset: int, length: int, first: bytes) -> socket.socket:
    """A raw PATCH that has sent its headers and ``first`` and then says nothing (a silent client)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
                 f"Content-Type: {OCTETS}\r\nContent-Length: {length}\r\n\r\n".encode() + first)
    return sock


def read_status(sock: socket.socket) -> int:
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


@pytest.fixture
def cluster(tmp_path: Path, seaweed: SeaweedFS) -> Iterator[Cluster]:
    made = Cluster(tmp_path, seaweed)
    try:
        with running_nginx(made.nginx):
            yield made
    finally:
        made.stop()


class TestSeveralHosts:
    def test_patches_alternating_between_hosts_complete_byte_identical(self, cluster: Cluster) -> None:
        """PATCHes through the round-robin balancer land on both hosts; the upload completes byte-identical,
        the hook runs once, and no multipart upload is left behind."""
        data = os.urandom(23 * MiB + 77)
        path = cluster.create(len(data))
        offset = 0
        for size in (3 * MiB, 6 * MiB, 1, 9 * MiB, 2 * MiB, len(data)):
            status, headers = cluster.patch(path, offset, data[offset:offset + size])
            assert status == 204, (status, headers)
            offset = int(headers["upload-offset"])
            if offset == len(data):
                break
        assert offset == len(data)
        assert all(cluster.served(host, "PATCH") >= 2 for host in cluster.hosts)
        assert sha256(cluster.object_data(path)) == sha256(data)
        [[upload_id, digest, _, _]] = cluster.hooks()
        assert (upload_id, digest) == (path.rsplit("/", 1)[1], sha256(data))
        assert cluster.seaweed.client().list_multipart_uploads(Bucket=cluster.bucket).get("Uploads", []) == []

    def test_concurrent_patches_on_both_hosts_never_corrupt(self, cluster: Cluster) -> None:
        """A PATCH on host 2 preempts a stalled PATCH of the same upload on host 1: host 1 keeps what it got,
        host 2's PATCH at the old offset is refused (409), and the upload completes intact."""
        host1, host2 = cluster.hosts
        data = os.urandom(16 * MiB)
        path = cluster.create(len(data), host1.port)
        stalled = open_patch(host1.port, path, 0, len(data), data[:10 * MiB])  # then silence
        try:
            wait_until(lambda: _stored_at_least(cluster, path, 8 * MiB), timeout=60, what="host 1 storing a part")
            status, headers = cluster.patch(path, 0, os.urandom(64 * 1024), host2.port)
            assert status == 409, (status, headers)
            assert read_status(stalled) == 204  # host 1 was preempted and answered what it stored
        finally:
            stalled.close()
        offset = cluster.offset(path, host2.port)
        assert offset == 10 * MiB  # every byte host 1 received, none of host 2's
        status, headers = cluster.patch(path, offset, data[offset:], host2.port)
        assert status == 204, (status, headers)
        assert sha256(cluster.object_data(path)) == sha256(data)

    def test_racing_patches_one_wins(self, cluster: Cluster) -> None:
        """Two full PATCHes for one upload at once, one per host: the stored bytes are a prefix of one of
        them, never a mix; the loser is refused (409/423) or cut."""
        host1, host2 = cluster.hosts
        path = cluster.create(12 * MiB, host1.port)
        bodies = [os.urandom(12 * MiB), os.urandom(12 * MiB)]
        results: list[tuple[int, dict[str, str]]] = [(0, {}), (0, {})]

        def send(index: int, host: Gunicorn) -> None:
            results[index] = cluster.patch(path, 0, bodies[index], host.port)

        threads = [threading.Thread(target=send, args=(i, host)) for i, host in enumerate((host1, host2))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert all(status in (0, 204, 409, 423) for status, _ in results), results
        offset = cluster.offset(path)
        assert offset == cluster.stored_offset(path) > 0
        filler = b"\0" * (12 * MiB - offset)
        if filler:
            status, _ = cluster.patch(path, offset, filler)
            assert status == 204
        stored = cluster.object_data(path)
        assert stored[offset:] == filler
        assert stored[:offset] in (bodies[0][:offset], bodies[1][:offset])

    def test_host_killed_mid_patch_client_resumes_through_the_other(self, cluster: Cluster) -> None:
        """SIGKILL of the host holding a PATCH: its lease lapses, the client resumes through nginx on the other
        host from the committed offset, and the file is byte-identical."""
        host1, _ = cluster.hosts
        data = os.urandom(20 * MiB)
        path = cluster.create(len(data), host1.port)
        stalled = open_patch(host1.port, path, 0, len(data), data[:12 * MiB])
        try:
            wait_until(lambda: _stored_at_least(cluster, path, 8 * MiB), timeout=60, what="host 1 storing a part")
            os.killpg(host1.pid, 9)
            host1.proc.wait(timeout=10)
        finally:
            stalled.close()
        offset = cluster.offset(path, timeout=90)  # 423 + Retry-After until the dead host's lease lapses
        assert 8 * MiB <= offset <= 12 * MiB
        status, headers = cluster.patch(path, offset, data[offset:])
        assert status == 204, (status, headers)
        assert sha256(cluster.object_data(path)) == sha256(data)

    def test_storage_down_is_503_then_the_upload_completes(self, cluster: Cluster) -> None:
        """SeaweedFS stopped mid-upload: HEAD and PATCH get 503 + Retry-After; restarted, the upload resumes
        from the committed offset and completes intact."""
        data = os.urandom(14 * MiB)
        path = cluster.create(len(data))
        status, _ = cluster.patch(path, 0, data[:9 * MiB])
        assert status == 204
        cluster.seaweed.stop(kill=True)
        try:
            for method in ("HEAD", "PATCH"):
                status, headers = (cluster.head(path) if method == "HEAD"
                                   else cluster.patch(path, 9 * MiB, data[9 * MiB:]))
                assert status == 503 and int(headers["retry-after"]) > 0, (method, status, headers)
        finally:
            cluster.seaweed.start()
        offset = cluster.offset(path)
        assert offset == 9 * MiB
        status, headers = cluster.patch(path, offset, data[offset:])
        assert status == 204, (status, headers)
        assert sha256(cluster.object_data(path)) == sha256(data)

    def test_tuspy_through_nginx_with_connections_cut_at_random(self, cluster: Cluster) -> None:
        """tuspy completes an upload through a proxy that resets connections at random, in front of nginx
        and both hosts; the stored object is byte-identical."""
        from tusclient import client as tus_client

        data = os.urandom(24 * MiB)
        with ChaosProxy(cluster.port, cut_probability=0.5, cut_after=(256 * 1024, 6 * MiB), modes=("reset",),
                        max_cuts=6, seed=11) as proxy:
            uploader = tus_client.TusClient(f"{proxy.url}/files/").uploader(
                file_stream=io.BytesIO(data), chunk_size=6 * MiB, retries=60, retry_delay=1)
            uploader.upload()
            cuts = proxy.counts()["reset"]
        path = "/files/" + str(uploader.url).rsplit("/", 1)[1]
        assert sha256(cluster.object_data(path)) == sha256(data)
        assert cuts > 0


def _stored_at_least(cluster: Cluster, path: str, size: int) -> bool:
    try:
        return cluster.stored_offset(path) >= size
    except Exception:  # noqa: BLE001 - not there yet
        return False

