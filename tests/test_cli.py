from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import IS_ROOT, ROOT, fill, needs_root, tmpfs, unlinked_dir
from uploadguard.cli import main
from uploadguard.operations import clean_old_files, disk_usage, mount_of

DAY = 86400


def age(path: Path, seconds: float) -> None:
    """Set ``path``'s atime and mtime (of a link itself, not its target) to ``seconds`` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def write(path: Path, size: int = 10, *, old: float = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    if old:
        age(path, old)
    return path


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    path = tmp_path / "uploads"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A private directory outside /tmp and /var/tmp (on /dev/shm), as a production temp dir would be."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("needs /dev/shm for a directory outside /tmp")
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="uploadguard-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No UPLOADGUARD_* or TMPDIR from the outside; tempfile re-reads its directory."""
    for name in list(os.environ):
        if name.startswith("UPLOADGUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)
    return monkeypatch


class TestClean:
    def test_removes_old_files_keeps_fresh_ones(self, uploads: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Files older than the age are removed anywhere below DIR; fresh ones and DIR stay; one line says it."""
        write(uploads / "old.upload", 1000, old=2 * DAY)
        write(uploads / "a" / "b" / "old.upload", 24, old=2 * DAY)
        fresh = write(uploads / "fresh.upload", 5)
        nearly = write(uploads / "a" / "nearly.upload", 5, old=23 * 3600)
        age(uploads, 2 * DAY)

        assert main(["clean", str(uploads), "--older-than", "24h"]) == 0

        assert sorted(p.name for p in uploads.rglob("*") if p.is_file()) == ["fresh.upload", "nearly.upload"]
        assert fresh.exists() and nearly.exists() and uploads.is_dir()
        out = capsys.readouterr().out
        assert out == f"uploadguard clean: removed 2 files (1.0K) older than 24h from {uploads}\n"

    def test_dry_run_removes_nothing(self, uploads: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--dry-run counts what would go, including directories that would end up empty, and keeps it all."""
        old = write(uploads / "sub" / "old.upload", 2048, old=2 * DAY)
        age(uploads / "sub", 2 * DAY)

        assert main(["clean", str(uploads), "--older-than", "1d", "--dry-run"]) == 0

        assert old.exists()
        assert capsys.readouterr().out == (
            f"uploadguard clean: would remove 1 file (2.0K) and 1 empty directory older than 1d from {uploads}\n")

    def test_json(self, uploads: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints one object with the counts, for machines."""
        write(uploads / "old", 7, old=3600)
        assert main(["clean", str(uploads), "--older-than", "30m", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {
            "path": str(uploads), "files": 1, "directories": 0, "bytes": 7, "errors": [],
            "older_than": 1800.0, "dry_run": False, "resumable": None,  # a DIR named: only it is cleaned
        }

    def test_old_empty_subdirectories_go_dir_stays(self, uploads: Path) -> None:
        """An old subdirectory left empty is removed; a fresh one, a non-empty one and DIR itself stay."""
        write(uploads / "old-dir" / "deep" / "f", old=2 * DAY)
        age(uploads / "old-dir" / "deep", 2 * DAY)
        age(uploads / "old-dir", 2 * DAY)
        (uploads / "fresh-dir").mkdir()
        write(uploads / "busy-dir" / "fresh")
        age(uploads / "busy-dir", 2 * DAY)
        age(uploads, 2 * DAY)

        result = clean_old_files(uploads, older_than=DAY)

        assert sorted(p.name for p in uploads.iterdir()) == ["busy-dir", "fresh-dir"]
        assert (result.files, result.directories) == (1, 2)

    def test_age_is_the_last_write_not_the_last_read(self, uploads: Path) -> None:
        """A file still being written (fresh mtime) stays however long ago it was read (old atime); an old
        write goes even when the file was just read."""
        now = time.time()
        writing = write(uploads / "writing")
        os.utime(writing, (now - 2 * DAY, now))
        read = write(uploads / "read")
        os.utime(read, (now, now - 2 * DAY))

        result = clean_old_files(uploads, older_than=DAY)

        assert [p.name for p in uploads.iterdir()] == ["writing"]
        assert result.files == 1

    def test_links_removed_never_followed(self, uploads: Path, tmp_path: Path) -> None:
        """An old symlink is removed itself; its target (a file or a directory outside DIR) is never touched."""
        outside = write(tmp_path / "outside" / "precious", old=2 * DAY)
        age(outside.parent, 2 * DAY)
        (uploads / "to-file").symlink_to(outside)
        (uploads / "to-dir").symlink_to(outside.parent)
        fresh_link = uploads / "fresh-link"
        fresh_link.symlink_to(outside)
        age(uploads / "to-file", 2 * DAY)
        age(uploads / "to-dir", 2 * DAY)

        result = clean_old_files(uploads, older_than=DAY)

        assert outside.exists() and outside.parent.is_dir()
        assert [p.name for p in uploads.iterdir()] == ["fresh-link"]
        assert (result.files, result.bytes) == (2, 0)

    def test_directory_swapped_for_a_link_never_leads_outside(self, uploads: Path, tmp_path: Path) -> None:
        """While a subdirectory is swapped back and forth for a symlink to elsewhere, nothing outside is removed."""
        outside = tmp_path / "outside"
        names = [f"f{i}" for i in range(50)]
        for name in names:
            write(outside / name, old=2 * DAY)
        sub, parked, link = uploads / "sub", uploads / "parked", uploads / "link"
        sub.mkdir()
        link.symlink_to(outside)
        stop = threading.Event()

        def swap() -> None:
            while not stop.is_set():
                sub.rename(parked)
                link.rename(sub)  # "sub" is now a symlink to outside
                sub.rename(link)
                parked.rename(sub)

        swapper = threading.Thread(target=swap)
        swapper.start()
        try:
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                clean_old_files(uploads, older_than=DAY)
        finally:
            stop.set()
            swapper.join()
        assert sorted(p.name for p in outside.iterdir()) == sorted(names)

    @needs_root
    def test_bind_mounts_not_entered(self, uploads: Path, tmp_path: Path) -> None:
        """A bind mount below DIR (same file system, same st_dev) is not entered: what it shows stays."""
        outside = tmp_path / "outside"
        precious = write(outside / "precious.txt", old=3 * DAY)
        (uploads / "sub").mkdir()
        subprocess.run(["mount", "--bind", str(outside), str(uploads / "sub")], check=True)
        try:
            result = clean_old_files(uploads, older_than=3600)
        finally:
            subprocess.run(["umount", "-l", str(uploads / "sub")], check=False)
        assert precious.exists() and result.files == 0

    @needs_root
    def test_other_file_systems_not_entered(self, uploads: Path) -> None:
        """A file system mounted below DIR is left alone, like rm --one-file-system."""
        with tmpfs(uploads / "mounted") as mounted:
            keep = write(mounted / "old", old=2 * DAY)
            clean_old_files(uploads, older_than=DAY)
            assert keep.exists()

    @needs_root
    def test_failures_reported_exit_1(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Files that cannot be removed (a read-only file system) are reported on stderr with exit 1."""
        with tmpfs(tmp_path / "ro") as ro:
            write(ro / "old", old=2 * DAY)
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
            assert main(["clean", str(ro), "--older-than", "1d"]) == 1
        err = capsys.readouterr().err
        assert f"cannot remove {ro}/old: Read-only file system" in err

    def test_default_dir_is_the_configured_temp_dir(self, uploads: Path, env: pytest.MonkeyPatch) -> None:
        """Without DIR, the upload temp dir from UPLOADGUARD_TEMP_DIR is cleaned."""
        env.setenv("UPLOADGUARD_TEMP_DIR", str(uploads))
        old = write(uploads / "old", old=2 * DAY)
        assert main(["clean", "--older-than", "24h"]) == 0
        assert not old.exists()

    @pytest.mark.parametrize("make, message", [
        pytest.param(lambda p: None, "does not exist", id="missing"),
        pytest.param(lambda p: p.write_text("x"), "is not a directory", id="file"),
        pytest.param(lambda p: p.symlink_to(p.parent), "is a symbolic link; name the real directory", id="symlink"),
    ])
    def test_unusable_dir_exit_2(self, tmp_path: Path, make: object, message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
        """A DIR that is missing, a file or a symlink is refused with exit 2 and one line on stderr."""
        target = tmp_path / "target"
        make(target)  # type: ignore[operator]
        assert main(["clean", str(target), "--older-than", "1h"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"uploadguard: error: {target} {message}") and err.count("\n") == 1

    @pytest.mark.parametrize("value, message", [
        pytest.param("30s", "under a minute", id="too-young"),
        pytest.param("1w", "is not a duration", id="unit"),
        pytest.param("-1h", "is not a duration", id="negative"),
    ])
    def test_bad_age_exit_2(self, uploads: Path, value: str, message: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
        """An age that is not a duration, or under a minute (uploads in progress), is a usage error."""
        with pytest.raises(SystemExit) as exit_info:
            main(["clean", str(uploads), f"--older-than={value}"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err

    def test_bad_setting_exit_2(self, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """A bad UPLOADGUARD_* variable is named in a one-line error, not a traceback."""
        env.setenv("UPLOADGUARD_MAX_BODY_SIZE", "20X")
        assert main(["clean", "--older-than", "1h"]) == 2
        assert "UPLOADGUARD_MAX_BODY_SIZE='20X' is not a size" in capsys.readouterr().err


class TestCheckDisk:
    def test_quiet_when_ok(self, uploads: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """At or under the threshold the exit status is 0 and nothing is printed (cron mails nothing)."""
        assert main(["check-disk", str(uploads), "--max-used", "100"]) == 0
        assert capsys.readouterr().out == ""

    def test_verbose(self, uploads: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--verbose prints a line per path even when all is well."""
        assert main(["check-disk", str(uploads), str(uploads), "--max-used", "100", "-v"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2 and all(line.startswith(f"uploadguard check-disk: ok {uploads}: ") for line in lines)

    @needs_root
    def test_over_threshold_alerts(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A file system over the threshold exits 1 with one alert line that shows the percentage df shows."""
        with tmpfs(tmp_path / "full", size="4m") as full:
            fill(full, leave=512 * 1024)
            df = subprocess.run(["df", "--output=pcent", str(full)], capture_output=True, text=True, check=True)
            assert main(["check-disk", str(full), "--max-used", "80"]) == 1
        out = capsys.readouterr().out
        assert out.startswith(f"uploadguard check-disk: ALERT {full}: {df.stdout.split()[-1]} full (over 80%)")
        assert out.count("\n") == 1

    @needs_root
    def test_threshold_is_inclusive(self, tmp_path: Path) -> None:
        """Usage exactly at the threshold is fine; a hair over it alerts."""
        with tmpfs(tmp_path / "disk", size="4m") as disk:
            fill(disk, leave=1024 * 1024)
            percent = disk_usage(disk).used_percent
            assert main(["check-disk", str(disk), f"--max-used={percent!r}", "--max-inodes-used=100"]) == 0
            assert main(["check-disk", str(disk), f"--max-used={percent - 0.01!r}", "--max-inodes-used=100"]) == 1

    @needs_root
    def test_inodes(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Inode usage is checked too, against --max-inodes-used (default: --max-used)."""
        with tmpfs(tmp_path / "inodes", options="nr_inodes=20") as disk:
            for i in range(18):  # + the root directory: 19 of 20 inodes, 95 %
                (disk / str(i)).touch()
            assert main(["check-disk", str(disk), "--max-used", "90"]) == 1
            assert "% of inodes used (over 90%)" in capsys.readouterr().out
            assert main(["check-disk", str(disk), "--max-used", "90", "--max-inodes-used", "100"]) == 0

    def test_several_paths_one_line_each(self, uploads: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Every path over the threshold gets its own line; --max-used 0 alerts on any used block."""
        assert main(["check-disk", str(uploads), "/", "--max-used", "0"]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[3] for line in lines] == [f"{uploads}:", "/:"]

    def test_json(self, uploads: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--json reports every path with its numbers and problems."""
        assert main(["check-disk", str(uploads), "--max-used", "100", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] is True and report["max_inodes_used"] == 100
        [entry] = report["paths"]
        assert entry["path"] == str(uploads) and entry["problems"] == []
        assert 0 <= entry["used_percent"] <= 100 and entry["total_bytes"] > 0

    def test_default_path_is_the_temp_dir(self, uploads: Path, env: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
        """Without PATH, the configured upload temp dir is checked."""
        env.setenv("UPLOADGUARD_TEMP_DIR", str(uploads))
        env.setenv("UPLOADGUARD_RESUMABLE_STORAGE", str(uploads.parent / "not-yet"))
        assert main(["check-disk", "--max-used", "100", "-v"]) == 0
        assert f" ok {uploads}: " in capsys.readouterr().out

    def test_default_paths_include_the_resumable_storage(self, uploads: Path, tmp_path: Path,
                                                         env: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
        """Completed resumable uploads accumulate in their storage: without PATH it is checked too."""
        storage = tmp_path / "resumable"
        storage.mkdir()
        env.setenv("UPLOADGUARD_TEMP_DIR", str(uploads))
        env.setenv("UPLOADGUARD_RESUMABLE_STORAGE", str(storage))
        assert main(["check-disk", "--max-used", "100", "-v"]) == 0
        out = capsys.readouterr().out
        assert f" ok {uploads}: " in out and f" ok {storage}: " in out

    def test_missing_path_exit_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A path that does not exist cannot be checked: exit 2 with one line."""
        assert main(["check-disk", str(tmp_path / "nope")]) == 2
        expected = f"uploadguard: error: cannot check {tmp_path / 'nope'}: No such file or directory\n"
        assert capsys.readouterr().err == expected

    def test_unreadable_path_does_not_hide_alerts_on_the_others(self, uploads: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
        """Paths after (and before) one that cannot be checked are still checked and alerted on; exit 2."""
        missing = tmp_path / "nope"
        assert main(["check-disk", str(uploads), str(missing), "/", "--max-used", "0"]) == 2
        out, err = capsys.readouterr()
        assert [line.split()[3] for line in out.splitlines()] == [f"{uploads}:", "/:"]
        assert err == f"uploadguard: error: cannot check {missing}: No such file or directory\n"

    def test_unreadable_path_with_the_rest_fine_exit_2(self, uploads: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
        """The exit status is the worst one: a path that could not be checked beats all-clear."""
        assert main(["check-disk", str(tmp_path / "nope"), str(uploads), "--max-used", "100", "-v"]) == 2
        assert capsys.readouterr().out.startswith(f"uploadguard check-disk: ok {uploads}: ")

    def test_unreadable_path_in_json(self, uploads: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
        """--json lists the path that could not be checked with its error, beside the checked ones."""
        missing = tmp_path / "nope"
        assert main(["check-disk", str(missing), str(uploads), "--max-used", "100", "--json"]) == 2
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] is False
        assert report["paths"][0] == {"path": str(missing), "error": "No such file or directory", "problems": []}
        assert report["paths"][1]["path"] == str(uploads) and report["paths"][1]["problems"] == []

    @pytest.mark.parametrize("option", [
        pytest.param("--max-used=101", id="over-100"),
        pytest.param("--max-used=-1", id="negative"),
        pytest.param("--max-used=lots", id="word"),
        pytest.param("--max-inodes-used=200", id="inodes"),
    ])
    def test_bad_percent_exit_2(self, uploads: Path, option: str, capsys: pytest.CaptureFixture[str]) -> None:
        """A threshold that is not a percentage between 0 and 100 is a usage error."""
        with pytest.raises(SystemExit) as exit_info:
            main(["check-disk", str(uploads), option])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "is not a percentage" in err or "is not between 0 and 100" in err


def doctor(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, dict[str, str]]]:
    code = main(["doctor", "--json", *args])
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is (code == 0)
    return code, {check["name"]: check for check in report["checks"]}


class TestDoctor:
    def test_healthy(self, private_dir: Path, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """A private dir outside /tmp that tempfile also points at passes every check."""
        env.setenv("UPLOADGUARD_TEMP_DIR", str(private_dir))
        env.setenv("TMPDIR", str(private_dir))
        env.setenv("UPLOADGUARD_RESUMABLE_STORAGE", str(private_dir / "uploads"))
        (private_dir / "uploads").mkdir(mode=0o700)
        assert main(["doctor"]) == 0
        lines = capsys.readouterr().out.splitlines()
        names = [line.split()[1] for line in lines]
        assert names == ["settings:", "temp_dir:", "write:", "space:", "location:", "private_tmp:", "tempfile:",
                         "resumable_storage:"]
        assert all(line.startswith("ok   ") for line in lines), lines
        assert list(private_dir.iterdir()) == [private_dir / "uploads"]  # the write probes cleaned up
        assert not list((private_dir / "uploads").iterdir())

    @pytest.mark.parametrize("place, status, words", [
        pytest.param("/var/tmp", "FAIL", "aged by systemd-tmpfiles", id="under-var-tmp"),
        pytest.param("file", "FAIL", "(not_a_directory)", id="a-file"),
        pytest.param("missing", "ok", "does not exist yet", id="not-yet"),
    ])
    def test_resumable_storage(self, private_dir: Path, env: pytest.MonkeyPatch, place: str, status: str,
                               words: str, capsys: pytest.CaptureFixture[str]) -> None:
        """The resumable storage is checked as the endpoint checks it, and must not be where files are aged."""
        if place == "/var/tmp":
            storage = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="uploadguard-test-"))
        else:
            storage = private_dir / "uploads"
            if place == "file":
                storage.write_text("in the way")
        try:
            env.setenv("UPLOADGUARD_RESUMABLE_STORAGE", str(storage))
            _, checks = doctor(["--temp-dir", str(private_dir)], capsys)
        finally:
            if place == "/var/tmp":
                shutil.rmtree(storage)
        assert checks["resumable_storage"]["status"] == status and words in checks["resumable_storage"]["detail"]
        if place == "file":
            assert "UPLOADGUARD_RESUMABLE_STORAGE" in checks["resumable_storage"]["fix"]

    def test_an_unused_default_storage_under_tmp_is_only_a_warning(self, private_dir: Path, env: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
        """HOME under /tmp (some container images) puts the *default* storage there: an app that never uses
        resumable uploads must not fail doctor for it."""
        home = Path(tempfile.mkdtemp(dir="/tmp", prefix="uploadguard-home-"))
        try:
            env.setenv("HOME", str(home))
            env.delenv("XDG_DATA_HOME", raising=False)
            code, checks = doctor(["--temp-dir", str(private_dir)], capsys)
        finally:
            shutil.rmtree(home)
        assert checks["resumable_storage"]["status"] == "warn" and code == 0

    @pytest.mark.parametrize("make, reason, fix", [
        pytest.param(lambda p: None, "missing", "install -d -m 700", id="missing"),
        pytest.param(lambda p: p.write_text("x"), "not_a_directory", "remove what is at", id="file"),
        pytest.param(lambda p: (p.parent / "real").mkdir() or p.symlink_to(p.parent / "real"), "symlink",
                     "set UPLOADGUARD_TEMP_DIR to the real directory", id="symlink"),
        pytest.param(lambda p: p.mkdir(mode=0o777) or p.chmod(0o777), "insecure_mode", "chmod 700", id="mode"),
    ])
    def test_unusable_temp_dir_fails(self, tmp_path: Path, env: pytest.MonkeyPatch, make: object, reason: str,
                                     fix: str, capsys: pytest.CaptureFixture[str]) -> None:
        """An unusable temp dir is a FAIL naming the reason and the fix; the exit status is 1."""
        target = tmp_path / "temp"
        make(target)  # type: ignore[operator]
        code, checks = doctor(["--temp-dir", str(target)], capsys)
        assert code == 1
        assert checks["temp_dir"]["status"] == "FAIL"
        assert f"({reason})" in checks["temp_dir"]["detail"] and fix in checks["temp_dir"]["fix"]

    def test_text_line_has_the_fix(self, tmp_path: Path, env: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
        """In text form a failed check is one line: FAIL, the name, what is wrong, and the fix."""
        assert main(["doctor", "--temp-dir", str(tmp_path / "nope")]) == 1
        [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
        assert line.startswith(f"FAIL temp_dir: {tmp_path / 'nope'} does not exist (missing). Fix: create it")

    @needs_root
    def test_unlinked(self, tmp_path: Path, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """A directory deleted while bind-mounted (st_nlink 0) fails with 'restart the service'."""
        with unlinked_dir(tmp_path) as path:
            code, checks = doctor(["--temp-dir", str(path)], capsys)
        assert code == 1 and "(unlinked)" in checks["temp_dir"]["detail"]
        assert "restart the service" in checks["temp_dir"]["fix"]

    @needs_root
    def test_no_room_for_a_full_upload(self, tmp_path: Path, env: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
        """When a body of the full limit plus the floor does not fit, 'space' fails (no_space)."""
        env.setenv("UPLOADGUARD_MAX_BODY_SIZE", "4M")
        env.setenv("UPLOADGUARD_MIN_FREE_SPACE", "0")
        with tmpfs(tmp_path / "small", size="2m") as small:
            code, checks = doctor(["--temp-dir", str(small)], capsys)
            assert code == 1 and checks["temp_dir"]["status"] == "ok" and checks["write"]["status"] == "ok"
            assert checks["space"]["status"] == "FAIL" and "a full 4M upload" in checks["space"]["detail"]
            env.setenv("UPLOADGUARD_MAX_BODY_SIZE", "1M")
            code, checks = doctor(["--temp-dir", str(small)], capsys)
            assert checks["space"]["status"] == "ok"

    def test_under_tmp_warns(self, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """A temp dir under /tmp (aged by systemd-tmpfiles, private under PrivateTmp=) is a warning, not a failure."""
        path = tempfile.mkdtemp(dir="/tmp", prefix="uploadguard-test-")
        try:
            code, checks = doctor(["--temp-dir", path], capsys)
        finally:
            os.rmdir(path)
        assert checks["location"]["status"] == "warn" and "CacheDirectory=" in checks["location"]["fix"]
        assert code == 0

    def test_tempfile_elsewhere_from_a_shell_is_information(self, uploads: Path, env: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
        """From a shell, a tempfile dir elsewhere is no warning: the line names this shell's dir and says the hooks' workers get the upload dir."""
        env.delenv("SERVER_SOFTWARE", raising=False)
        code, checks = doctor(["--temp-dir", str(uploads)], capsys)
        assert checks["tempfile"]["status"] == "ok" and code == 0
        detail = checks["tempfile"]["detail"]
        assert f"this shell's temp dir (tempfile.gettempdir()) is {tempfile.gettempdir()}" in detail
        assert f"gunicorn workers started with uploadguard's hooks" in detail
        assert f"point tempfile and TMPDIR at {uploads} themselves" in detail

    def test_a_missing_parent_is_named(self, private_dir: Path, env: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
        """A temp dir or resumable storage whose parent is missing (a typo) is a FAIL naming that parent."""
        env.setenv("UPLOADGUARD_RESUMABLE_STORAGE", str(private_dir / "typo" / "resumable"))
        code, checks = doctor(["--temp-dir", str(private_dir / "tpyo" / "tmp")], capsys)
        assert code == 1
        assert checks["temp_dir"]["status"] == "FAIL"
        assert f"nor does its parent directory {private_dir / 'tpyo'}" in checks["temp_dir"]["detail"]
        assert checks["resumable_storage"]["status"] == "FAIL"
        assert f"nor does its parent directory {private_dir / 'typo'}" in checks["resumable_storage"]["detail"]

    def test_tempfile_elsewhere_under_gunicorn_warns(self, uploads: Path, env: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
        """Inside a gunicorn process (SERVER_SOFTWARE set by its arbiter) a tempfile dir elsewhere is a warning naming both."""
        env.setenv("SERVER_SOFTWARE", "gunicorn/23.0.0")
        code, checks = doctor(["--temp-dir", str(uploads)], capsys)
        assert checks["tempfile"]["status"] == "warn"
        assert f"is {tempfile.gettempdir()}, not {uploads}" in checks["tempfile"]["detail"]

    def test_bad_setting_fails_but_checks_go_on(self, uploads: Path, env: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
        """A bad UPLOADGUARD_* variable is a FAIL naming it; the temp dir is still checked."""
        env.setenv("UPLOADGUARD_RETRY_AFTER", "soon")
        code, checks = doctor(["--temp-dir", str(uploads)], capsys)
        assert code == 1 and "UPLOADGUARD_RETRY_AFTER='soon'" in checks["settings"]["detail"]
        assert checks["temp_dir"]["status"] == "ok"

    def test_mount_of_the_root(self) -> None:
        """mount_of('/') parses this machine's mountinfo and finds the root mount, not bind-mounted, not deleted."""
        mount = mount_of("/")
        assert mount is not None and mount.mount_point == "/" and mount.root == "/" and not mount.deleted


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A directory outside /tmp (which the namespaced process below mounts over)."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="uploadguard-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


IN_PRIVATE_TMP = """
import subprocess, sys
import uploadguard.cli  # imported before /tmp is covered: the checkout and its venv may live there
subprocess.run(["mount", "--bind", sys.argv[1], "/tmp"], check=True)
subprocess.run(["sh", "-c", sys.argv[2]], check=True)
raise SystemExit(uploadguard.cli.main(["doctor", "--json", "--temp-dir", "/tmp"]))
"""


def in_private_tmp(host_dir: Path, script: str) -> dict[str, dict[str, str]]:
    """Run ``uploadguard doctor --json`` in a new mount namespace whose /tmp is a bind mount, as PrivateTmp= does."""
    if not IS_ROOT or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to make a private /tmp")
    source = host_dir / "systemd-private-test" / "tmp"
    source.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADGUARD_") and k != "TMPDIR"}
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private",
                           sys.executable, "-c", IN_PRIVATE_TMP, str(source), script],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert not proc.stderr, proc.stderr
    return {check["name"]: check for check in json.loads(proc.stdout)["checks"]}


class TestDoctorPrivateTmp:
    def test_private_tmp_is_seen(self, host_dir: Path) -> None:
        """Under a PrivateTmp-style bind mount doctor says /tmp is private and where it really lives."""
        checks = in_private_tmp(host_dir, "true")
        assert checks["private_tmp"]["status"] == "ok"
        assert f"/tmp is private to this process (a bind mount of {host_dir}/systemd-private-test/tmp)" in \
            checks["private_tmp"]["detail"]
        assert checks["temp_dir"]["status"] == "ok" and checks["location"]["status"] == "warn"

    def test_deleted_private_tmp_fails(self, host_dir: Path) -> None:
        """When the private /tmp's backing directory is deleted on the host (the seed's outage), doctor fails."""
        checks = in_private_tmp(host_dir, f"rmdir {host_dir}/systemd-private-test/tmp")
        assert checks["private_tmp"]["status"] == "FAIL" and "deleted on the host" in checks["private_tmp"]["detail"]
        assert "(unlinked)" in checks["temp_dir"]["detail"]


class TestEntryPoints:
    def console_script(self) -> str:
        script = shutil.which("uploadguard") or str(Path(sys.executable).parent / "uploadguard")
        if not os.path.exists(script):
            pytest.skip("the uploadguard console script is not installed (pip install -e .)")
        return script

    def test_console_script(self, tmp_path: Path) -> None:
        """The installed `uploadguard` command runs main() and reports errors without a traceback."""
        proc = subprocess.run([self.console_script(), "clean", str(tmp_path / "nope"), "--older-than", "1h"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        assert proc.stderr == f"uploadguard: error: {tmp_path / 'nope'} does not exist\n"

    def test_python_m(self, tmp_path: Path) -> None:
        """`python -m uploadguard` is the same command, exit status included."""
        proc = subprocess.run([sys.executable, "-m", "uploadguard", "check-disk", str(tmp_path), "--max-used", "0"],
                              capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert proc.returncode == 1 and proc.stdout.startswith(f"uploadguard check-disk: ALERT {tmp_path}: ")

    def test_no_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a command the usage is printed and the exit status is 2."""
        assert main([]) == 2
        assert "name a command: clean, check-disk or doctor" in capsys.readouterr().err
