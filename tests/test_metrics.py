from __future__ import annotations

import concurrent.futures
import errno
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import webtest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import uploadguard.tempdir
from tests.support import GUNICORN_CONF, ROOT, Gunicorn, other_users_can_run_python
from uploadguard import UploadGuard, metrics

LIMIT = 1024
REJECTED_413 = ("uploadguard_error_responses_total", {"code": "413", "reason": "body_too_large"})
GUARDED = ("uploadguard_requests_guarded_total", {})


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def ok_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"stored"]


def eio_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    raise OSError(errno.EIO, "Input/output error")


@pytest.fixture
def temp_dir(tmp_path: Path) -> Path:
    path = tmp_path / "uploads"
    path.mkdir(mode=0o700)
    return path


def guarded(app: Any, temp_dir: Path) -> webtest.TestApp:
    guard = UploadGuard(app, temp_dir=temp_dir, max_body_size=LIMIT, min_free_space=0, check_interval=0)
    return webtest.TestApp(metrics.with_metrics(guard))  # UploadGuard installs the counters itself


class TestInstall:
    def test_counts_guarded_requests_and_413s(self, temp_dir: Path) -> None:
        """Every guarded request and every 413 the guard answers is counted."""
        app = guarded(ok_app, temp_dir)
        before = sample(*GUARDED), sample(*REJECTED_413)
        app.post("/upload", b"x" * (LIMIT + 1), status=413)
        app.post("/upload", b"x" * LIMIT, status=200)
        app.get("/page", status=200)  # no body: not guarded
        assert (sample(*GUARDED), sample(*REJECTED_413)) == (before[0] + 2, before[1] + 1)

    def test_503_by_reason_and_heals(self, temp_dir: Path) -> None:
        """A 503 is counted with its temp-dir reason; recreating a vanished dir counts a heal."""
        app = guarded(ok_app, temp_dir)
        labels = {"code": "503", "reason": "not_a_directory"}
        before = sample("uploadguard_error_responses_total", labels), sample("uploadguard_temp_dir_heals_total", {})
        temp_dir.rmdir()
        app.post("/upload", b"x", status=200)
        temp_dir.rmdir()
        temp_dir.write_text("in the way")
        app.post("/upload", b"x", status=503)
        after = sample("uploadguard_error_responses_total", labels), sample("uploadguard_temp_dir_heals_total", {})
        assert after == (before[0] + 1, before[1] + 1)

    def test_500_by_errno(self, temp_dir: Path) -> None:
        """An OSError unrelated to the temp dir is a 500 counted with its errno name."""
        app = guarded(eio_app, temp_dir)
        labels = {"code": "500", "reason": "EIO"}
        before = sample("uploadguard_error_responses_total", labels)
        app.post("/upload", b"x", status=500)
        assert sample("uploadguard_error_responses_total", labels) == before + 1

    def test_idempotent(self, temp_dir: Path) -> None:
        """Installing again (UploadGuard already did) subscribes once, so nothing is counted twice."""
        guard = UploadGuard(ok_app, temp_dir=temp_dir, max_body_size=LIMIT)
        metrics.install(guard)
        metrics.install(guard)
        assert guard.stats.listeners.count(metrics._record) == 1
        before = sample(*REJECTED_413)
        webtest.TestApp(guard).post("/upload", b"x" * (LIMIT + 1), status=413)
        assert sample(*REJECTED_413) == before + 1

    def test_series_exist_from_the_start(self, temp_dir: Path) -> None:
        """The 413, 400 and every 503 reason are exported at 0 before anything happens, so increase() sees the first."""
        text = guarded(ok_app, temp_dir).get("/metrics").text
        for reason in metrics.TEMP_DIR_REASONS:
            assert f'uploadguard_error_responses_total{{code="503",reason="{reason}"}}' in text
        assert 'uploadguard_error_responses_total{code="400",reason="bad_request"}' in text

    def test_reasons_are_the_tempdir_reasons(self) -> None:
        """The pre-initialised 503 reasons are exactly the reasons uploadguard.tempdir documents."""
        documented = re.findall(r"^``(\w+)``\s", uploadguard.tempdir.__doc__ or "", re.MULTILINE)
        assert sorted(metrics.TEMP_DIR_REASONS) == sorted(documented)


