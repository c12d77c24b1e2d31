"""A service user without a home: the default upload temp dir needs none, and no command shows a traceback.

Each test runs a real process under a uid that has no passwd entry, with
``HOME`` and ``XDG_*`` unset (``setpriv``), as a ``DynamicUser=`` service or
a bare ``docker run --user`` would.  That process has a private mount
namespace (``unshare``): where the interpreter lives below a directory other
users cannot enter (``/root/.pyenv``), a tmpfs makes just that path
reachable; ``no_shm`` covers ``/dev/shm`` with a tmpfs the uid cannot write,
for the case where no default works at all.  Nothing outside the namespace
changes.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support import ROOT, TESTS, free_port, needs_root, other_users_can_run_python, wait_for_port
from uploadguard.config import default_temp_dir

pytestmark = needs_root


def homeless_uid() -> int:
    """A uid with no passwd entry."""
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def as_homeless(uid: int, argv: Sequence[str], stash: Path, *, no_shm: bool = False) -> list[str]:
    """``argv`` run as ``uid`` without HOME, in a private mount namespace (see the module docs)."""
    setup = ["mount -t tmpfs -o mode=755 tmpfs /dev/shm"] if no_shm else []
    return [*other_users_can_run_python(stash, setup=setup, run_as=uid), *argv]


def homeless_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items()
            if name not in ("HOME", "TMPDIR") and not name.startswith(("XDG_", "UPLOADGUARD_", "PYTEST_"))}


@pytest.fixture
def uid() -> Iterator[int]:
    """A uid without a passwd entry; its fallback dir in /dev/shm is removed afterwards."""
    uid = homeless_uid()
    shm = Path(f"/dev/shm/uploadguard-{uid}")
    shutil.rmtree(shm, ignore_errors=True)
    yield uid
    shutil.rmtree(shm, ignore_errors=True)


def run(uid: int, code: Sequence[str], tmp_path: Path, *, no_shm: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(as_homeless(uid, [sys.executable, *code], tmp_path / "stash", no_shm=no_shm),
                          cwd=ROOT, env=homeless_env(), capture_output=True, text=True, timeout=60)


class TestWithoutHome:
    def test_the_process_really_has_no_home(self, uid: int, tmp_path: Path) -> None:
        """The set-up reproduces the failure: pathlib cannot find a home for this uid."""
        proc = run(uid, ["-c", "import os, pathlib; print(os.getuid()); pathlib.Path.home()"], tmp_path)
        assert proc.stdout == f"{uid}\n"
        assert "Could not determine home directory" in proc.stderr

    def test_default_temp_dir_is_per_uid_in_dev_shm(self, uid: int, tmp_path: Path) -> None:
        """UploadGuard() works and spools to /dev/shm/uploadguard-<uid>/tmp: per uid, outside /tmp."""
        proc = run(uid, ["-c", "from uploadguard import UploadGuard; print(UploadGuard(None).settings.temp_dir)"],
                   tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"/dev/shm/uploadguard-{uid}/tmp\n"

    def test_doctor_checks_the_default(self, uid: int, tmp_path: Path) -> None:
        """uploadguard doctor runs without a traceback and checks the per-uid default."""
        proc = run(uid, ["-m", "uploadguard", "doctor", "--json"], tmp_path)
        assert "Traceback" not in proc.stderr, proc.stderr
        report = json.loads(proc.stdout)
        assert report["temp_dir"] == f"/dev/shm/uploadguard-{uid}/tmp"
        assert report["checks"][0]["status"] == "ok"  # the settings

    def test_gunicorn_serves_uploads(self, uid: int, tmp_path: Path) -> None:
        """gunicorn with uploadguard's config starts, and its worker creates the default dir and spools there."""
        port = free_port()
        log = tmp_path / "gunicorn.log"
        argv = ["-m", "gunicorn", "-c", "python:uploadguard.gunicorn", "--bind", f"127.0.0.1:{port}",
                "--workers", "1", "--no-control-socket", "--pythonpath", str(TESTS), "wsgi_apps:guarded"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(as_homeless(uid, [sys.executable, *argv], tmp_path / "stash"), cwd=ROOT,
                                    env=homeless_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(port, proc=proc)
            status, body = 0, b""
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            try:
                conn.request("POST", "/upload", body=b"x" * 1000)
                response = conn.getresponse()
                status, body = response.status, response.read()
            finally:
                conn.close()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        text = log.read_text(errors="replace")
        assert status == 200 and json.loads(body)["size"] == 1000, text
        assert "Traceback" not in text, text
        created = Path(f"/dev/shm/uploadguard-{uid}/tmp")
        assert created.is_dir() and created.stat().st_uid == uid

    def test_nothing_works_is_one_clear_line(self, uid: int, tmp_path: Path) -> None:
        """Without a home and a writable /dev/shm, doctor exits 2 with one line asking for UPLOADGUARD_TEMP_DIR."""
        proc = run(uid, ["-m", "uploadguard", "doctor"], tmp_path, no_shm=True)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr == (f"uploadguard: error: UPLOADGUARD_TEMP_DIR is not set and there is no default for uid "
                               f"{uid}: no XDG_CACHE_HOME, no home directory ('~') and no writable /dev/shm; "
                               "set UPLOADGUARD_TEMP_DIR to a directory for upload temp files\n")

    def test_nothing_works_stops_gunicorn_with_one_line(self, uid: int, tmp_path: Path) -> None:
        """gunicorn loads the config, then on_starting stops it with the same one line, no traceback."""
        argv = ["-m", "gunicorn", "-c", "python:uploadguard.gunicorn", "--bind", f"127.0.0.1:{free_port()}",
                "--no-control-socket", "--pythonpath", str(TESTS), "wsgi_apps:spool"]
        proc = run(uid, argv, tmp_path, no_shm=True)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "uploadguard: UPLOADGUARD_TEMP_DIR is not set and there is no default" in proc.stderr

    def test_explicit_temp_dir_needs_no_default(self, uid: int, tmp_path: Path) -> None:
        """With UPLOADGUARD_TEMP_DIR set, nothing looks for a home: doctor runs even without /dev/shm."""
        env = {**homeless_env(), "UPLOADGUARD_TEMP_DIR": "/nonexistent-uploadguard/tmp"}
        proc = subprocess.run(as_homeless(uid, [sys.executable, "-m", "uploadguard", "doctor", "--json"],
                                          tmp_path / "stash", no_shm=True),
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert json.loads(proc.stdout)["temp_dir"] == "/nonexistent-uploadguard/tmp"


class TestDefaultOrder:
    def test_xdg_cache_home_first(self, tmp_path: Path) -> None:
        """$XDG_CACHE_HOME wins over the home directory."""
        assert default_temp_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "uploadguard" / "tmp"

    def test_home_that_exists(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """An existing home directory holds the default in its .cache."""
        monkeypatch.setenv("HOME", str(tmp_path))
        assert default_temp_dir({}) == tmp_path / ".cache" / "uploadguard" / "tmp"

    def test_home_that_does_not_exist(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A home that does not exist (nobody's /nonexistent) is skipped for the per-uid dir in /dev/shm."""
        monkeypatch.setenv("HOME", "/nonexistent-uploadguard-home")
        assert default_temp_dir({}) == Path(f"/dev/shm/uploadguard-{os.geteuid()}/tmp")
