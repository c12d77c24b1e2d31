"""Resumable uploads in a Django ASGI project: ``ResumableUploadsASGI`` in asgi.py, ``aresumable_file``.

The real-server tests serve tests/django_project/asgi.py (the documented
``UploadGuard(ResumableUploadsASGI(get_asgi_application()), ...)``, with
database sessions and users in SQLite) under uvicorn and ``gunicorn -c
gunicorn_conf.py -k asgi``, uploaded to by tuspy and a browser-like
``requests`` session.  The ownership and CSRF cases shared with the WSGI
middleware run through both integrations in tests/test_django_resumable.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests

from tests.support import GUNICORN_CONF, ROOT, Gunicorn, needs_root, tmpfs
from tests.test_asgi import Uvicorn, clean
from tests.test_django import dirs, project  # noqa: F401  (fixtures: the test project's settings)

MiB = 1024 * 1024
TUS = {"Tus-Resumable": "1.0.0"}


class Browser:
    """A browser on the site: its cookies (session, CSRF), the token its pages give it, its logins."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()
        self.token: str = self.session.get(base + "/form/", timeout=30).json()["csrf"]

    def log_in(self, user: int) -> None:
        """``login()`` as database user ``user``; the CSRF secret rotates with it."""
        response = self.session.post(self.base + "/db-login/", data={"user": str(user),
                                                                     "csrfmiddlewaretoken": self.token}, timeout=30)
        assert response.status_code == 200, response.text[:300]
        rotated = self.session.cookies["csrftoken"]
        assert rotated != self.token
        self.token = rotated

    def headers(self, *, csrf: bool = True) -> dict[str, str]:
        """What its JavaScript sends to the endpoint: the cookies, and the token header for unsafe methods."""
        cookies = "; ".join(f"{name}={value}" for name, value in self.session.cookies.items())
        return {**TUS, "Cookie": cookies, **({"X-CSRFToken": self.token} if csrf else {})}

    def tus(self, data: bytes, *, chunk_size: int) -> str:
        """Upload ``data`` with tuspy (one PATCH per ``chunk_size``); its URL."""
        from tusclient.client import TusClient

        uploader = TusClient(self.base + "/files/", headers=self.headers()).uploader(
            file_stream=io.BytesIO(data), chunk_size=chunk_size, metadata={"filename": "cat.jpg",
                                                                            "filetype": "image/jpeg"})
        uploader.upload()
        assert uploader.url is not None
        return str(uploader.url)

    def create(self, length: int) -> str:
        response = requests.post(self.base + "/files/", headers={**self.headers(), "Upload-Length": str(length),
                                                                 "Upload-Metadata": "filename Y2F0LmpwZw=="},
                                 timeout=30)
        assert response.status_code == 201, response.text[:300]
        return urljoin(self.base + "/files/", response.headers["Location"])

    def patch(self, url: str, offset: int, data: bytes, *, csrf: bool = True) -> requests.Response:
        return requests.patch(url, data=data, timeout=30, headers={
            **self.headers(csrf=csrf), "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream"})

    def head(self, url: str) -> requests.Response:
        return requests.head(url, headers=self.headers(csrf=False), timeout=30)

    def fetch(self, url: str, view: str = "/resumable-done/") -> requests.Response:
        """Post the upload's URL to a view that takes it with ``resumable_file`` (or ``aresumable_file``)."""
        return self.session.post(self.base + view, data={"upload": url, "csrfmiddlewaretoken": self.token},
                                 timeout=60)


def open_files(path: Path) -> list[str]:
    """Which processes hold ``path`` open (``/proc/<pid>/fd``): ``["<pid>:<fd>", ...]``."""
    held = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == str(path):
                    held.append(f"{fd_dir.parent.name}:{fd.name}")
            except OSError:
                continue
    return held


