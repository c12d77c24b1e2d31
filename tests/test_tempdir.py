from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support import IS_ROOT, as_user, fill, traversable_dir, needs_root, tmpfs, unlinked_dir
from uploadguard.tempdir import (
    TempDirGuard,
    check_temp_dir,
    ensure_temp_dir,
    is_within,
    probe_write,
    reason_for_errno,
    use_as_tempdir,
)


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    path = tmp_path / "uploads"
    path.mkdir(mode=0o700)
    return path


class TestCheck:
    def test_healthy(self, upload_dir: Path) -> None:
        """A private, writable directory with space is ok and reports its free bytes."""
        health = check_temp_dir(upload_dir)
        assert health.ok and health.reason is None
        assert health.free_bytes and health.free_bytes > 0

    def test_missing(self, tmp_path: Path) -> None:
        """A path that does not exist is 'missing' (and check never creates it)."""
        health = check_temp_dir(tmp_path / "nope")
        assert health.reason == "missing"
        assert not (tmp_path / "nope").exists()

    def test_file(self, tmp_path: Path) -> None:
        """A regular file where the directory should be is 'not_a_directory'."""
        (tmp_path / "f").write_text("x")
        assert check_temp_dir(tmp_path / "f").reason == "not_a_directory"

    def test_symlink(self, upload_dir: Path, tmp_path: Path) -> None:
        """A symlink is refused even when it points at a good directory: it can be swapped."""
        (tmp_path / "link").symlink_to(upload_dir)
        assert check_temp_dir(tmp_path / "link").reason == "symlink"

    def test_world_writable_without_sticky_bit(self, upload_dir: Path) -> None:
        """Mode 777 lets other users replace our temp files: 'insecure_mode'."""
        upload_dir.chmod(0o777)
        assert check_temp_dir(upload_dir).reason == "insecure_mode"

    def test_world_writable_with_sticky_bit(self, upload_dir: Path) -> None:
        """Mode 1777 (like /tmp) is safe."""
        upload_dir.chmod(0o1777)
        assert check_temp_dir(upload_dir).ok

    def test_floor_and_need(self, upload_dir: Path) -> None:
        """The file system must hold the announced body plus the free-space floor."""
        free = os.statvfs(upload_dir).f_bavail * os.statvfs(upload_dir).f_frsize
        # Well past it: other processes of a shared machine free space between two statvfs calls.
        assert check_temp_dir(upload_dir, need=2 * free + 2**30).reason == "no_space"
        assert check_temp_dir(upload_dir, min_free_space=2 * free + 2**30).reason == "no_space"
        assert check_temp_dir(upload_dir, need=1024).ok

    @needs_root
    def test_unlinked(self, tmp_path: Path) -> None:
        """A deleted-but-mounted directory (st_nlink 0, as under a broken PrivateTmp) is 'unlinked'."""
        with unlinked_dir(tmp_path) as path:
            assert path.is_dir()
            assert check_temp_dir(path).reason == "unlinked"

    @needs_root
    def test_wrong_owner(self, upload_dir: Path) -> None:
        """A non-root process refuses a directory owned by another non-root user."""
        with traversable_dir() as base:
            upload_dir = base / "uploads"
            upload_dir.mkdir(mode=0o1777)
            os.chown(upload_dir, 65533, 65533)
            assert as_user(65534, lambda: check_temp_dir(upload_dir).reason) == "wrong_owner"

    @needs_root
    def test_root_may_use_a_directory_owned_by_the_app_user(self, upload_dir: Path) -> None:
        """Root (gunicorn without ``user``, as in many containers) uses an app-owned volume."""
        os.chown(upload_dir, 65534, 65534)
        assert check_temp_dir(upload_dir).ok

    @needs_root
    def test_the_owner_may_use_it(self, upload_dir: Path) -> None:
        """A worker switched to the directory's owner judges it as that user: fine."""
        with traversable_dir() as base:
            upload_dir = base / "uploads"
            upload_dir.mkdir(mode=0o700)
            os.chown(upload_dir, 65534, 65534)
            assert as_user(65534, lambda: check_temp_dir(upload_dir).reason) is None

    @needs_root
    def test_read_only(self, tmp_path: Path) -> None:
        """A directory on a read-only file system is 'read_only' (root can't write there either)."""
        with tmpfs(tmp_path / "ro", options="ro") as path:
            assert check_temp_dir(path).reason == "read_only"

    @needs_root
    def test_full(self, tmp_path: Path) -> None:
        """A full file system is 'no_space'."""
        with tmpfs(tmp_path / "full", size="1m") as path:
            fill(path)
            assert check_temp_dir(path).reason == "no_space"

    @needs_root
    def test_no_inodes(self, tmp_path: Path) -> None:
        """A file system out of inodes is 'no_inodes' even with bytes free."""
        with tmpfs(tmp_path / "inodes", size="4m", options="nr_inodes=8") as path:
            for i in range(20):
                try:
                    (path / str(i)).touch()
                except OSError:
                    break
            assert check_temp_dir(path).reason == "no_inodes"

    @needs_root
    def test_not_writable_for_another_user(self, tmp_path: Path) -> None:
        """A root-owned 755 directory is 'not_writable' for an unprivileged worker."""
        tmp_path.chmod(0o755)
        path = tmp_path / "rootonly"
        path.mkdir(mode=0o755)
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become an unprivileged worker and report
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.write(writer, str(check_temp_dir(path).reason).encode())
            finally:
                os._exit(0)
        os.close(writer)
        os.waitpid(pid, 0)
        with os.fdopen(reader) as fh:
            assert fh.read() == "not_writable"

    @pytest.mark.skipif(IS_ROOT, reason="root may write anywhere; covered as root by the test above")
    def test_not_writable_mode(self, upload_dir: Path) -> None:
        """An owner without write permission gets 'not_writable'."""
        upload_dir.chmod(0o500)
        assert check_temp_dir(upload_dir).reason == "not_writable"


