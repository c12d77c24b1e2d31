"""Is the ASGI endpoint as fast as the WSGI one?  One 200 MiB PATCH, side by side.

``uploadguard.resumable.asgi.ResumableUploads`` under uvicorn and under
``gunicorn -k asgi`` (one worker each) against the WSGI ``ResumableUploads``
under gunicorn's sync worker (one worker), all on local storage with the
fsync at completion.  Target (issue #15): the ASGI endpoint >= 0.9x the WSGI
endpoint's throughput.  Servers are pinned to CPU 1 and this client to CPU 0
when there are two; rounds alternate and medians are reported (a shared
machine is noisy); the servers' CPU seconds per PATCH are shown too, since
wall time on a busy machine includes waiting for a core.  A bare ASGI app
writing each body message to a file under the same server is each ASGI
server's own floor: what the endpoint could reach at best there.

Measured 2026-12-06 (2 shared cores, 5 rounds, 200 MiB; three runs):
ASGI under gunicorn -k asgi 0.76-0.86x the WSGI endpoint, its bare floor
0.63-0.76x; under uvicorn (h11: httptools is not installed) 0.42-0.51x, its
bare floor 0.42-0.47x.  The endpoint costs nothing measurable over the
server's own body delivery; the 0.9x target is missed by the servers' ASGI
body paths, not by the endpoint.  While the PATCH streams, OPTIONS on another connection took at most 8-15 ms from the
endpoint, 89-117 ms from the bare app (its fsync runs on the loop).  Run:

    .venv/bin/python bench/bench_resumable_asgi.py [--quick] [--rounds N] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_resumable import MiB, alternate, pin, timed_patch  # noqa: E402
from tests.support import Gunicorn  # noqa: E402

_asgi: Any = None


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI endpoint (imported by the server as bench.bench_resumable_asgi:asgi_app)."""
    global _asgi
    if _asgi is None:
        from uploadguard.resumable.asgi import ResumableUploads

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
    def __init__(self, tmp_path: Path, env: dict[str, str], app: str = "asgi_app") -> None:
        from tests.test_asgi import Uvicorn as Server

        self.server = Server(f"bench.bench_resumable_asgi:{app}", tmp_path=tmp_path,
                             env={**env, "PYTHONPATH": str(ROOT)})
        self.port = self.server.port
        self.pid = self.server.proc.pid

    def stop(self) -> None:
        self.server.stop()


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
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    size = (50 if args.quick else 200) * MiB
    print(f"# uploadguard resumable ASGI vs WSGI — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, {rounds} rounds, medians; files in {args.dir or tempfile.gettempdir()}")
    body = memoryview(os.urandom(size))
    with tempfile.TemporaryDirectory(dir=args.dir) as temp:
        base = Path(temp)
        env = {"BENCH_DIR": str(base), "PYTHONPATH": str(ROOT), "UPLOADGUARD_TEMP_DIR": str(base / "spool")}
        common = ["--log-level", "warning", "--timeout", "300"]
        wsgi = Gunicorn("bench.bench_resumable:resumable_app", tmp_path=base, env=env, workers=1,
                        pythonpath=[ROOT], args=common)
        gasgi = Gunicorn("bench.bench_resumable_asgi:asgi_app", tmp_path=base, env=env, workers=1,
                         pythonpath=[ROOT], args=["-k", "asgi", *common])
        uvicorn = Uvicorn(base, env)
        bare = Uvicorn(base, env, "bare_asgi_app")
        gbare = Gunicorn("bench.bench_resumable_asgi:bare_asgi_app", tmp_path=base, env=env, workers=1,
                         pythonpath=[ROOT], args=["-k", "asgi", *common])
        try:
            pids = {"wsgi": wsgi.worker_pids()[0], "gunicorn-asgi": gasgi.worker_pids()[0], "uvicorn": uvicorn.pid,
                    "uvicorn-bare": bare.pid, "gunicorn-asgi-bare": gbare.worker_pids()[0]}
            pin([wsgi.pid, gasgi.pid, gbare.pid, *pids.values()], 1)
            pin([os.getpid()], 0)
            ports = {"wsgi": wsgi.port, "gunicorn-asgi": gasgi.port, "uvicorn": uvicorn.port,
                     "uvicorn-bare": bare.port, "gunicorn-asgi-bare": gbare.port}
            for port in ports.values():
                timed_patch(port, "/files/", body[:MiB])  # warm up: imports, first write
            contenders: dict[str, tuple[int, Callable[[], float]]] = {
                name: (pids[name], (lambda port=port: timed_patch(port, "/files/", body)))  # type: ignore[misc]
                for name, port in ports.items()
            }
            wall, cpu = alternate(rounds, contenders)
            stalls = {name: latencies_during(ports[name], contenders[name][1])
                      for name in ("uvicorn", "uvicorn-bare", "gunicorn-asgi", "gunicorn-asgi-bare")}
        finally:
            gbare.stop()
            bare.stop()
            uvicorn.stop()
            gasgi.stop()
            wsgi.stop()
    base_rate = size / statistics.median(wall["wsgi"])
    print(f"\n## One {size // MiB} MiB PATCH (local storage, fsync at completion)\n")
    print("| server | MiB/s (median) | × WSGI | server CPU s (median) |")
    print("|---|---:|---:|---:|")
    labels = {"wsgi": "WSGI ResumableUploads, gunicorn sync", "gunicorn-asgi": "ASGI ResumableUploads, gunicorn -k asgi",
              "uvicorn": "ASGI ResumableUploads, uvicorn",
              "uvicorn-bare": "bare ASGI app, body to a file (uvicorn): uvicorn's own floor",
              "gunicorn-asgi-bare": "bare ASGI app, body to a file (gunicorn -k asgi): its own floor"}
    for name in ("wsgi", "gunicorn-asgi", "gunicorn-asgi-bare", "uvicorn", "uvicorn-bare"):
        rate = size / statistics.median(wall[name])
        print(f"| {labels[name]} | {rate / MiB:.0f} | {rate / base_rate:.2f} | {statistics.median(cpu[name]):.2f} |")
    print(f"\n## Does the PATCH stall the loop?  OPTIONS answered meanwhile on another connection\n")
    print("| server | requests | median ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, seen in stalls.items():
        print(f"| {labels[name]} | {len(seen)} | {1000 * statistics.median(seen):.1f} | {1000 * max(seen):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
