"""What the guard counts: the :class:`Event` vocabulary and the in-process :class:`GuardStats`.

Shared by both drivers (:mod:`uploadguard.wsgi`, :mod:`uploadguard.asgi`)
and read by :mod:`uploadguard.metrics`; standard library only.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Event", "GuardStats"]

log = logging.getLogger("uploadguard")


class Event(enum.StrEnum):
    """What :class:`GuardStats` counts (a ``str`` enum: logs and JSON stay readable)."""

    GUARDED = "guarded"  # a request with a body was checked
    REJECTED = "413"  # body over the limit
    UNAVAILABLE = "503"  # the temp dir could not take the body; reason = the temp-dir reason
    BAD_REQUEST = "400"  # malformed Content-Length
    LENGTH_REQUIRED = "411"  # a chunked body the server would not deliver
    ERROR = "500"  # another OSError; reason = its errno name
    HEALED = "heal"  # a vanished temp dir was recreated


class GuardStats:
    """In-process counters of :class:`Event` values, by reason.

    ``listeners`` are called as ``listener(event, reason)`` for every count,
    which is how :mod:`uploadguard.metrics` exports them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.listeners: list[Callable[[str, str], None]] = []

    def record(self, event: Event, reason: str = "") -> None:
        # Plain strings: an enum member hashes in Python, ~10x slower; a str enum's value is its str().
        key = (event._value_ if isinstance(event, Event) else str(event), reason if type(reason) is str else str(reason))
        with self._lock:
            self.counts[key] += 1
        for listener in self.listeners:
            try:
                listener(event, reason)
            except Exception:  # a metrics backend must never break a request
                log.exception("stats listener failed")

    def total(self, event: Event | str) -> int:
        """All counts of ``event``."""
        with self._lock:
            return sum(n for (e, _), n in self.counts.items() if e == event)

    def by_reason(self, event: Event | str) -> dict[str, int]:
        with self._lock:
            return {r: n for (e, r), n in self.counts.items() if e == event}

    def snapshot(self) -> dict[str, Any]:
        """A plain dict for logs, tests and health endpoints: every event."""
        return {
            "guarded": self.total(Event.GUARDED),
            "rejected_413": self.total(Event.REJECTED),
            "unavailable_503": self.by_reason(Event.UNAVAILABLE),
            "bad_requests_400": self.total(Event.BAD_REQUEST),
            "length_required_411": self.total(Event.LENGTH_REQUIRED),
            "heals": self.total(Event.HEALED),
            "errors_500": self.total(Event.ERROR),
        }
