# mypy: disable-error-code="import-untyped"
"""Django integration: ``UploadGuardMiddleware``, one line in ``MIDDLEWARE``.

::

    MIDDLEWARE = [
        "uploadguard.django.UploadGuardMiddleware",  # first
        "django.middleware.security.SecurityMiddleware",
        ...
    ]

It gives a Django site what :class:`uploadguard.UploadGuard` gives any WSGI
application, for every request **with a body** (requests without one pass
straight through):

* **413** for a ``Content-Length`` over ``UPLOADGUARD_MAX_BODY_SIZE``, before
  Django parses a byte.  This limit counts the whole body, files included;
  Django's ``DATA_UPLOAD_MAX_MEMORY_SIZE`` counts only the fields that are not
  files, so it cannot stop a 5 GB upload.
* The upload temp dir is checked first: a vanished directory is recreated, an
  unusable one (full, read-only, a file, ...) is answered **503** with
  ``Retry-After`` -- see :mod:`uploadguard.wsgi`.
* A temp-dir error raised anywhere while Django handles the request -- the
  view reading ``request.FILES``, ``CsrfViewMiddleware`` reading
  ``request.POST`` before the view, any middleware after this one -- is
  answered with the same retryable **503**, never Django's 500.

How the last one works: Django turns every exception into a response inside
each middleware layer (``convert_exception_to_response``), so a middleware
never sees the exception, only a 500, and ``process_exception`` is not called
for exceptions raised outside the view.  Django does send
``got_request_exception`` for each of them; this module's receiver stores the
exception in ``request.META`` (the WSGI environ) under
``"uploadguard.exception"``, and the middleware, seeing the 500 come back,
asks the core whether it was about the temp dir and replaces the response.
Headers other middleware added to the 500 (CORS, HSTS, cookies...) are kept;
its content headers are not.  By then Django has logged the exception
(``django.request``) and error trackers listening to the signal have seen it.
Exceptions your own code handles (``try``/``except``, a ``process_exception``
that returns a response) stay yours.  With ``DEBUG_PROPAGATE_EXCEPTIONS`` the
exception reaches the middleware itself and gets the same answer.  Django's
test ``Client`` re-raises every exception that reached the signal: pass
``raise_request_exception=False`` to see the 503.

**Settings.**  The ``UPLOADGUARD_*`` settings (the docs' "Settings
reference") in Django settings, typed values taken as they are; a Django
setting wins over the environment.  A bad value raises
``ImproperlyConfigured`` naming it when the middleware loads.

**The upload temp dir** is the directory Django spools uploads to, which the
middleware never changes:

* ``FILE_UPLOAD_TEMP_DIR`` when it is set.  ``UPLOADGUARD_TEMP_DIR`` may be
  left unset or name the same directory; naming another one raises
  ``ImproperlyConfigured``, since the guard would watch a directory Django
  does not use.
* Otherwise Django spools to :func:`tempfile.gettempdir`, and the middleware
  guards ``UPLOADGUARD_TEMP_DIR`` (default ``~/.cache/uploadguard/tmp``).  The
  two are the same directory under uploadguard's ``gunicorn_conf.py``, whose
  ``post_worker_init`` points :mod:`tempfile` at ``UPLOADGUARD_TEMP_DIR`` *from
  the environment* (the hook runs before Django's settings are read); a value
  set only in Django settings, or any other server, makes them differ, and the
  middleware logs a WARNING at the first upload.  Setting
  ``FILE_UPLOAD_TEMP_DIR = UPLOADGUARD_TEMP_DIR`` makes it hold everywhere.

**Chunked bodies.**  Django's ``WSGIRequest`` takes the body length from
``Content-Length`` only: a chunked request without one has an empty
``request.body``, ``POST`` and ``FILES``, so Django itself never reads or
spools it.  Code that reads ``request.META["wsgi.input"]`` directly does; for
it the middleware wraps that stream, as the WSGI middleware does, when the
server marks where the body ends (``wsgi.input_terminated``, as gunicorn
does): it is counted as it is read and cut at the limit with a 413.  Where
the server will not deliver it (uWSGI without a way to) the answer is the
WSGI guard's 411 (:func:`uploadguard.wsgi.body_length` decides both).

**With the WSGI middleware too** (``application = UploadGuard(get_wsgi_application())``):
the outer guard counts the request and checks its limit and temp dir; the
middleware still applies a smaller ``UPLOADGUARD_MAX_BODY_SIZE`` of its own,
checks Django's upload dir if the outer guard watches another (logging a
WARNING once), and turns the exceptions Django caught into its answers,
counted in the outer guard's :attr:`~uploadguard.UploadGuard.stats` when both
guard the same directory.

**Logging.**  Each 413/503 is one WARNING line of the ``uploadguard`` logger;
the response is marked logged, so Django does not add an ``ERROR
django.request`` line for it.  An exception Django caught itself is logged by
Django (with its traceback) before the middleware replaces its 500.

**System checks.**  ``manage.py check`` reports a bad ``UPLOADGUARD_*`` value
(``uploadguard.E002``), ``UPLOADGUARD_TEMP_DIR`` and ``FILE_UPLOAD_TEMP_DIR``
disagreeing (``uploadguard.E001``), uploads spooled outside the guarded dir in
this process (``uploadguard.W001``), the middleware missing or not first
(``uploadguard.W002``) and ``ResumableUploadsMiddleware`` ahead of the session
or authentication middleware it needs (``uploadguard.W003``) -- once the checks are loaded: add
``"uploadguard.django.UploadGuardConfig"`` to ``INSTALLED_APPS``.

WSGI only: under ASGI, Django reads the whole body into a temporary file
before any middleware runs -- guard it with :class:`uploadguard.asgi.UploadGuard`,
and serve resumable uploads with :class:`ResumableUploadsASGI` (in front of
``get_asgi_application()``), which keeps :class:`ResumableUploadsMiddleware`'s
rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import io
import logging
import os
import sys
import tempfile
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import got_request_exception
from django.core.files.uploadedfile import UploadedFile
from django.http import HttpResponse
from django.utils.module_loading import import_string

from .config import ConfigError, Settings
from .errors import BadRequest, InternalError, UploadGuardError
from .guard import may_have_body
from .wsgi import (
    ENVIRON_EXCEPTION,
    ENVIRON_GUARD,
    ENVIRON_INPUT,
    GuardedInput,
    UploadGuard,
    body_length,
    remember_exception,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = [
    "ResumableUploadedFile",
    "ResumableUploadsASGI",
    "ResumableUploadsMiddleware",
    "UploadGuardConfig",
    "UploadGuardMiddleware",
    "adelete_resumable",
    "aresumable_file",
    "asave_resumable",
    "delete_resumable",
    "resumable_file",
    "save_resumable",
    "settings_from_django",
]

log = logging.getLogger("uploadguard")


MIDDLEWARE_PATH = "uploadguard.django.UploadGuardMiddleware"


def _django_setting(name: str) -> Any:
    return getattr(settings, name, None)


def settings_from_django() -> Settings:
    """The effective settings: ``UPLOADGUARD_*`` Django settings (typed as they are) over the environment.

    The temp dir is ``FILE_UPLOAD_TEMP_DIR`` when that is set.  Raises
    ``ImproperlyConfigured`` for a bad value, or for an ``UPLOADGUARD_TEMP_DIR``
    that is not ``FILE_UPLOAD_TEMP_DIR``.
    """
    try:
        resolved = Settings.from_environ(framework=_django_setting)
    except ConfigError as exc:
        raise ImproperlyConfigured(f"{exc} (a Django setting or an environment variable)") from exc
    upload_dir = getattr(settings, "FILE_UPLOAD_TEMP_DIR", None)
    if not upload_dir:
        return resolved
    chosen = _django_setting("UPLOADGUARD_TEMP_DIR") or os.environ.get("UPLOADGUARD_TEMP_DIR", "").strip()
    if chosen and os.path.abspath(os.fspath(chosen)) != os.path.abspath(os.fspath(upload_dir)):
        raise ImproperlyConfigured(
            f"UPLOADGUARD_TEMP_DIR={os.fspath(chosen)!r} is not FILE_UPLOAD_TEMP_DIR={os.fspath(upload_dir)!r}: "
            "uploadguard would guard a directory Django does not spool uploads to; "
            "leave UPLOADGUARD_TEMP_DIR unset or make the two the same"
        )
    try:
        return resolved.replace(temp_dir=upload_dir)
    except ConfigError as exc:
        raise ImproperlyConfigured(f"FILE_UPLOAD_TEMP_DIR: {exc}") from exc


def _spool_dir_problem(guarded: str) -> str | None:
    """Why Django's uploads in this process do not go to ``guarded``, or ``None`` if they do."""
    if getattr(settings, "FILE_UPLOAD_TEMP_DIR", None):
        return None  # then the guarded dir is FILE_UPLOAD_TEMP_DIR (settings_from_django)
    spool = tempfile.gettempdir()
    if os.path.abspath(spool) == guarded:
        return None
    return (
        f"Django spools uploads to {spool} (tempfile.gettempdir(), FILE_UPLOAD_TEMP_DIR being unset), "
        f"but uploadguard guards {guarded}"
    )


