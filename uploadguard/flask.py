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
(``PROPAGATE_EXCEPTIONS`` true, as in debug and testing mode).  Wrapped
again from outside (``UploadGuard(app)`` of :mod:`uploadguard.wsgi` in a
``wsgi.py``), the app's own, smaller limit still holds.  With it false
(production), Flask turns an unhandled exception into its 500 itself
(``Flask.handle_exception``) after sending ``got_request_exception``; this
module's receiver keeps the exception in ``request.environ`` under
``"uploadguard.exception"``, and an ``after_request`` function turns the 500
into the 503.  Headers other ``after_request`` functions set (CORS,
cookies...) are kept; the 500's content headers are not.  Flask has logged
the exception by then.  An error handler you register for ``OSError`` or
``Exception`` is asked first and no signal is sent: its answer stands.

**Settings** are the ``UPLOADGUARD_*`` keys of ``app.config`` (read by
``init_app``; typed values taken as they are), then the environment: the
the docs' "Settings reference".  A bad value raises
:class:`~uploadguard.config.ConfigError` naming it.

**MAX_CONTENT_LENGTH.**  When ``UPLOADGUARD_MAX_BODY_SIZE`` is set neither in
the config nor in the environment, Flask's ``MAX_CONTENT_LENGTH`` (if set) is
uploadguard's limit too, so the app has one limit, enforced early.  When both
are set, both apply: uploadguard's before Flask runs (a 413 naming the limit,
the body drained so the client reads it), Flask's when the view reads the
form -- including a ``request.max_content_length`` a view sets for itself.

**The upload temp dir.**  Werkzeug spools file parts larger than 500 KB to
:func:`tempfile.gettempdir`; Flask has no setting for it.  Under uploadguard's
``gunicorn_conf.py`` that is ``UPLOADGUARD_TEMP_DIR`` *from the environment*
(its ``post_worker_init`` points :mod:`tempfile` there before the app's
config exists).  With the setting only in ``app.config``, or under another
server, call :func:`uploadguard.tempdir.use_as_tempdir` with it at startup;
otherwise the two differ and a WARNING says so at the first upload.

``app.extensions["uploadguard"]`` is the app's :class:`uploadguard.UploadGuard`
(``.settings``, ``.stats``); ``init_app`` also returns it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, has_request_context, request
from flask.signals import got_request_exception
from werkzeug.exceptions import BadRequest, NotFound

from .config import Settings
from .resumable.protocol import UploadIncomplete, UploadNotFound
from .wsgi import ENVIRON_GUARD, ENVIRON_INPUT, GuardedInput, remember_exception
from .wsgi import UploadGuard as WSGIUploadGuard

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

__all__ = ["ResumableUploads", "UploadGuard", "delete_resumable", "resumable_file", "settings_from_config"]

log = logging.getLogger("uploadguard")


