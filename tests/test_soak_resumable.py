"""Chaos soak, resumable: every upload ends intact through a network that keeps breaking.

Four clients send 60 uploads of 5-50 MiB of random bytes to
``UploadGuard(ResumableUploads(...))`` under real gunicorn with the project's
``gunicorn_conf.py`` (6 sync workers), each through ``ChaosProxy``
(``tests/chaos_proxy.py``) on 127.0.0.1, which cuts every connection after a
random number of bytes (0.5-48 MiB), half of them by RST and half by silently
black-holing them.  Meanwhile a vandal thread SIGKILLs a random worker each
time the clients have sent another 96 MiB (every 3 s or so) and every worker
is up (so one always serves: a stall is the chaos's, not a boot's), sends the
master a HUP every 400 MiB, and deletes the guard's upload temp dir every
0.25 s.  The chaos follows the bytes, not the clock: a slow machine gets as
much of it.

The clients are a small tus 1.0 client written here on ``http.client``:
chunked PATCHes of 4 MiB, a 5 s socket timeout that is the only way to see a
black hole, a HEAD after every failure to learn the offset the server kept,
``Retry-After`` honoured on 503/423/429.

The same soak, smaller (16 uploads of 1-10 MiB, 1 MiB PATCHes, cuts after
2-12 MiB, a SIGKILL every 18 MiB, so CI stays fast), runs against the ASGI
endpoint (``tests/resumable_asgi_apps.py``) under ``gunicorn -c
gunicorn_conf.py -k asgi`` (2 workers, SIGKILLed, HUPed every 40 MiB and
recycled every 20-30 requests) and under ``uvicorn --workers 2`` (SIGKILLed;
no HUPs, see ``SHAPES``).  Its connections are kept alive: a cut may fall on
any of the requests one carries -- and a connection may end (a recycle, a
kill) before the bytes of its random cut, so every 12 MiB the vandal also
has an open connection past its first 2 MiB cut within its next 64 KiB, by
RST and by black hole in turn.

Required (issue #10): 100 % stored intact (the sha256 of what ``on_complete``
read equals what was sent), ``on_complete`` run once per upload (a second
time only after a SIGKILL of the worker that ran it first, which could not
note that it had), total body bytes sent <= 1.2 x the total size,
and no upload stalled more than 15 s after a cut: from the start of the
request that was cut to the first answer showing that the server holds more
bytes than it had kept at the cut (the first HEAD after the cut says how many
it kept).  A worker killed or a server that never answers before then
extends the same stall; the proxy cutting the request that was recovering is
a new cut, with a stall of its own (the one before it counted up to that
request): else the stall bound would hang on how often the random cuts fall
on one upload twice running, not on the server.  Run alone with
``pytest -m soak -s tests/test_soak_resumable.py`` to see the figures.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.chaos_proxy import BLACKHOLE, RESET, ChaosProxy
from tests.support import GUNICORN_CONF, TESTS, Gunicorn

pytest.importorskip("uploadguard.resumable")
pytestmark = [pytest.mark.slow, pytest.mark.soak]

MiB = 1024 * 1024
UPLOADS = 60
CLIENTS = 4
SIZES = (5 * MiB, 50 * MiB)
CHUNK = 4 * MiB  # bytes per PATCH: what one cut can cost at most
PIECE = 64 * 1024  # bytes per send()
READ_TIMEOUT = 5.0  # seconds of silence before a client counts its connection as cut
CUT_AFTER = (MiB // 2, 48 * MiB)  # client-to-server bytes a connection carries before it is cut
KILL_EVERY = 96 * MiB  # body bytes sent between SIGKILLs of a random worker
HUP_EVERY = 400 * MiB  # body bytes sent between HUPs of the master
TEMP_DIR_EVERY = 0.25  # seconds between deletions of the upload temp dir
DEADLINE = 300.0  # seconds for all uploads
MAX_STALL = 15.0  # seconds, from the issue
MAX_RATIO = 1.2  # bytes sent / total size, from the issue


class Cut(Exception):
    """The connection broke (reset, timeout, EOF) before a whole response came back."""

    def __init__(self, message: str, *, by_proxy: bool) -> None:
        super().__init__(message)
        self.by_proxy = by_proxy  # the chaos proxy cut it (a new cut), not the server (a kill, a hang)


@dataclasses.dataclass
class Tally:
    """What the clients saw, shared between their threads (updated under ``lock``)."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    sent: int = 0  # body bytes handed to the kernel, cut requests included
    total: int = 0  # bytes of all uploads
    stored: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)  # upload id -> (sha256, size)
    stalls: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # (seconds from a cut to new bytes stored, what broke)
    failures: int = 0
    restarts: int = 0  # uploads the server lost (404/410) and the client began again
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    unfinished: list[str] = dataclasses.field(default_factory=list)

    def count(self, status: int) -> None:
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1


