"""gunicorn settings and hooks for serving uploads; itself a gunicorn config module.

Run any WSGI application with it, from a checkout or from an installed package::

    gunicorn -c gunicorn_conf.py app:application            # the repo's readable file
    gunicorn -c python:uploadguard.gunicorn app:application  # the same, no checkout needed

``gunicorn_conf.py`` takes every value from this module, so both forms are
the same configuration.  gunicorn's precedence is untouched: this module <
``GUNICORN_CMD_ARGS`` < the command line.

Settings (gunicorn's own names; each read from the environment once, when
gunicorn loads the configuration; a bad value raises
:class:`~uploadguard.config.ConfigError` naming the variable):

``bind``                 ``0.0.0.0:$PORT`` when ``PORT`` is set (gunicorn's own
                         convention), else ``127.0.0.1:8000``
``workers``              ``WEB_CONCURRENCY``, else 2 x CPUs + 1, at most 8
``max_requests``         ``GUNICORN_MAX_REQUESTS``, default 500: a worker is
                         recycled after that many requests (0 = never)
``max_requests_jitter``  ``GUNICORN_MAX_REQUESTS_JITTER``, default 100, so the
                         workers do not all recycle at once
``timeout``              ``GUNICORN_TIMEOUT``, default 600 s (``"10m"`` works):
                         a slow upload is not a hung worker
``graceful_timeout``     ``GUNICORN_GRACEFUL_TIMEOUT``, default 60 s: in-flight
                         requests get that long on a restart, inside systemd's
                         default ``TimeoutStopSec`` of 90 s
``accesslog``            ``"-"`` (stdout)
``errorlog``             ``"-"`` (stderr)
``worker_tmp_dir``       ``/dev/shm`` where it is a writable directory (a tmpfs,
                         as gunicorn's FAQ advises), else
                         ``~/.cache/uploadguard/gunicorn``, created by the master

Hooks (every one logs and swallows its own exceptions: gunicorn stops the
whole server when ``post_worker_init``, ``child_exit`` or
``nworkers_changed`` raises):

``on_starting``       master, once, before the sockets are bound: reads the
                      ``UPLOADGUARD_*`` settings (the same
                      :meth:`~uploadguard.config.Settings.from_environ` as the
                      middleware) and stops gunicorn with one line naming the
                      variable if one is bad, before any worker forks; logs the
                      effective settings; prepares ``worker_tmp_dir``.
``nworkers_changed``  master, at startup, on every reload (``HUP``) and on
                      ``TTIN``/``TTOU``; and ``child_exit``, master, after each
                      worker exits (a ``max_requests`` recycle): make sure the
                      next worker's heartbeat file can be created.  gunicorn
                      creates it in the master, in the worker's constructor,
                      which runs *before* ``pre_fork`` -- so these are the hooks
                      that run early enough.  A missing directory is recreated;
                      one that cannot be used is replaced by the fallback above.
                      Without this, deleting ``worker_tmp_dir`` (or, with the
                      default of gunicorn 27, the directory ``TMPDIR`` named when
                      the master started) makes the next recycle raise in the
                      master, and the server exits.
``post_worker_init``  each worker, after gunicorn's ``user``/``group`` switch:
                      creates the upload temp dir if missing (mode 0700, owned by
                      the worker's user), checks it with a write probe and points
                      :mod:`tempfile` and ``TMPDIR`` at it, so Django, Werkzeug and
                      any library spool there instead of the master's cached
                      choice (gunicorn#1215).  If it cannot be used, the worker
                      still boots: the error is logged, :mod:`tempfile` picks a
                      working directory again, and the middleware answers uploads
                      with 503 while the rest of the site works.
                      Under gunicorn's ASGI worker it also keeps ``backlog``:
                      that worker serves its sockets through asyncio's
                      ``create_server`` without one, and asyncio calls
                      ``listen(100)`` on the socket all workers share, so the
                      configured backlog (2048 by default) silently became 100
                      and a burst of new connections lost SYNs, each retried by
                      the client's kernel a second later.
``pre_request``       gunicorn's default (logs ``METHOD path`` at debug), plus
                      a lazy ``Expect: 100-continue``: gunicorn sends
                      ``100 Continue`` itself before the application runs, so a
                      client would send a body the application is about to
                      refuse.  The hook defers it until the application first
                      reads the body (:class:`~uploadguard.wsgi.ContinueOnRead`),
                      so a 413 or 503 -- whatever limit or check decided it,
                      ``UploadGuard``, Django or Flask settings -- reaches the
                      client before it sends a byte.  gunicorn's ASGI worker
                      (``-k asgi``) does that itself (``100 Continue`` on the
                      first ``receive()``): there the hook only logs.
``child_exit``        also calls :func:`uploadguard.metrics.child_exit`;
                      ``on_starting`` calls :func:`uploadguard.metrics.on_starting`.

Every public name in this module is a gunicorn setting: gunicorn applies
every name of a ``python:`` config module that matches a setting and silently
ignores the rest, so helpers and imports are private (``_``).
"""

