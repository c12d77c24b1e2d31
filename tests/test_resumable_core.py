"""The resumable endpoint's pure core (uploadguard/resumable/core.py): values in, values out, ``now`` passed in."""

from __future__ import annotations

import pytest

from uploadguard.resumable import core
from uploadguard.resumable import protocol as p
from uploadguard.resumable.store import UploadInfo

FLOOR = core.RATE_FLOOR


def head(method: str = "POST", dialect: str | None = p.Dialect.IETF, interop: int | None = 6,
         **headers: str) -> core.Head:
    made = core.Head(method=method, wire_method=method, path="/files/", root="", lookup=headers.get,
                     content_length=None, terminated=False, owner=None)
    made.dialect, made.interop = dialect, interop
    return made


class TestRateFloor:
    @pytest.mark.parametrize(("counts", "now", "slow"), [
        pytest.param([], 9.9, False, id="silent-within-the-first-window"),
        pytest.param([], 10.0, True, id="silent-for-a-window"),
        pytest.param([(FLOOR - 1, 5.0)], 10.0, True, id="a-window-under-the-floor"),
        pytest.param([(FLOOR, 5.0)], 10.0, False, id="a-window-at-the-floor"),
        pytest.param([(FLOOR, 5.0)], 15.0, True, id="silence-one-window-after-the-last-bytes"),
        pytest.param([(FLOOR, 5.0), (FLOOR, 14.0)], 15.0, False, id="a-second-good-window"),
    ])
    def test_windows(self, counts: list[tuple[int, float]], now: float, slow: bool) -> None:
        """A body is slow once a window of ``window`` seconds brought fewer than RATE_FLOOR bytes."""
        floor = core.RateFloor(10.0, 0.0)
        for size, at in counts:
            floor.count(size, at)
        assert floor.slow(now) is slow

    def test_no_window_never_slow(self) -> None:
        """A window of 0 is no floor: never slow, no deadline."""
        floor = core.RateFloor(0.0, 0.0)
        assert not floor.slow(1e9) and floor.deadline() == float("inf")

    def test_deadline_follows_the_bytes(self) -> None:
        """The deadline is the window's end, or one window after the last bytes once the window is good."""
        floor = core.RateFloor(10.0, 0.0)
        assert floor.deadline() == 10.0
        floor.count(FLOOR, 3.0)
        assert floor.deadline() == 13.0


class TestInterim:
    def test_ietf_creation_with_its_location(self) -> None:
        """An IETF creation whose upload exists gets a 104 with its Location and interop version."""
        made = head()
        made.headers.append(("Location", "/files/abc"))
        assert core.interim_headers(made) == [("Location", "/files/abc"), ("Upload-Draft-Interop-Version", "6")]

    @pytest.mark.parametrize("made", [
        pytest.param(head(dialect=p.Dialect.TUS, interop=None), id="tus"),
        pytest.param(head(method="PATCH"), id="not-a-creation"),
        pytest.param(head(), id="no-upload-yet"),
    ])
    def test_none_otherwise(self, made: core.Head) -> None:
        """tus, a PATCH, or a creation without its upload: no interim response."""
        if made.method == "PATCH" or made.dialect == p.Dialect.TUS:
            made.headers.append(("Location", "/files/abc"))
        assert core.interim_headers(made) is None


class TestLiveness:
    @pytest.mark.parametrize(("info", "gone"), [
        pytest.param(UploadInfo(id="a", length=3, created=0.0, expires_after=10.0), True, id="expired"),
        pytest.param(UploadInfo(id="a", length=3, created=95.0, expires_after=10.0), False, id="not-yet"),
        pytest.param(UploadInfo(id="a", length=3, completed=True, completed_at=50.0, keep_completed=10.0), True,
                     id="completed-past-keep"),
        pytest.param(UploadInfo(id="a", length=3, completed=True, completed_at=95.0, keep_completed=10.0), False,
                     id="completed-kept"),
    ])
    def test_gone(self, info: UploadInfo, gone: bool) -> None:
        """410 once an upload expired or a completed one is past keep_completed, at ``now``."""
        assert (core.liveness(info, 100.0, 0.0) is not None) is gone
