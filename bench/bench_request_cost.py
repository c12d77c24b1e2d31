"""What one request costs a ``gunicorn -c gunicorn_conf.py -k asgi`` worker, in CPU, side by side.

The capacity bench's arrival burst is ~2,000 requests in 2 s on 2 cores, so the
CPU a worker spends per request decides whether the site keeps answering then.
One worker each (recycling off), requests sent one at a time on fresh
connections from this process, the worker's CPU seconds read from ``/proc``:

* ``bare GET``     -- the capacity bench's site alone: gunicorn's own floor;
* ``guarded GET``  -- the same through ``UploadGuard(ResumableUploads(site))``;
* ``creation``     -- ``POST /files/`` through it (a new upload on local storage);
* ``HEAD``         -- asking an upload's offset.

Rounds alternate and the medians are printed, with each against the bare GET.
Run::

    .venv/bin/python bench/bench_request_cost.py [--requests 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import GUNICORN_CONF, Gunicorn, raw_http  # noqa: E402

GET = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
CREATE = (b"POST /files/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTus-Resumable: 1.0.0\r\n"
          b"Upload-Length: 1048576\r\nContent-Length: 0\r\n\r\n")
KINDS = {"bare GET": ("bare", GET), "guarded GET": ("guarded", GET), "creation": ("guarded", CREATE),
         "HEAD": ("guarded", None)}


def _exchange(port: int, raw: bytes) -> bytes:
    return raw_http(port, raw, timeout=30)[0]  # Connection: close -- read to the server's close


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, requests: int) -> float:
    """Milliseconds of the worker's CPU per request of ``kind``."""
    app, raw = KINDS[kind]
    with tempfile.TemporaryDirectory(prefix="request-cost-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "tmp").mkdir()
        server = Gunicorn(f"bench.bench_capacity:{'asgi_app' if app == 'guarded' else '_asgi_site'}",
                          tmp_path=tmp_path, config=GUNICORN_CONF, pythonpath=[ROOT], args=["-k", "asgi"],
                          env={"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"), "UPLOADGUARD_MIN_FREE_SPACE": "0",
                               "CAPACITY_STORAGE": str(tmp_path / "uploads"), "CAPACITY_HOOK_LOG": os.devnull,
                               "GUNICORN_MAX_REQUESTS": "0", "PYTHONPATH": str(ROOT)})
        try:
            if raw is None:  # HEAD of an upload made first
                head = _exchange(server.port, CREATE).split(b"\r\n\r\n", 1)[0]
                location = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                                if line.lower().startswith(b"location:"))
                path = b"/files/" + location.rsplit(b"/", 1)[1]
                raw = b"HEAD " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTus-Resumable: 1.0.0\r\n\r\n"
            for _ in range(50):  # warm: imports, the pool's threads
                _exchange(server.port, raw)
            (worker,) = server.worker_pids()
            before = _cpu_seconds(worker)
            for _ in range(requests):
                status = _exchange(server.port, raw)[9:12]
                if not status.startswith(b"2"):
                    raise SystemExit(f"{kind}: answered {status.decode()}")
            return (_cpu_seconds(worker) - before) / requests * 1e3
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            results[kind].append(measure(kind, args.requests))
    print(f"gunicorn -k asgi, 1 worker, {args.requests} sequential requests per kind on fresh connections, "
          f"medians of {args.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f}\n")
    print("| request | worker CPU ms / request | all rounds | vs bare GET |")
    print("|---|---:|---|---:|")
    floor = statistics.median(results["bare GET"])
    for kind, values in results.items():
        median = statistics.median(values)
        print(f"| {kind} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {median / floor:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
