"""One settings object for the middleware, ``gunicorn_conf.py`` and the CLI.

Every knob of uploadguard is read here and only here, so the WSGI middleware,
the gunicorn hooks and the ``uploadguard`` command can never disagree about
where uploads are spooled or how large they may be.

Environment variables (all optional):

``UPLOADGUARD_TEMP_DIR``
    Directory that upload temp files go to.  Default:
    ``$XDG_CACHE_HOME/uploadguard/tmp`` (``~/.cache/uploadguard/tmp``), which
    any user can create on a fresh machine.  In production point it at a
    dedicated directory *outside* ``/tmp`` and ``/var/tmp``: systemd's
    ``PrivateTmp=`` gives each service its own copy of those and
    ``systemd-tmpfiles`` ages their contents.
``UPLOADGUARD_MAX_BODY_SIZE``
    Largest request body accepted, inclusive.  Bytes or a binary ``K``/``M``/``G``
    suffix as nginx's ``client_max_body_size`` (``200M`` = 200 MiB).  Default ``200M``.
    ``0`` switches the limit off.
``UPLOADGUARD_RETRY_AFTER``
    Seconds sent in ``Retry-After`` with a 503.  Default ``5``.
``UPLOADGUARD_MIN_FREE_SPACE``
    Free space (size) the temp dir's file system must keep *after* a body of
    the announced length is spooled; below it uploads get a 503.  Default ``16M``.
``UPLOADGUARD_DRAIN_MAX``
    How many body bytes a worker reads and discards so that a client still
    sending an oversized or failed upload reads the error instead of a
    connection reset.  Default: twice the body limit (64M when the limit is
    off).  ``0`` never drains.
``UPLOADGUARD_DRAIN_TIMEOUT``
    Seconds a worker spends draining at most.  Default ``10``.
``UPLOADGUARD_CHECK_INTERVAL``
    Seconds a healthy temp-dir verdict is reused by a busy worker before the
    directory is checked again (``0`` = every request).  Default ``0.1``.

Usage::

    from uploadguard.config import Settings

    settings = Settings.from_environ()          # reads os.environ
    settings = Settings.from_environ({"UPLOADGUARD_MAX_BODY_SIZE": "20M"})
    settings = settings.replace(retry_after=2)  # validated again

A bad value raises :class:`ConfigError` (a ``ValueError``) naming the
variable and the value, e.g. ``UPLOADGUARD_MAX_BODY_SIZE='20X' is not a size;
use bytes or a K/M/G suffix (e.g. 200M)``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "Settings", "parse_size", "parse_duration", "overlay_environ", "ENV_PREFIX", "SETTING_NAMES"]

ENV_PREFIX = "UPLOADGUARD_"

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d{1,20})\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_MAX_SIZE = 2**63 - 1  # bytes: what off_t holds
_MAX_DURATION = 100 * 365 * 86400.0  # seconds: a hundred years
_SECONDS = {"": 1.0, "S": 1.0, "M": 60.0, "H": 3600.0, "D": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,9})?)\s*([SMHD]?)\s*$", re.IGNORECASE)


_DRAIN_WITHOUT_LIMIT = 64 * 1024**2


class ConfigError(ValueError):
    """A setting has a value uploadguard cannot use; the message names it."""


def parse_size(value: str | int, *, name: str = "size") -> int:
    """Parse ``"200M"``-style sizes (binary multiples, as nginx does) into bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a size; use bytes or a K/M/G suffix (e.g. 200M)")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{name}={value!r} is not a size; use bytes or a K/M/G suffix (e.g. 200M)")
        size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size < 0:
        raise ConfigError(f"{name}={value!r} must not be negative")
    if size > _MAX_SIZE:
        raise ConfigError(f"{name}={value!r} is too large (at most {_MAX_SIZE} bytes)")
    return size