class TestEnsureAndProbe:
    def test_creates_missing_with_private_mode(self, tmp_path: Path) -> None:
        """A missing directory whose parent exists is created mode 0700 and reported as healed."""
        path = tmp_path / "up"
        health = ensure_temp_dir(path)
        assert health.ok and health.healed
        assert path.stat().st_mode & 0o777 == 0o700

    def test_a_missing_parent_is_named_not_created(self, tmp_path: Path) -> None:
        """A configured path whose parent is missing (a typo) is 'missing' naming that parent; nothing is created."""
        path = tmp_path / "typo" / "up"
        health = ensure_temp_dir(path)
        assert health.reason == "missing" and not health.healed
        assert f"its parent directory {tmp_path / 'typo'} does not exist" in health.detail
        assert not (tmp_path / "typo").exists()

    def test_parents_when_asked(self, tmp_path: Path) -> None:
        """parents=True creates the missing parents too."""
        path = tmp_path / "a" / "b"
        health = ensure_temp_dir(path, parents=True)
        assert health.ok and health.healed
        assert path.stat().st_mode & 0o777 == 0o700

    @pytest.mark.parametrize("name", ["default_temp_dir", "default_resumable_storage"])
    def test_the_defaults_are_created_with_their_parents(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         name: str) -> None:
        """uploadguard's default dirs (under ~/.cache and ~/.local/share) are created whole on a fresh account."""
        from uploadguard import config

        home = tmp_path / "home"
        home.mkdir()
        for variable in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "UPLOADGUARD_TEMP_DIR"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("HOME", str(home))
        path = getattr(config, name)()
        assert str(path).startswith(str(home)) and not (home / path.relative_to(home).parts[0]).exists()
        assert ensure_temp_dir(path).healed
        assert path.is_dir()
        path.rmdir()
        guard = TempDirGuard(path)
        path.parent.rmdir()
        assert guard.preflight().healed and path.is_dir()

    def test_existing_is_not_healed(self, upload_dir: Path) -> None:
        """An existing healthy directory is ok and not counted as healed."""
        health = ensure_temp_dir(upload_dir)
        assert health.ok and not health.healed

    def test_never_raises(self, tmp_path: Path) -> None:
        """A path below a regular file cannot be created: a reason, not an exception."""
        (tmp_path / "file").write_text("x")
        health = ensure_temp_dir(tmp_path / "file" / "sub")
        assert health.reason == "not_a_directory"

    def test_probe_leaves_nothing(self, upload_dir: Path) -> None:
        """The write probe creates and removes a file, leaving the directory as it was."""
        assert probe_write(upload_dir).ok
        assert list(upload_dir.iterdir()) == []

    @needs_root
    def test_probe_sees_unlinked(self, tmp_path: Path) -> None:
        """The probe fails with 'missing' in an unlinked directory (ENOENT on create)."""
        with unlinked_dir(tmp_path) as path:
            assert probe_write(path).reason == "missing"
            assert ensure_temp_dir(path).reason == "unlinked"


