"""How much does UploadGuard cost?  Prints tables of guarded vs bare, side by side.

1. In-process overhead per request (GET and a small POST), guarded vs bare app.
   Target: <= 5 us added per request.
2. Reading a 200 MiB body through the guarded input stream vs the raw stream.
   Target: >= 0.95 of raw throughput, memory flat.
3. Through real gunicorn on loopback with ``wrk`` (Debian package), guarded vs bare.
   Target: >= 0.98 of bare throughput.  Skipped when wrk is missing.

Each measurement alternates baseline and guarded rounds and reports medians,
because the machines are shared and noisy.  Run:  ``.venv/bin/python bench/bench_wsgi.py [--quick]``
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from uploadguard import UploadGuard  # noqa: E402
from uploadguard.wsgi import GuardedInput  # noqa: E402


def bare_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def _noop_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
    return lambda data: None


def _environ(method: str, body: bytes) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method, "PATH_INFO": "/upload", "SERVER_NAME": "bench", "SERVER_PORT": "80",
        "wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "wsgi.url_scheme": "http",
    }
    if body:
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
    return environ


def per_request_ns(app: Any, method: str, body: bytes, n: int) -> float:
    environs = [_environ(method, body) for _ in range(n)]
    start = time.perf_counter_ns()
    for environ in environs:
        for _ in app(environ, _noop_start_response):
            pass
    return (time.perf_counter_ns() - start) / n


def bench_overhead(rounds: int, n: int, temp_dir: str) -> None:
    with_metrics = UploadGuard(bare_app, temp_dir=temp_dir, min_free_space=0)
    default = UploadGuard(bare_app, temp_dir=temp_dir, min_free_space=0)
    every = UploadGuard(bare_app, temp_dir=temp_dir, min_free_space=0, check_interval=0)
    for guard in (default, every):  # as installed without the [metrics] extra
        guard.stats.listeners.clear()
    print("\n## 1. In-process overhead per request (median of %d rounds x %d requests)\n" % (rounds, n))
    print("| request | bare (us) | guarded (us) | added (us) | ratio |")
    print("|---|---:|---:|---:|---:|")
    form = b"a=1&b=2" * 28
    for label, guarded, method, body in (
        ("GET", default, "GET", b""),
        ("POST 200 B (default: verdict reused 0.1 s)", default, "POST", form),
        ("POST 200 B (check_interval=0: lstat+statvfs each)", every, "POST", form),
        *([("POST 200 B (default + Prometheus counters)", with_metrics, "POST", form)]
          if with_metrics.stats.listeners else []),
    ):
        bare, guard = [], []
        for _ in range(rounds):
            bare.append(per_request_ns(bare_app, method, body, n))
            guard.append(per_request_ns(guarded, method, body, n))
        b, g = statistics.median(bare) / 1000, statistics.median(guard) / 1000
        print(f"| {label} | {b:.2f} | {g:.2f} | {g - b:.2f} | {g / b:.2f}x |")


def socket_body(total: int) -> tuple[Any, int]:
    """A real socket carrying ``total`` bytes from a writer process: what a WSGI server reads from.

    A process, not a thread, so the writer does not compete for the reader's GIL.
    """
    reader, writer = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the client
        reader.close()
        block = os.urandom(1 << 20)
        left = total
        while left > 0:
            writer.sendall(block[: min(left, len(block))])
            left -= len(block)
        writer.close()
        os._exit(0)
    writer.close()
    stream = reader.makefile("rb", buffering=0)
    reader.close()  # the file object keeps the socket open
    return stream, pid


def read_all(stream: Any, chunk: int) -> int:
    total = 0
    while True:
        data = stream.read(chunk)
        if not data:
            return total
        total += len(data)


def bench_stream(rounds: int, size: int) -> None:
    print(f"\n## 2. Reading a {size >> 20} MiB body from a socket, 64 KiB reads (median of {rounds} rounds)\n")
    print("| stream | MiB/s (wall) | ratio to raw | reader CPU ms | CPU ratio | peak traced memory |")
    print("|---|---:|---:|---:|---:|---:|")
    def one(label: str, traced: bool) -> float:
        source, pid = socket_body(size)
        stream: Any = source if label == "raw" else GuardedInput(source, length=size, limit=size)
        if traced:
            tracemalloc.start()
        start, cpu = time.perf_counter(), time.process_time()
        assert read_all(stream, 65536) == size
        elapsed = time.perf_counter() - start
        cpu_times[label].append(time.process_time() - cpu)  # the reader's own CPU: what the guard adds to
        if traced:
            peaks[label] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        os.waitpid(pid, 0)
        source.close()
        return elapsed

    raw_t, guard_t = [], []
    peaks: dict[str, int] = {}
    cpu_times: dict[str, list[float]] = {"raw": [], "guarded": []}
    for i in range(rounds):  # alternate which goes first: the writer process shares the 2 cores
        order = [("raw", raw_t), ("guarded", guard_t)]
        for label, times in order if i % 2 == 0 else reversed(order):
            times.append(one(label, False))
    one("raw", True)  # memory in a separate pass: tracing slows every allocation
    one("guarded", True)
    raw, guard = statistics.median(raw_t), statistics.median(guard_t)
    mib = size / (1 << 20)
    raw_cpu, guard_cpu = statistics.median(cpu_times["raw"]), statistics.median(cpu_times["guarded"])
    print(f"| raw | {mib / raw:.0f} | 1.00 | {raw_cpu * 1000:.0f} | 1.00 | {peaks['raw'] >> 10} KiB |")
    print(f"| guarded | {mib / guard:.0f} | {raw / guard:.3f} | {guard_cpu * 1000:.0f} | "
          f"{guard_cpu / raw_cpu:.3f} | {peaks['guarded'] >> 10} KiB |")


WRK_POST = """
wrk.method = "POST"
wrk.body = string.rep("a", 200)
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
"""


def bench_gunicorn(rounds: int, seconds: int, temp_dir: str) -> None:
    print(f"\n## 3. Real gunicorn on loopback: 1 sync worker pinned to CPU 1, wrk -t1 -c4 -d{seconds}s pinned to "
          f"CPU 0 (median of {rounds} rounds, alternating)\n")
    wrk = shutil.which("wrk")
    if wrk is None:
        print("skipped: wrk not installed (apt-get install wrk)")
        return
    if len(os.sched_getaffinity(0)) < 2:
        print("skipped: needs two CPUs to keep the load generator off the server's")
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from tests.support import Gunicorn

    script = Path(temp_dir) / "post.lua"
    script.write_text(WRK_POST)
    env = {"UPLOADGUARD_TEMP_DIR": temp_dir, "UPLOADGUARD_MIN_FREE_SPACE": "0", "PYTHONPATH": str(ROOT)}
    servers = {
        label: Gunicorn(f"bench.bench_wsgi:{app}", tmp_path=Path(temp_dir), env=env, workers=1,
                        pythonpath=[ROOT], args=["--log-level", "warning"])
        for label, app in (("bare", "bare_app"), ("guarded", "guarded_app"))
    }
    for server in servers.values():  # one core each for server and client: less noise than both roaming
        for pid in [server.pid, *server.worker_pids()]:
            os.sched_setaffinity(pid, {1})
    try:
        print("| request | bare req/s | guarded req/s | ratio |")
        print("|---|---:|---:|---:|")
        for label, extra in (("GET", []), ("POST 200 B", ["-s", str(script)])):
            results: dict[str, list[float]] = {"bare": [], "guarded": []}
            for i in range(rounds):
                order = list(servers.items()) if i % 2 == 0 else list(reversed(servers.items()))
                for name, server in order:
                    out = subprocess.run(["taskset", "-c", "0", wrk, "-t1", "-c4", f"-d{seconds}s", *extra,
                                          server.url + "/upload"], capture_output=True, text=True, check=True).stdout
                    line = next(x for x in out.splitlines() if x.startswith("Requests/sec"))
                    results[name].append(float(line.split()[1]))
            b, g = statistics.median(results["bare"]), statistics.median(results["guarded"])
            print(f"| {label} | {b:.0f} | {g:.0f} | {g / b:.3f} |")
    finally:
        for server in servers.values():
            server.stop()


guarded_app = UploadGuard(bare_app, min_free_space=0)
guarded_app.stats.listeners.clear()  # as installed without the [metrics] extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    args = parser.parse_args()
    rounds = 3 if args.quick else 9
    print(f"# uploadguard middleware benchmark — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as temp_dir:
        bench_overhead(rounds, 2000 if args.quick else 20000, temp_dir)
        bench_stream(rounds, (50 if args.quick else 200) << 20)
        bench_gunicorn(3 if args.quick else 10, 2 if args.quick else 3, temp_dir)


if __name__ == "__main__":
    main()
