"""One settings object for the middleware, the framework integrations, ``gunicorn_conf.py`` and the CLI.

Every knob of uploadguard is parsed and validated here and only here, so the
WSGI middleware, the Django and Flask integrations, the gunicorn hooks and the
``uploadguard`` command can never disagree about where uploads are spooled or
how large they may be.  The settings, their defaults and their meaning are
listed once, in SETTING_HELP below (rendered as the settings reference of the docs).

Three sources, one parser per setting:

* the environment (``UPLOADGUARD_MAX_BODY_SIZE=200M``): strings;
* framework settings (Django ``settings.UPLOADGUARD_*``, a Flask ``app.config``)
  and keyword arguments: typed values (``200 * 1024**2``, ``0.5``, a ``Path``)
  or the same strings as the environment;
* what is left takes the default.

Usage::

    from uploadguard.config import Settings

    settings = Settings.from_environ()          # reads os.environ
    settings = Settings.from_environ({"UPLOADGUARD_MAX_BODY_SIZE": "20M"})
    settings = Settings.from_mapping(django_settings_as_dict)   # over os.environ
    settings = settings.replace(retry_after=2)  # validated again

A bad value raises :class:`ConfigError` (a ``ValueError``) naming the setting
and the value, e.g. ``UPLOADGUARD_MAX_BODY_SIZE='20X' is not a size; use bytes
or a K/M/G suffix (e.g. 200M or 1.5G)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ConfigError", "Settings", "parse_size", "parse_duration", "ENV_PREFIX", "SETTING_NAMES", "ServerPool",
           "note_server_pool", "server_pool", "stream_caps", "is_s3_url", "parse_s3_url"]

ENV_PREFIX = "UPLOADGUARD_"

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d{1,20})(?:\.(\d{1,20}))?\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_MAX_SIZE = 2**63 - 1  # bytes: what off_t holds
_MAX_DURATION = 100 * 365 * 86400.0  # seconds: a hundred years
_SECONDS = {"": 1.0, "S": 1.0, "M": 60.0, "H": 3600.0, "D": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,9})?)\s*([SMHD]?)\s*$", re.IGNORECASE)


_DRAIN_WITHOUT_LIMIT = 64 * 1024**2


class ConfigError(ValueError):
    """A setting has a value uploadguard cannot use; the message names it."""


def parse_size(value: str | int, *, name: str = "size") -> int:
    """Parse ``"200M"``-style sizes (binary multiples, as nginx does) or whole bytes.

    A decimal takes a suffix and is rounded down to whole bytes (``"1.5G"`` is
    1.5 x 1024**3 bytes), as people write sizes; a decimal of plain bytes
    (``"0.5"``) or one that rounds down to nothing (``"0.0000001K"``, where 0
    would mean "no limit") is refused rather than guessed at.
    """
    hint = "use bytes or a K/M/G suffix (e.g. 200M or 1.5G)"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{name}={value!r} is not a size; {hint}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if not match:
            if value.strip().startswith("-"):
                raise ConfigError(f"{name}={value!r} must not be negative; {hint}")
            raise ConfigError(f"{name}={value!r} is not a size; {hint}")
        whole, fraction, suffix = match.group(1), match.group(2), match.group(3).upper()
        unit = _UNITS[suffix]
        if fraction is None:
            size = int(whole) * unit
        elif not suffix:
            raise ConfigError(f"{name}={value!r} is not a whole number of bytes; a decimal needs a K/M/G "
                              "suffix (e.g. 1.5G)")
        else:
            # Exact integer arithmetic: float would round 1.1G to a byte off.
            size = (int(whole + fraction) * unit) // 10 ** len(fraction)
            if size == 0 and int(whole + fraction):
                raise ConfigError(f"{name}={value!r} is less than one byte; {hint}")
    if size < 0:
        raise ConfigError(f"{name}={value!r} must not be negative")
    if size > _MAX_SIZE:
        raise ConfigError(f"{name}={value!r} is too large (at most {_MAX_SIZE} bytes)")
    return size


def parse_duration(value: str | float, *, name: str = "duration") -> float:
    """Parse ``"90s"``, ``"30m"``, ``"24h"``, ``"7d"`` or plain seconds (a number or its text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
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


def _parse_whole_seconds(value: str | float, *, name: str) -> int:
    """A duration rounded *up* to whole seconds (``Retry-After`` has no fractions); 0 stays 0."""
    return math.ceil(parse_duration(value, name=name))


def _parse_path(value: str | os.PathLike[str], *, name: str) -> Path:
    """An absolute path: ``~`` is the home directory (as the defaults are written), a relative path is
    taken from the working directory of the process that reads it (gunicorn's ``--chdir``)."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str) and text.strip() and "\0" not in text:
            return Path(os.path.abspath(os.path.expanduser(text)))
    raise ConfigError(f"{name}={value!r} is not a directory path")


def is_s3_url(value: object) -> bool:
    """Whether ``value`` is an ``s3://bucket/prefix`` storage URL."""
    return isinstance(value, str) and value.startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``; :class:`ValueError` if it is not one."""
    parts = urlsplit(url)
    bucket = parts.netloc
    if parts.scheme != "s3" or not bucket or parts.query or parts.fragment or parts.port is not None:
        raise ValueError(f"{url!r} is not an S3 storage URL; use s3://bucket/prefix")
    if not (3 <= len(bucket) <= 63) or not all(c.islower() or c.isdigit() or c in ".-" for c in bucket) \
            or not bucket[0].isalnum() or not bucket[-1].isalnum():
        raise ValueError(f"{url!r}: {bucket!r} is not a valid S3 bucket name "
                         "(3-63 lowercase letters, digits, dots and hyphens)")
    prefix = parts.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def _parse_storage(value: str | os.PathLike[str], *, name: str) -> Path | str:
    """A directory, or an ``s3://bucket/prefix`` URL kept as it is (``uploadguard.resumable.s3``)."""
    if isinstance(value, str) and value.strip().startswith("s3://"):
        try:
            parse_s3_url(value.strip())
        except ValueError as exc:
            raise ConfigError(f"{name}={value!r}: {exc}") from None
        return value.strip()
    return _parse_path(value, name=name)


def _parse_optional_size(value: str | int | None, *, name: str) -> int | None:
    return None if value is None else parse_size(value, name=name)


def _parse_streams(value: str | int | None, *, name: str) -> int | None:
    """``"auto"`` (or ``None``): from the server's pool (:func:`stream_caps`); else a whole number, 0 = no cap."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) < 10:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**9:
        raise ConfigError(f"{name}={value!r} is not a number of streams; use a whole number (0 = no cap) or auto")
    return value


#: The parser of every field: the one decision of what each setting accepts, for every source.
_PARSERS: dict[str, Callable[..., Any]] = {
    "temp_dir": _parse_path,
    "max_body_size": parse_size,
    "retry_after": _parse_whole_seconds,
    "min_free_space": parse_size,
    "drain_max": _parse_optional_size,
    "drain_timeout": parse_duration,
    "check_interval": parse_duration,
    "resumable_storage": lambda value, *, name: None if value is None else _parse_storage(value, name=name),
    "resumable_expires_after": parse_duration,
    "resumable_idle_timeout": parse_duration,
    "resumable_keep_completed": parse_duration,
    "resumable_max_streams": _parse_streams,
}

#: One line per field for the settings reference (docs/settings.md is generated from this table and
#: the defaults below, never copied): ``(default as written in an environment variable, meaning)``.
SETTING_HELP: dict[str, tuple[str, str]] = {
    "temp_dir": ("`~/.cache/uploadguard/tmp`", "where upload temp files go; owned by the user the workers run as, "
                 "or root (workers running as root may use a directory of any owner, e.g. an app-owned volume)"),
    "max_body_size": ("`200M`", "largest body, inclusive; binary K/M/G as nginx (`1.5G` too, rounded down to "
                      "whole bytes); `0` = off"),
    "retry_after": ("`5`", "seconds in `Retry-After`"),
    "min_free_space": ("`16M`", "free space kept after spooling the announced body"),
    "drain_max": ("2 × limit", "body bytes read so a client can see an early error (64 MiB when the limit is off)"),
    "drain_timeout": ("`10`", "seconds spent draining at most"),
    "check_interval": ("`0.1`", "seconds a busy worker reuses a healthy temp-dir verdict (`0` = check every request)"),
    "resumable_storage": ("`~/.local/share/uploadguard/uploads`", "where resumable uploads live: a persistent "
                          "directory (never `/tmp`), or `s3://bucket/prefix` (several hosts)"),
    "resumable_expires_after": ("`24h`", "inactivity after which an incomplete resumable upload expires "
                                "(`0` = never)"),
    "resumable_idle_timeout": ("`30`", "seconds without a byte that end a resumable PATCH (the bytes received count)"),
    "resumable_keep_completed": ("`7d`", "how long a completed resumable upload the app has not deleted is kept "
                                 "after it completed (`0` = forever); then it is 410 and `uploadguard clean` "
                                 "removes it"),
    "resumable_max_streams": ("`auto`", "resumable bodies read at once by the host's workers; more get 503 + "
                              "`Retry-After` at once (`auto`: sync workers − 1, gthread threads − 1 per worker, no "
                              "cap on an event loop; `0` = no cap)"),
}


def settings_reference() -> str:
    """The settings reference as a Markdown table, one row per field in declaration order.

    The documentation renders this (``docs/hooks.py``) so the one list of settings is the code's.
    """
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for field in _PARSERS:
        default, meaning = SETTING_HELP[field]
        rows.append(f"| `{ENV_PREFIX}{field.upper()}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def default_temp_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where uploads spool when nobody said: a per-user cache dir, found without needing a home.

    In order: ``$XDG_CACHE_HOME/uploadguard/tmp``; ``~/.cache/uploadguard/tmp``
    when the home directory (``$HOME``, else the passwd entry) exists; else
    ``/dev/shm/uploadguard-<uid>/tmp``.  A service user often has no home
    (``HOME`` unset, a ``DynamicUser=`` uid without a passwd entry, or
    ``/nonexistent``), and a default that needs one would make ``doctor``,
    gunicorn and ``UploadGuard()`` fail for a setting nobody asked for.  The
    last resort is per uid, so users never share it; outside ``/tmp`` and
    ``/var/tmp``, so ``PrivateTmp=`` and ``systemd-tmpfiles`` leave it alone;
    and on the world-writable sticky ``/dev/shm`` that every Linux has, so any
    uid can create it (the guard refuses it if another user made it first,
    as it checks owner and mode).  It is memory: ``doctor`` reports whether a
    full-size upload fits.  Without ``/dev/shm`` either, :class:`ConfigError`
    asks for ``UPLOADGUARD_TEMP_DIR``.

    Not derived from :func:`tempfile.gettempdir`, because the gunicorn hooks
    point ``tempfile`` *at* this directory; the default must not move once they have.
    """
    environ = os.environ if environ is None else environ
    cache = environ.get("XDG_CACHE_HOME") or ""
    if os.path.isabs(cache):
        return Path(cache) / "uploadguard" / "tmp"
    home = os.path.expanduser("~")  # "~" unchanged when HOME is unset and the uid has no passwd entry
    if os.path.isabs(home) and os.path.isdir(home):
        return Path(home) / ".cache" / "uploadguard" / "tmp"
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return Path(shm) / f"uploadguard-{os.geteuid()}" / "tmp"
    raise ConfigError(f"UPLOADGUARD_TEMP_DIR is not set and there is no default for uid {os.geteuid()}: "
                      f"no XDG_CACHE_HOME, no home directory ({home!r}) and no writable /dev/shm; "
                      "set UPLOADGUARD_TEMP_DIR to a directory for upload temp files")


def default_resumable_storage(environ: Mapping[str, str] | None = None) -> Path:
    """Where resumable uploads live when nobody said: persistent per-user data, never ``/tmp``.

    ``$XDG_DATA_HOME/uploadguard/uploads``, else ``~/.local/share/uploadguard/uploads``
    when the home directory exists: any user can create it on a fresh
    machine, and no tmp cleaner ages it.  Resolved only when resumable
    uploads are used (a ``None`` in :class:`Settings`), so a service user
    without a home runs the rest of uploadguard; for resumable uploads it gets
    :class:`ConfigError` asking for ``UPLOADGUARD_RESUMABLE_STORAGE`` --
    persistent uploads must not fall back to memory or ``/tmp``.
    """
    environ = os.environ if environ is None else environ
    data = environ.get("XDG_DATA_HOME") or ""
    if os.path.isabs(data):
        return Path(data) / "uploadguard" / "uploads"
    home = os.path.expanduser("~")
    if os.path.isabs(home) and os.path.isdir(home):
        return Path(home) / ".local" / "share" / "uploadguard" / "uploads"
    raise ConfigError(f"UPLOADGUARD_RESUMABLE_STORAGE is not set and uid {os.geteuid()} has no XDG_DATA_HOME and no "
                      f"home directory ({home!r}); set it to a persistent directory for resumable uploads")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Effective uploadguard settings; immutable, validated on creation (see the settings reference in the docs)."""

    temp_dir: Path
    max_body_size: int = 200 * 1024**2  # bytes, inclusive; 0 = no limit
    retry_after: int = 5  # seconds
    min_free_space: int = 16 * 1024**2  # bytes kept free after the body is spooled
    drain_max: int | None = None  # bytes; None = 2 x max_body_size
    drain_timeout: float = 10.0  # seconds
    check_interval: float = 0.1  # seconds
    resumable_storage: Path | str | None = None  # directory or s3://bucket/prefix; None = default_resumable_storage()
    resumable_expires_after: float = 86400.0  # seconds of inactivity before an incomplete upload expires; 0 = never
    resumable_idle_timeout: float = 30.0  # seconds without a byte that end a resumable PATCH
    #: seconds a completed resumable upload the app has not deleted is kept after it completed; 0 = forever
    resumable_keep_completed: float = 7 * 86400.0
    resumable_max_streams: int | None = None  # PATCH bodies read at once per host; None = auto; 0 = no cap

    def __post_init__(self) -> None:
        # Direct construction goes through the same parsers as every other source.
        for field in dataclasses.fields(self):
            parse = _PARSERS[field.name]
            object.__setattr__(self, field.name, parse(getattr(self, field.name), name=field.name))

    @property
    def drain_bytes(self) -> int:
        """The effective drain bound in bytes: ``drain_max``, else twice the limit, else 64 MiB."""
        if self.drain_max is not None:
            return self.drain_max
        return 2 * self.max_body_size if self.max_body_size else _DRAIN_WITHOUT_LIMIT

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        framework: Callable[[str], Any] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Settings from keyword ``overrides``, then ``framework``, then ``UPLOADGUARD_*`` variables.

        ``framework(name)`` returns a framework's value for a setting name
        (``"UPLOADGUARD_MAX_BODY_SIZE"``) or ``None``: how Django settings and
        a Flask config win over the environment, with their typed values
        parsed as they are, never turned into strings and back.  ``None``
        overrides are ignored, so callers can pass their keyword arguments
        straight through.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, parse in _PARSERS.items():
            name = ENV_PREFIX + field.upper()
            value = framework(name) if framework is not None else None
            if value is None:
                value = environ.get(name)
                if value is not None and not value.strip():
                    value = None  # an empty variable means the default
            if value is not None:
                values[field] = parse(value, name=name)
        values.update(_parse_overrides(overrides))
        if "temp_dir" not in values:
            values["temp_dir"] = default_temp_dir(environ)
        return cls(**values)

    def replace(self, **overrides: Any) -> Settings:
        """A copy with some fields changed (``None`` means keep), validated again."""
        return dataclasses.replace(self, **_parse_overrides(overrides))

    def effective_resumable_storage(self) -> Path | str:
        """``resumable_storage``, or the default directory; :class:`ConfigError` when there is none."""
        return self.resumable_storage or default_resumable_storage()

    def describe(self) -> str:
        """One log line with the effective values."""
        limit = "off" if not self.max_body_size else format_size(self.max_body_size)
        return (
            f"temp_dir={self.temp_dir} max_body_size={limit} retry_after={self.retry_after}s "
            f"min_free_space={format_size(self.min_free_space)} drain_max={format_size(self.drain_bytes)} "
            f"drain_timeout={self.drain_timeout:g}s check_interval={self.check_interval:g}s "
            f"resumable_storage={self._storage_text()} "
            f"resumable_expires_after={self.resumable_expires_after:g}s "
            f"resumable_idle_timeout={self.resumable_idle_timeout:g}s "
            f"resumable_keep_completed={self.resumable_keep_completed:g}s "
            f"resumable_max_streams={'auto' if self.resumable_max_streams is None else self.resumable_max_streams}"
        )


    def _storage_text(self) -> str:
        """The storage the line's reader would look for: the default's path, not the word "default"."""
        if self.resumable_storage is not None:
            return str(self.resumable_storage)
        try:
            return f"{default_resumable_storage()}(default)"
        except ConfigError:
            return "none(no home directory: set UPLOADGUARD_RESUMABLE_STORAGE for resumable uploads)"


def _parse_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(_PARSERS)
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return {field: _PARSERS[field](value, name=field) for field, value in overrides.items() if value is not None}


#: Every variable :meth:`Settings.from_environ` reads (and every framework setting name).
SETTING_NAMES = tuple(ENV_PREFIX + field.name.upper() for field in dataclasses.fields(Settings))


@dataclasses.dataclass(frozen=True)
class ServerPool:
    """The worker pool serving this process's requests, as the server reported it (gunicorn's hooks)."""

    workers: int
    threads: int  # request threads per worker
    worker_class: str  # "sync", "gthread" (blocking), "asgi" (gunicorn's ASGI worker), else the class name

    @property
    def blocking(self) -> bool:
        """Whether a request holds a whole thread (sync, gthread) rather than a coroutine for its duration."""
        return self.worker_class in ("sync", "gthread")


_server_pool: ServerPool | None = None


def note_server_pool(pool: ServerPool | None) -> None:
    """Record the pool this process serves in (called by :func:`uploadguard.gunicorn.post_worker_init`)."""
    global _server_pool
    _server_pool = pool


def server_pool() -> ServerPool | None:
    """The pool :func:`note_server_pool` recorded, or ``None`` (another server, or gunicorn without the hooks)."""
    return _server_pool


def stream_caps(setting: int | None, pool: ServerPool | None) -> tuple[int, int]:
    """How many request bodies the resumable endpoint reads at once: (per host pool, per process); 0 = no cap.

    A PATCH body is streamed as the phone sends it, so under a blocking
    worker class each one holds a worker (sync) or a thread (gthread) for as
    long as the phone takes: without a cap, as many slow phones as there are
    workers stop the whole site.  ``auto`` keeps one of each worker's threads
    (sync: one worker of the pool) for everything else: sync workers read at
    most ``workers - 1`` bodies (at least 1), gthread workers ``threads - 1``
    each.  An event loop (the ASGI worker) holds no thread per body: no cap.
    An explicit number caps the pool only.
    """
    if setting is not None:
        return setting, 0
    if pool is None or not pool.blocking:
        return 0, 0
    if pool.threads > 1:
        return pool.workers * (pool.threads - 1), pool.threads - 1
    return max(1, pool.workers - 1), 0


def format_size(size: int) -> str:
    """``209715200`` -> ``"200M"``; exact binary multiples only, else bytes."""
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