def parse_duration(value: str | float, *, name: str = "duration") -> float:
    """Parse ``"90s"``, ``"30m"``, ``"24h"``, ``"7d"`` or plain seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a duration; use seconds or an s/m/h/d suffix (e.g. 24h)")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(value)
        if not match:
            raise ConfigError(f"{name}={value!r} is not a duration; use seconds or an s/m/h/d suffix (e.g. 24h)")
        seconds = float(match.group(1)) * _SECONDS[match.group(2).upper()]
    if not seconds >= 0:  # also catches NaN
        raise ConfigError(f"{name}={value!r} must not be negative")
    if seconds > _MAX_DURATION:
        raise ConfigError(f"{name}={value!r} is too long (at most 100 years)")
    return seconds


def default_temp_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where uploads spool when nobody said: a per-user cache dir.

    Not derived from :func:`tempfile.gettempdir`, because the gunicorn hooks
    point ``tempfile`` *at* this directory; the default must not move once they have.
    """
    environ = os.environ if environ is None else environ
    cache = environ.get("XDG_CACHE_HOME") or ""
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return base / "uploadguard" / "tmp"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Effective uploadguard settings; immutable, validated on creation."""

    temp_dir: Path
    max_body_size: int = 200 * 1024**2  # bytes, inclusive; 0 = no limit
    retry_after: int = 5  # seconds
    min_free_space: int = 16 * 1024**2  # bytes kept free after the body is spooled
    drain_max: int | None = None  # bytes; None = 2 x max_body_size
    drain_timeout: float = 10.0  # seconds
    check_interval: float = 0.1  # seconds

    def __post_init__(self) -> None:
        if not isinstance(self.temp_dir, Path):
            object.__setattr__(self, "temp_dir", Path(self.temp_dir))
        if not self.temp_dir.is_absolute():
            object.__setattr__(self, "temp_dir", Path(os.path.abspath(self.temp_dir)))
        for name in ("max_body_size", "retry_after", "min_free_space"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a whole number >= 0")
        if self.drain_max is not None and (
            isinstance(self.drain_max, bool) or not isinstance(self.drain_max, int) or self.drain_max < 0
        ):
            raise ConfigError(f"drain_max={self.drain_max!r} must be a whole number >= 0 or None")
        for name in ("drain_timeout", "check_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name}={value!r} must be >= 0 seconds")

    @property
    def drain_bytes(self) -> int:
        """The effective drain bound in bytes: ``drain_max``, else twice the limit, else 64 MiB."""
        if self.drain_max is not None:
            return self.drain_max
        return 2 * self.max_body_size if self.max_body_size else _DRAIN_WITHOUT_LIMIT

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``UPLOADGUARD_*`` variables; ``overrides`` win.

        ``None`` overrides are ignored, so callers can pass their keyword
        arguments straight through.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def get(key: str) -> str | None:
            raw = environ.get(ENV_PREFIX + key)
            return raw if raw is not None and raw.strip() != "" else None

        raw = get("TEMP_DIR")
        values["temp_dir"] = Path(raw) if raw else default_temp_dir(environ)
        for key, field in (("MAX_BODY_SIZE", "max_body_size"), ("MIN_FREE_SPACE", "min_free_space"),
                           ("DRAIN_MAX", "drain_max")):
            raw = get(key)
            if raw is not None:
                values[field] = parse_size(raw, name=ENV_PREFIX + key)
        raw = get("RETRY_AFTER")
        if raw is not None:
            seconds = parse_duration(raw, name=ENV_PREFIX + "RETRY_AFTER")
            values["retry_after"] = max(1, round(seconds))
        for key, field in (("DRAIN_TIMEOUT", "drain_timeout"), ("CHECK_INTERVAL", "check_interval")):
            raw = get(key)
            if raw is not None:
                values[field] = parse_duration(raw, name=ENV_PREFIX + key)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls._coerce(values)

    def replace(self, **overrides: Any) -> Settings:
        """A copy with some fields changed (``None`` means keep), validated again."""
        values = dataclasses.asdict(self)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return self._coerce(values)

    @classmethod
    def _coerce(cls, values: dict[str, Any]) -> Settings:
        # Keyword arguments may use the same spellings as the environment ("200M", "24h").
        for field in ("max_body_size", "min_free_space", "drain_max"):
            if isinstance(values.get(field), str):
                values[field] = parse_size(values[field], name=field)
        if isinstance(values.get("retry_after"), (str, float)):
            values["retry_after"] = max(1, round(parse_duration(values["retry_after"], name="retry_after")))
        for field in ("drain_timeout", "check_interval"):
            if isinstance(values.get(field), str):
                values[field] = parse_duration(values[field], name=field)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def describe(self) -> str:
        """One log line with the effective settings."""
        limit = "off" if not self.max_body_size else format_size(self.max_body_size)
        return (
            f"temp_dir={self.temp_dir} max_body_size={limit} retry_after={self.retry_after}s "
            f"min_free_space={format_size(self.min_free_space)} drain_max={format_size(self.drain_bytes)} "
            f"drain_timeout={self.drain_timeout:g}s check_interval={self.check_interval:g}s"
        )


#: Every variable :meth:`Settings.from_environ` reads.
SETTING_NAMES = tuple(ENV_PREFIX + field.name.upper() for field in dataclasses.fields(Settings))


def overlay_environ(lookup: Callable[[str], Any], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) with each ``UPLOADGUARD_*`` name that ``lookup`` knows put over it.

    How the framework integrations let Django settings or a Flask config win
    over the environment: ``lookup(name)`` returns the framework's value or
    ``None``; values are turned into the strings the environment would hold.
    """
    merged = dict(os.environ if environ is None else environ)
    for name in SETTING_NAMES:
        value = lookup(name)
        if value is not None:
            merged[name] = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    return merged


def format_size(size: int) -> str:
    """``209715200`` -> ``"200M"``; exact binary multiples only, else bytes."""
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
