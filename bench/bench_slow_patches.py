"""Slow resumable PATCHes against a sync gunicorn pool: does the rest of the site keep answering?

The shape the issue measured: ``gunicorn -c gunicorn_conf.py`` with sync workers serving
``ResumableUploads(site)`` (tests/resumable_apps.py), N clients each streaming a PATCH at a few
KiB/s, and a prober asking ``GET /`` every 100 ms.  Two configurations in the same run, rounds
alternated: ``UPLOADGUARD_RESUMABLE_MAX_STREAMS=0`` (no cap: what the endpoint did before) and
the default ``auto`` (sync workers - 1).  Printed: GET latency (median, p99, max; a GET that
took longer than the probe's 10 s timeout counts as 10 s), how many PATCHes were refused 503 and
how many bytes the slow clients got stored.

    .venv/bin/python bench/bench_slow_patches.py              # 3 workers, 6 clients at 2 KiB/s, 15 s
    .venv/bin/python bench/bench_slow_patches.py --workers 5 --clients 20 --seconds 20

Only loopback; every client and the prober stop after ``--seconds``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import GUNICORN_CONF, Gunicorn  # noqa: E402

TUS = {"Tus-Resumable": "1.0.0"}
PROBE_TIMEOUT = 10.0  # seconds


def slow_client(port: int, rate: int, until: float, outcome: dict[str, int]) -> None:
    """Create a 1 MiB upload and PATCH it at ``rate`` bytes/s until ``until``; note what happened."""
    try:
        created = requests.post(f"http://127.0.0.1:{port}/files/", headers={**TUS, "Upload-Length": str(1 << 20)},
                                timeout=PROBE_TIMEOUT)
    except requests.RequestException:
        outcome["create_failed"] = outcome.get("create_failed", 0) + 1
        return
    path = created.headers.get("Location", "")
    if created.status_code != 201:
        outcome[f"create_{created.status_code}"] = outcome.get(f"create_{created.status_code}", 0) + 1
        return
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as sock:
        sock.sendall((f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
                      f"Content-Type: application/offset+octet-stream\r\nContent-Length: {1 << 20}\r\n\r\n").encode())
        tick = rate // 10
        sock.settimeout(0.1)
        answer = b""
        while time.monotonic() < until:
            try:
                sock.sendall(bytes(tick))
            except OSError:
                break
            try:
                answer = sock.recv(4096)
                if answer:
                    break
            except TimeoutError:
                pass
            except OSError:
                break
    key = "refused_503" if answer.startswith(b"HTTP/1.1 503") else "streamed"
    outcome[key] = outcome.get(key, 0) + 1


def probe(port: int, until: float, latencies: list[float]) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=PROBE_TIMEOUT)
            latencies.append(time.monotonic() - started)
        except requests.RequestException:
            latencies.append(PROBE_TIMEOUT)
        time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))


def run(max_streams: str, workers: int, clients: int, rate: int, seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "tmp").mkdir()
        server = Gunicorn("resumable_apps:application", tmp_path=tmp_path, config=GUNICORN_CONF, workers=workers,
                          env={"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"),
                               "RESUMABLE_TEST_STORAGE": str(tmp_path / "uploads"),
                               "UPLOADGUARD_RESUMABLE_MAX_STREAMS": max_streams})
        try:
            until = time.monotonic() + seconds
            outcome: dict[str, int] = {}
            latencies: list[float] = []
            threads = [threading.Thread(target=slow_client, args=(server.port, rate, until, outcome))
                       for _ in range(clients)]
            for thread in threads:
                thread.start()
                time.sleep(0.05)
            time.sleep(1.0)  # the clients are streaming; now ask for the site
            probe(server.port, until, latencies)
            for thread in threads:
                thread.join(timeout=PROBE_TIMEOUT + 5)
            stored = sum(path.stat().st_size for path in (tmp_path / "uploads").glob("*.bin"))
        finally:
            server.stop()
    latencies.sort()
    return {"gets": len(latencies), "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "max": latencies[-1],
            "over_1s": sum(1 for value in latencies if value > 1), "stored_kib": stored // 1024, **outcome}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rate", type=int, default=2048, help="bytes per second per client")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.pop("WEB_CONCURRENCY", None)
    print(f"{args.workers} sync workers, {args.clients} PATCHes at {args.rate} B/s, GET / every 100 ms "
          f"for {args.seconds:g} s; {args.rounds} rounds alternated")
    print(f"{'max_streams':>12} {'GETs':>5} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'>1 s':>5} "
          f"{'streamed':>8} {'503':>4} {'stored KiB':>10}")
    for _ in range(args.rounds):
        for setting in ("0", "auto"):
            row = run(setting, args.workers, args.clients, args.rate, args.seconds)
            print(f"{setting:>12} {row['gets']:>5} {row['p50']:>7.3f} {row['p99']:>7.3f} {row['max']:>7.3f} "
                  f"{row['over_1s']:>5} {row.get('streamed', 0):>8} {row.get('refused_503', 0):>4} "
                  f"{row['stored_kib']:>10}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
