"""The guard's decisions as plain functions: one place for the WSGI and the ASGI driver."""

from __future__ import annotations

import ast
import dataclasses
import errno
from pathlib import Path

import pytest

from tests.support import ROOT
from uploadguard import guard
from uploadguard.errors import BadRequest, BodyTooLarge, InternalError, LengthRequired, TempDirUnavailable
from uploadguard.tempdir import Health, Reason, TempDirGuard


@dataclasses.dataclass
class Body:
    limit: int = 100
    consumed: int = 0
    exceeded: bool = False
    failed: bool = False


@pytest.fixture
def temp(tmp_path: Path) -> TempDirGuard:
    return TempDirGuard(tmp_path, min_free_space=10)


def classify(exc: BaseException, body: Body | None, health: Health | None, temp: TempDirGuard,
             spooled: int = 0) -> object:
    return guard.classify(exc, body, health, temp=temp, retry_after=7, spooled=spooled)


class TestBodyLength:
    @pytest.mark.parametrize(("environ", "expected"), [
        pytest.param({"CONTENT_LENGTH": "12"}, 12, id="content-length"),
        pytest.param({}, 0, id="none"),
        pytest.param({"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True}, None, id="chunked"),
    ])
    def test_lengths(self, environ: dict[str, object], expected: int | None) -> None:
        """A Content-Length is the length; a terminated chunked body is unknown (None); otherwise no body."""
        assert guard.body_length(environ) == expected

    def test_malformed(self) -> None:
        """A Content-Length that is not digits is a 400."""
        with pytest.raises(BadRequest):
            guard.body_length({"CONTENT_LENGTH": "12, 12"})

    def test_chunked_not_delivered(self) -> None:
        """A chunked body the server does not end in the input is a 411 naming the fix."""
        with pytest.raises(LengthRequired, match="Content-Length"):
            guard.body_length({"HTTP_TRANSFER_ENCODING": "chunked"})

    def test_wsgi_keeps_its_names(self) -> None:
        """The WSGI driver still offers body_length, Event and GuardStats (imports of the old place keep working)."""
        from uploadguard import stats, wsgi

        assert wsgi.body_length({"CONTENT_LENGTH": "7"}) == 7
        assert wsgi.Event is stats.Event and wsgi.GuardStats is stats.GuardStats


class TestRefusal:
    def test_over_the_limit(self) -> None:
        """An announced length over the limit is a 413 naming both; at the limit, chunked or no limit: none."""
        error = guard.limit_refusal(100, 101)
        assert isinstance(error, BodyTooLarge) and (error.limit, error.length) == (100, 101)
        assert guard.limit_refusal(100, 100) is None
        assert guard.limit_refusal(100, None) is None
        assert guard.limit_refusal(0, 10**12) is None


class TestClassify:
    def test_cut_body_is_413(self, temp: TempDirGuard) -> None:
        """Whatever the application raised after the limit cut the body, it is the 413."""
        error = classify(ValueError("parse"), Body(exceeded=True), None, temp)
        assert isinstance(error, BodyTooLarge) and error.limit == 100

    def test_other_exceptions_propagate(self, temp: TempDirGuard) -> None:
        """An exception that is not an OSError is not ours to answer."""
        assert classify(ValueError("bug"), Body(), None, temp) is None

    def test_client_gone(self, temp: TempDirGuard) -> None:
        """An OSError while the body itself failed (the client went away) propagates, with no temp-dir check."""
        exc = OSError(errno.EIO, "reset")
        assert not guard.needs_health(exc, Body(failed=True))
        assert classify(exc, Body(failed=True), None, temp) is None

    def test_temp_dir_error_is_503(self, temp: TempDirGuard) -> None:
        """An OSError naming a file inside the temp dir is its retryable 503."""
        exc = FileNotFoundError(errno.ENOENT, "gone", str(Path(temp.path) / "spool"))
        assert guard.needs_health(exc, Body())
        error = classify(exc, Body(), Health(temp.path, free_bytes=10**9), temp)
        assert isinstance(error, TempDirUnavailable) and error.retry_after == 7 and error.reason == "missing"

    def test_other_oserror_is_500(self, temp: TempDirGuard) -> None:
        """An OSError about another path, or one that is no temp-dir errno, is a 500."""
        elsewhere = FileNotFoundError(errno.ENOENT, "gone", "/srv/other")
        assert isinstance(classify(elsewhere, Body(), Health(temp.path, free_bytes=10**9), temp), InternalError)
        assert not guard.needs_health(ConnectionRefusedError(errno.ECONNREFUSED, "db"), Body())
        assert isinstance(classify(ConnectionRefusedError(errno.ECONNREFUSED, "db"), Body(), None, temp),
                          InternalError)

    def test_full_without_path(self, temp: TempDirGuard) -> None:
        """ENOSPC without a path is the temp dir's when the dir could not have held the spooled bytes."""
        exc = OSError(errno.ENOSPC, "No space left on device")
        assert isinstance(classify(exc, Body(), Health(temp.path, free_bytes=50), temp, spooled=45),
                          TempDirUnavailable)
        assert isinstance(classify(exc, Body(), Health(temp.path, free_bytes=10**9), temp, spooled=45),
                          InternalError)


class TestClassifyStatus:
    def test_400_with_broken_dir(self, temp: TempDirGuard) -> None:
        """A framework's 400 while the temp dir is unusable is the temp dir's 503."""
        broken = Health(temp.path, Reason.NOT_A_DIRECTORY, "a file")
        error = guard.classify_status(400, broken, path=temp.path, retry_after=3)
        assert isinstance(error, TempDirUnavailable) and error.reason == "not_a_directory"

    def test_400_with_healed_dir(self, temp: TempDirGuard) -> None:
        """A 400 while the dir had vanished (recreated just now) is a 503: the retry succeeds."""
        error = guard.classify_status(400, Health(temp.path, healed=True), path=temp.path, retry_after=3)
        assert isinstance(error, TempDirUnavailable) and error.reason == "missing"

    def test_kept(self, temp: TempDirGuard) -> None:
        """A 400 with a healthy dir, or any other status, stays the application's."""
        assert guard.classify_status(400, Health(temp.path), path=temp.path, retry_after=3) is None
        broken = Health(temp.path, Reason.READ_ONLY, "ro")
        assert guard.classify_status(500, broken, path=temp.path, retry_after=3) is None


class TestDrainPlan:
    @pytest.mark.parametrize(("kwargs", "expected"), [
        pytest.param(dict(waiting=True, eof=False, remaining=10), guard.Drain.SKIP, id="waiting-for-100"),
        pytest.param(dict(waiting=False, eof=True, remaining=None), guard.Drain.DONE, id="eof"),
        pytest.param(dict(waiting=False, eof=False, remaining=0), guard.Drain.DONE, id="all-read"),
        pytest.param(dict(waiting=False, eof=False, remaining=101), guard.Drain.SKIP, id="too-much"),
        pytest.param(dict(waiting=False, eof=False, remaining=100), guard.Drain.READ, id="within"),
        pytest.param(dict(waiting=False, eof=False, remaining=None), guard.Drain.READ, id="chunked"),
    ])
    def test_plan(self, kwargs: dict[str, object], expected: guard.Drain) -> None:
        """The rest is read unless the client sends nothing more, nothing is left, or it is over the bound."""
        assert guard.drain_plan(max_bytes=100, timeout=1.0, **kwargs) is expected  # type: ignore[arg-type]

    def test_no_time(self) -> None:
        """A drain_timeout of 0 reads nothing."""
        assert guard.drain_plan(waiting=False, eof=False, remaining=1, max_bytes=100, timeout=0) is guard.Drain.SKIP


def _imports(path: Path) -> set[str]:
    """Every ``uploadguard`` module ``path`` imports, lazy imports included, as dotted names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                names.add(f"uploadguard.{node.module}")
            elif node.level == 1:  # from . import x
                names.update(f"uploadguard.{alias.name}" for alias in node.names)
            elif node.module and node.module.startswith("uploadguard"):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("uploadguard"))
    return names


class TestImportFloors:
    @pytest.mark.parametrize("module", ["stats", "guard"])
    def test_core_imports_no_driver(self, module: str) -> None:
        """The decisions import only the floors below them: settings, errors, tempdir, stats -- never a driver."""
        allowed = {"uploadguard.config", "uploadguard.errors", "uploadguard.tempdir", "uploadguard.stats"}
        assert _imports(ROOT / "uploadguard" / f"{module}.py") <= allowed

    def test_asgi_driver_needs_no_wsgi_driver(self) -> None:
        """The ASGI driver takes the shared decisions from guard.py, nothing from the WSGI driver."""
        imported = _imports(ROOT / "uploadguard" / "asgi.py")
        assert "uploadguard.guard" in imported and "uploadguard.wsgi" not in imported
