"""Chaos soak: the demo under real gunicorn while its upload temp dir keeps vanishing.

Three gunicorn workers (the project's ``gunicorn_conf.py``) serve the Django
demo; four clients upload 100 files of 1-6 MB of random bytes (stored as-is by
the demo) while another thread deletes the temp dir every 20 ms.  The clients
do what ``upload.js`` does: resend after a 503's ``Retry-After`` (1 s here), at
most five times, with the default settings (a healthy verdict reused for
0.1 s while the directory's inode is unchanged).  Run alone with
``pytest -m soak -s`` to see the first-try success rate.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.support import GUNICORN_CONF, ROOT, Gunicorn

requests = pytest.importorskip("requests")
pytest.importorskip("django")

pytestmark = [pytest.mark.slow, pytest.mark.soak]

DEMO = ROOT / "examples" / "django_demo"
MiB = 1024 * 1024
UPLOADS = 100
CLIENTS = 4
RETRIES = 5
CHAOS_INTERVAL = 0.02  # seconds between deletions of the temp dir
DEADLINE = 150.0  # seconds for all uploads; the test must end well within 3 minutes


@dataclasses.dataclass
class Tally:
    """What the clients saw, shared between their threads (appends and Counter updates under a lock)."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    statuses: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    attempts: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)  # per stored upload
    dropped: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    no_retry_after: int = 0
    stored: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # sent sha256, answered, name
    gave_up: list[str] = dataclasses.field(default_factory=list)


def upload_all(url: str, jobs: list[tuple[int, int]], tally: Tally, deadline: float) -> None:
    """Upload each (seed, size) job, retrying on 503 as a browser with upload.js would."""
    with requests.Session() as session:
        session.get(url + "/", timeout=30).close()
        headers = {"X-CSRFToken": session.cookies["csrftoken"], "Accept": "application/json"}
        for seed, size in jobs:
            data = random.Random(seed).randbytes(size)
            sent = hashlib.sha256(data).hexdigest()
            for attempt in range(1, RETRIES + 2):
                if time.monotonic() > deadline:
                    return
                try:
                    response = session.post(url + "/upload/", headers=headers, timeout=60,
                                            files={"file": (f"blob-{seed}.bin", data, "application/octet-stream")})
                except requests.RequestException as exc:
                    with tally.lock:
                        tally.dropped.append(f"upload {seed} attempt {attempt}: {exc!r}")
                    break
                with tally.lock:
                    tally.statuses[response.status_code] += 1
                if response.status_code == 200:
                    [stored] = response.json()["stored"]
                    with tally.lock:
                        tally.attempts[attempt] += 1
                        tally.stored.append((sent, stored["sha256"], stored["name"]))
                    break
                if response.status_code != 503:
                    with tally.lock:
                        tally.unexpected.append(f"upload {seed}: {response.status_code} {response.text[:200]}")
                    break
                retry_after = response.headers.get("Retry-After")
                if retry_after is None:
                    with tally.lock:
                        tally.no_retry_after += 1
                time.sleep(min(float(retry_after or 1), 1.0))
            else:
                with tally.lock:
                    tally.gave_up.append(f"upload {seed}: still 503 after {RETRIES} retries")


class TestChaosSoak:
    def test_uploads_survive_a_vanishing_temp_dir(self, tmp_path: Path) -> None:
        """Every upload ends stored with the right sha256; the server answers only 200 or 503 + Retry-After and never drops a connection."""
        temp_dir, storage = tmp_path / "tmp", tmp_path / "uploads"
        server = Gunicorn(
            "demo.wsgi:application", tmp_path=tmp_path, config=GUNICORN_CONF, pythonpath=[DEMO], workers=3,
            env={"DJANGO_SETTINGS_MODULE": "demo.settings", "UPLOADGUARD_TEMP_DIR": str(temp_dir),
                 "DEMO_STORAGE_DIR": str(storage), "UPLOADGUARD_RETRY_AFTER": "1"},
        )
        rng = random.Random(4)
        jobs = [(seed, rng.randint(1 * MiB, 6 * MiB)) for seed in range(UPLOADS)]
        tally = Tally()
        stop = threading.Event()
        deletions = 0

        def chaos() -> None:
            nonlocal deletions
            while not stop.wait(CHAOS_INTERVAL):
                shutil.rmtree(temp_dir, ignore_errors=True)
                deletions += 1

        deadline = time.monotonic() + DEADLINE
        clients = [threading.Thread(target=upload_all, args=(server.url, jobs[i::CLIENTS], tally, deadline))
                   for i in range(CLIENTS)]
        vandal = threading.Thread(target=chaos)
        started = time.monotonic()
        try:
            vandal.start()
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join(timeout=max(1.0, deadline + 30 - time.monotonic()))
        finally:
            stop.set()
            vandal.join()
            server.stop()
        elapsed = time.monotonic() - started
        log = server.log_path.read_text(errors="replace")

        rate = tally.attempts[1] / UPLOADS
        summary = (f"{len(tally.stored)}/{UPLOADS} stored in {elapsed:.1f}s; first-try success rate {rate:.0%}; "
                   f"attempts needed {dict(sorted(tally.attempts.items()))}; statuses {dict(tally.statuses)}; "
                   f"temp dir deleted {deletions} times")
        print(f"\nchaos soak: {summary}")
        assert not any(thread.is_alive() for thread in clients), f"clients still running: {summary}"
        assert tally.dropped == [], summary
        assert tally.unexpected == [], summary
        assert set(tally.statuses) <= {200, 503}, summary
        assert tally.no_retry_after == 0, f"503s without Retry-After: {summary}"
        assert tally.gave_up == [], summary
        assert len(tally.stored) == UPLOADS, summary
        for sent, answered, name in tally.stored:
            on_disk = hashlib.sha256((storage / name).read_bytes()).hexdigest()
            assert sent == answered == on_disk, f"{name}: sent {sent}, answered {answered}, on disk {on_disk}"
        assert "recreated missing upload temp dir" in log, f"the chaos never bit: {summary}"
        assert "Error handling request" not in log, log[-3000:]  # gunicorn's words for a dropped connection
