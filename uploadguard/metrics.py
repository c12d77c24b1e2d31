"""Prometheus metrics for the guard (extra ``[metrics]``: ``prometheus_client``).

:func:`install` subscribes to a guard's :class:`~uploadguard.wsgi.GuardStats`
and counts into ``prometheus_client``'s default registry; without
``prometheus_client`` it does nothing.  :class:`~uploadguard.UploadGuard`
calls it itself, so installing the extra is all it takes.

Metrics (counters; the ``_created`` series ``prometheus_client`` adds are omitted here):

``uploadguard_requests_guarded_total``
    Requests with a body that the guard checked.
``uploadguard_error_responses_total{code, reason}``
    Error responses the guard answered instead of the application:
    ``code="413"`` ``reason="body_too_large"``; ``code="503"`` with the
    temp-dir reason (``missing``, ``no_space``, ``unlinked``... see
    :mod:`uploadguard.tempdir`); ``code="500"`` with the ``errno`` name of the
    ``OSError`` (``EIO``...); ``code="400"`` ``reason="bad_request"``; ``code="411"``
    ``reason="length_required"`` (a chunked body the server would not
    deliver).  The 413, 400, 411 and 503 series exist from the start at 0, so ``increase()``
    sees the first one.
``uploadguard_temp_dir_heals_total``
    Times a vanished upload temp dir was recreated.

Alert on ``increase(uploadguard_error_responses_total{code=~"5.."}[10m]) > 0``.

**Serving them.** :func:`metrics_app` is a WSGI app answering the text
format (it defers to ``prometheus_client.make_wsgi_app``); mount it beside
the application with :func:`with_metrics`::

    from uploadguard import UploadGuard
    from uploadguard.metrics import with_metrics

    application = with_metrics(UploadGuard(application), path="/metrics")

Keep the path away from the internet (the shipped nginx site allows it from
loopback only).

**Under gunicorn with several workers** each worker counts in its own
memory, and a scrape would see one random worker.  ``prometheus_client``'s
multiprocess mode fixes that: every process writes its counts to files in
``PROMETHEUS_MULTIPROC_DIR`` and :func:`metrics_app` sums them.  The
variable must be in the environment *before any process imports*
``prometheus_client`` -- so set it where gunicorn is started (the systemd
unit's ``Environment=``), not from Python: with ``preload_app`` the
application (and this module) loads in the master before any hook runs.
uploadguard therefore does not invent a setting of its own for it.  The
directory must start empty: systemd's ``RuntimeDirectory=`` gives a fresh
one per start, and :func:`on_starting` removes stale files otherwise --
only ``prometheus_client``'s own (``counter_<pid>.db``, ``gauge_all_<pid>.db``...),
never another file that happens to end in ``.db``.  When the master runs as
root and gunicorn switches the workers to another ``user``/``group``, a
directory the master created (or that a preloaded app created through
:func:`install`) is handed to that user, or the workers could not write
their counts and the metrics would silently stay at zero.  Without the
variable, a master with several workers whose app serves the metrics
(:func:`with_metrics`, :func:`metrics_app`) warns once that each worker
counts alone; an app that never serves them hears nothing about it.
Counts of workers that exited stay in the sum (a counter must not drop
when gunicorn recycles a worker); :func:`child_exit` lets
``prometheus_client`` forget their live gauges.  Both are gunicorn hook
bodies, called by :mod:`uploadguard.gunicorn`; they never raise.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
from typing import TYPE_CHECKING, Any

from .stats import Event
from .tempdir import Reason

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from prometheus_client import Counter

    from .asgi import UploadGuard as ASGIUploadGuard
    from .wsgi import UploadGuard

__all__ = ["child_exit", "install", "metrics_app", "on_starting", "with_metrics", "MULTIPROC_ENV"]

log = logging.getLogger("uploadguard")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The temp-dir reasons (:class:`uploadguard.tempdir.Reason`), pre-initialised as 503 series.
TEMP_DIR_REASONS = tuple(reason.value for reason in Reason)
#: Reasons for the events whose guard reason is empty.
_DEFAULT_REASONS = {Event.REJECTED: "body_too_large", Event.BAD_REQUEST: "bad_request",
                    Event.LENGTH_REQUIRED: "length_required"}
_ERROR_EVENTS = frozenset({Event.REJECTED, Event.UNAVAILABLE, Event.ERROR, Event.BAD_REQUEST, Event.LENGTH_REQUIRED})

#: The files prometheus_client's multiprocess mode writes: ``<type>_<pid>.db`` (see its ``values.py``).
_OWN_FILE = re.compile(r"(?:counter|histogram|summary|gauge_(?:live)?(?:all|min|max|sum|mostrecent))_[0-9]+\.db")

_lock = threading.Lock()
_counters: _Counters | None = None
_missing = False  # prometheus_client is not installed, or creating the counters failed
_serving = False  # this process mounted or answered the metrics endpoint
_gunicorn_workers = 1  # set by on_starting in the master; workers inherit it
_warned = False


class _Counters:
    def __init__(self) -> None:
        from prometheus_client import Counter

        self.guarded: Counter = Counter(
            "uploadguard_requests_guarded", "Requests with a body that uploadguard checked.")
        self.errors: Counter = Counter(
            "uploadguard_error_responses",
            "Error responses uploadguard answered instead of the application, by HTTP status and reason.",
            ["code", "reason"])
        self.heals: Counter = Counter(
            "uploadguard_temp_dir_heals", "Times uploadguard recreated a vanished upload temp dir.")
        for code, reason in _DEFAULT_REASONS.items():
            self.errors.labels(code=code, reason=reason)
        for reason in TEMP_DIR_REASONS:
            self.errors.labels(code="503", reason=reason)


def _get_counters() -> _Counters | None:
    """The process-wide counters, created on first use; ``None`` without ``prometheus_client``."""
    global _counters, _missing
    with _lock:
        if _counters is None and not _missing:
            if importlib.util.find_spec("prometheus_client") is None:
                _missing = True
                log.debug("prometheus_client is not installed; no metrics")
                return None
            try:
                directory = os.environ.get(MULTIPROC_ENV)
                if directory:  # prometheus_client opens its files there as soon as a counter exists
                    os.makedirs(directory, mode=0o700, exist_ok=True)
                _counters = _Counters()
            except Exception:
                _missing = True
                log.warning("cannot create the Prometheus metrics; continuing without them",
                            exc_info=True)
        return _counters


def _record(event: str, reason: str) -> None:
    counters = _counters or _get_counters()
    if counters is None:
        return
    if event == Event.GUARDED:
        counters.guarded.inc()
    elif event == Event.HEALED:
        counters.heals.inc()
    elif event in _ERROR_EVENTS:
        counters.errors.labels(code=event, reason=reason or _DEFAULT_REASONS.get(Event(event), "unknown")).inc()


def install(guard: UploadGuard | ASGIUploadGuard) -> None:
    """Count ``guard``'s events in Prometheus counters; idempotent, never raises.

    A no-op (one DEBUG line) when ``prometheus_client`` is not installed.
    """
    if _record in guard.stats.listeners:
        return
    if _get_counters() is not None:
        guard.stats.listeners.append(_record)


def metrics_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """WSGI app answering the metrics, summed over all processes in multiprocess mode.

    Raises :class:`ImportError` naming the extra when ``prometheus_client`` is missing.
    """
    prometheus_client = _require()
    _note_serving()
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = prometheus_client.REGISTRY
    app: WSGIApplication = prometheus_client.make_wsgi_app(registry)
    return app(environ, start_response)


def with_metrics(app: WSGIApplication, path: str = "/metrics") -> WSGIApplication:
    """``app``, except that ``GET path`` answers :func:`metrics_app`.

    Raises :class:`ImportError` naming the extra when ``prometheus_client`` is missing.
    """
    if not path.startswith("/"):
        raise ValueError(f"path={path!r} must start with '/'")
    _require()
    _note_serving()

    def dispatch(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == path:
            return metrics_app(environ, start_response)
        return app(environ, start_response)

    return dispatch


def _require() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError("uploadguard.metrics needs prometheus_client: pip install 'uploadguard[metrics]'") from exc
    return prometheus_client


def _note_serving() -> None:
    """This process serves the metrics: from now on a lone worker's count is worth a warning."""
    global _serving
    _serving = True
    _warn_if_counting_alone()


