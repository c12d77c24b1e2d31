"""Is the ASGI endpoint as fast as the WSGI one?  One 200 MiB PATCH, side by side.

``uploadguard.resumable.asgi.ResumableUploads`` under ``gunicorn -k asgi`` and
uvicorn (one worker each; with their C HTTP parsers, gunicorn_h1c and
httptools, and without) against the WSGI ``ResumableUploads`` under
gunicorn's sync worker (one worker) and @tus/server + @tus/file-store under
node (``tests/js``; skipped without node or ``npm ci --prefix tests/js``),
all on local storage (the uploadguard ones fsync at completion).  A bare
ASGI app writing each body message to a file on the loop is each ASGI
server's floor.  Target (issue #15): the ASGI endpoint >= 0.9x the WSGI
endpoint's throughput; and server CPU seconds per GiB against @tus/server.
Servers are pinned to CPU 1 and this client to CPU 0 when there are two;
rounds alternate and medians are reported; the servers' CPU seconds (all
threads) are shown since wall time on a busy machine includes waiting for a core.

Measured 2026-12-06 (2 shared cores at load 4-8, 7 rounds, three runs):
gunicorn -k asgi 1.25-2.75x the WSGI endpoint (1.6-2.0 CPU s per GiB; WSGI
2.1-2.9, @tus/server 3.3-3.7); with gunicorn's Python parser 0.92-1.24x;
uvicorn with httptools 1.20-2.09x, with h11 0.76-1.63x.  Before the
endpoint wrote 1 MiB pieces (256 KiB, copied twice): 0.52x.  bench/README.md
has the table.  Run:

    .venv/bin/python bench/bench_resumable_asgi.py [--quick] [--rounds N] [--only NAMES] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_resumable import JS, MiB, Node, alternate, pin, timed_patch  # noqa: E402
from tests.support import Gunicorn, free_port, wait_for_port  # noqa: E402

_asgi: Any = None


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI endpoint (imported by the server as bench.bench_resumable_asgi:asgi_app)."""
    global _asgi
    if _asgi is None:
        from uploadguard.resumable import asgi
        from uploadguard.resumable.asgi import ResumableUploads

        if os.environ.get("BENCH_COALESCE"):  # attribution only: the piece size handed to the store
            asgi._COALESCE = int(os.environ["BENCH_COALESCE"])
        _asgi = ResumableUploads(storage=os.path.join(os.environ["BENCH_DIR"], "tus"), max_size=1 << 40)
    await _asgi(scope, receive, send)