class TestEndpoint:
    def test_metrics_path_serves_text_format(self, temp_dir: Path) -> None:
        """GET /metrics answers Prometheus' text format; other paths reach the application."""
        app = guarded(ok_app, temp_dir)
        response = app.get("/metrics")
        assert response.content_type == "text/plain"
        names = {family.name for family in text_string_to_metric_families(response.text)}
        assert {"uploadguard_requests_guarded", "uploadguard_error_responses", "uploadguard_temp_dir_heals"} <= names
        assert app.get("/metricsx").text == "stored"

    def test_path_must_be_absolute(self) -> None:
        """A mount path without a leading slash could never match PATH_INFO: ValueError."""
        with pytest.raises(ValueError, match="must start with '/'"):
            metrics.with_metrics(ok_app, path="metrics")


NO_PROMETHEUS = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, format="%(message)s")
from uploadguard import UploadGuard, metrics
from uploadguard.wsgi import Event
guard = UploadGuard(lambda e, s: [], temp_dir=sys.argv[1])
metrics.install(guard)
assert guard.stats.listeners == [], guard.stats.listeners
guard.stats.record(Event.REJECTED)
try:
    metrics.with_metrics(guard)
except ImportError as exc:
    print(exc)
"""


class TestWithoutPrometheusClient:
    def test_install_is_a_no_op(self, tmp_path: Path) -> None:
        """Without prometheus_client, install() is a logged no-op and mounting the endpoint names the extra."""
        venv = tmp_path / "bare"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", NO_PROMETHEUS, str(tmp_path)],
                              capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        assert "prometheus_client is not installed; no metrics" in proc.stderr
        assert proc.stdout == "uploadguard.metrics needs prometheus_client: pip install 'uploadguard[metrics]'\n"


# -- under gunicorn with several workers ------------------------------------------------------

APP = """
import os
from uploadguard import UploadGuard, metrics
from wsgi_apps import spool

_guard = UploadGuard(spool)
_app = metrics.with_metrics(_guard)


def application(environ, start_response):
    def start(status, headers, exc_info=None):
        return start_response(status, headers + [("X-Worker-Pid", str(os.getpid()))], exc_info)
    return _app(environ, start)
"""


MULTIPROC_WARNING = "PROMETHEUS_MULTIPROC_DIR is not set: each of the 2 gunicorn workers counts its own"


def post_too_large(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/upload", body=b"x" * (LIMIT + 1))
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("X-Worker-Pid") or ""
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def rejected(values: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return values[(REJECTED_413[0], tuple(sorted(REJECTED_413[1].items())))]


def send_until_both_workers_answered(server: Gunicorn) -> int:
    """Send 413-worthy uploads, 8 at a time, until both workers answered some; returns how many."""
    pids: set[str] = set()
    sent = 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while len(pids) < 2 and sent < 400:
            for status, pid in pool.map(post_too_large, [server.port] * 8):
                assert status == 413
                pids.add(pid)
            sent += 8
    assert len(pids) == 2, "one worker served every request"
    return sent


@pytest.mark.slow
class TestMultiprocess:
    def serve(self, tmp_path: Path, multiproc: Path | None, *args: str) -> Gunicorn:
        (tmp_path / "metrics_app.py").write_text(APP)
        env = {"UPLOADGUARD_TEMP_DIR": str(tmp_path / "uploads"), "UPLOADGUARD_MAX_BODY_SIZE": str(LIMIT),
               "UPLOADGUARD_MIN_FREE_SPACE": "0"}
        if multiproc is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
        return Gunicorn("metrics_app:application", tmp_path=tmp_path, config=GUNICORN_CONF, workers=2,
                        pythonpath=[tmp_path], env=env, args=list(args))

    @pytest.mark.parametrize("preload", [pytest.param((), id="loaded-in-workers"),
                                         pytest.param(("--preload",), id="preloaded")])
    def test_scrape_sums_all_workers(self, tmp_path: Path, preload: tuple[str, ...]) -> None:
        """Every scrape, whichever worker answers it, shows the 413s of both workers -- and of recycled ones."""
        multiproc = tmp_path / "metrics"
        server = self.serve(tmp_path, multiproc, *preload)
        try:
            sent = send_until_both_workers_answered(server)
            for _ in range(6):
                assert rejected(scrape(server.port)) == sent
            victim = server.worker_pids()[0]
            os.kill(victim, signal.SIGTERM)  # gunicorn replaces it; child_exit runs in the master
            deadline = time.monotonic() + 20
            while (victim in server.worker_pids() or len(server.worker_pids()) < 2) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert victim not in server.worker_pids()
            assert rejected(scrape(server.port)) == sent
            assert [status for status, _ in map(post_too_large, [server.port] * 4)] == [413] * 4
            assert rejected(scrape(server.port)) == sent + 4
        finally:
            server.stop()
        log = server.log_path.read_text()
        assert "Traceback" not in log, log

    def test_a_new_run_starts_from_zero(self, tmp_path: Path) -> None:
        """on_starting removes the previous run's files, so counters restart at 0 with the server."""
        multiproc = tmp_path / "metrics"
        first = self.serve(tmp_path, multiproc)
        try:
            assert [post_too_large(first.port)[0] for _ in range(3)] == [413] * 3
            assert rejected(scrape(first.port)) == 3
        finally:
            first.stop()
        assert list(multiproc.glob("*.db"))
        second = self.serve(tmp_path, multiproc)
        try:
            assert rejected(scrape(second.port)) == 0
        finally:
            second.stop()

    def test_only_prometheus_files_are_removed(self, tmp_path: Path) -> None:
        """A new run removes prometheus_client's stale files from the directory, never a user's users.db."""
        multiproc = tmp_path / "metrics"
        multiproc.mkdir()
        theirs = {name: multiproc / name for name in ("users.db", "counter.db", "notes.txt", "counter_12.db.bak")}
        for path in theirs.values():
            path.write_bytes(b"keep me")
        stale = [multiproc / name for name in ("counter_999999.db", "gauge_livesum_999999.db", "histogram_1.db")]
        for path in stale:
            path.write_bytes(b"")
        server = self.serve(tmp_path, multiproc)
        server.stop()
        assert all(path.read_bytes() == b"keep me" for path in theirs.values())
        assert not any(path.exists() for path in stale)

    def test_quiet_when_the_app_serves_no_metrics(self, tmp_path: Path) -> None:
        """With prometheus_client installed but no metrics endpoint, several workers start without the warning."""
        server = Gunicorn("wsgi_apps:guarded", tmp_path=tmp_path, config=GUNICORN_CONF, workers=2,
                          env={"UPLOADGUARD_TEMP_DIR": str(tmp_path / "uploads")})
        try:
            assert post_too_large(server.port)[0] == 200  # under the default limit: stored, counted
        finally:
            server.stop()
        assert MULTIPROC_WARNING not in server.log_path.read_text()

    def test_warns_without_multiproc_dir(self, tmp_path: Path) -> None:
        """Several workers serving metrics without PROMETHEUS_MULTIPROC_DIR would each count alone: they are warned."""
        server = self.serve(tmp_path, None)
        try:
            assert post_too_large(server.port)[0] == 413
        finally:
            server.stop()
        assert MULTIPROC_WARNING in server.log_path.read_text()