import functools as _functools
import logging as _logging
import os as _os
import tempfile as _tempfile
from collections.abc import Callable as _Callable
from collections.abc import Mapping as _Mapping
from typing import Any as _Any
from typing import ParamSpec as _ParamSpec
from typing import Protocol as _Protocol

from .config import ConfigError as _ConfigError
from .config import ServerPool as _ServerPool
from .config import Settings as _Settings
from .config import note_server_pool as _note_server_pool
from .config import default_temp_dir as _default_temp_dir
from .config import parse_duration as _parse_duration
from .tempdir import Health as _Health
from .tempdir import ensure_temp_dir as _ensure_temp_dir
from .tempdir import probe_write as _probe_write
from .tempdir import use_as_tempdir as _use_as_tempdir
from .wsgi import ContinueOnRead as _ContinueOnRead

_log = _logging.getLogger("uploadguard")

_MAX_DEFAULT_WORKERS = 8
_SHM = "/dev/shm"


# -- reading the environment ---------------------------------------------------------


def _whole_number(environ: _Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not minimum <= int(raw) <= 2**31 - 1:
        raise _ConfigError(f"{name}={raw!r} is not a whole number from {minimum} to {2**31 - 1}")
    return int(raw)


_MAX_TIMEOUT = 86400  # seconds: past a day select() overflows in the workers, and no upload takes that long


def _seconds(environ: _Mapping[str, str], name: str, default: int) -> int:
    """Whole seconds from 1 s to a day; gunicorn would read a value rounded to 0 as "no timeout"."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    seconds = round(_parse_duration(raw, name=name))
    if not 1 <= seconds <= _MAX_TIMEOUT:
        raise _ConfigError(f"{name}={raw!r} must be between 1 second and 1 day (e.g. 600 or 10m)")
    return seconds


def _bind(environ: _Mapping[str, str]) -> list[str]:
    raw = environ.get("PORT", "").strip()
    if not raw:
        return ["127.0.0.1:8000"]
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < 65536:
        raise _ConfigError(f"PORT={raw!r} is not a TCP port (1-65535)")
    return [f"0.0.0.0:{int(raw)}"]


def _cpus() -> int:
    try:
        return len(_os.sched_getaffinity(0))  # honours CPU pinning (taskset, cpusets)
    except AttributeError:  # not on Linux
        return _os.cpu_count() or 1


def _fallback_worker_tmp_dir(environ: _Mapping[str, str]) -> str | None:
    """Where heartbeat files go without a usable ``/dev/shm``: next to the default upload dir.

    ``None`` (gunicorn's own default) when there is no default upload dir
    either: loading this config must not fail over a directory nobody named.
    """
    try:
        return str(_default_temp_dir(environ).parent / "gunicorn")
    except _ConfigError:
        return None


def _worker_tmp_dir(environ: _Mapping[str, str], *, shm: str = _SHM) -> str | None:
    if _os.path.isdir(shm) and _os.access(shm, _os.W_OK | _os.X_OK):
        return shm
    return _fallback_worker_tmp_dir(environ)


# -- settings --------------------------------------------------------------------------

bind = _bind(_os.environ)
workers = _whole_number(_os.environ, "WEB_CONCURRENCY", min(2 * _cpus() + 1, _MAX_DEFAULT_WORKERS), minimum=1)
max_requests = _whole_number(_os.environ, "GUNICORN_MAX_REQUESTS", 500)
max_requests_jitter = _whole_number(_os.environ, "GUNICORN_MAX_REQUESTS_JITTER", 100)
timeout = _seconds(_os.environ, "GUNICORN_TIMEOUT", 600)
graceful_timeout = _seconds(_os.environ, "GUNICORN_GRACEFUL_TIMEOUT", 60)
accesslog = "-"
errorlog = "-"
worker_tmp_dir = _worker_tmp_dir(_os.environ)


# -- what the hooks are given (gunicorn's classes, described structurally) -----------


class _Log(_Protocol):  # gunicorn.glogging.Logger
    def debug(self, msg: str, *args: object) -> None: ...
    def info(self, msg: str, *args: object) -> None: ...
    def warning(self, msg: str, *args: object) -> None: ...
    def error(self, msg: str, *args: object, exc_info: BaseException | None = None) -> None: ...


class _Server(_Protocol):  # gunicorn.arbiter.Arbiter
    cfg: _Any
    log: _Log
    pidfile: _Any


class _Worker(_Protocol):  # gunicorn.workers.base.Worker
    log: _Log
    cfg: _Any


class _Request(_Protocol):  # gunicorn.http.message.Request
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: _Any
    must_close: bool
    _expected_100_continue: bool


_P = _ParamSpec("_P")


def _never_raises(hook: _Callable[_P, None]) -> _Callable[_P, None]:
    """Log a hook's exception (to the server's or worker's log) instead of stopping gunicorn.

    The signature is kept (``functools.wraps``), which gunicorn's arity check reads.
    """

    @_functools.wraps(hook)
    def safe(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            hook(*args, **kwargs)
        except Exception as exc:
            message = "uploadguard: the %s hook failed; gunicorn carries on"
            name = hook.__name__.lstrip("_")
            try:
                getattr(args[0], "log").error(message, name, exc_info=exc)
            except Exception:
                _log.error(message, name, exc_info=exc)

    return safe


# -- master: the heartbeat directory -------------------------------------------------


def _usable_heartbeat_dir(path: str) -> _Health:
    """What gunicorn's ``WorkerTmp`` needs: a directory it can create a file in; recreated if gone."""
    health = _probe_write(path)
    if health.reason == "missing":
        # The fallback is uploadguard's own (its parents too); a configured one gets its last component only.
        health = _ensure_temp_dir(path, parents=path == _fallback_worker_tmp_dir(_os.environ))
    return health


def _ensure_worker_tmp_dir(server: _Server) -> None:
    configured = server.cfg.worker_tmp_dir
    if not configured:
        return  # gunicorn's own default: tempfile's directory
    health = _usable_heartbeat_dir(configured)
    if health.ok:
        if health.healed:
            server.log.warning("uploadguard: recreated the missing worker_tmp_dir %s", configured)
        return
    fallback = _fallback_worker_tmp_dir(_os.environ)
    if fallback is not None and fallback != configured and _usable_heartbeat_dir(fallback).ok:
        server.cfg.set("worker_tmp_dir", fallback)
        server.log.warning("uploadguard: worker_tmp_dir %s is unusable (%s); heartbeat files go to %s now",
                           configured, health.detail, fallback)
        return
    server.log.error("uploadguard: worker_tmp_dir %s is unusable (%s); gunicorn cannot start a worker "
                     "until it is fixed", configured, health.detail)


# -- hooks ---------------------------------------------------------------------------


def on_starting(server: _Server) -> None:
    """Master, once: stop on a bad ``UPLOADGUARD_*`` value, else log the settings."""
    try:
        settings = _Settings.from_environ()
    except _ConfigError as exc:
        if server.pidfile is not None:
            server.pidfile.unlink()
        # gunicorn prints a RuntimeError from here as one "Error: ..." line and exits 1.
        raise RuntimeError(f"uploadguard: {exc}") from None
    _on_starting(server, settings)


class _ToGunicornErrorLog(_logging.Handler):
    """Hands ``uploadguard`` records to gunicorn's error log, whatever handlers it has by then.

    Forwarding (rather than copying gunicorn's handlers) keeps working when
    gunicorn replaces its handlers on ``HUP`` or ``USR1``.
    """

    def __init__(self, log: _Log) -> None:
        super().__init__()
        self.log = log

    def emit(self, record: _logging.LogRecord) -> None:
        error_log = getattr(self.log, "error_log", None)
        if isinstance(error_log, _logging.Logger) and record.levelno >= error_log.getEffectiveLevel():
            # gunicorn's format has no logger name: say whose line it is, once.
            named = _logging.makeLogRecord(record.__dict__)
            named.msg, named.args = f"{record.name}: {record.getMessage()}", None
            error_log.handle(named)


def _route_logs(server: _Server) -> None:
    """Send the guard's log lines (heals at INFO, 413/503 at WARNING) where gunicorn's go.

    Left alone when the application configured the ``uploadguard`` logger itself.
    """
    logger = _logging.getLogger("uploadguard")
    if logger.handlers:
        return
    logger.addHandler(_ToGunicornErrorLog(server.log))
    logger.setLevel(_logging.INFO)
    logger.propagate = False


@_never_raises
def _on_starting(server: _Server, settings: _Settings) -> None:
    from . import metrics

    _route_logs(server)
    server.log.info("uploadguard: %s", settings.describe())
    _ensure_worker_tmp_dir(server)
    metrics.on_starting(server)


@_never_raises
def nworkers_changed(server: _Server, new_value: int, old_value: int | None) -> None:
    """Master, at startup, on reload and on TTIN/TTOU: the next workers' heartbeat dir exists."""
    _ensure_worker_tmp_dir(server)


@_never_raises
def child_exit(server: _Server, worker: _Worker) -> None:
    """Master, after a worker exited and before its replacement is made: heartbeat dir, metrics."""
    from . import metrics

    _ensure_worker_tmp_dir(server)
    metrics.child_exit(server, worker)


@_never_raises
def post_worker_init(worker: _Worker) -> None:
    """Worker, after the user switch: a usable upload temp dir that tempfile and TMPDIR name; the pool noted."""
    pool = _pool_of(worker)
    _note_server_pool(pool)
    if pool is not None and pool.worker_class == "asgi":
        _keep_backlog(worker)
    path = _Settings.from_environ().temp_dir
    health = _ensure_temp_dir(path)
    if health.ok:
        _use_as_tempdir(path)
        worker.log.info("uploadguard: upload temp dir %s %s; tempfile and TMPDIR point there",
                        path, "created" if health.healed else "ready")
    else:
        _tempfile.tempdir = None  # drop the master's cached choice: tempfile finds a working dir again
        worker.log.error("uploadguard: upload temp dir %s is unusable (%s): %s; uploads are answered "
                         "503 while it stays so", path, health.reason, health.detail)


def _keep_backlog(worker: _Worker) -> None:
    """Make the ASGI worker's ``loop.create_server`` listen with gunicorn's ``backlog``, not asyncio's 100.

    ``listen()`` sets the queue of the socket itself, which the master and
    every worker share: one worker starting (each recycle too) would shrink
    it for all.  Wrapping the loop's method before the worker serves keeps the
    queue at the configured size from the first ``listen`` on, with no window.
    """
    loop = getattr(worker, "loop", None)
    backlog = int(getattr(worker.cfg, "backlog", 0) or 0)
    if loop is None or backlog <= 0:
        return
    create_server = loop.create_server

    @_functools.wraps(create_server)
    async def create_server_keeping_backlog(*args: _Any, **kwargs: _Any) -> _Any:
        kwargs.setdefault("backlog", backlog)
        return await create_server(*args, **kwargs)

    try:
        loop.create_server = create_server_keeping_backlog
    except AttributeError:  # a loop class that takes no attributes: say what the queue will be
        worker.log.warning("uploadguard: cannot pass backlog %d to %s; the listen queue will be the "
                           "loop's default", backlog, type(loop).__name__)


def _pool_of(worker: _Worker) -> _ServerPool | None:
    """The pool ``worker`` serves in, for the resumable endpoint's cap on bodies read at once."""
    cfg = getattr(worker, "cfg", None)
    if cfg is None:
        return None
    from gunicorn.workers.gthread import ThreadWorker  # type: ignore[import-untyped]
    from gunicorn.workers.sync import SyncWorker  # type: ignore[import-untyped]

    # The instance tells what gunicorn runs ("sync" with threads > 1 is gthread), subclasses included.
    if isinstance(worker, ThreadWorker):
        kind = "gthread"
    elif isinstance(worker, SyncWorker):
        kind = "sync"
    elif type(worker).__module__ == "gunicorn.workers.gasgi":  # gunicorn's own ASGI worker: takes 1xx messages
        kind = "asgi"
    else:
        kind = type(worker).__name__
    return _ServerPool(workers=int(cfg.workers), threads=int(cfg.threads), worker_class=kind)


@_never_raises
def pre_request(worker: _Worker, req: _Request) -> None:
    """Worker, before each request: ``100 Continue`` only once the application reads the body."""
    worker.log.debug("%s %s", req.method, req.path)
    # Only a WSGI worker's request has the flag: gunicorn's ASGI worker (-k asgi) already sends
    # 100 Continue when the application first calls receive(), the deferral this hook adds.
    if getattr(req, "_expected_100_continue", False):
        _defer_continue(req)


def _defer_continue(req: _Request) -> None:
    """Replace gunicorn's eager ``100 Continue`` with :class:`~uploadguard.wsgi.ContinueOnRead`.

    gunicorn builds the environ from ``req.body`` after this hook, so the
    application reads through the wrapper.  Until the body is read the
    connection is marked to close: a client refused without its ``100
    Continue`` may still send the body after its own timeout, and those bytes
    must never be parsed as the next request.
    """
    sock = getattr(getattr(req, "unreader", None), "sock", None)
    if sock is None:
        return  # not an HTTP/1 socket request gunicorn would send 100 Continue on: leave it be
    was_closing = bool(req.must_close)

    def continued() -> None:
        req.must_close = was_closing

    req._expected_100_continue = False
    req.must_close = True
    req.body = _ContinueOnRead(req.body, sock, continued)