def _warn_if_counting_alone() -> None:
    """Warn once when several gunicorn workers serve metrics without multiprocess mode."""
    global _warned
    if _serving and not _warned and _gunicorn_workers > 1 and not os.environ.get(MULTIPROC_ENV):
        _warned = True
        log.warning("%s is not set: each of the %s gunicorn workers counts its own "
                    "metrics and a scrape sees one of them", MULTIPROC_ENV, _gunicorn_workers)


def on_starting(server: Any) -> None:
    """gunicorn ``on_starting`` body (master, before workers fork): prepare the multiprocess dir.

    Creates ``$PROMETHEUS_MULTIPROC_DIR``, hands it to gunicorn's ``user``/``group``
    when the master is root and they differ, and removes the files
    ``prometheus_client`` wrote there in a previous run (except this master's
    own, written if the app was preloaded); a re-executed master (``USR2``)
    leaves them, as the old workers still write there.  Without the variable,
    warns when several workers serve metrics that each counts alone (at the
    first scrape when the app is not preloaded).
    """
    global _gunicorn_workers
    try:
        _gunicorn_workers = int(getattr(server.cfg, "workers", 1))
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            _warn_if_counting_alone()
            return
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _hand_to_workers(server, directory)
        if getattr(server, "master_pid", 0):
            return
        own = f"_{os.getpid()}.db"
        for name in os.listdir(directory):
            if _OWN_FILE.fullmatch(name) and not name.endswith(own):
                os.unlink(os.path.join(directory, name))
    except Exception:
        log.exception("preparing the metrics directory failed")


def _hand_to_workers(server: Any, directory: str) -> None:
    """Chown the directory to the workers' uid/gid when a root master made it for workers that are not root.

    gunicorn switches users in each worker after the fork; a directory the
    master created ``0700`` as root would refuse their files.  A directory
    owned by anyone but the master is the administrator's choice and left alone.
    """
    uid, gid = int(getattr(server.cfg, "uid", os.geteuid())), int(getattr(server.cfg, "gid", os.getegid()))
    if os.geteuid() != 0 or (uid, gid) == (0, 0):
        return
    if os.stat(directory).st_uid != os.geteuid():
        return
    os.chown(directory, uid, gid)
    for name in os.listdir(directory):  # a preloaded app's files: the workers read them when they scrape
        if _OWN_FILE.fullmatch(name):
            os.chown(os.path.join(directory, name), uid, gid, follow_symlinks=False)
    log.info("%s %s now belongs to uid %s gid %s, the workers' user", MULTIPROC_ENV, directory, uid, gid)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn ``child_exit`` body (master): let ``prometheus_client`` forget the worker's live gauges."""
    try:
        if os.environ.get(MULTIPROC_ENV) and importlib.util.find_spec("prometheus_client"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
    except Exception:
        log.exception("marking worker %s dead for the metrics failed", getattr(worker, "pid", "?"))