async def bare_asgi_app(scope: Any, receive: Any, send: Any) -> None:
    """The floor: a bare ASGI app that writes each body message to a file on the loop, no protocol."""
    if scope["type"] != "http":
        return
    if scope["method"] == "POST" and scope["path"] == "/files/":  # answer a creation so timed_patch can run
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"location", b"/files/bare"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    size = 0
    if scope["method"] == "PATCH":
        fd = os.open(os.path.join(os.environ["BENCH_DIR"], "bare.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while True:
                message = await receive()
                size += os.write(fd, message.get("body", b""))
                if not message.get("more_body"):
                    break
            os.fsync(fd)
        finally:
            os.close(fd)
    await send({"type": "http.response.start", "status": 204,
                "headers": [(b"upload-offset", str(size).encode())]})
    await send({"type": "http.response.body", "body": b""})


class Uvicorn:
    """uvicorn serving ``app`` of this module, with its HTTP/1.1 implementation ``http`` (h11, httptools, auto)."""

    def __init__(self, tmp_path: Path, env: dict[str, str], app: str = "asgi_app", http: str = "auto") -> None:
        self.port = free_port()
        self._log = open(tmp_path / f"uvicorn-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(self.port), "--http", http,
             "--log-level", "warning", f"bench.bench_resumable_asgi:{app}"],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=str(ROOT))
        wait_for_port(self.port, proc=self.proc)
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)
        self._log.close()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def latencies_during(port: int, run: Callable[[], float]) -> list[float]:
    """Seconds each of a stream of OPTIONS requests took (one keep-alive connection) while ``run`` ran."""
    import http.client
    import threading

    done = threading.Event()
    seen: list[float] = []

    def probe() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not done.is_set():
            start = time.perf_counter()
            connection.request("OPTIONS", "/files/")
            connection.getresponse().read()
            seen.append(time.perf_counter() - start)
            time.sleep(0.005)
        connection.close()

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 MiB, 3 rounds: a smoke run")
    parser.add_argument("--dir", help="where the files go (default: the temp dir; e.g. /dev/shm for a tmpfs)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 7; quick: 3)")
    parser.add_argument("--only", default="", help="comma-separated server names to run beside wsgi (default: all)")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    size = (50 if args.quick else 200) * MiB
    print(f"# uploadguard resumable ASGI vs WSGI — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, {rounds} rounds, medians; files in {args.dir or tempfile.gettempdir()}")
    body = memoryview(os.urandom(size))
    fast = _installed("gunicorn_h1c")  # gunicorn's C parser (gunicorn[fast]); its ASGI worker's default when present
    httptools = _installed("httptools")  # uvicorn[standard]'s parser; uvicorn's default when present
    node_ready = shutil.which("node") is not None and (JS / "node_modules" / "@tus" / "server").is_dir()
    with tempfile.TemporaryDirectory(dir=args.dir) as temp:
        base = Path(temp)
        env = {"BENCH_DIR": str(base), "PYTHONPATH": str(ROOT), "UPLOADGUARD_TEMP_DIR": str(base / "spool")}
        common = ["--log-level", "warning", "--timeout", "300"]
        servers: dict[str, Any] = {}

        only = {"wsgi", *args.only.split(",")} if args.only else None

        def gunicorn(name: str, app: str, *extra: str, **more: str) -> None:
            if only is None or name in only:
                servers[name] = Gunicorn(f"bench.bench_resumable_asgi:{app}" if "asgi" in name else app, tmp_path=base,
                                         env={**env, **more}, workers=1, pythonpath=[ROOT], args=[*extra, *common])

        try:
            gunicorn("wsgi", "bench.bench_resumable:resumable_app")
            gunicorn("gunicorn-asgi", "asgi_app", "-k", "asgi")
            gunicorn("gunicorn-asgi-bare", "bare_asgi_app", "-k", "asgi")
            if fast:
                gunicorn("gunicorn-asgi-python", "asgi_app", "-k", "asgi", "--http-parser", "python")
            gunicorn("gunicorn-asgi-256k", "asgi_app", "-k", "asgi", BENCH_COALESCE=str(256 * 1024))
            for name, start, ready in (
                    ("uvicorn-h11", lambda: Uvicorn(base, env, http="h11"), True),
                    ("uvicorn-httptools", lambda: Uvicorn(base, env, http="httptools"), httptools),
                    ("uvicorn-bare", lambda: Uvicorn(base, env, "bare_asgi_app"), True),
                    ("node", lambda: Node(base / "node"), node_ready)):
                if ready and (only is None or name in only):
                    servers[name] = start()
            pids = {name: server.worker_pids()[0] if isinstance(server, Gunicorn) else server.pid
                    for name, server in servers.items()}
            pin([*(s.pid for s in servers.values()), *pids.values()], 1)
            pin([os.getpid()], 0)
            ports = {name: server.port for name, server in servers.items()}
            for port in ports.values():
                timed_patch(port, "/files/", body[:MiB])  # warm up: imports, first write
            contenders: dict[str, tuple[int, Callable[[], float]]] = {
                name: (pids[name], (lambda port=port: timed_patch(port, "/files/", body)))  # type: ignore[misc]
                for name, port in ports.items()
            }
            wall, cpu = alternate(rounds, contenders)
            stalls = {name: latencies_during(ports[name], contenders[name][1])
                      for name in ("uvicorn-h11", "uvicorn-bare", "gunicorn-asgi", "gunicorn-asgi-bare") if name in ports}
        finally:
            for server in reversed(servers.values()):
                server.stop()
    base_rate = size / statistics.median(wall["wsgi"])
    parser = "gunicorn_h1c" if fast else "Python parser: gunicorn_h1c not installed"
    labels = {"wsgi": "WSGI ResumableUploads, gunicorn sync",
              "gunicorn-asgi": f"ASGI ResumableUploads, gunicorn -k asgi ({parser})",
              "gunicorn-asgi-python": "ASGI ResumableUploads, gunicorn -k asgi --http-parser python",
              "gunicorn-asgi-256k": f"the same, {parser}, pieces of 256 KiB to the store (the previous size)",
              "gunicorn-asgi-bare": f"bare ASGI app, body to a file (gunicorn -k asgi, {parser}): its floor",
              "uvicorn-h11": "ASGI ResumableUploads, uvicorn --http h11",
              "uvicorn-httptools": "ASGI ResumableUploads, uvicorn --http httptools",
              "uvicorn-bare": f"bare ASGI app, body to a file (uvicorn, {'httptools' if httptools else 'h11'}): its floor",
              "node": "@tus/server + @tus/file-store (node), which never fsyncs"}
    print(f"\n## One {size // MiB} MiB PATCH (local storage, fsync at completion)\n")
    print("| server | MiB/s (median) | × WSGI | server CPU s (median) | server CPU s per GiB |")
    print("|---|---:|---:|---:|---:|")
    for name in labels:
        if name in wall:
            rate, used = size / statistics.median(wall[name]), statistics.median(cpu[name])
            print(f"| {labels[name]} | {rate / MiB:.0f} | {rate / base_rate:.2f} | {used:.2f} | {used * (1 << 30) / size:.2f} |")
    print(f"\n## Does the PATCH stall the loop?  OPTIONS answered meanwhile on another connection\n")
    print("| server | requests | median ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, seen in stalls.items():
        print(f"| {labels[name]} | {len(seen)} | {1000 * statistics.median(seen):.1f} | {1000 * max(seen):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