def settings_from_config(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``UPLOADGUARD_*`` keys of a Flask config (typed as they are), then ``environ``.

    ``MAX_CONTENT_LENGTH`` is the body limit when ``UPLOADGUARD_MAX_BODY_SIZE``
    is in neither.
    """
    resolved = Settings.from_environ(environ, framework=config.get)
    own_limit = config.get("UPLOADGUARD_MAX_BODY_SIZE") is not None or (
        (os.environ if environ is None else environ).get("UPLOADGUARD_MAX_BODY_SIZE", "").strip())
    flask_limit = config.get("MAX_CONTENT_LENGTH")
    # MAX_CONTENT_LENGTH = 0 means "no body" to Werkzeug, but 0 means "no limit" here: leave that one to Flask.
    if flask_limit and not own_limit:
        resolved = resolved.replace(max_body_size=flask_limit)
    return resolved


def _remember_exception(sender: Flask, exception: BaseException, **extra: Any) -> None:
    """``got_request_exception`` receiver: Flask is about to answer 500 itself."""
    if has_request_context():
        remember_exception(request.environ, exception)


class _ReplaceServerError:
    """The ``after_request`` function: a 500 Flask made of a temp-dir error becomes the retryable 503."""

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
                log.warning("Werkzeug spools uploads to %s (tempfile.gettempdir()), but uploadguard "
                            "guards %s. Serve with uploadguard's gunicorn_conf.py, or call "
                            "uploadguard.tempdir.use_as_tempdir(%r) at startup.",
                            spool, self.guard.temp.path, self.guard.temp.path)
        error = self.guard.answer_for_caught(environ, response.status_code)
        if error is None:
            return response
        self.guard.record(error, environ)
        stream = environ.get(ENVIRON_INPUT)
        if isinstance(stream, GuardedInput) and self.guard.should_drain(error, stream, environ):
            self.guard.drain(stream, environ)
        status, headers, body = error.replacing(environ, response.headers.items())
        response.status = status
        response.headers.clear()
        for name, value in headers:
            response.headers.add(name, value)
        response.set_data(body)
        return response


class _FlaskUploadGuard(WSGIUploadGuard):
    """The guard around a Flask app's ``wsgi_app``, knowing the app's resumable endpoint (whenever it is added)."""

    def __init__(self, flask_app: Flask, **options: Any) -> None:
        super().__init__(flask_app.wsgi_app, **options)
        self.flask_app = flask_app

    def spools_body(self, environ: WSGIEnvironment) -> bool:
        endpoint = self.flask_app.extensions.get("uploadguard.resumable")
        return True if endpoint is None else bool(endpoint.spools_body(environ))


class UploadGuard:
    """Flask extension; see the module documentation."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> WSGIUploadGuard:
        """Guard ``app``; returns its :class:`uploadguard.UploadGuard` (also ``app.extensions["uploadguard"]``)."""
        if "uploadguard" in app.extensions:
            raise RuntimeError(f"uploadguard is already set up for the Flask app {app.name!r}")
        guard = _FlaskUploadGuard(app, settings=settings_from_config(app.config))
        app.wsgi_app = guard  # type: ignore[method-assign]  # Flask's documented way to add WSGI middleware
        app.extensions["uploadguard"] = guard
        got_request_exception.connect(_remember_exception, app)
        app.after_request(_ReplaceServerError(guard))
        return guard


# -- resumable uploads -------------------------------------------------------------------

#: The session key that names an anonymous visitor's uploads.
OWNER_KEY = "uploadguard_owner"


def _owner() -> str | None:
    """The requester: ``flask_login``'s user when logged in, else the token in Flask's signed session."""
    from flask import session

    user = _current_user()
    if user is not None:
        return f"user:{user}"
    token = session.get(OWNER_KEY)
    return f"anon:{token}" if token else None


def _give_owner_token() -> None:
    """``before_request``: a visitor's token goes into its session on its first request (the page).

    Handed out by the endpoint instead, two uploads started at once would
    each make one, and the session cookie of one would orphan the other.
    """
    from flask import session

    if OWNER_KEY not in session:
        import secrets

        session[OWNER_KEY] = secrets.token_urlsafe(24)


def _current_user() -> str | None:
    try:
        from flask_login import current_user  # type: ignore[import-not-found]  # optional: Flask-Login apps
    except ImportError:
        return None
    if getattr(current_user, "is_authenticated", False):
        return str(current_user.get_id())
    return None


class ResumableUploads:
    """The resumable-upload endpoint (tus 1.0 and the IETF draft) as Flask views.

    ::

        from uploadguard.flask import ResumableUploads, UploadGuard, resumable_file

        UploadGuard(app)                          # the guard covers the endpoint too
        ResumableUploads(app, on_complete=done)   # /files/ (prefix=...)

        @app.post("/photos")
        def photos():
            file = resumable_file(request.form["upload"])   # a FileStorage
            file.save(MEDIA / secure_filename(file.filename))  # the name is the client's word

    The views run inside Flask, so ``before_request`` functions, Flask-Login
    and CSRF extensions (Flask-WTF's ``CSRFProtect`` checks every POST,
    PATCH and DELETE) apply to them.  An upload belongs to whoever created it:
    the Flask-Login user when there is one, else a token put in Flask's signed
    session on the visitor's first request; anybody else gets 404.  Settings are the ``UPLOADGUARD_*`` keys
    of ``app.config`` over the environment (the docs' settings reference).
    ``app.extensions["uploadguard.resumable"]`` is the
    :class:`uploadguard.resumable.ResumableUploads`.
    """

    def __init__(self, app: Flask | None = None, *, prefix: str = "/files/",
                 on_complete: Any = None, cors_origins: Any = ()) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.on_complete = on_complete
        self.cors_origins = cors_origins
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> Any:
        from .resumable import ResumableUploads as Endpoint

        if not app.secret_key:
            raise RuntimeError("uploadguard.flask.ResumableUploads keeps each visitor's uploads apart in Flask's "
                               "signed session: set app.secret_key (SECRET_KEY)")
        endpoint = Endpoint(None, prefix=self.prefix, settings=settings_from_config(app.config),
                            on_complete=self.on_complete, cors_origins=self.cors_origins)
        app.extensions["uploadguard.resumable"] = endpoint

        def serve(rest: str = "") -> Response:
            status, headers, body = endpoint.handle(request.environ, owner=_owner())
            return Response(b"".join(body), status=status, headers=headers)

        app.before_request(_give_owner_token)
        methods = ["POST", "HEAD", "PATCH", "DELETE", "OPTIONS"]
        app.add_url_rule(self.prefix, "uploadguard_resumable", serve, methods=methods,
                         provide_automatic_options=False, strict_slashes=False)
        app.add_url_rule(self.prefix + "<rest>", "uploadguard_resumable_upload", serve, methods=methods,
                         provide_automatic_options=False)
        return endpoint


class _FlaskUploadNotFound(UploadNotFound, NotFound):  # type: ignore[misc]  # Flask answers it as a NotFound
    """An unknown upload that Flask also answers itself (404) in any view."""


class _FlaskUploadIncomplete(UploadIncomplete, BadRequest):  # type: ignore[misc]  # likewise, a BadRequest
    """An upload still in progress that Flask also answers itself (400) in any view."""


def _endpoint() -> Any:
    from flask import current_app

    endpoint = current_app.extensions.get("uploadguard.resumable")
    if endpoint is None:
        raise RuntimeError("uploadguard.flask.resumable_file() and delete_resumable() need "
                           "uploadguard.flask.ResumableUploads(app)")
    return endpoint


def delete_resumable(url: str) -> None:
    """Remove the upload ``url`` names (data, info, lock) -- only for whoever created it.

    Call it once the file is where it belongs: otherwise a completed upload
    stays ``UPLOADGUARD_RESUMABLE_KEEP_COMPLETED`` (7 days) after it
    completed.  Raises what :func:`resumable_file` raises for an unknown or
    another's upload, and :class:`uploadguard.resumable.UploadLocked` while
    a request still holds it.
    """
    try:
        _endpoint().delete(url, owner=_owner())
    except UploadNotFound as exc:
        raise _FlaskUploadNotFound(exc.detail) from None


def resumable_file(url: str) -> Any:
    """The completed upload ``url`` (or id) names, as a Werkzeug ``FileStorage`` -- only for whoever created it.

    Its ``filename`` is the client's ``Upload-Metadata`` value, as a form
    upload's is: pass it through ``werkzeug.utils.secure_filename`` before it
    names a file (``../../x`` is a valid value).

    Raises :class:`uploadguard.resumable.UploadNotFound` (unknown, expired,
    another's) or :class:`uploadguard.resumable.UploadIncomplete`; both are
    also Werkzeug's ``NotFound`` and ``BadRequest``, so Flask answers an
    uncaught one with a 404 or 400 in any view.
    """
    from werkzeug.datastructures import FileStorage

    try:
        upload = _endpoint().get(url, owner=_owner())
    except UploadNotFound as exc:
        raise _FlaskUploadNotFound(exc.detail) from None
    except UploadIncomplete as exc:
        raise _FlaskUploadIncomplete(exc.detail) from None
    metadata = upload.metadata
    return FileStorage(stream=upload.open(), filename=metadata.get("filename") or metadata.get("name") or upload.id,
                       content_type=metadata.get("filetype") or metadata.get("type") or "application/octet-stream",
                       content_length=upload.length)