class TusClient:
    """tus 1.0 over one keep-alive connection at a time; any transport error becomes ``Cut``."""

    def __init__(self, port: int, tally: Tally, proxy: ChaosProxy) -> None:
        self.port = port
        self.tally = tally
        self.proxy = proxy
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, headers: dict[str, str],
                body: memoryview | None = None) -> tuple[int, http.client.HTTPResponse]:
        conn = self.conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=READ_TIMEOUT)
        self.conn = None
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            conn.putheader("Tus-Resumable", "1.0.0")
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            if body is not None:
                for start in range(0, len(body), PIECE):
                    piece = body[start:start + PIECE]
                    conn.send(piece)
                    with self.tally.lock:
                        self.tally.sent += len(piece)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            by_proxy = False
            with contextlib.suppress(OSError, AttributeError):  # asked before the close frees the port
                by_proxy = self.proxy.was_cut(conn.sock.getsockname()[1])
            conn.close()
            raise Cut(repr(exc), by_proxy=by_proxy) from None
        if response.will_close:
            conn.close()
        else:
            self.conn = conn
        self.tally.count(response.status)
        return response.status, response

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def wait_as_asked(response: http.client.HTTPResponse) -> None:
    """Sleep for the response's Retry-After (whole seconds), at most 2 s, at least 0.1 s."""
    value = (response.getheader("Retry-After") or "").strip()
    time.sleep(min(2.0, max(0.1, float(value) if value.isdigit() else 0.5)))


def upload(client: TusClient, seed: int, size: int, deadline: float, chunk_size: int = CHUNK,
           rate: int | None = None) -> None:
    """Send one upload to its end, resuming after every cut; record what was sent.

    With ``rate`` (bytes a second), each PATCH the server took is followed by a pause that keeps the
    upload's average under it.
    """
    tally = client.tally
    data = memoryview(random.Random(seed).randbytes(size))
    sha256 = hashlib.sha256(data).hexdigest()
    name = base64.b64encode(f"blob-{seed}.bin".encode()).decode()
    path: str | None = None
    offset = 0
    ask = False  # the offset is unknown: HEAD before the next PATCH
    cut_at: float | None = None  # when the request that was cut began (None: not stalled)
    held: int | None = None  # the offset the first HEAD after the cut reported: what the server kept
    cause = ""  # what broke it, and what broke after
    started = time.monotonic()

    def moved(now_at: int) -> None:
        """The server holds ``now_at`` bytes: the stall ends if that is more than it kept at the cut."""
        nonlocal cut_at, held
        if cut_at is None:
            return
        if held is None:
            held = now_at
        elif now_at > held:
            with tally.lock:
                tally.stalls.append((time.monotonic() - cut_at, cause))
            cut_at = held = None

    while True:
        if time.monotonic() > deadline:
            tally.unfinished.append(f"upload {seed}: {offset}/{size} bytes at the deadline")
            return
        began = time.monotonic()
        try:
            if path is None:
                status, response = client.request("POST", "/files/", {"Upload-Length": str(size),
                                                                      "Upload-Metadata": f"filename {name}"})
                if status == 201:
                    path, offset, ask = urlsplit(response.getheader("Location", "")).path, 0, False
                    moved(0)
                    continue
            elif ask:
                status, response = client.request("HEAD", path, {})
                if status in (200, 204):
                    offset, ask = int(response.getheader("Upload-Offset", "")), False
                    moved(offset)
                    if offset == size:
                        break
                    continue
            else:
                chunk = data[offset:offset + chunk_size]
                status, response = client.request(
                    "PATCH", path, {"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
                                    "Content-Length": str(len(chunk))}, chunk)
                if status in (200, 204):
                    offset = int(response.getheader("Upload-Offset", ""))
                    moved(offset)
                    if offset == size:
                        break
                    if rate:
                        time.sleep(max(0.0, started + offset / rate - time.monotonic()))
                    continue
                if status == 409:
                    ask = True
                    continue
        except Cut as exc:
            with tally.lock:
                tally.failures += 1
            kind = "PATCH" if path and not ask else "HEAD" if path else "POST"
            if cut_at is not None and exc.by_proxy:
                # A stall runs from a cut of the network to the server's recovery.  The proxy cutting the
                # request that was recovering is a new cut: the stall so far (to that request) is counted
                # and a new one starts, while a kill or a server that never answers extends the stall.
                with tally.lock:
                    tally.stalls.append((began - cut_at, f"{cause}; ended by a new cut"))
                cut_at = None
            if cut_at is None:
                cut_at, held, cause = began, None, ""
            cause += f"{'; then ' if cause else ''}{kind} {exc} after {time.monotonic() - began:.1f} s"
            ask = path is not None
            time.sleep(0.05)
            continue
        if status in (503, 423, 429):
            ask = path is not None
            wait_as_asked(response)
        elif status in (404, 410) and path is not None:
            with tally.lock:
                tally.restarts += 1
            path, offset, ask = None, 0, False
        else:
            with tally.lock:
                tally.unexpected.append(f"upload {seed}: {status} {response.getheaders()}")
            return
    with tally.lock:
        tally.stored[path.rsplit("/", 1)[-1]] = (sha256, size)