@pytest.fixture(params=["uvicorn", "gunicorn"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Start tests/django_project/asgi.py under uvicorn or ``gunicorn -c gunicorn_conf.py -k asgi``."""
    started: list[Any] = []
    env = {"DJANGO_SETTINGS_MODULE": "tests.django_project.settings_asgi",
           "TEST_DJANGO_DB": str(tmp_path / "db.sqlite3"), "TEST_RESUMABLE_STORAGE": str(tmp_path / "tus"),
           "TEST_STORE_DIR": str(tmp_path / "store"), "UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"),
           "UPLOADGUARD_MIN_FREE_SPACE": "0", "UPLOADGUARD_RETRY_AFTER": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "django", "migrate", "-v0", "--skip-checks"], env={**os.environ, **env}, cwd=ROOT,
                   check=True, timeout=120)

    def start(**more: str) -> Any:
        if request.param == "uvicorn":
            server: Any = Uvicorn("tests.django_project.asgi:application", tmp_path=tmp_path, env={**env, **more})
        else:
            server = Gunicorn("tests.django_project.asgi:application", tmp_path=tmp_path, config=GUNICORN_CONF,
                              args=["-k", "asgi", "--log-level", "info"], env={**env, **more})
        server.base = f"http://127.0.0.1:{server.port}"
        server.kind = request.param
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        assert clean(server.log()), server.log()[-3000:]


@pytest.mark.slow
class TestServed:
    def test_a_users_upload_reaches_sync_and_async_views_and_nobody_else(self, serve: Callable[[], Any]) -> None:
        """A logged-in user's tuspy upload is theirs in a sync view (resumable_file) and an async one
        (aresumable_file); another user, or an anonymous browser, gets 404 for it."""
        server = serve()
        owner = Browser(server.base)
        owner.log_in(7)
        data = os.urandom(3 * MiB)
        url = owner.tus(data, chunk_size=2 * MiB)
        expected = {"name": "cat.jpg", "size": len(data), "content_type": "image/jpeg",
                    "sha256": hashlib.sha256(data).hexdigest()}

        sync, asynchronous = owner.fetch(url), owner.fetch(url, "/resumable-done-async/")

        assert (sync.status_code, sync.json()) == (200, expected), sync.text[:300]
        assert (asynchronous.status_code, asynchronous.json()) == (200, expected), asynchronous.text[:300]
        other_user = Browser(server.base)
        other_user.log_in(8)
        anonymous = Browser(server.base)
        for stranger in (other_user, anonymous):
            assert stranger.head(url).status_code == 404
            assert stranger.patch(url, len(data), b"x").status_code == 404
            assert stranger.fetch(url).status_code == 404

    @pytest.mark.parametrize("middleware", ["RecordingUploads", "AsyncRecordingUploads"])
    def test_on_complete_may_use_the_orm_and_leaves_no_connection_open(self, serve: Callable[..., Any],
                                                                         tmp_path: Path, middleware: str) -> None:
        """The middleware subclass's on_complete (a function, or a coroutine function using the async ORM) runs
        once per upload, may query the database, and its connection is closed after it, as after a request: no
        process holds the database open."""
        server = serve(TEST_RESUMABLE_MIDDLEWARE=middleware)
        browser = Browser(server.base)
        browser.log_in(7)

        url = browser.tus(b"abcdef", chunk_size=3)

        upload_id = url.rsplit("/", 1)[1]
        assert (tmp_path / "store" / "completed" / upload_id).read_text() == "1"  # one user in the database
        assert open_files(tmp_path / "db.sqlite3") == []

    def test_an_ietf_creation_gets_104_under_gunicorn(self, serve: Callable[[], Any]) -> None:
        """A browser's IETF-draft creation (cookies, X-CSRFToken) gets 104 with its Location before its body is
        read under gunicorn -k asgi (none under uvicorn), then 201; the upload is the visitor's."""
        from tests.test_resumable_asgi import ietf_creation_of_five_bytes

        server = serve()
        browser = Browser(server.base)
        head = "".join(f"{name}: {value}\r\n" for name, value in browser.headers().items() if name != "Tus-Resumable")
        raw = ietf_creation_of_five_bytes(server.port, server.kind, head)
        location = next(line.split(b":", 1)[1].strip().decode() for line in raw.split(b"\r\n")
                        if line.lower().startswith(b"location:"))
        done = browser.fetch(urljoin(server.base + "/files/", location))
        assert (done.status_code, done.json()["size"]) == (200, 5), done.text[:300]

    def test_an_anonymous_upload_is_the_users_after_login(self, serve: Callable[[], Any]) -> None:
        """Begun anonymously, an upload resumes after login() as the user's, in any of their browsers;
        another browser logging in takes nothing."""
        server = serve()
        visitor, thief = Browser(server.base), Browser(server.base)
        url = visitor.create(6)
        assert visitor.patch(url, 0, b"abc").status_code == 204
        thief.log_in(7)
        assert thief.head(url).status_code == 404

        visitor.log_in(7)

        head = visitor.head(url)
        assert (head.status_code, head.headers["Upload-Offset"]) == (200, "3")
        assert visitor.patch(url, 3, b"def").status_code == 204
        done = visitor.fetch(url)
        assert (done.status_code, done.json()["size"]) == (200, 6), done.text[:300]
        assert thief.head(url).status_code == 200  # the user's now, from any of their browsers

    def test_a_patch_without_the_csrf_token_is_djangos_403(self, serve: Callable[[], Any]) -> None:
        """A 16 MiB PATCH carrying the cookies but not X-CSRFToken is Django's CSRF 403, read by the client
        (the body is drained), and stores nothing."""
        server = serve()
        browser = Browser(server.base)
        data = os.urandom(16 * MiB)
        url = browser.create(len(data))

        refused = browser.patch(url, 0, data, csrf=False)

        assert refused.status_code == 403
        assert "CSRF verification failed" in refused.text
        assert browser.head(url).headers["Upload-Offset"] == "0"
        assert browser.patch(url, 0, data).status_code == 204

    @needs_root
    def test_the_patch_body_never_reaches_djangos_spool(self, serve: Callable[[], Any], tmp_path: Path) -> None:
        """With Django's spool (the guarded temp dir) a 1 MiB tmpfs, a body Django would spool is refused
        503 there, while a 3 MiB PATCH to the endpoint is stored whole."""
        data = os.urandom(3 * MiB)
        with tmpfs(tmp_path / "tmp", size="1m", options="mode=700"):
            server = serve()
            browser = Browser(server.base)
            spooled = requests.post(server.base + "/raw/", data=data, timeout=30,
                                    headers={"Content-Type": "application/octet-stream"})
            assert spooled.status_code == 503  # Django's spool cannot hold it

            url = browser.tus(data, chunk_size=len(data))

            done = browser.fetch(url)
            assert done.status_code == 200, done.text[:300]
            assert done.json()["sha256"] == hashlib.sha256(data).hexdigest()


class TestAsyncViews:
    """In-process: the upload functions on an event loop (an async view) and off it."""

    @pytest.fixture(autouse=True)
    def _project(self) -> Iterator[None]:
        import django
        from django.conf import settings

        if not settings.configured and "DJANGO_SETTINGS_MODULE" not in os.environ:
            settings.configure(SECRET_KEY="uploadguard-tests")
        django.setup()
        yield

    @pytest.mark.parametrize("name", ["resumable_file", "save_resumable", "delete_resumable"])
    def test_the_sync_functions_refuse_the_event_loop(self, name: str) -> None:
        """Called on the loop (from an async view), the sync functions raise Django's SynchronousOnlyOperation
        naming the async one, before touching the session or the store."""
        from django.core.exceptions import SynchronousOnlyOperation
        from django.test import RequestFactory

        import uploadguard.django as integration

        async def view() -> None:
            getattr(integration, name)(RequestFactory().get("/"), "/files/x")

        with pytest.raises(SynchronousOnlyOperation, match=f"a{name}"):
            asyncio.run(view())


class TestWithoutTheASGIWrapper:
    """In-process: ``ResumableUploadsMiddleware`` reached under ASGI (asgi.py without ResumableUploadsASGI)."""

    @pytest.fixture(autouse=True)
    def _project(self, tmp_path: Path) -> Iterator[None]:
        from django.test import override_settings

        from tests.test_django_resumable import MIDDLEWARE

        with override_settings(MIDDLEWARE=MIDDLEWARE, UPLOADGUARD_RESUMABLE_STORAGE=str(tmp_path / "tus"),
                               FILE_UPLOAD_TEMP_DIR=str(tmp_path), UPLOADGUARD_MIN_FREE_SPACE=0):
            yield

    def test_it_serves_djangos_copy_of_the_body_and_says_so(self, project: None,
                                                             caplog: pytest.LogCaptureFixture) -> None:
        """The upload still works from the body Django spooled, and a WARNING names ResumableUploadsASGI, once."""
        from django.test import AsyncClient

        async def upload() -> tuple[int, int, int]:
            client = AsyncClient(enforce_csrf_checks=True, raise_request_exception=False)
            token = (await client.get("/form/")).json()["csrf"]
            headers = {**TUS, "X-CSRFToken": token}
            created = await client.generic("POST", "/files/", b"", headers={**headers, "Upload-Length": "6"})
            patched = [await client.generic("PATCH", created["Location"], data, headers={
                **headers, "Upload-Offset": str(offset)}, content_type="application/offset+octet-stream")
                for offset, data in ((0, b"abc"), (3, b"def"))]
            return created.status_code, patched[0].status_code, patched[1].status_code

        assert asyncio.run(upload()) == (201, 204, 204)
        warnings = [record.getMessage() for record in caplog.records if "under ASGI" in record.getMessage()]
        assert len(warnings) == 1 and "ResumableUploadsASGI" in warnings[0]


class TestTheVerdict:
    def test_a_cache_ahead_never_keeps_the_verdict(self, project: None) -> None:
        """Django's per-site cache ahead of the endpoint does not store the verdict that passes back out
        through it (an empty 200 to a HEAD), or a later HEAD would get that instead of the upload's offset."""
        from django.middleware.cache import FetchFromCacheMiddleware, UpdateCacheMiddleware
        from django.test import RequestFactory, override_settings

        from uploadguard.django import _Proceed

        caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "verdict"}}
        with override_settings(CACHES=caches, CACHE_MIDDLEWARE_SECONDS=600):
            update = UpdateCacheMiddleware(lambda request: _Proceed("owner"))
            fetch = FetchFromCacheMiddleware(lambda request: _Proceed("owner"))
            factory = RequestFactory()
            for method in ("head", "get"):
                request = getattr(factory, method)("/files/abcdefghijklmnopqrstuvwx")
                assert fetch.process_request(request) is None  # a miss: marks the request for the update
                assert isinstance(update(request), _Proceed)
                assert fetch.process_request(getattr(factory, method)("/files/abcdefghijklmnopqrstuvwx")) is None