_SPOOL_HINT = "Set FILE_UPLOAD_TEMP_DIR to the guarded directory, or serve with uploadguard's gunicorn_conf.py."


def _django_serves_itself(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI app of the middleware's guard, never called: Django serves, the guard only judges."""
    raise RuntimeError(
        "this UploadGuard belongs to UploadGuardMiddleware and serves nothing itself; "
        "wrap get_wsgi_application() in uploadguard.UploadGuard instead"
    )


def _remember_exception(sender: object, request: Any = None, **kwargs: Any) -> None:
    """``got_request_exception`` receiver; Django sends it from its ``except`` block, without the exception."""
    exc = sys.exc_info()[1]
    meta = getattr(request, "META", None)
    if exc is not None and isinstance(meta, dict):
        remember_exception(meta, exc)


got_request_exception.connect(_remember_exception, dispatch_uid=ENVIRON_EXCEPTION)


class UploadGuardMiddleware:
    """Django middleware; see the module documentation.

    ``guard`` is the :class:`~uploadguard.UploadGuard` holding the settings,
    the temp-dir guard and the :attr:`~uploadguard.UploadGuard.stats` of the
    requests this middleware answers alone.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.guard = UploadGuard(_django_serves_itself, settings=settings_from_django())
        self._spool_checked = False
        self._outer_warned = False

    def __repr__(self) -> str:
        return f"<UploadGuardMiddleware {self.guard.settings.describe()}>"

    def __call__(self, request: Any) -> Any:
        environ = request.META
        if not may_have_body(environ):
            return self.get_response(request)  # no body: nothing to guard
        outer = environ.get(ENVIRON_GUARD)
        try:
            length = body_length(environ)
        except BadRequest as malformed:
            if outer is not None:
                return self.get_response(request)  # the outer guard has judged it
            return self._answer(self.guard, malformed, request, None)
        if length == 0:
            return self.get_response(request)
        self._check_spool_dir_once()
        guard = self.guard
        spooled = _endpoint is None or _endpoint.uploads.spools_body(environ)  # the endpoint's go to its storage
        if outer is None:
            if length is None:  # Django reads none of it; code reading wsgi.input itself gets it counted
                stream = GuardedInput(environ["wsgi.input"], length=None, limit=guard.settings.max_body_size)
                environ["wsgi.input"] = environ[ENVIRON_INPUT] = stream
            environ[ENVIRON_GUARD] = guard
            refusal = guard.refusal(length, spooled=spooled)
        else:
            if isinstance(outer, UploadGuard) and outer.temp.path == guard.temp.path:
                guard = outer  # the outer guard counted the request: its answers are counted there too
            else:
                self._warn_outer(outer)
            refusal = self.guard.nested_refusal(environ, length, spooled=spooled)
        if refusal is not None:
            return self._answer(guard, refusal, request, self._body(request, length))
        try:
            response = self.get_response(request)
        except Exception as exc:  # DEBUG_PROPAGATE_EXCEPTIONS: Django re-raised it
            environ.pop(ENVIRON_EXCEPTION, None)
            error = guard.answer_for(exc, environ)
            if error is None or isinstance(error, InternalError):
                raise
            self._release_spooled(request)
            return self._answer(guard, error, request, self._body(request))
        error = guard.answer_for_caught(environ, response.status_code)
        if error is None:
            return response
        answer = self._answer(guard, error, request, self._body(request), replacing=response)
        response.close()
        self._release_spooled(request)
        return answer

    def _check_spool_dir_once(self) -> None:
        if not self._spool_checked:
            self._spool_checked = True
            problem = _spool_dir_problem(self.guard.temp.path)
            if problem:
                log.warning("%s. %s", problem, _SPOOL_HINT)

    def _warn_outer(self, outer: object) -> None:
        if not self._outer_warned:
            self._outer_warned = True
            log.warning("the WSGI UploadGuard guards %s, but Django spools uploads to %s, which the "
                        "middleware checks itself; set UPLOADGUARD_TEMP_DIR to it",
                        outer.temp.path if isinstance(outer, UploadGuard) else outer, self.guard.temp.path)

    @staticmethod
    def _release_spooled(request: Any) -> None:
        """Close (and so delete) the temp file a failed parse left open in its upload handler.

        Django's parser closes the files it finished, not the one it was
        writing; that one would hold its space (on a full disk, say) until the
        garbage collector finds it.
        """
        for handler in request.upload_handlers:
            file = getattr(handler, "file", None)
            if file is not None:
                with contextlib.suppress(OSError):  # flushing the rest may fail again: it is closed all the same
                    file.close()

    @staticmethod
    def _body(request: Any, length: int | None = None) -> GuardedInput:
        """The request body as a counting stream, to drain before answering."""
        stream = request.META.get(ENVIRON_INPUT)
        if isinstance(stream, GuardedInput):
            return stream  # counts every byte read: the WSGI guard's, or ours for a chunked body
        # Through Django's stream, which ends at Content-Length; 100-continue state is the server's input's.
        return GuardedInput(request.META["wsgi.input"] if length is not None else request, length=length, limit=0)

    @staticmethod
    def _answer(guard: UploadGuard, error: UploadGuardError, request: Any, stream: GuardedInput | None, *,
                replacing: Any = None) -> HttpResponse:
        """Count and log ``error``, let the client finish sending, and build the response."""
        environ = request.META
        guard.record(error, environ)
        if stream is not None and guard.should_drain(error, stream, environ):
            guard.drain(stream, environ)
        status, headers, body = error.replacing(environ, replacing.items() if replacing is not None else ())
        response = HttpResponse(body, status=error.status_code, reason=error.title)
        for name, value in headers:
            if name.lower() != "set-cookie":
                response[name] = value
        if replacing is not None:
            response.cookies = replacing.cookies
        response._has_been_logged = True  # one WARNING line (ours) per answer, not Django's ERROR too
        return response


# -- system checks ---------------------------------------------------------------------


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """uploadguard.E001 (temp dirs disagree), E002 (bad value), W001 (uploads spooled elsewhere)."""
    try:
        resolved = settings_from_django()
    except ImproperlyConfigured as exc:
        ident = "uploadguard.E002" if isinstance(exc.__cause__, ConfigError) else "uploadguard.E001"
        return [checks.Error(str(exc), id=ident)]
    problem = _spool_dir_problem(os.path.abspath(resolved.temp_dir))
    if problem:
        return [checks.Warning(f"{problem}: temp-dir errors there are not recognised.", hint=_SPOOL_HINT,
                               id="uploadguard.W001")]
    return []


def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """uploadguard.W002: the middleware is missing from ``MIDDLEWARE`` or not first."""
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if middleware:
        try:
            first = import_string(middleware[0])
        except ImportError:
            first = None  # Django reports an unimportable middleware itself
        if isinstance(first, type) and issubclass(first, UploadGuardMiddleware):
            return []
    if MIDDLEWARE_PATH in middleware:
        problem = (f"{MIDDLEWARE_PATH} is entry {middleware.index(MIDDLEWARE_PATH) + 1} of MIDDLEWARE: the "
                   "middleware ahead of it runs before the body limit and the temp-dir check, and temp-dir "
                   "errors raised there are answered 500, not 503.")
    else:
        problem = (f"{MIDDLEWARE_PATH} is not in MIDDLEWARE: temp-dir errors Django catches are answered 500, "
                   "not a retryable 503.")
    return [checks.Warning(problem, hint=f'Make "{MIDDLEWARE_PATH}" the first entry of MIDDLEWARE.',
                           id="uploadguard.W002")]


SESSION_MIDDLEWARE = "django.contrib.sessions.middleware.SessionMiddleware"
AUTHENTICATION_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"


def check_resumable_order(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """uploadguard.W003: ``ResumableUploadsMiddleware`` ahead of the session or authentication middleware.

    Under WSGI and under :class:`ResumableUploadsASGI` alike, the endpoint's
    owner and the adoption at login come from what the middleware ahead of it
    set on the request; behind it, they never run for the endpoint's requests.
    """
    needed = {SESSION_MIDDLEWARE, AUTHENTICATION_MIDDLEWARE}  # by name: importing them needs their apps installed
    classes = []
    for dotted in getattr(settings, "MIDDLEWARE", None) or []:
        try:
            classes.append((dotted, import_string(dotted)))
        except ImportError:
            continue  # Django reports an unimportable middleware itself
    position = next((index for index, (_, factory) in enumerate(classes)
                     if isinstance(factory, type) and issubclass(factory, ResumableUploadsMiddleware)), None)
    if position is None:
        return []
    behind = [dotted for dotted, factory in classes[position + 1:] if isinstance(factory, type)
              and needed.intersection(f"{base.__module__}.{base.__qualname__}" for base in factory.__mro__)]
    if not behind:
        return []
    return [checks.Warning(
        f"{', '.join(behind)} come(s) after {classes[position][0]} in MIDDLEWARE: the resumable endpoint never "
        "sees the session or the logged-in user (under WSGI and ResumableUploadsASGI), so every upload is an "
        "anonymous visitor's and none is adopted at login.",
        hint="Put ResumableUploadsMiddleware after SessionMiddleware, CsrfViewMiddleware and "
             "AuthenticationMiddleware.", id="uploadguard.W003")]


checks.register(check_settings, checks.Tags.files)
checks.register(check_middleware)
checks.register(check_resumable_order)


class UploadGuardConfig(AppConfig):  # type: ignore[misc]  # Django ships no type hints
    """``INSTALLED_APPS`` entry that loads uploadguard's system checks (and its static files)."""

    name = "uploadguard"
    label = "uploadguard"
    verbose_name = "uploadguard"


# -- resumable uploads -------------------------------------------------------------------

_endpoint: ResumableUploadsMiddleware | None = None


def _tus_view(request: Any) -> None:  # pragma: no cover - never called: CSRF is checked against it
    """What the CSRF check sees as the view: an ordinary, protected one."""


def _endpoint_response(status: str, headers: list[tuple[str, str]], body: Iterable[bytes]) -> HttpResponse:
    """An answer of the endpoint as Django's response (for the middleware above it to finish)."""
    code, _, reason = status.partition(" ")
    response = HttpResponse(b"".join(body), status=int(code), reason=reason or None)
    if not any(name.lower() == "content-type" for name, _ in headers):
        del response["Content-Type"]  # Django's default text/html would describe a body there is none of
    for name, value in headers:
        response[name] = value
    response._has_been_logged = True  # the endpoint logs what matters; a 409 on resume is routine
    return response


class ResumableUploadsMiddleware:
    """The resumable-upload endpoint (tus 1.0 and the IETF draft) inside Django: one line in ``MIDDLEWARE``.

    ::

        MIDDLEWARE = [
            "uploadguard.django.UploadGuardMiddleware",        # first
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "uploadguard.django.ResumableUploadsMiddleware",  # after those three
            ...
        ]

    Requests under :attr:`prefix` are answered by
    :class:`uploadguard.resumable.ResumableUploads`, inside Django, after the
    middleware above it: the guard's limit, temp-dir check and retryable 503
    cover them, and **CSRF protection holds** -- a POST, PATCH or DELETE must
    carry the ``X-CSRFToken`` header like any unsafe request.  Settings are
    the ``UPLOADGUARD_*`` ones (storage, expiry, idle timeout; the docs'
    table).  Each upload belongs to whoever created it: the logged-in user, or
    an anonymous visitor's browser, named by its CSRF secret; anybody else
    gets 404.  The uploads a visitor began before ``login()`` (which rotates
    that secret) become the user's at their next request, with Django's
    ``SessionMiddleware`` installed.  Fetch a completed upload in a
    view with :func:`resumable_file`.

    Subclass to change :attr:`prefix`, :attr:`cors_origins` or to act on
    completed uploads in :meth:`on_complete`.

    Under ASGI, keep it in ``MIDDLEWARE`` and wrap the application in
    :class:`ResumableUploadsASGI`, which answers the endpoint's requests before
    Django spools their bodies, by this class's :meth:`verdict`.
    """

    prefix: str = "/files/"
    cors_origins: tuple[str, ...] = ()

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        from .resumable import ResumableUploads

        global _endpoint
        self.get_response = get_response
        self.uploads = ResumableUploads(None, prefix=self.prefix, settings=settings_from_django(),
                                        on_complete=self.on_complete, cors_origins=self.cors_origins)
        _endpoint = self
        self._spool_warned = False
        from django.middleware.csrf import CsrfViewMiddleware

        self._csrf = CsrfViewMiddleware(get_response)

    def __repr__(self) -> str:
        return f"<ResumableUploadsMiddleware {self.uploads!r}>"

    def on_complete(self, upload: Any) -> None:
        """Called once per completed upload (see :mod:`uploadguard.resumable`); override it."""

    def __call__(self, request: Any) -> Any:
        if not self.serves(request.path_info):
            return self.get_response(request)
        self._serve_spooled_under_asgi(request)
        owner, refused = self.verdict(request)
        if refused is not None:
            return refused
        return _endpoint_response(*self.uploads.handle(request.META, owner=owner))

    def serves(self, path_info: str) -> bool:
        """Whether a request for ``path_info`` is the endpoint's (under :attr:`prefix`)."""
        served: bool = self.uploads.serves_path(path_info)
        return served

    def verdict(self, request: Any) -> tuple[str | None, Any]:
        """Who a request for the endpoint is for, or Django's answer refusing it: ``(owner, None | response)``.

        The one place of the endpoint's Django decisions, under WSGI (here,
        before :meth:`ResumableUploads.handle`) and ASGI
        (:class:`ResumableUploadsASGI`, on a body-less request): Django's CSRF
        verdict for an unsafe method, the owner (:func:`_owner`) and the
        adoption of uploads begun before logging in (:func:`_adopt`; a held or
        unreadable upload refuses with the endpoint's 423 or 503).
        """
        if request.method not in ("GET", "HEAD", "OPTIONS", "TRACE"):
            if "CSRF_COOKIE" not in request.META:
                self._csrf.process_request(request)  # CsrfViewMiddleware is not installed above us
            refused = self._checked_csrf(request)
            if refused is not None:
                return None, refused
        elif "CSRF_COOKIE" not in request.META:
            self._csrf.process_request(request)  # the CSRF secret names an anonymous visitor's uploads
        owner = _owner(request)
        try:
            _adopt(request, owner, self._named_uploads(request))
        except UploadGuardError as error:  # the upload is held (423) or the storage failed (503)
            status, headers, answer = error.response(request.META)
            return owner, _endpoint_response(status, headers, [answer])
        except OSError as exc:  # the storage failed: the endpoint's own answer says how (503)
            log.debug("could not adopt the uploads of %s: %r", request.path_info, exc)
        return owner, None

    def _serve_spooled_under_asgi(self, request: Any) -> None:
        """Under ASGI without :class:`ResumableUploadsASGI`: serve Django's copy of the body, and say why not to, once.

        Django's ASGI handler has read the whole body into a temporary file
        (the temp dir must hold every PATCH) before any middleware ran.
        """
        if not hasattr(request, "scope"):  # ASGIRequest has the scope; WSGIRequest not
            return
        request.META.setdefault("wsgi.input", request)  # the endpoint reads Django's spooled copy of the body
        if self._spool_warned:
            return
        self._spool_warned = True
        log.warning("a resumable upload request reached ResumableUploadsMiddleware under ASGI: Django has "
                    "read its whole body into a temporary file first; wrap the ASGI application in "
                    "uploadguard.django.ResumableUploadsASGI (asgi.py) to stream uploads to their storage")

    def _named_uploads(self, request: Any) -> list[str]:
        """The ids of the uploads a request names: in its path, or the parts a concatenation joins."""
        from .resumable.protocol import parse_concat

        ids = [self.uploads.upload_id(request.path_info)]
        if request.method == "POST":
            try:
                concat = parse_concat(request.headers.get("Upload-Concat"))
            except BadRequest:
                concat = None  # the endpoint answers the 400
            if concat is not None and concat.final:
                ids += [self.uploads.upload_id(url) for url in concat.parts]
        return [upload_id for upload_id in ids if upload_id is not None]

    def _checked_csrf(self, request: Any) -> Any:
        """Django's CSRF verdict on the header alone.

        For a form media type ``CsrfViewMiddleware`` looks for the token in
        ``request.POST`` first, which reads the body -- here the body is the
        upload (the IETF draft lets a creation carry the file under any media
        type), so it would be consumed, and a form field in the file would
        stand in for the header.  While Django checks, the request claims a
        media type it does not parse; ``request.POST`` is empty from then on.
        """
        content_type = request.content_type
        request.content_type = "application/octet-stream"
        try:
            return self._csrf.process_view(request, _tus_view, (), {})
        finally:
            request.content_type = content_type


def _owner(request: Any) -> str | None:
    """Who is asking: ``"user:<pk>"`` when logged in, else ``"anon:<digest of the CSRF secret>"``, else ``None``.

    An anonymous visitor is named by the CSRF secret its browser already
    holds (the cookie every unsafe request needs anyway): stable across the
    visitor's concurrent requests, unlike a new cookie handed out by each
    creation, and never sent anywhere -- only a keyed digest is stored.
    """
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        return f"user:{user.pk}"
    return _anonymous_owner(request.META.get("CSRF_COOKIE"))


def _anonymous_owner(secret: str | None) -> str | None:
    """``"anon:<keyed digest of the CSRF secret>"``, or ``None`` without a secret."""
    if not secret:
        return None
    from django.utils.crypto import salted_hmac

    digest: str = salted_hmac("uploadguard.django.owner", secret, algorithm="sha256").hexdigest()
    return "anon:" + digest[:32]


#: The session key holding the anonymous owner a visitor was just before logging in (see _remember_anonymous).
SESSION_PREVIOUS_OWNER = "uploadguard.previous_owner"


def _remember_anonymous(sender: object, request: Any = None, user: Any = None, **kwargs: Any) -> None:
    """``user_logged_in`` receiver: keep, in the session, who the visitor was before logging in.

    Django's ``login()`` rotates the CSRF secret, which names an anonymous
    visitor's uploads, so an upload begun before logging in would be another
    owner's (404) after it.  The secret the browser sent with the login request
    (its cookie, or the session's copy with ``CSRF_USE_SESSIONS``: Django
    replaces those only in the response) is the one the uploads were created
    with; its digest goes into the session, which only this browser holds, and
    the user's requests then adopt those uploads (:func:`_adopt`).  Nobody else
    can: the digest is of a secret only this browser had, and it is stored
    server-side (or signed), never taken from the request.
    """
    session = getattr(request, "session", None)
    if session is None or user is None:
        return
    from django.middleware.csrf import CsrfViewMiddleware

    csrf = _endpoint._csrf if _endpoint is not None else CsrfViewMiddleware(lambda request: None)
    try:
        previous = _anonymous_owner(csrf._get_secret(request))  # the secret before rotate_token
    except Exception as exc:  # a malformed cookie, or a Django without _get_secret: nothing to adopt
        log.debug("no anonymous owner to remember at login: %r", exc)
        return
    if previous is not None:
        session[SESSION_PREVIOUS_OWNER] = previous


def _connect_login_signal() -> None:
    from django.contrib.auth.signals import user_logged_in

    user_logged_in.connect(_remember_anonymous, dispatch_uid=SESSION_PREVIOUS_OWNER)


_connect_login_signal()


def _adopt(request: Any, owner: str | None, upload_ids: Iterable[str]) -> None:
    """Make the uploads the visitor began before logging in the user's, as the request names them.

    Only uploads owned by the anonymous owner this very session recorded at
    login are taken, under their lock (a PATCH of the old owner is preempted
    as by any request).  Raises the endpoint's errors (423, 503).
    """
    session = getattr(request, "session", None)
    if _endpoint is None or session is None or owner is None or not owner.startswith("user:"):
        return
    try:
        previous = session.get(SESSION_PREVIOUS_OWNER)
    except Exception:  # a session that cannot be read is no reason to fail the request
        return
    if not isinstance(previous, str) or not previous.startswith("anon:"):
        return
    from .resumable import UploadNotFound

    uploads = _endpoint.uploads
    for upload_id in upload_ids:
        try:
            if uploads.store.get(upload_id).owner != previous:
                continue
            with uploads.locker.acquire(upload_id, timeout=uploads.lock_timeout):
                info = uploads.store.get(upload_id)
                if info.owner == previous:
                    uploads.store.update(dataclasses.replace(info, owner=owner))
                    log.info("upload %s begun before logging in is now %s's", upload_id, owner)
        except UploadNotFound:
            continue


class ResumableUploadedFile(UploadedFile):  # type: ignore[misc]  # Django ships no type hints
    """A completed resumable upload as Django's ``UploadedFile``: save it to any storage, or read it.

    It has no ``temporary_file_path()`` on purpose: Django's
    ``FileSystemStorage`` would *move* that file, taking it out of the
    upload store; the data is copied instead.
    """

    def __init__(self, upload: Any) -> None:
        metadata = upload.metadata
        name = os.path.basename(metadata.get("filename") or metadata.get("name") or upload.id) or upload.id
        super().__init__(file=upload.open(), name=name,
                         content_type=metadata.get("filetype") or metadata.get("type") or "application/octet-stream",
                         size=upload.length, charset=None)
        self.upload = upload


def _framework_errors() -> tuple[type[Exception], type[Exception]]:
    """UploadNotFound and UploadIncomplete that Django also answers itself (404 and 400) in any view."""
    from django.core.exceptions import BadRequest as DjangoBadRequest
    from django.http import Http404

    from .resumable import UploadIncomplete, UploadNotFound

    class NotFound(UploadNotFound, Http404):  # type: ignore[misc]
        pass

    class Incomplete(UploadIncomplete, DjangoBadRequest):  # type: ignore[misc]
        pass

    return NotFound, Incomplete


_NotFound, _Incomplete = _framework_errors()


def _get_upload(request: Any, url: str) -> Any:
    from .resumable import UploadIncomplete, UploadLocked, UploadNotFound

    if _endpoint is None:
        raise ImproperlyConfigured("uploadguard.django.ResumableUploadsMiddleware is not in MIDDLEWARE")
    owner = _owner(request)
    try:
        _adopt(request, owner, [upload_id] if (upload_id := _endpoint.uploads.upload_id(url)) else [])
        return _endpoint.uploads.get(url, owner=owner)
    except UploadLocked as exc:  # a request is writing it: not complete, not a 500
        raise _Incomplete(exc.detail) from None
    except UploadNotFound as exc:
        raise _NotFound(exc.detail) from None
    except UploadIncomplete as exc:
        raise _Incomplete(exc.detail) from None


def resumable_file(request: Any, url: str) -> ResumableUploadedFile:
    """The completed upload ``url`` (or id) names, as an ``UploadedFile`` -- only for whoever created it.

    Raises :class:`uploadguard.resumable.UploadNotFound` (unknown, expired, or
    another user's or visitor's) or :class:`uploadguard.resumable.UploadIncomplete`
    (still being uploaded); both are also Django's ``Http404`` and
    ``BadRequest``, so an uncaught one is a 404 or 400 in any view.
    ``ImproperlyConfigured`` without :class:`ResumableUploadsMiddleware`.
    An upload whose data ``on_complete`` moved away is not found either.
    """
    from .resumable import UploadNotFound

    _refuse_on_the_loop("resumable_file")
    upload = _get_upload(request, url)
    try:
        return ResumableUploadedFile(upload)
    except UploadNotFound as exc:  # completed, but on_complete took the data
        raise _NotFound(exc.detail) from None


def delete_resumable(request: Any, url: str) -> None:
    """Remove the upload ``url`` names (data, info, lock) -- only for whoever created it.

    Call it once the file is where it belongs (after :func:`save_resumable`
    or reading :func:`resumable_file`): otherwise a completed upload stays
    ``UPLOADGUARD_RESUMABLE_KEEP_COMPLETED`` (7 days) after it completed.
    Raises what :func:`resumable_file` raises for an unknown or another's
    upload, and :class:`uploadguard.resumable.UploadLocked` while a request
    still holds it (for ``lock_timeout`` seconds).
    """
    from .resumable import UploadNotFound

    _refuse_on_the_loop("delete_resumable")
    if _endpoint is None:
        raise ImproperlyConfigured("uploadguard.django.ResumableUploadsMiddleware is not in MIDDLEWARE")
    owner = _owner(request)
    try:
        _adopt(request, owner, [upload_id] if (upload_id := _endpoint.uploads.upload_id(url)) else [])
        _endpoint.uploads.delete(url, owner=owner)
    except UploadNotFound as exc:
        raise _NotFound(exc.detail) from None


def save_resumable(request: Any, url: str, name: str | None = None, storage: Any = None) -> str:
    """Save the completed upload ``url`` names into a Django ``storage``; return the name it got there.

    Only for whoever created the upload (as :func:`resumable_file`).
    ``storage`` defaults to ``default_storage`` and ``name`` to the upload's
    ``filename`` metadata.  When the upload lives on S3 (``s3://`` storage)
    and ``storage`` is django-storages' S3 storage on the same endpoint, the
    copy is server-side -- the bytes never pass through this host; any other
    pair streams the data into ``storage.save``.
    """
    from .resumable.s3 import save_to_storage

    _refuse_on_the_loop("save_resumable")
    upload = _get_upload(request, url)
    if storage is None:
        from django.core.files.storage import default_storage

        storage = default_storage
    if name is None:
        name = os.path.basename(upload.metadata.get("filename") or upload.metadata.get("name") or upload.id)
    from .resumable import UploadNotFound

    try:
        return save_to_storage(upload, storage, name or upload.id)
    except UploadNotFound as exc:  # completed, but on_complete took the data
        raise _NotFound(exc.detail) from None


# -- async views -------------------------------------------------------------------------


def _refuse_on_the_loop(name: str) -> None:
    """Raise Django's ``SynchronousOnlyOperation`` when ``name`` is called on an event loop (an async view).

    The sync functions read the session (``request.user``, the ORM) and the
    upload store, and may wait for an upload's lock: on the loop they would
    stall every other connection, as Django refuses sync ORM calls there.
    """
    if os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE"):
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop in this thread: a sync view (also a sync view under ASGI, run in a thread)
    from django.core.exceptions import SynchronousOnlyOperation

    raise SynchronousOnlyOperation(f"{name}() reads the session and the upload store, which would block the "
                                   f"event loop: in an async view, use 'await uploadguard.django.a{name}(...)'")


async def aresumable_file(request: Any, url: str) -> ResumableUploadedFile:
    """:func:`resumable_file` for async views: the session and the store are read in a thread, off the loop."""
    from asgiref.sync import sync_to_async

    upload: ResumableUploadedFile = await sync_to_async(resumable_file)(request, url)
    return upload


async def asave_resumable(request: Any, url: str, name: str | None = None, storage: Any = None) -> str:
    """:func:`save_resumable` for async views (in a thread, off the loop)."""
    from asgiref.sync import sync_to_async

    saved: str = await sync_to_async(save_resumable)(request, url, name, storage)
    return saved


async def adelete_resumable(request: Any, url: str) -> None:
    """:func:`delete_resumable` for async views (in a thread, off the loop)."""
    from asgiref.sync import sync_to_async

    await sync_to_async(delete_resumable)(request, url)


# -- ASGI --------------------------------------------------------------------------------

#: The scope key carrying the owner Django decided to the ASGI endpoint (read by its ``authorize``).
SCOPE_OWNER = "uploadguard.owner"


async def _scope_owner(scope: MutableMapping[str, Any]) -> str | None:
    """The ASGI endpoint's ``authorize``: the owner :class:`ResumableUploadsASGI` put in the scope."""
    owner = scope.get(SCOPE_OWNER)
    return owner if isinstance(owner, str) else None


#: Headers of the verdict that are its own, not the middleware's ahead: never added to the endpoint's answer.
_NOT_PASSED_ON = ("content-type", "content-length", "cache-control")


class _Proceed(HttpResponse):  # type: ignore[misc]  # Django ships no type hints
    """The verdict "serve it, as ``owner``", on its way out through the middleware ahead of the endpoint."""

    def __init__(self, owner: str | None) -> None:
        super().__init__(b"", status=200)
        self.owner = owner
        # Never stored by a cache ahead (Django's per-site cache keeps a 200 to a GET or HEAD): a later
        # request would get this empty 200 instead of the endpoint's answer.  Not sent: the endpoint's own is.
        self["Cache-Control"] = "private, no-store, max-age=0"


class ResumableUploadsASGI:
    """Resumable uploads in a Django ASGI project: the endpoint in front of Django's ASGI handler.

    ::

        # asgi.py
        django_app = get_asgi_application()
        application = UploadGuard(ResumableUploadsASGI(django_app), settings=settings_from_django())

    Django's ASGI handler reads a request's **whole body** into a temporary
    file before any middleware runs, so under ASGI the endpoint cannot live in
    ``MIDDLEWARE``.  This ASGI application answers the requests under the
    prefix itself, with :class:`uploadguard.resumable.asgi.ResumableUploads`
    (the PATCH body goes from ``receive()`` to the upload storage, never into
    Django's spool); everything else goes to ``app`` untouched.

    It is configured by :class:`ResumableUploadsMiddleware`, which stays in
    ``MIDDLEWARE`` as under WSGI (the same settings module serves both): its
    :attr:`~ResumableUploadsMiddleware.prefix`,
    :attr:`~ResumableUploadsMiddleware.cors_origins`,
    :meth:`~ResumableUploadsMiddleware.on_complete` (in a thread of its own
    as a request's view, or awaited on the loop if it is a coroutine
    function; the database connections it opens closed after it either way)
    and the ``UPLOADGUARD_*`` settings.  The ``MIDDLEWARE`` entry
    must name the class (or a subclass), not a factory function;
    ``ImproperlyConfigured`` when there is none.

    **The same rules as under WSGI.**  For each request under the prefix, the
    middleware ``MIDDLEWARE`` lists *ahead of* ``ResumableUploadsMiddleware``
    (sessions, CSRF, authentication, your own) runs on a body-less copy of the
    request, in a thread of its own (``sync_to_async`` in a
    ``ThreadSensitiveContext``, as Django runs sync middleware),
    then :meth:`ResumableUploadsMiddleware.verdict` -- the very code the WSGI
    middleware runs -- decides: Django's CSRF check (403), the owner (the user,
    or the anonymous visitor's CSRF-secret digest) and the adoption of uploads
    begun before logging in.  A response of that middleware (a 403, a
    redirect) is sent as Django would send it; otherwise the endpoint serves
    the request as that owner, and the headers and cookies the middleware
    added on the way out (a refreshed session cookie, security headers) join
    its answer.  ``UploadGuardMiddleware`` is left out of that run: wrap the
    whole application in :class:`uploadguard.asgi.UploadGuard` instead, which
    guards the body as it arrives.  Views take finished uploads with
    :func:`resumable_file` (sync views) or :func:`aresumable_file` (async
    views).

    ``threads``: the endpoint's pool for store and lock calls (``None``: as
    :func:`uploadguard.resumable.asgi.default_threads` chooses for the store).
    """

    def __init__(self, app: Any, *, threads: int | None = None) -> None:
        from .resumable.asgi import ResumableUploads as ASGIEndpoint

        endpoint_class = _configured_endpoint_class()
        middleware = _endpoint if type(_endpoint) is endpoint_class else None
        if middleware is None:  # not loaded by Django (yet): the instance the views' resumable_file will use
            middleware = endpoint_class(_never_called)
        self.app = app
        self.middleware = middleware
        uploads = middleware.uploads
        self.endpoint = ASGIEndpoint(app, prefix=uploads.prefix, settings=uploads.settings,
                                     on_complete=self._on_complete,
                                     cors_origins=middleware.cors_origins,
                                     lock_timeout=uploads.lock_timeout, authorize=_scope_owner, threads=threads)
        self._ahead = _middleware_ahead_of(endpoint_class, self._decided)

    def __repr__(self) -> str:
        return f"<ResumableUploadsASGI {self.endpoint!r}>"

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.middleware.serves(_path_info(rooted := _rooted(scope))):
            await self.app(scope, receive, send)
            return
        from asgiref.sync import ThreadSensitiveContext, sync_to_async

        # A thread of its own per request, as Django's ASGIHandler gives each: outside a ThreadSensitiveContext,
        # every request's middleware would queue for asgiref's one shared thread -- one slow session lookup (or
        # an adoption waiting for a held upload) would hold up the admission of every other upload.
        async with ThreadSensitiveContext():
            owner, response, headers, content = await sync_to_async(self._decide)(scope)
        if response is not None:  # refused (CSRF, a held upload) or answered by a middleware ahead of it
            # The unread body is the server's to discard, as after any early answer (uvicorn and gunicorn's
            # ASGI worker do: the client of a refused 16 MiB PATCH reads the 403, tests/test_django_asgi.py).
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": content, "more_body": False})
            return
        await self.endpoint({**rooted, SCOPE_OWNER: owner}, receive, _adding_headers(send, headers))

    def spools_body(self, scope: MutableMapping[str, Any]) -> bool:
        """Whether the request's body may be spooled to the temp dir (asked by :class:`uploadguard.asgi.UploadGuard`)."""
        return self.endpoint.spools_body(_rooted(scope))

    def _decide(self, scope: MutableMapping[str, Any]) -> tuple[str | None, Any, list[tuple[bytes, bytes]], bytes]:
        """In a thread: the middleware ahead of the endpoint and its verdict, on a body-less request.

        ``(owner, None, headers to add, b"")`` to serve it, or ``(None,
        response, its headers, its body)`` to answer with Django's response.
        """
        from django.core import signals
        from django.core.handlers.asgi import ASGIRequest
        from django.core.handlers.asgi import get_script_prefix as asgi_script_prefix
        from django.http import HttpResponseBadRequest
        from django.urls import set_script_prefix

        set_script_prefix(asgi_script_prefix(scope))
        signals.request_started.send(sender=type(self), scope=scope)
        try:
            request = ASGIRequest(scope, io.BytesIO())  # the body stays in receive(), for the endpoint
        except UnicodeDecodeError:
            response = HttpResponseBadRequest()
        else:
            response = self._ahead(request)
        try:
            if isinstance(response, _Proceed):
                return response.owner, None, _asgi_headers(response, skip=_NOT_PASSED_ON), b""
            return None, response, _asgi_headers(response), b"".join(response)
        finally:
            response.close()  # request_finished: Django closes its database connections as after any request

    async def _on_complete(self, upload: Any) -> None:
        """The middleware's ``on_complete``, in a thread of its own, with Django's connection housekeeping.

        As a request: in a ``ThreadSensitiveContext`` of its own, a plain
        hook (and a coroutine one's async-ORM queries) run in that context's
        thread -- never in the endpoint's pool, which a slow hook (a virus
        scan, a thumbnail) would take from every other upload's store calls --
        between ``close_old_connections`` (as ``request_started`` and
        ``request_finished``): its database connection is closed after it (or
        kept up to ``CONN_MAX_AGE``), never left open for the life of a thread.
        """
        from asgiref.sync import ThreadSensitiveContext, sync_to_async
        from django.db import close_old_connections

        hook = self.middleware.on_complete
        async with ThreadSensitiveContext():
            await sync_to_async(close_old_connections)()
            try:
                if inspect.iscoroutinefunction(hook):
                    await hook(upload)
                else:
                    await sync_to_async(hook)(upload)
            finally:
                await sync_to_async(close_old_connections)()

    def _decided(self, request: Any) -> HttpResponse:
        """The innermost layer: the WSGI middleware's verdict, as a response to pass back out."""
        owner, refused = self.middleware.verdict(request)
        if refused is not None:
            return refused
        return _Proceed(owner)


def _configured_endpoint_class() -> type[ResumableUploadsMiddleware]:
    """The ``ResumableUploadsMiddleware`` (or subclass) ``MIDDLEWARE`` names; ``ImproperlyConfigured`` if none."""
    for dotted in getattr(settings, "MIDDLEWARE", None) or []:
        factory = import_string(dotted)
        if isinstance(factory, type) and issubclass(factory, ResumableUploadsMiddleware):
            return factory
    raise ImproperlyConfigured(
        "ResumableUploadsASGI is configured by uploadguard.django.ResumableUploadsMiddleware (or a subclass), "
        "which is not in MIDDLEWARE: add it after the session, CSRF and authentication middleware, as under WSGI")


def _never_called(request: Any) -> Any:
    """The ``get_response`` of the endpoint's middleware under ASGI: nothing follows its verdict."""
    raise RuntimeError("ResumableUploadsASGI answers the endpoint's requests itself")


def _rooted(scope: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``scope`` with Django's script prefix as its ``root_path``: ``FORCE_SCRIPT_NAME`` first, as ``ASGIRequest``.

    The endpoint finds its path below it and puts it in front of each
    upload's ``Location``, as under WSGI (where Django puts
    ``FORCE_SCRIPT_NAME`` in ``SCRIPT_NAME``): behind a proxy that mounts the
    site at a prefix and strips it, the client finds the upload there.
    """
    from django.core.handlers.asgi import get_script_prefix

    root = get_script_prefix(scope)
    return scope if root == scope.get("root_path", "") else {**scope, "root_path": root}


def _path_info(scope: MutableMapping[str, Any]) -> str:
    """The path below the application's root, as ``ASGIRequest.path_info`` has it."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", "")).rstrip("/")
    return path.removeprefix(root) if root and path.startswith(root + "/") else path


def _middleware_ahead_of(endpoint: type, terminal: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The sync chain of the ``MIDDLEWARE`` entries before ``endpoint``'s, around ``terminal``.

    Built as Django's ``BaseHandler.load_middleware`` builds its own (each
    layer turns exceptions into responses; async-only middleware is adapted),
    without ``UploadGuardMiddleware``, whose work on a body is the ASGI
    guard's.  Entries after the endpoint's never see its requests, as under
    WSGI.
    """
    from django.core.exceptions import MiddlewareNotUsed
    from django.core.handlers.base import BaseHandler
    from django.core.handlers.exception import convert_exception_to_response

    entries = list(getattr(settings, "MIDDLEWARE", None) or [])
    ahead: list[str] = []
    for dotted in entries:
        factory = import_string(dotted)
        if isinstance(factory, type) and issubclass(factory, endpoint):
            break
        ahead.append(dotted)
    adapter = BaseHandler()
    handler = convert_exception_to_response(terminal)
    handler_is_async = False
    for dotted in reversed(ahead):
        factory = import_string(dotted)
        if isinstance(factory, type) and issubclass(factory, UploadGuardMiddleware):
            continue
        is_async = not getattr(factory, "sync_capable", True)
        try:
            adapted = adapter.adapt_method_mode(is_async, handler, handler_is_async, name=f"middleware {dotted}")
            instance = factory(adapted)
        except MiddlewareNotUsed:
            continue
        handler = convert_exception_to_response(instance)
        handler_is_async = is_async
    chain: Callable[[Any], Any] = adapter.adapt_method_mode(False, handler, handler_is_async)
    return chain


def _asgi_headers(response: Any, *, skip: tuple[str, ...] = ()) -> list[tuple[bytes, bytes]]:
    """A Django response's headers and cookies as ASGI sends them (as Django's ``ASGIHandler`` does)."""
    headers = [(name.encode("ascii"), value.encode("latin-1"))
               for name, value in response.items() if name.lower() not in skip]
    headers += [(b"Set-Cookie", cookie.output(header="").encode("ascii").strip())
                for cookie in response.cookies.values()]
    return headers


def _adding_headers(send: Any, extra: list[tuple[bytes, bytes]]) -> Any:
    """``send``, adding to the final response's head the ``extra`` headers it does not set itself.

    ``Set-Cookie`` and ``Vary`` are added beside the endpoint's own: a second
    ``Vary`` line is read as one list with the first (Django's
    ``patch_vary_headers`` would have merged them), so a CORS answer's
    ``Vary: Origin`` keeps the session's ``Vary: Cookie``.
    """
    if not extra:
        return send

    async def sending(message: MutableMapping[str, Any]) -> None:
        if message.get("type") == "http.response.start":
            own = {bytes(name).lower() for name, _ in message.get("headers", ())}
            added = [(name, value) for name, value in extra
                     if name.lower() in (b"set-cookie", b"vary") or name.lower() not in own]
            message = {**message, "headers": [*message.get("headers", ()), *added]}
        await send(message)

    return sending