def run_client(proxy: ChaosProxy, jobs: list[tuple[int, int]], tally: Tally, deadline: float,
               chunk_size: int, rate: int | None = None) -> None:
    client = TusClient(proxy.port, tally, proxy)
    try:
        for seed, size in jobs:
            upload(client, seed, size, deadline, chunk_size, rate)
    finally:
        client.close()


@dataclasses.dataclass(frozen=True)
class Shape:
    """One soak: where the endpoint runs, what the clients send, what the vandal does."""

    server: str  # "wsgi" (gunicorn sync), "asgi-gunicorn" (gunicorn -k asgi) or "asgi-uvicorn" (uvicorn --workers)
    uploads: int
    sizes: tuple[int, int]  # bytes per upload, (lo, hi)
    chunk: int  # bytes per PATCH: what one cut can cost at most
    cut_after: tuple[int, int]  # client-to-server bytes a connection carries before it is cut
    workers: int
    kill_every: int  # body bytes sent between SIGKILLs of a random worker
    hup_every: int | None  # body bytes sent between HUPs of the master (a graceful restart of every worker); None: none
    cut_every: int | None = None  # body bytes sent between cuts the vandal asks for (RST, black hole in turn)
    max_requests: int = 0  # gunicorn recycles a worker after about this many requests; 0: the config's default
    # Bytes a second per client at most; None: as fast as it goes.  The vandal looks every TEMP_DIR_EVERY s: a run
    # over in 4 s (90 MiB, a fast moment) left it no time to ask for its black hole, and the soak failed.
    rate: int | None = None


SHAPES = [
    pytest.param(Shape("wsgi", UPLOADS, SIZES, CHUNK, CUT_AFTER, workers=6, kill_every=KILL_EVERY,
                       hup_every=HUP_EVERY), id="wsgi"),
    # The ASGI endpoint, kept small for CI's time (90 MiB), the chaos as dense per byte.  Connections are kept alive
    # there, so a cut may fall on any request of many; each carries a whole PATCH (1 MiB) and more before its cut,
    # so a stall is one cut, never a run of black holes.  gunicorn also recycles a worker every 20-30 requests.
    pytest.param(Shape("asgi-gunicorn", 16, (MiB, 10 * MiB), MiB, (2 * MiB, 12 * MiB), workers=2,
                       kill_every=18 * MiB, hup_every=40 * MiB, cut_every=12 * MiB, max_requests=20, rate=2 * MiB),
                 id="asgi-gunicorn"),
    # uvicorn's supervisor replaces a killed worker; its HUP restart waits for every connection of the old worker to
    # close (no graceful timeout) and replaces no killed worker meanwhile: not a restart to soak.
    pytest.param(Shape("asgi-uvicorn", 16, (MiB, 10 * MiB), MiB, (2 * MiB, 12 * MiB), workers=2,
                       kill_every=18 * MiB, hup_every=None, cut_every=12 * MiB, rate=2 * MiB), id="asgi-uvicorn"),
]