def options_request(marker: bytes) -> tuple[dict[str, Any], Any, Any, list[dict[str, Any]]]:
    """An in-process ``OPTIONS /files/`` carrying the header ``marker`` (which a test middleware acts on): its
    scope, ``receive`` and ``send``, and the list ``send`` fills."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "OPTIONS",
             "scheme": "http", "path": "/files/", "raw_path": b"/files/", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"tus-resumable", b"1.0.0"), (marker, b"1")],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return scope, receive, send, sent


class TestOffTheLoop:
    """In-process: the Django work of an endpoint request runs in a thread, never on the event loop."""

    def test_a_slow_session_lookup_does_not_hold_the_loop(self, tmp_path: Path) -> None:
        """While the middleware ahead of the endpoint waits (a slow session store), the loop runs on: it is the
        loop that lets the request go, and then the request is answered."""
        from django.test import override_settings

        from tests.django_asgi_client import asgi_stack
        from tests.django_project.middleware import Hold
        from tests.test_django_resumable import MIDDLEWARE

        scope, receive, send, sent = options_request(b"x-hold")

        async def exchange() -> None:
            app = asgi_stack()
            request = asyncio.ensure_future(app(scope, receive, send))
            await asyncio.to_thread(Hold.entered.wait, 30)
            Hold.release.set()  # from the loop: only if the loop runs while the request waits
            await request

        Hold.entered.clear()
        Hold.release.clear()
        with override_settings(MIDDLEWARE=["tests.django_project.middleware.Hold", *MIDDLEWARE],
                               UPLOADGUARD_RESUMABLE_STORAGE=str(tmp_path / "tus")):
            asyncio.run(exchange())
        assert Hold.released is True
        assert sent[0]["status"] == 204

    def test_one_slow_session_lookup_does_not_hold_the_others(self, tmp_path: Path) -> None:
        """Two requests whose middleware ahead of the endpoint waits (slow session lookups) run side by side,
        each in a thread of its own as Django gives each request, not one after the other in one shared thread."""
        from django.test import override_settings

        from tests.django_asgi_client import asgi_stack
        from tests.django_project.middleware import Meet
        from tests.test_django_resumable import MIDDLEWARE

        scope, receive, send, sent = options_request(b"x-meet")

        async def exchange() -> None:
            app = asgi_stack()
            await asyncio.gather(app(dict(scope), receive, send), app(dict(scope), receive, send))

        Meet.barrier.reset()
        Meet.met.clear()
        with override_settings(MIDDLEWARE=["tests.django_project.middleware.Meet", *MIDDLEWARE],
                               UPLOADGUARD_RESUMABLE_STORAGE=str(tmp_path / "tus")):
            asyncio.run(exchange())
        assert Meet.met == [True, True]
        assert [message["status"] for message in sent if message["type"] == "http.response.start"] == [204, 204]

    def test_a_slow_on_complete_holds_none_of_the_endpoints_threads(self, tmp_path: Path) -> None:
        """While one upload's on_complete takes its time, other uploads are created and stored, even by an
        endpoint with a single thread: the hook runs in a thread of its own, as a request, not in the pool."""
        from django.core.handlers.asgi import ASGIHandler
        from django.middleware.csrf import _get_new_csrf_string
        from django.test import override_settings

        from tests.django_asgi_client import _exchange
        from tests.django_project.middleware import SlowUploads
        from tests.test_django_resumable import MIDDLEWARE
        from uploadguard.asgi import UploadGuard
        from uploadguard.django import ResumableUploadsASGI, settings_from_django

        secret = _get_new_csrf_string()

        def scope(method: str, path: str, **headers: str) -> dict[str, Any]:
            fields = {"host": "testserver", "tus-resumable": "1.0.0", "cookie": f"csrftoken={secret}",
                      "x-csrftoken": secret, "content-type": "application/offset+octet-stream", **headers}
            return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                    "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                    "headers": [(name.replace("_", "-").encode(), value.encode()) for name, value in fields.items()],
                    "client": ("127.0.0.1", 1), "server": ("testserver", 80)}

        async def upload(app: Any, data: bytes) -> int:
            status, headers, _ = await _exchange(app, scope("POST", "/files/", upload_length=str(len(data))), b"")
            assert status == 201
            location = dict((name.lower(), value) for name, value in headers)["location"]
            status, _, _ = await _exchange(app, scope("PATCH", location, upload_offset="0",
                                                      content_length=str(len(data))), data)
            return status

        async def exchange() -> list[int]:
            app = UploadGuard(ResumableUploadsASGI(ASGIHandler(), threads=1), settings=settings_from_django())
            slow = asyncio.ensure_future(upload(app, b"abc"))
            await asyncio.to_thread(SlowUploads.entered.wait, 10)
            other = await upload(app, b"abcd")
            SlowUploads.release.set()
            return [other, await slow]

        SlowUploads.entered.clear()
        SlowUploads.release.clear()
        with override_settings(MIDDLEWARE=[*MIDDLEWARE[:-1], "tests.django_project.middleware.SlowUploads"],
                               UPLOADGUARD_RESUMABLE_STORAGE=str(tmp_path / "tus"), UPLOADGUARD_MIN_FREE_SPACE=0):
            assert asyncio.run(exchange()) == [204, 204]
        assert SlowUploads.released is True


SESSION = "django.contrib.sessions.middleware.SessionMiddleware"
CSRF = "django.middleware.csrf.CsrfViewMiddleware"
AUTH = "django.contrib.auth.middleware.AuthenticationMiddleware"
RESUMABLE = "uploadguard.django.ResumableUploadsMiddleware"


class TestConfiguration:
    def test_without_the_middleware_it_refuses_to_start(self) -> None:
        """Without ResumableUploadsMiddleware (the class, or a subclass) in MIDDLEWARE, ResumableUploadsASGI raises
        ImproperlyConfigured saying where it goes, rather than serving uploads by other rules."""
        from django.core.exceptions import ImproperlyConfigured
        from django.core.handlers.asgi import ASGIHandler
        from django.test import override_settings

        from uploadguard.django import ResumableUploadsASGI

        with override_settings(MIDDLEWARE=[CSRF, "tests.test_django_resumable.FakeLogin"]):
            with pytest.raises(ImproperlyConfigured, match="ResumableUploadsMiddleware .*not in MIDDLEWARE"):
                ResumableUploadsASGI(ASGIHandler())


class TestSystemCheck:
    @pytest.mark.parametrize(("middleware", "expected"), [
        pytest.param([SESSION, CSRF, AUTH, RESUMABLE], [], id="after-all"),
        pytest.param([CSRF], [], id="no-endpoint"),
        pytest.param([RESUMABLE, SESSION, CSRF, AUTH], ["uploadguard.W003"], id="first"),
        pytest.param([SESSION, CSRF, RESUMABLE, AUTH], ["uploadguard.W003"], id="before-auth"),
        pytest.param([SESSION, RESUMABLE, CSRF, AUTH], ["uploadguard.W003"], id="before-csrf-and-auth"),
        pytest.param([SESSION, AUTH, RESUMABLE, CSRF], [], id="csrf-behind-is-checked-by-the-endpoint"),
    ])
    def test_the_endpoint_comes_after_session_and_authentication(self, middleware: list[str],
                                                                 expected: list[str]) -> None:
        """ResumableUploadsMiddleware ahead of SessionMiddleware or AuthenticationMiddleware is W003: under WSGI and
        ResumableUploadsASGI its owner and adoption would never see the user."""
        from django.test import override_settings

        from uploadguard.django import check_resumable_order

        with override_settings(MIDDLEWARE=middleware, INSTALLED_APPS=["django.contrib.contenttypes",
                                                                     "django.contrib.auth", "django.contrib.sessions"]):
            assert [message.id for message in check_resumable_order()] == expected
