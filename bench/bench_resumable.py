"""What do resumable uploads cost?  Prints tables of ResumableUploads against a bare app and @tus/server.

1. PATCH throughput of a 200 MiB upload through real gunicorn (one sync
   worker), against a bare WSGI app under the same gunicorn that writes the
   request body to a file (1 MiB reads, ``os.write``), with and without an
   ``fsync`` at the end (ResumableUploads fsyncs a completed upload before
   anybody is told).  Target: >= 0.9x the bare app's throughput, memory flat
   (the worker's peak RSS, ``VmHWM``, before and after).  A row with
   ``os.fsync`` made a no-op in the worker shows what the durability costs.
2. The same PATCH against @tus/server with @tus/file-store (npm, pinned by
   ``tests/js/package-lock.json``; ``npm ci --prefix tests/js``) under node on
   the same machine.  Target: faster than it.
3. The per-chunk cost: an upload of 32 MiB in 1 MiB chunks, each a HEAD and a
   PATCH on fresh connections (gunicorn's sync workers close every
   connection), per chunk, for both servers; a bare 1 MiB POST is the floor.

Server processes are pinned to CPU 1 and this client to CPU 0 when there are
two CPUs; rounds alternate the servers and medians are reported, because the
machines are shared and noisy.  Run:

    .venv/bin/python bench/bench_resumable.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import Gunicorn, free_port, wait_for_port  # noqa: E402

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

MiB = 1024 * 1024
PIECE = MiB  # bytes per send() and per read in the bare app
JS = ROOT / "tests" / "js"


# -- the apps gunicorn serves (imported by the worker as bench.bench_resumable:...) --------------

def _bare(environ: WSGIEnvironment, start_response: StartResponse, *, sync: bool) -> Iterable[bytes]:
    """Write the body to $BENCH_DIR/bare.bin: what a new user's upload view does, no protocol."""
    left = int(environ.get("CONTENT_LENGTH") or 0)
    stream = environ["wsgi.input"]
    fd = os.open(os.path.join(os.environ["BENCH_DIR"], "bare.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while left > 0:
            data = stream.read(min(PIECE, left))
            if not data:
                break
            os.write(fd, data)
            left -= len(data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    start_response("204 No Content", [])
    return []


def bare_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    return _bare(environ, start_response, sync=False)


def bare_fsync_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    return _bare(environ, start_response, sync=True)


def _not_found(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("404 Not Found", [("Content-Length", "0")])
    return []


def resumable_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    app: Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]] = _resumable()
    return app(environ, start_response)


def resumable_nosync_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """ResumableUploads with os.fsync a no-op in this worker: attributes the cost, never a setting to use."""
    os.fsync = lambda fd: None
    return resumable_app(environ, start_response)


_app: Any = None


def _resumable() -> Any:
    global _app
    if _app is None:
        from uploadguard.resumable import ResumableUploads

        _app = ResumableUploads(_not_found, storage=os.path.join(os.environ["BENCH_DIR"], "tus"),
                                max_size=1 << 40)
    return _app


# -- a minimal tus client on http.client --------------------------------------------------------

def request(port: int, method: str, path: str, headers: dict[str, str],
            body: memoryview | None = None) -> tuple[int, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body is not None:
            for start in range(0, len(body), PIECE):
                conn.send(body[start:start + PIECE])
        response = conn.getresponse()
        response.read()
        return response.status, response
    finally:
        conn.close()


TUS = {"Tus-Resumable": "1.0.0"}
PATCH = {**TUS, "Content-Type": "application/offset+octet-stream"}


def create(port: int, prefix: str, length: int) -> str:
    status, response = request(port, "POST", prefix, {**TUS, "Upload-Length": str(length)})
    assert status == 201, status
    return urlsplit(response.getheader("Location", "")).path


def timed_patch(port: int, prefix: str, body: memoryview) -> float:
    """Create an upload, PATCH the whole body in one request; seconds the PATCH took."""
    path = create(port, prefix, len(body))
    start = time.perf_counter()
    status, response = request(port, "PATCH", path, {**PATCH, "Upload-Offset": "0"}, body)
    elapsed = time.perf_counter() - start
    assert status == 204 and response.getheader("Upload-Offset") == str(len(body)), status
    request(port, "DELETE", path, TUS)
    return elapsed


def timed_post(port: int, body: memoryview) -> float:
    start = time.perf_counter()
    status, _ = request(port, "POST", "/upload", {"Content-Type": "application/octet-stream"}, body)
    elapsed = time.perf_counter() - start
    assert status == 204, status
    return elapsed


def per_chunk(port: int, prefix: str, body: memoryview, chunk: int) -> list[float]:
    """Seconds per chunk for HEAD + PATCH of each ``chunk`` bytes of ``body``."""
    path = create(port, prefix, len(body))
    times = []
    for offset in range(0, len(body), chunk):
        start = time.perf_counter()
        status, response = request(port, "HEAD", path, TUS)
        assert status in (200, 204) and response.getheader("Upload-Offset") == str(offset), status
        status, _ = request(port, "PATCH", path, {**PATCH, "Upload-Offset": str(offset)},
                            body[offset:offset + chunk])
        assert status == 204, status
        times.append(time.perf_counter() - start)
    request(port, "DELETE", path, TUS)
    return times


# -- servers ----------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class Node:
    """@tus/server + @tus/file-store under node (tests/js/tus_server.js)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([shutil.which("node") or "node", str(JS / "tus_server.js"), str(self.port),
                                      str(directory)], stdout=subprocess.DEVNULL, cwd=str(JS))
        wait_for_port(self.port)
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def pin(pids: Iterable[int], cpu: int) -> None:
    if len(os.sched_getaffinity(0)) >= 2:
        for pid in pids:
            os.sched_setaffinity(pid, {cpu})


def alternate(rounds: int, contenders: dict[str, tuple[int, Callable[[], float]]],
              ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run each (server pid, run) once per round, in an order that alternates.

    Returns the wall seconds per run and the server process's CPU seconds per
    run: on a shared machine the wall time includes waiting for a core, the
    CPU time does not.
    """
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for i in range(rounds):
        order = list(contenders.items())
        for name, (pid, run) in order if i % 2 == 0 else reversed(order):
            used = cpu_seconds(pid)
            wall[name].append(run())
            cpu[name].append(cpu_seconds(pid) - used)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 MiB, 3 rounds: a smoke run")
    parser.add_argument("--dir", help="where the files go (default: the temp dir; e.g. /dev/shm for a tmpfs)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per measurement (default 9; quick: 3)")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    size = (50 if args.quick else 200) * MiB
    node_ready = shutil.which("node") is not None and (JS / "node_modules" / "@tus" / "server").is_dir()
    print(f"# uploadguard resumable benchmark — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, {rounds} rounds, medians; files in {args.dir or tempfile.gettempdir()}")
    body = memoryview(os.urandom(size))
    with tempfile.TemporaryDirectory(dir=args.dir) as temp:
        base = Path(temp)
        env = {"BENCH_DIR": str(base), "PYTHONPATH": str(ROOT), "UPLOADGUARD_TEMP_DIR": str(base / "spool")}
        servers = {
            name: Gunicorn(f"bench.bench_resumable:{app}", tmp_path=base, env=env, workers=1, pythonpath=[ROOT],
                           args=["--log-level", "warning", "--timeout", "300"])
            for name, app in (("bare", "bare_app"), ("bare+fsync", "bare_fsync_app"), ("resumable", "resumable_app"),
                              ("resumable-nosync", "resumable_nosync_app"))
        }
        node = Node(base / "node") if node_ready else None
        workers = {name: server.worker_pids()[0] for name, server in servers.items()}
        pin([*(p for s in servers.values() for p in (s.pid, *s.worker_pids()))] + ([node.pid] if node else []), 1)
        pin([os.getpid()], 0)
        try:
            small = body[:MiB]
            timed_post(servers["bare"].port, small)  # warm up: imports, first write
            timed_post(servers["bare+fsync"].port, small)
            timed_patch(servers["resumable"].port, "/files/", small)
            timed_patch(servers["resumable-nosync"].port, "/files/", small)
            if node:
                timed_patch(node.port, "/files/", small)
            before = {name: peak_rss(pid) for name, pid in workers.items()}
            if node:
                before["node"] = peak_rss(node.pid)

            contenders: dict[str, tuple[int, Callable[[], float]]] = {
                "bare": (workers["bare"], lambda: timed_post(servers["bare"].port, body)),
                "bare+fsync": (workers["bare+fsync"], lambda: timed_post(servers["bare+fsync"].port, body)),
                "resumable": (workers["resumable"], lambda: timed_patch(servers["resumable"].port, "/files/", body)),
                "resumable-nosync": (workers["resumable-nosync"],
                                     lambda: timed_patch(servers["resumable-nosync"].port, "/files/", body)),
            }
            if node:
                contenders["node"] = (node.pid, lambda: timed_patch(node.port, "/files/", body))
            results, cpu = alternate(rounds, contenders)
            after = {name: peak_rss(pid) for name, pid in workers.items()}
            if node:
                after["node"] = peak_rss(node.pid)

            medians = {name: statistics.median(times) for name, times in results.items()}
            cpu_medians = {name: statistics.median(times) for name, times in cpu.items()}
            labels = {"bare": "bare WSGI app, body to a file (gunicorn)",
                      "bare+fsync": "bare WSGI app + fsync (gunicorn)",
                      "resumable": "ResumableUploads PATCH (gunicorn)",
                      "resumable-nosync": "same, fsync made a no-op (attribution only)",
                      "node": "@tus/server + file-store PATCH (node)"}
            mib = size / MiB
            print(f"\n## 1-2. One {mib:.0f} MiB body (PATCH for the tus servers)\n")
            print("| server | median s | MiB/s | throughput vs bare | vs bare+fsync | min–max s "
                  "| server CPU s | CPU vs bare | worker peak RSS before → after |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for name, median in medians.items():
                rss0, rss1 = before[name][1] >> 10, after[name][1] >> 10
                print(f"| {labels[name]} | {median:.3f} | {mib / median:.0f} | {medians['bare'] / median:.2f}x "
                      f"| {medians['bare+fsync'] / median:.2f}x | {min(results[name]):.3f}–{max(results[name]):.3f} "
                      f"| {cpu_medians[name]:.3f} | {cpu_medians[name] / cpu_medians['bare']:.2f}x "
                      f"| {rss0} → {rss1} MiB |")
            if node:
                print(f"\nResumableUploads vs @tus/server: {medians['node'] / medians['resumable']:.2f}x "
                      "the throughput")

            chunk_body = body[: 32 * MiB]
            chunks: dict[str, list[float]] = {"resumable": [], "bare": []}
            if node:
                chunks["node"] = []
            for i in range(max(1, rounds // 2)):
                chunks["resumable"] += per_chunk(servers["resumable"].port, "/files/", chunk_body, MiB)
                if node:
                    chunks["node"] += per_chunk(node.port, "/files/", chunk_body, MiB)
                chunks["bare"] += [timed_post(servers["bare"].port, small) for _ in range(32)]
            print("\n## 3. Per chunk: HEAD + PATCH of 1 MiB, fresh connections (32 chunks per round)\n")
            print("| server | median ms per chunk | p90 ms |")
            print("|---|---:|---:|")
            for name, label in (("bare", "bare 1 MiB POST (the floor: no HEAD, no protocol)"),
                                ("resumable", "ResumableUploads HEAD + PATCH"),
                                ("node", "@tus/server HEAD + PATCH")):
                if name in chunks:
                    times = sorted(chunks[name])
                    print(f"| {label} | {statistics.median(times) * 1000:.2f} "
                          f"| {times[int(len(times) * 0.9)] * 1000:.2f} |")
            if not node:
                print("\n@tus/server skipped: needs node and tests/js/node_modules (npm ci --prefix tests/js)")
        finally:
            for server in servers.values():
                server.stop()
            if node:
                node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