def start_server(shape: Shape, tmp_path: Path, env: dict[str, str]) -> Any:
    """The endpoint (tests/resumable_client_apps.py or tests/resumable_asgi_apps.py) under ``shape.server``."""
    if shape.server == "wsgi":
        return Gunicorn("resumable_client_apps:application", tmp_path=tmp_path, config=GUNICORN_CONF,
                        workers=shape.workers, env=env)
    if shape.server == "asgi-gunicorn":
        recycle = {"GUNICORN_MAX_REQUESTS": str(shape.max_requests), "GUNICORN_MAX_REQUESTS_JITTER": "10"}
        return Gunicorn("resumable_asgi_apps:application", tmp_path=tmp_path, config=GUNICORN_CONF,
                        workers=shape.workers, args=["-k", "asgi", "--log-level", "info"], env={**env, **recycle})
    from tests.test_asgi import Uvicorn

    return Uvicorn("resumable_asgi_apps:application", tmp_path=tmp_path, args=["--workers", str(shape.workers)],
                   env={**env, "PYTHONPATH": str(TESTS)})


#: What a worker logs once it is up: gunicorn's (uploadguard's post_worker_init hook) and uvicorn's.
READY = re.compile(r"\[(\d+)\] \[INFO\] uploadguard: upload temp dir |Started server process \[(\d+)\]")


