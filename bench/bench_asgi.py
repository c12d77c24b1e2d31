"""How much does the ASGI ``UploadGuard`` cost per request?  Guarded vs bare, side by side.

In-process, like section 1 of ``bench_wsgi.py``: one event loop drives the
bare ASGI app and the guarded one with a minimal ``receive``/``send`` pair
(no server, no socket), for a GET and a small POST.  Rounds alternate bare
and guarded; the medians of the per-request process CPU time
(``time.process_time``: what this process spent, not what the other
engineers' jobs on the shared machine took) are quoted, with one ``os.lstat``
of the temp dir beside them (the check the guard keeps per request).
Target: <= 10 us added for a small POST.  Measured 2026-12-06, 2 shared
cores at load 4-8, three runs: 10.29, 10.96, 9.65 us (lstat 2.2-2.4 us);
the code before that day's changes, A/B in one process: 14.0-18.6 us.

    .venv/bin/python bench/bench_asgi.py            # ~1 min
    .venv/bin/python bench/bench_asgi.py --quick    # smoke run
    .venv/bin/python bench/bench_asgi.py --profile  # cProfile of the guarded small POST, top 25
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from uploadguard.asgi import UploadGuard  # noqa: E402

FORM = b"a=1&b=2" * 28  # 196 bytes, as bench_wsgi.py's small POST


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers ``ok``: the least an upload endpoint does."""
    more = scope["method"] != "GET"
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _scope(method: str, body: bytes) -> dict[str, Any]:
    headers = [(b"host", b"bench"), (b"user-agent", b"bench/1"), (b"accept", b"*/*")]
    if body:
        headers += [(b"content-length", str(len(body)).encode()),
                    (b"content-type", b"application/x-www-form-urlencoded")]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": "/upload", "raw_path": b"/upload", "query_string": b"",
            "root_path": "", "headers": headers, "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000)}


async def _send(message: Any) -> None:
    pass


async def run(app: Any, method: str, body: bytes, n: int) -> float:
    """Per-request process CPU time (ns) of ``n`` requests through ``app``."""
    scopes = [_scope(method, body) for _ in range(n)]
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    start = time.process_time_ns()
    for scope in scopes:
        await app(scope, receive, _send)
    return (time.process_time_ns() - start) / n


def bench_overhead(rounds: int, n: int, temp_dir: str) -> None:
    default = UploadGuard(bare_app, temp_dir=temp_dir, min_free_space=0)
    default.stats.listeners.clear()  # as installed without the [metrics] extra
    every = UploadGuard(bare_app, temp_dir=temp_dir, min_free_space=0, check_interval=0)
    every.stats.listeners.clear()
    with_metrics = UploadGuard(bare_app, temp_dir=temp_dir, min_free_space=0)
    print(f"\n## In-process overhead per request (median of {rounds} rounds x {n} requests, process CPU time)\n")
    print("| request | bare (us) | guarded (us) | added (us) | ratio |")
    print("|---|---:|---:|---:|---:|")
    loop = asyncio.new_event_loop()
    try:
        for label, guarded, method, body in (
            ("GET", default, "GET", b""),
            ("POST 196 B (default: verdict reused 0.1 s)", default, "POST", FORM),
            ("POST 196 B (check_interval=0: full check in a thread)", every, "POST", FORM),
            *([("POST 196 B (default + Prometheus counters)", with_metrics, "POST", FORM)]
              if with_metrics.stats.listeners else []),
        ):
            bare, guard = [], []
            loop.run_until_complete(run(guarded, method, body, n // 10))  # warm up: first check, caches
            for i in range(rounds):
                order = [(bare_app, bare), (guarded, guard)]
                for app, results in order if i % 2 == 0 else reversed(order):
                    results.append(loop.run_until_complete(run(app, method, body, n)))
            b, g = statistics.median(bare) / 1000, statistics.median(guard) / 1000
            print(f"| {label} | {b:.2f} | {g:.2f} | {g - b:.2f} | {g / b:.2f}x |", flush=True)
    finally:
        loop.close()
    lstats = [lstat_ns(temp_dir, n) / 1000 for _ in range(rounds)]
    print(f"\nOne os.lstat of the temp dir (what the default check keeps per request, so a broken dir is seen "
          f"by the next one): {statistics.median(lstats):.2f} us (median of {rounds} rounds), min {min(lstats):.2f} us")


def lstat_ns(path: str, n: int) -> float:
    """Process CPU time (ns) per ``os.lstat(path)``: this machine's price of the check the guard keeps."""
    start = time.process_time_ns()
    for _ in range(n):
        os.lstat(path)
    return (time.process_time_ns() - start) / n


def profile(n: int, temp_dir: str) -> None:
    guarded = UploadGuard(bare_app, temp_dir=temp_dir, min_free_space=0)
    guarded.stats.listeners.clear()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(run(guarded, "POST", FORM, 100))
    profiler = cProfile.Profile()
    profiler.enable()
    loop.run_until_complete(run(guarded, "POST", FORM, n))
    profiler.disable()
    loop.close()
    stats = pstats.Stats(profiler)
    print(f"\n## cProfile, guarded small POST, {n} requests (calls / {n} = calls per request)\n")
    stats.sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the guarded small POST")
    args = parser.parse_args()
    print(f"# uploadguard ASGI middleware benchmark — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as temp_dir:
        if args.profile:
            profile(20000, temp_dir)
            return
        bench_overhead(3 if args.quick else 9, 2000 if args.quick else 20000, temp_dir)


if __name__ == "__main__":
    main()