NOBODY = 65534  # the uid and gid gunicorn switches its workers to below


@pytest.mark.slow
class TestRootMasterSwitchingUser:
    @pytest.fixture
    def base(self, tmp_path: Path) -> Iterator[Path]:
        """A directory the workers' user can enter (tmp_path's parents are root's only), removed afterwards."""
        if os.geteuid() != 0 or not os.path.isdir("/dev/shm"):
            pytest.skip("needs root (gunicorn --user) and /dev/shm")
        path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="uploadguard-test-"))
        path.chmod(0o755)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @pytest.mark.parametrize("preload", [pytest.param((), id="loaded-in-workers"),
                                         pytest.param(("--preload",), id="preloaded")])
    def test_workers_of_another_user_can_count(self, tmp_path: Path, base: Path, preload: tuple[str, ...]) -> None:
        """A root master creates the metrics dir for workers running as another user; a scrape sums both workers."""
        (base / "metrics_app.py").write_text(APP)
        uploads = base / "uploads"
        uploads.mkdir(mode=0o700)
        os.chown(uploads, NOBODY, NOBODY)
        multiproc = base / "metrics"  # does not exist yet: the master creates it, as root
        server = Gunicorn("metrics_app:application", tmp_path=tmp_path, config=GUNICORN_CONF, workers=2,
                          pythonpath=[base], prefix=other_users_can_run_python(tmp_path / "stash"),
                          args=["--user", str(NOBODY), "--group", str(NOBODY), *preload],
                          env={"UPLOADGUARD_TEMP_DIR": str(uploads), "UPLOADGUARD_MAX_BODY_SIZE": str(LIMIT),
                               "UPLOADGUARD_MIN_FREE_SPACE": "0", "PROMETHEUS_MULTIPROC_DIR": str(multiproc)})
        try:
            assert {os.stat(f"/proc/{pid}").st_uid for pid in server.worker_pids()} == {NOBODY}
            sent = send_until_both_workers_answered(server)
            for _ in range(4):
                assert rejected(scrape(server.port)) == sent
        finally:
            server.stop()
        assert (multiproc.stat().st_uid, multiproc.stat().st_gid) == (NOBODY, NOBODY)
        log = server.log_path.read_text()
        assert "Traceback" not in log and "cannot create the Prometheus metrics" not in log, log
