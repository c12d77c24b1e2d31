"""Flask integration: ``UploadGuard(app)``, one call.

::

    from flask import Flask
    from uploadguard.flask import UploadGuard

    app = Flask(__name__)
    UploadGuard(app)

    # or, with an application factory:
    guard = UploadGuard()
    def create_app():
        app = Flask(__name__)
        guard.init_app(app)
        return app

It gives the app what :class:`uploadguard.UploadGuard` gives any WSGI
application, for every request **with a body** (requests without one pass
straight through):

* **413** for a body over ``UPLOADGUARD_MAX_BODY_SIZE``, before Flask reads a
  byte (``Content-Length``) or as soon as a chunked body passes it.
* The upload temp dir is checked first: a vanished directory is recreated, an
  unusable one is answered **503** with ``Retry-After``.
* A temp-dir error raised while Flask handles the request -- Werkzeug
  spooling a file part while the view reads ``request.files`` -- is answered
  with the same retryable **503**, whatever ``PROPAGATE_EXCEPTIONS`` says.

How: ``init_app`` wraps ``app.wsgi_app`` in :class:`uploadguard.UploadGuard`,
which handles the limit, the temp-dir check and exceptions that leave Flask
(``PROPAGATE_EXCEPTIONS`` true, as in debug and testing mode).  With it false
(production), Flask turns an unhandled exception into its 500 itself
(``Flask.handle_exception``) after sending ``got_request_exception``; this
module's receiver keeps the exception in ``request.environ`` under
``"uploadguard.exception"``, and an ``after_request`` function turns the 500
into the 503.  Headers other ``after_request`` functions set (CORS,
cookies...) are kept; the 500's content headers are not.  Flask has logged
the exception by then.  An error handler you register for ``OSError`` or
``Exception`` is asked first and no signal is sent: its answer stands.

**Settings** come from ``app.config`` (read by ``init_app``), then the
environment: ``UPLOADGUARD_TEMP_DIR``, ``UPLOADGUARD_MAX_BODY_SIZE`` (bytes or
``"200M"``), ``UPLOADGUARD_RETRY_AFTER``, ``UPLOADGUARD_MIN_FREE_SPACE``,
``UPLOADGUARD_DRAIN_MAX``, ``UPLOADGUARD_DRAIN_TIMEOUT`` and
``UPLOADGUARD_CHECK_INTERVAL``, meaning what they mean in
:mod:`uploadguard.config`.  A bad value raises
:class:`~uploadguard.config.ConfigError` naming it.

**MAX_CONTENT_LENGTH.**  When ``UPLOADGUARD_MAX_BODY_SIZE`` is set neither in
the config nor in the environment, Flask's ``MAX_CONTENT_LENGTH`` (if set) is
uploadguard's limit too, so the app has one limit, enforced early.  When both
are set, both apply: uploadguard's before Flask runs (a 413 naming the limit,
the body drained so the client reads it), Flask's when the view reads the
form -- including a ``request.max_content_length`` a view sets for itself.

**The upload temp dir.**  Werkzeug spools file parts larger than 500 KB to
:func:`tempfile.gettempdir`; Flask has no setting for it.  Under uploadguard's
``gunicorn_conf.py`` that is ``UPLOADGUARD_TEMP_DIR`` (its
``post_worker_init`` points :mod:`tempfile` there).  Under another server,
call :func:`uploadguard.tempdir.use_as_tempdir` with it at startup; otherwise
the two differ and a WARNING says so at the first upload.

``app.extensions["uploadguard"]`` is the app's :class:`uploadguard.UploadGuard`
(``.settings``, ``.stats``); ``init_app`` also returns it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, has_request_context, request
from flask.signals import got_request_exception

from .config import Settings, overlay_environ
from .errors import CONTENT_HEADERS
from .wsgi import ENVIRON_EXCEPTION, ENVIRON_GUARD, ENVIRON_INPUT, GuardedInput
from .wsgi import UploadGuard as WSGIUploadGuard

__all__ = ["UploadGuard", "settings_from_config"]

log = logging.getLogger("uploadguard")





def settings_from_config(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``UPLOADGUARD_*`` keys of a Flask config, then ``environ`` (default ``os.environ``).

    ``MAX_CONTENT_LENGTH`` is the body limit when ``UPLOADGUARD_MAX_BODY_SIZE``
    is in neither.
    """
    merged = overlay_environ(config.get, environ)
    flask_limit = config.get("MAX_CONTENT_LENGTH")
    # MAX_CONTENT_LENGTH = 0 means "no body" to Werkzeug, but 0 means "no limit" here: leave that one to Flask.
    if flask_limit and not merged.get("UPLOADGUARD_MAX_BODY_SIZE", "").strip():
        merged["UPLOADGUARD_MAX_BODY_SIZE"] = str(flask_limit)
    return Settings.from_environ(merged)


def _remember_exception(sender: Flask, exception: BaseException, **extra: Any) -> None:
    """``got_request_exception`` receiver: keep the first exception for :class:`_Answer`."""
    if has_request_context():
        request.environ.setdefault(ENVIRON_EXCEPTION, exception)


class _Answer:
    """The ``after_request`` function: a 500 Flask made of a temp-dir error becomes the 503."""

    def __init__(self, guard: WSGIUploadGuard) -> None:
        self.guard = guard
        self.spool_checked = False

    def __call__(self, response: Response) -> Response:
        environ = request.environ
        guard = environ.get(ENVIRON_GUARD)
        if not isinstance(guard, WSGIUploadGuard):
            return response  # no body, or Flask served it without the wrapper (e.g. a test request context)
        if not self.spool_checked:
            self.spool_checked = True
            spool = tempfile.gettempdir()
            if os.path.abspath(spool) != self.guard.temp.path:
                log.warning("uploadguard: Werkzeug spools uploads to %s (tempfile.gettempdir()), but uploadguard "
                            "guards %s. Serve with uploadguard's gunicorn_conf.py, or call "
                            "uploadguard.tempdir.use_as_tempdir(%r) at startup.",
                            spool, self.guard.temp.path, self.guard.temp.path)
        error = guard.replacement(environ, response.status_code)
        if error is None:
            return response
        guard.note(error, environ)
        stream = environ.get(ENVIRON_INPUT)
        if isinstance(stream, GuardedInput):
            guard.drain(stream, environ)
        _, headers, body = error.response(environ)
        for name in {key.lower() for key in response.headers.keys()} & CONTENT_HEADERS:
            del response.headers[name]
        response.status = error.status
        response.set_data(body)
        for name, value in headers:
            response.headers[name] = value
        return response



class UploadGuard:
    """Flask extension; see the module documentation."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> WSGIUploadGuard:
        """Guard ``app``; returns its :class:`uploadguard.UploadGuard` (also ``app.extensions["uploadguard"]``)."""
        if "uploadguard" in app.extensions:
            raise RuntimeError(f"uploadguard is already set up for the Flask app {app.name!r}")
        guard = WSGIUploadGuard(app.wsgi_app, settings=settings_from_config(app.config))
        app.wsgi_app = guard  # type: ignore[method-assign]  # Flask's documented way to add WSGI middleware
        app.extensions["uploadguard"] = guard
        got_request_exception.connect(_remember_exception, app)
        app.after_request(_Answer(guard))
        return guard