def worker_pids(server: Any) -> list[int]:
    """The server's live worker processes: the master's children (uvicorn's: not its resource tracker)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                state, parent = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if int(parent) == server.proc.pid and state != "Z" and b"resource_tracker" not in command:
                pids.append(int(entry))
    return pids


def all_up(server: Any, workers: list[int], count: int) -> bool:
    """Whether ``count`` workers run and every one has said it is up."""
    ready = {int(a or b) for a, b in READY.findall(server.log())}
    return len(workers) == count and set(workers) <= ready


class TestResumableChaosSoak:
    @pytest.mark.parametrize("shape", SHAPES)
    def test_uploads_end_intact_through_resets_black_holes_kills_and_hups(self, tmp_path: Path, shape: Shape) -> None:
        """Uploads by 4 clients through cut connections, killed (and HUPed or recycled) workers and a vanishing temp
        dir all end stored intact, on_complete run once for each (again only where a SIGKILL cut it short), with
        at most 1.2x the bytes sent and no stall over 15 s after a cut."""
        temp_dir, records, completions = tmp_path / "tmp", tmp_path / "records", tmp_path / "completions"
        server = start_server(shape, tmp_path, {
            "UPLOADGUARD_TEMP_DIR": str(temp_dir), "UPLOADGUARD_RETRY_AFTER": "1",
            "TEST_RESUMABLE_STORAGE": str(tmp_path / "uploads"), "TEST_RECORDS": str(records),
            "TEST_COMPLETIONS": str(completions), "UPLOADGUARD_RESUMABLE_IDLE_TIMEOUT": "10"})
        rng = random.Random(10)
        jobs = [(seed, rng.randint(*shape.sizes)) for seed in range(shape.uploads)]
        tally = Tally(total=sum(size for _, size in jobs))
        proxy = ChaosProxy(server.port, cut_probability=1.0, cut_after=shape.cut_after, seed=11).start()
        stop = threading.Event()
        chaos = {"kills": 0, "hups": 0, "deletions": 0, "cuts": 0}
        killed: set[int] = set()

        def vandal() -> None:
            chance = random.Random(12)
            before: int | None = None  # cuts of the mode due, when the vandal began to ask for one
            while not stop.wait(TEMP_DIR_EVERY):
                shutil.rmtree(temp_dir, ignore_errors=True)
                chaos["deletions"] += 1
                with tally.lock:
                    sent = tally.sent
                workers = worker_pids(server)
                if chaos["kills"] < sent // shape.kill_every and all_up(server, workers, shape.workers):
                    victim = chance.choice(workers)
                    with contextlib.suppress(ProcessLookupError):  # gone by itself: another at the next look
                        os.kill(victim, signal.SIGKILL)
                        killed.add(victim)
                        chaos["kills"] += 1
                if shape.hup_every is not None and chaos["hups"] < sent // shape.hup_every:
                    os.kill(server.proc.pid, signal.SIGHUP)
                    chaos["hups"] += 1
                if shape.cut_every is not None and chaos["cuts"] < sent // shape.cut_every:
                    mode = (RESET, BLACKHOLE)[chaos["cuts"] % 2]
                    if before is None:
                        before = proxy.counts()[mode]
                    if proxy.counts()[mode] > before:  # done (by this or by a random cut)
                        chaos["cuts"] += 1
                        before = None
                    else:  # past its first PATCH only: one that replaced a cut connection carries it whole
                        proxy.arm(mode, 64 * 1024, min_bytes=shape.cut_after[0])

        deadline = time.monotonic() + DEADLINE
        clients = [threading.Thread(target=run_client,
                                    args=(proxy, jobs[i::CLIENTS], tally, deadline, shape.chunk, shape.rate))
                   for i in range(CLIENTS)]
        chaos_thread = threading.Thread(target=vandal)
        started = time.monotonic()
        try:
            chaos_thread.start()
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join(timeout=max(1.0, deadline + 60 - time.monotonic()))
        finally:
            stop.set()
            chaos_thread.join()
            proxy.stop()
            server.stop()
        elapsed = time.monotonic() - started

        intact, wrong = 0, []
        for upload_id, (sha256, size) in tally.stored.items():
            path = records / f"{upload_id}.json"
            held = json.loads(path.read_text()) if path.exists() else None
            if held is not None and held["sha256"] == sha256 and held["length"] == size:
                intact += 1
            else:
                wrong.append(f"{upload_id}: sent {sha256} ({size} B), server recorded {held}")
        calls: dict[str, list[int]] = {}
        for line in completions.read_text().splitlines() if completions.exists() else []:
            upload_id, pid = line.split()
            calls.setdefault(upload_id, []).append(int(pid))
        # A worker SIGKILLed after on_complete returned but before it noted so leaves it to run again: only then.
        not_once = {upload_id: pids for upload_id, pids in calls.items() if not set(pids[:-1]) <= killed}
        not_once |= {upload_id: [] for upload_id in tally.stored if upload_id not in calls}
        again = sum(len(pids) - 1 for pids in calls.values())
        ratio = tally.sent / tally.total
        worst, worst_cause = max(tally.stalls, default=(0.0, ""))
        stalls = sorted(seconds for seconds, _ in tally.stalls)
        cuts = proxy.counts()
        recycled = len(set(re.findall(r"\[(\d+)\] \[INFO\] Autorestarting worker", server.log())))  # max_requests
        summary = (f"{shape.server}: {intact}/{shape.uploads} uploads stored intact in {elapsed:.0f} s; "
                   f"{tally.total / MiB:.0f} MiB in all, bytes sent {ratio:.3f}x; "
                   f"cuts: {cuts[RESET]} resets + {cuts[BLACKHOLE]} black holes over {proxy.connections} "
                   f"connections ({chaos['cuts']} asked for); {chaos['kills']} workers SIGKILLed, "
                   f"{recycled} recycled, {chaos['hups']} HUPs, "
                   f"temp dir deleted {chaos['deletions']} times; {tally.failures} failed requests, "
                   f"{tally.restarts} restarts; "
                   f"on_complete run again {again} times (after a SIGKILL); "
                   f"worst stall after a cut {worst:.1f} s ({worst_cause}; median "
                   f"{stalls[len(stalls) // 2] if stalls else 0:.1f} s over {len(stalls)}); "
                   f"statuses {dict(sorted(tally.statuses.items()))}")
        print(f"\nresumable chaos soak: {summary}")
        assert not any(thread.is_alive() for thread in clients), summary
        assert tally.unexpected == [], summary
        assert tally.unfinished == [], summary
        assert wrong == [], summary
        assert intact == shape.uploads, summary
        assert not_once == {}, summary
        assert ratio <= MAX_RATIO, summary
        assert worst <= MAX_STALL, summary
        assert cuts[RESET] > 0 and cuts[BLACKHOLE] > 0 and chaos["kills"] > 0, summary
        assert chaos["hups"] > 0 or shape.hup_every is None, summary
        assert "Error handling request" not in server.log(), server.log()[-3000:]
        if shape.server != "wsgi":
            assert "Traceback" not in server.log(), server.log()[-3000:]