class TestGuard:
    def test_preflight_heals_a_vanished_dir(self, tmp_path: Path) -> None:
        """preflight() recreates a deleted directory and says so once."""
        guard = TempDirGuard(tmp_path / "up")
        first = guard.preflight()
        assert first.ok and first.healed
        second = guard.preflight(need=10)
        assert second.ok and not second.healed

    def test_preflight_names_a_missing_parent(self, tmp_path: Path) -> None:
        """A configured dir whose parent is missing stays missing, with the parent named, on every request."""
        guard = TempDirGuard(tmp_path / "typo" / "up")
        for _ in range(2):
            health = guard.preflight()
            assert health.reason == "missing" and f"{tmp_path / 'typo'} does not exist" in health.detail
        assert not (tmp_path / "typo").exists()

    def test_first_creation_is_logged_as_created_a_vanished_dir_as_recreated(
            self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """The log says "created" for a dir that never existed and "recreated" for one that vanished."""
        guard = TempDirGuard(tmp_path / "up")
        with caplog.at_level(logging.INFO, logger="uploadguard"):
            assert guard.preflight().healed
            (tmp_path / "up").rmdir()
            assert guard.preflight().healed
        assert [r.getMessage() for r in caplog.records] == [f"created upload temp dir {tmp_path / 'up'}",
                                                            f"recreated missing upload temp dir {tmp_path / 'up'}"]

    def test_a_dir_seen_before_is_recreated_with_its_parents(self, tmp_path: Path) -> None:
        """A dir this process saw exist is no typo: when its parent was removed too (an rm -rf of the app's
        directory), the heal recreates both, instead of a 503 until somebody fixes it by hand."""
        guard = TempDirGuard(tmp_path / "app" / "up")
        (tmp_path / "app").mkdir()
        assert guard.preflight().ok
        shutil.rmtree(tmp_path / "app")
        health = guard.preflight()
        assert health.ok and health.healed and (tmp_path / "app" / "up").is_dir()

    def test_a_dir_seen_at_start_is_recreated(self, upload_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
        """A dir that existed when the guard was made, then vanished, is logged as recreated."""
        guard = TempDirGuard(upload_dir)
        upload_dir.rmdir()
        with caplog.at_level(logging.INFO, logger="uploadguard"):
            assert guard.preflight().healed
        assert [r.getMessage() for r in caplog.records] == [f"recreated missing upload temp dir {upload_dir}"]

    def test_a_dir_made_by_the_startup_hook_is_recreated(self, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
        """A dir the guard never checked, but that this process created at startup (post_worker_init's
        ensure_temp_dir) and that then vanished, is logged as recreated."""
        guard = TempDirGuard(tmp_path / "up")  # the app loads before gunicorn's post_worker_init runs
        assert ensure_temp_dir(tmp_path / "up").healed
        (tmp_path / "up").rmdir()
        with caplog.at_level(logging.INFO, logger="uploadguard"):
            assert guard.preflight().healed
        assert [r.getMessage() for r in caplog.records] == [f"recreated missing upload temp dir {tmp_path / 'up'}"]

    def test_preflight_does_not_heal_a_file(self, tmp_path: Path) -> None:
        """A file in the way is reported, not deleted: nothing already stored is lost."""
        (tmp_path / "up").write_text("precious")
        assert TempDirGuard(tmp_path / "up").preflight().reason == "not_a_directory"
        assert (tmp_path / "up").read_text() == "precious"

    def test_healthy_verdict_is_reused_within_the_interval(self, tmp_path: Path) -> None:
        """A busy worker reuses a healthy verdict while the inode is unchanged, skipping the statvfs."""
        guard = TempDirGuard(tmp_path / "up", min_free_space=1, check_interval=60)
        assert guard.preflight().ok
        guard.min_free_space = 1 << 62  # a full check would now say no_space
        assert guard.preflight(need=10).ok
        assert guard.preflight(fresh=True).reason == "no_space"  # the error path asks for a fresh check

    @pytest.mark.parametrize("change", ["delete", "replace", "chmod"])
    def test_inode_changes_are_seen_inside_the_interval(self, tmp_path: Path, change: str) -> None:
        """Deleting, replacing or chmod-ing the dir is noticed on the next request, cached verdict or not."""
        path = tmp_path / "up"
        guard = TempDirGuard(path, check_interval=60)
        assert guard.preflight().ok
        if change == "delete":
            path.rmdir()
            assert guard.preflight().healed
        elif change == "replace":
            path.rmdir()
            path.write_text("x")
            assert guard.preflight().reason == "not_a_directory"
        else:
            path.chmod(0o777)
            assert guard.preflight().reason == "insecure_mode"

    def test_reuse_stops_when_admitted_bodies_exceed_the_space(self, tmp_path: Path) -> None:
        """Bodies admitted under a cached verdict are subtracted from its free space; past it, a fresh check."""
        guard = TempDirGuard(tmp_path / "up", check_interval=60)
        free = guard.preflight().free_bytes
        assert free is not None
        guard.min_free_space = 1 << 62  # a full check would now say no_space
        assert guard.preflight(need=free // 2).ok  # fits the cached verdict
        assert guard.preflight(need=free // 2 + 2).reason == "no_space"  # does not: checked afresh

    def test_cached_answers_only_from_a_verdict_that_holds(self, tmp_path: Path) -> None:
        """cached() (the ASGI driver's on-loop path) gives the reused verdict, else None and changes nothing."""
        path = tmp_path / "up"
        guard = TempDirGuard(path, check_interval=60)
        assert guard.cached() is None  # nothing checked yet: a full check is needed
        assert guard.preflight().ok
        assert guard.cached(need=10) is not None and guard.cached(need=10).ok  # type: ignore[union-attr]
        path.rmdir()
        assert guard.cached() is None and not path.exists()  # a miss heals nothing: preflight() does

    def test_requests_at_once_never_spend_the_same_budget(self, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        """Two gthread requests admitted at the same moment, whose bodies together exceed the cached free
        space: one is admitted on the cached verdict, the other checked afresh (never both on the cache)."""
        guard = TempDirGuard(tmp_path / "up", check_interval=60)
        free = guard.preflight().free_bytes
        assert free is not None
        guard.min_free_space = 1 << 62  # a full check would now say no_space
        racers: set[threading.Thread] = set()
        both_looked = threading.Barrier(2, timeout=10)
        real_lstat = os.lstat

        def lstat_together(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            """The real lstat, once both requests reached their first: both have passed the first budget check."""
            if threading.current_thread() in racers and os.fspath(path) == guard.path:
                racers.discard(threading.current_thread())
                both_looked.wait()
            return real_lstat(path, *args, **kwargs)

        monkeypatch.setattr(os, "lstat", lstat_together)
        verdicts: list[str] = []

        def request() -> None:
            health = guard.preflight(need=free // 2 + 1)
            verdicts.append("ok" if health.ok else str(health.reason))

        threads = [threading.Thread(target=request) for _ in range(2)]
        racers.update(threads)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(verdicts) == ["no_space", "ok"]

    def test_interval_zero_checks_every_time(self, tmp_path: Path) -> None:
        """check_interval=0 sees a deletion on the very next request."""
        guard = TempDirGuard(tmp_path / "up", check_interval=0)
        guard.preflight()
        (tmp_path / "up").rmdir()
        assert guard.preflight().healed

    def test_owns(self, tmp_path: Path) -> None:
        """owns() matches the directory and paths below it, not siblings with a common prefix."""
        guard = TempDirGuard(tmp_path / "up")
        assert guard.owns(str(tmp_path / "up" / "tmpx.upload"))
        assert guard.owns(os.fsencode(tmp_path / "up"))
        assert not guard.owns(str(tmp_path / "upload"))
        assert not guard.owns(None)
        assert is_within(tmp_path / "up" / ".." / "up" / "x", str(tmp_path / "up"))


class TestErrnoAndTempfile:
    @pytest.mark.parametrize(
        ("name", "reason"),
        [("ENOENT", "missing"), ("ENOSPC", "no_space"), ("EDQUOT", "no_space"), ("EROFS", "read_only"),
         ("EACCES", "not_writable"), ("ENOTDIR", "not_a_directory"), ("ECONNRESET", None)],
    )
    def test_reason_for_errno(self, name: str, reason: str | None) -> None:
        """Temp-dir errnos map to reasons; network errnos are not temp-dir errors."""
        import errno

        assert reason_for_errno(getattr(errno, name)) == reason

    def test_use_as_tempdir(self, upload_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """use_as_tempdir() points tempfile's cache and TMPDIR at the directory."""
        monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
        monkeypatch.setenv("TMPDIR", os.environ.get("TMPDIR", ""))
        use_as_tempdir(upload_dir)
        assert tempfile.gettempdir() == str(upload_dir)
        assert os.environ["TMPDIR"] == str(upload_dir)
        with tempfile.NamedTemporaryFile() as fh:
            assert Path(fh.name).parent == upload_dir
