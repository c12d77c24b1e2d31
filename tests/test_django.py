"""``uploadguard.django.UploadGuardMiddleware`` in a real Django project (``tests/django_project``).

In-process with Django's test ``Client`` and with WebTest over
``get_wsgi_application()``, on real directories and (as root) real tmpfs
mounts; end to end under real gunicorn with the project's ``gunicorn_conf.py``.

The project's settings are applied with ``override_settings`` so that other
Django tests in the same process (the demo's) keep theirs.  Its ``Sabotage``
middleware breaks the temp dir after uploadguard's check and before Django
spools the body -- the race a check alone cannot close.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import wsgiref.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from tests.support import GUNICORN_CONF, ROOT, Gunicorn, fill, needs_root, tmpfs

django = pytest.importorskip("django")
webtest = pytest.importorskip("webtest")

from django.conf import settings  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.core.signals import got_request_exception  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

from uploadguard import Settings, UploadGuard  # noqa: E402
from uploadguard.django import (  # noqa: E402
    UploadGuardMiddleware,
    check_middleware,
    check_settings,
    settings_from_django,
)

KiB = 1024
MiB = 1024 * KiB
MIDDLEWARE = "uploadguard.django.UploadGuardMiddleware"
SABOTAGE = "tests.django_project.middleware.Sabotage"
CSRF = "django.middleware.csrf.CsrfViewMiddleware"


def project_settings() -> dict[str, Any]:
    from tests.django_project import settings as module

    values = {name: getattr(module, name) for name in dir(module) if name.isupper()}
    del values["DATABASES"]  # cannot be overridden; the project uses no database
    del values["SECRET_KEY"]  # cannot be restored if the first configuration had none; nothing here signs
    return values


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    temp = tmp_path / "upload-tmp"
    temp.mkdir(mode=0o700)
    return {"temp": temp, "store": tmp_path / "stored"}


@pytest.fixture(autouse=True)
def project(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test project's settings, its temp dir under tmp_path, no UPLOADGUARD_* from the environment."""
    for name in [name for name in os.environ if name.startswith("UPLOADGUARD_")]:
        monkeypatch.delenv(name)
    if not settings.configured and "DJANGO_SETTINGS_MODULE" not in os.environ:
        settings.configure(SECRET_KEY="uploadguard-tests")  # a base to override; other tests may bring theirs
    django.setup()
    values = project_settings()
    values.update(FILE_UPLOAD_TEMP_DIR=str(dirs["temp"]), STORE_DIR=str(dirs["store"]),
                  UPLOADGUARD_MIN_FREE_SPACE=0, UPLOADGUARD_RETRY_AFTER=2)
    with override_settings(**values):
        yield


@pytest.fixture
def client() -> Client:
    """A client that shows the response Django sends, not the exception Django caught."""
    return Client(raise_request_exception=False)


def content(size: int, name: str = "photo.jpg") -> bytes:
    """The bytes of the file :func:`multipart` sends."""
    return (hashlib.sha256(name.encode()).digest() * (size // 32 + 1))[:size]


def multipart(size: int, name: str = "photo.jpg", **fields: str) -> tuple[bytes, str]:
    """A form with one file of ``size`` bytes (and text fields): body and content type."""
    return urllib3.encode_multipart_formdata({**fields, "file": (name, content(size, name))})


def upload(client: Client, size: int, path: str = "/upload/", **headers: str) -> Any:
    body, content_type = multipart(size)
    return client.post(path, body, content_type=content_type, headers={"Accept": "application/json", **headers})


def middleware_of(handler: WSGIHandler) -> UploadGuardMiddleware:
    """The middleware instance at the top of a handler's chain (Django wraps it with functools.wraps)."""
    instance = handler._middleware_chain.__wrapped__
    assert isinstance(instance, UploadGuardMiddleware)
    return instance


def logged(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    """uploadguard's log lines that start with ``start``."""
    return [r.getMessage() for r in caplog.records if r.name == "uploadguard" and r.getMessage().startswith(start)]


def wsgi_environ(path: str, body: bytes, **extra: Any) -> dict[str, Any]:
    """A WSGI environ for a POST of ``body`` with a Content-Length."""
    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "HTTP_HOST": "testserver",
                               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body), **extra}
    wsgiref.util.setup_testing_defaults(environ)
    return environ


def chunked_environ(path: str, body: bytes) -> dict[str, Any]:
    """A WSGI environ as gunicorn builds it for a chunked request (no Content-Length, input terminated)."""
    environ = wsgi_environ(path, body, HTTP_TRANSFER_ENCODING="chunked", CONTENT_TYPE="application/octet-stream",
                           **{"wsgi.input_terminated": True})
    del environ["CONTENT_LENGTH"]
    return environ


def call(app: Any, environ: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    started: list[Any] = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: started.append((status, headers))))
    status, headers = started[0]
    return int(status.split()[0]), dict(headers), body


class TestDjangoBehaviour:
    """What Django does on its own, which the middleware is built on."""

    @pytest.mark.parametrize(("path", "process_exception"), [
        pytest.param("/upload/", "FileNotFoundError", id="view-reads-FILES"),
        pytest.param("/upload/protected/", None, id="CsrfViewMiddleware-reads-POST"),
    ])
    def test_temp_dir_error_is_a_500_without_uploadguard(self, dirs: dict[str, Path], path: str,
                                                         process_exception: str | None) -> None:
        """Without uploadguard a vanished temp dir is a 500; process_exception sees only view errors."""
        with override_settings(MIDDLEWARE=[SABOTAGE, CSRF]):
            client = Client(enforce_csrf_checks=True, raise_request_exception=False)
            token = client.get("/form/").json()["csrf"]
            body, content_type = multipart(10 * KiB, csrfmiddlewaretoken=token)
            response = client.post(path, body, content_type=content_type, headers={"X-Sabotage": "remove"})

        assert response.status_code == 500
        assert response.get("X-Process-Exception") == process_exception

    def test_got_request_exception_carries_the_wsgi_environ(self, dirs: dict[str, Path]) -> None:
        """The signal's request.META is the very environ the WSGI server passed in."""
        seen: list[Any] = []

        def receiver(sender: object, request: Any, **kwargs: Any) -> None:
            seen.append((request.META, sys.exc_info()[1]))

        got_request_exception.connect(receiver)
        try:
            body, content_type = multipart(10 * KiB)
            environ = wsgi_environ("/upload/", body, CONTENT_TYPE=content_type, HTTP_X_SABOTAGE="remove")
            with override_settings(MIDDLEWARE=[SABOTAGE, CSRF]):
                status, _, _ = call(get_wsgi_application(), environ)
        finally:
            got_request_exception.disconnect(receiver)

        assert status == 500
        assert seen[0][0] is environ
        assert isinstance(seen[0][1], FileNotFoundError)

    def test_a_chunked_body_is_empty_to_django(self) -> None:
        """WSGIRequest reads Content-Length only: request.body of a chunked request is empty, wsgi.input is not."""
        with override_settings(MIDDLEWARE=[]):
            status, _, body = call(get_wsgi_application(), chunked_environ("/raw/", b"x" * 5000))

        assert status == 200
        assert json.loads(body) == {"size": 5000, "django_body": 0, "files": 0}


class TestSettings:
    def test_django_settings_win_over_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """UPLOADGUARD_* Django settings override the variables; the others still come from the environment."""
        monkeypatch.setenv("UPLOADGUARD_MAX_BODY_SIZE", "1M")
        monkeypatch.setenv("UPLOADGUARD_DRAIN_TIMEOUT", "3")

        with override_settings(UPLOADGUARD_MAX_BODY_SIZE="2M", UPLOADGUARD_RETRY_AFTER=7):
            resolved = settings_from_django()

        assert (resolved.max_body_size, resolved.retry_after, resolved.drain_timeout) == (2 * MiB, 7, 3.0)

    @pytest.mark.parametrize(("file_upload_temp_dir", "uploadguard_temp_dir", "expected"), [
        pytest.param("upload-tmp", None, "upload-tmp", id="FILE_UPLOAD_TEMP_DIR"),
        pytest.param("upload-tmp", "upload-tmp/", "upload-tmp", id="both-the-same"),
        pytest.param(None, "guarded", "guarded", id="UPLOADGUARD_TEMP_DIR"),
    ])
    def test_the_guarded_dir_is_where_django_spools(self, tmp_path: Path, file_upload_temp_dir: str | None,
                                                    uploadguard_temp_dir: str | None, expected: str) -> None:
        """FILE_UPLOAD_TEMP_DIR is the guarded dir when set; else UPLOADGUARD_TEMP_DIR (a Path works)."""
        with override_settings(
            FILE_UPLOAD_TEMP_DIR=file_upload_temp_dir and str(tmp_path / file_upload_temp_dir),
            UPLOADGUARD_TEMP_DIR=uploadguard_temp_dir and tmp_path / uploadguard_temp_dir,
        ):
            assert settings_from_django().temp_dir == tmp_path / expected

    @pytest.mark.parametrize(("overrides", "env", "message"), [
        pytest.param({"UPLOADGUARD_TEMP_DIR": "/srv/elsewhere"}, {},
                     "UPLOADGUARD_TEMP_DIR='/srv/elsewhere' is not FILE_UPLOAD_TEMP_DIR=", id="setting-disagrees"),
        pytest.param({}, {"UPLOADGUARD_TEMP_DIR": "/srv/elsewhere"},
                     "UPLOADGUARD_TEMP_DIR='/srv/elsewhere' is not FILE_UPLOAD_TEMP_DIR=", id="variable-disagrees"),
        pytest.param({"UPLOADGUARD_MAX_BODY_SIZE": "20X"}, {}, "UPLOADGUARD_MAX_BODY_SIZE='20X' is not a size",
                     id="bad-size"),
        pytest.param({"UPLOADGUARD_RETRY_AFTER": True}, {}, "UPLOADGUARD_RETRY_AFTER=True is not a duration",
                     id="bool"),
    ])
    def test_bad_configuration_stops_the_middleware_from_loading(
        self, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any], env: dict[str, str], message: str,
    ) -> None:
        """A bad value or a temp dir Django does not use raises ImproperlyConfigured naming it, at startup."""
        for name, value in env.items():
            monkeypatch.setenv(name, value)

        with override_settings(**overrides), pytest.raises(ImproperlyConfigured, match=message):
            get_wsgi_application()


class TestSystemChecks:
    @pytest.mark.parametrize(("overrides", "spool_in_guarded_dir", "expected"), [
        pytest.param({}, False, [], id="FILE_UPLOAD_TEMP_DIR-set"),
        pytest.param({"UPLOADGUARD_TEMP_DIR": "/srv/elsewhere"}, False, ["uploadguard.E001"], id="dirs-disagree"),
        pytest.param({"UPLOADGUARD_DRAIN_MAX": "lots"}, False, ["uploadguard.E002"], id="bad-value"),
        pytest.param({"FILE_UPLOAD_TEMP_DIR": None}, False, ["uploadguard.W001"], id="spooled-elsewhere"),
        pytest.param({"FILE_UPLOAD_TEMP_DIR": None}, True, [], id="tempfile-points-at-it"),
    ])
    def test_settings_check(self, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any],
                            spool_in_guarded_dir: bool, expected: list[str]) -> None:
        """The check reports disagreeing dirs, bad values and uploads spooled outside the guarded dir."""
        monkeypatch.setenv("UPLOADGUARD_TEMP_DIR", str(dirs["temp"]))
        monkeypatch.setattr(tempfile, "tempdir", str(dirs["temp"]) if spool_in_guarded_dir else "/tmp")

        with override_settings(**overrides):
            assert [message.id for message in check_settings()] == expected

    @pytest.mark.parametrize(("middleware", "expected"), [
        pytest.param([MIDDLEWARE, CSRF], [], id="first"),
        pytest.param(["tests.test_django.Subclassed", CSRF], [], id="a-subclass-first"),
        pytest.param([CSRF, MIDDLEWARE], ["uploadguard.W002"], id="second"),
        pytest.param([CSRF], ["uploadguard.W002"], id="missing"),
    ])
    def test_middleware_check(self, middleware: list[str], expected: list[str]) -> None:
        """The middleware must come first in MIDDLEWARE."""
        with override_settings(MIDDLEWARE=middleware):
            assert [message.id for message in check_middleware()] == expected

    def test_manage_py_check_reports_it(self, tmp_path: Path) -> None:
        """With the AppConfig in INSTALLED_APPS, `django-admin check` runs the checks in a fresh process."""
        (tmp_path / "a").mkdir()
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
               "TEST_FILE_UPLOAD_TEMP_DIR": str(tmp_path / "a"), "UPLOADGUARD_TEMP_DIR": str(tmp_path / "b")}

        result = subprocess.run([sys.executable, "-m", "django", "check"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)

        assert result.returncode == 1
        assert "(uploadguard.E001) UPLOADGUARD_TEMP_DIR=" in result.stderr


class Subclassed(UploadGuardMiddleware):
    """A project's own subclass (for the middleware check)."""


class TestBodyLimit:
    def test_content_length_over_the_limit_is_413_before_django_parses(self, client: Client,
                                                                       dirs: dict[str, Path]) -> None:
        """The 413 names the limit; the view never runs, nothing is spooled or stored."""
        with override_settings(UPLOADGUARD_MAX_BODY_SIZE=8 * KiB):
            response = upload(client, 10 * KiB)

        assert response.status_code == 413
        assert response.json()["limit"] == 8 * KiB
        assert response["Cache-Control"] == "no-store"
        assert not dirs["store"].exists()
        assert list(dirs["temp"].iterdir()) == []

    def test_the_limit_counts_files_unlike_data_upload_max_memory_size(self) -> None:
        """DATA_UPLOAD_MAX_MEMORY_SIZE lets a large file through; uploadguard's limit does not."""
        with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=KiB, UPLOADGUARD_MAX_BODY_SIZE=0):
            assert upload(Client(), 20 * KiB).status_code == 200
        with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=KiB, UPLOADGUARD_MAX_BODY_SIZE=16 * KiB):
            assert upload(Client(), 20 * KiB).status_code == 413

    def test_a_body_at_the_limit_is_stored(self, client: Client) -> None:
        """The limit is inclusive."""
        body, content_type = multipart(10 * KiB)
        with override_settings(UPLOADGUARD_MAX_BODY_SIZE=len(body)):
            response = client.post("/upload/", body, content_type=content_type)

        assert response.status_code == 200

    def test_invalid_content_length_is_400(self, client: Client) -> None:
        """A Content-Length that is not a number is refused, as the WSGI middleware does."""
        response = client.post("/upload/", b"abc", content_type="text/plain", CONTENT_LENGTH="3x")

        assert response.status_code == 400

    def test_a_chunked_body_the_server_will_not_deliver_is_411(self) -> None:
        """Without wsgi.input_terminated (uWSGI) a chunked body is a 411 naming the fix; the view never runs."""
        environ = chunked_environ("/raw/", b"x" * 5000)
        del environ["wsgi.input_terminated"]
        code, _, body = call(get_wsgi_application(), environ)

        assert code == 411 and b"Content-Length" in body

    @pytest.mark.parametrize(("size", "status"), [
        pytest.param(5000, 200, id="under"),
        pytest.param(9000, 413, id="over"),
    ])
    def test_a_chunked_body_read_from_wsgi_input_is_cut_at_the_limit(self, size: int, status: int) -> None:
        """Code reading a chunked body itself gets it counted, and a 413 past the limit."""
        with override_settings(UPLOADGUARD_MAX_BODY_SIZE=8000):
            code, headers, body = call(get_wsgi_application(), chunked_environ("/raw/", b"x" * size))

        assert code == status
        if status == 200:
            assert json.loads(body)["size"] == size


class TestTempDir:
    def test_a_deleted_dir_is_recreated_before_django_spools(self, client: Client, dirs: dict[str, Path]) -> None:
        """The upload is stored, having been spooled in the recreated directory."""
        shutil.rmtree(dirs["temp"])

        response = upload(client, 10 * KiB)

        assert response.status_code == 200
        assert response.json()["stored"][0]["spooled_in"] == str(dirs["temp"])
        assert (dirs["store"] / "photo.jpg").stat().st_size == 10 * KiB

    def test_a_file_in_its_place_is_503_before_django_reads(self, client: Client, dirs: dict[str, Path]) -> None:
        """An unusable dir is answered 503 + Retry-After; pages without a body still work."""
        shutil.rmtree(dirs["temp"])
        dirs["temp"].write_text("not a directory")

        response = upload(client, 10 * KiB)

        assert response.status_code == 503
        assert response["Retry-After"] == "2"
        assert response.json()["error"] == "not_a_directory"
        assert "X-Inner-Middleware" not in response  # answered before the rest of the stack
        assert client.get("/form/").status_code == 200

    @pytest.mark.parametrize("path", [
        pytest.param("/upload/", id="view-reads-FILES"),
        pytest.param("/upload/protected/", id="CsrfViewMiddleware-reads-POST"),
    ])
    def test_a_dir_deleted_while_django_spools_is_503_then_healed(self, dirs: dict[str, Path], path: str) -> None:
        """The error Django caught becomes a retryable 503; the retry is stored."""
        client = Client(enforce_csrf_checks=True, raise_request_exception=False)
        token = client.get("/form/").json()["csrf"]
        body, content_type = multipart(10 * KiB, csrfmiddlewaretoken=token)

        broken = client.post(path, body, content_type=content_type,
                             headers={"Accept": "application/json", "X-Sabotage": "remove"})
        retried = client.post(path, body, content_type=content_type)

        assert broken.status_code == 503
        assert broken.json() == {"error": "missing", "status": 503, "retry_after": 2,
                                 "detail": "Uploads are temporarily unavailable; please retry in 2 seconds."}
        assert (broken["Retry-After"], broken["Cache-Control"]) == ("2", "no-store")
        assert broken["X-Inner-Middleware"] == "seen"  # headers of the middleware inside are kept
        assert retried.status_code == 200
        assert retried.json()["stored"][0]["size"] == 10 * KiB

    def test_propagated_exceptions_get_the_same_answer(self, client: Client) -> None:
        """With DEBUG_PROPAGATE_EXCEPTIONS the middleware sees the exception itself and answers 503."""
        with override_settings(DEBUG_PROPAGATE_EXCEPTIONS=True):
            response = upload(client, 10 * KiB, **{"X-Sabotage": "remove"})

        assert response.status_code == 503

    def test_other_errors_keep_djangos_500(self, client: Client, caplog: pytest.LogCaptureFixture) -> None:
        """An OSError that is not about the temp dir is Django's business: its 500, logged once, by Django."""
        response = client.post("/broken/", {"field": "value"})

        assert response.status_code == 500
        assert [r.name for r in caplog.records if r.levelno >= logging.ERROR] == ["django.request"]

    @needs_root
    @pytest.mark.parametrize(("mount_options", "sabotage", "size", "reason", "view_ran"), [
        pytest.param("", "fill", 5 * MiB, "no_space", False, id="full"),
        pytest.param("ro", None, 10 * KiB, "read_only", False, id="read-only"),
        pytest.param("", "fill-while-spooling", 512 * KiB, "no_space", True, id="fills-up-while-spooling"),
        pytest.param("", "readonly", 10 * KiB, "read_only", True, id="turns-read-only-while-spooling"),
    ])
    def test_tmpfs(self, client: Client, tmp_path: Path, mount_options: str, sabotage: str | None, size: int,
                   reason: str, view_ran: bool) -> None:
        """A real 2 MB tmpfs full or read-only: 503 with the reason, whether found before or during spooling."""
        with tmpfs(tmp_path / "tmpfs", size="2m", options=mount_options) as mount:
            headers = {}
            if sabotage == "fill":
                fill(mount)
            elif sabotage:
                headers["X-Sabotage"] = sabotage.removesuffix("-while-spooling")
            with override_settings(FILE_UPLOAD_TEMP_DIR=str(mount)):
                response = upload(client, size, **headers)

        assert response.status_code == 503
        assert response.json()["error"] == reason
        assert ("X-Inner-Middleware" in response) is view_ran


class TestWsgiArrangements:
    """The middleware alone, or inside ``UploadGuard(get_wsgi_application())``: every answer counted once."""

    def post(self, app: Any, size: int = 10 * KiB, status: int = 503, **headers: str) -> Any:
        body, content_type = multipart(size)
        return webtest.TestApp(app).request("/upload/", method="POST", body=body, content_type=content_type,
                                            status=status, headers={"Accept": "application/json", **headers})

    def test_middleware_alone_counts_in_its_guard(self, caplog: pytest.LogCaptureFixture) -> None:
        """The middleware's own guard counts the request, the heal and the 503, once each."""
        handler = get_wsgi_application()

        self.post(handler, **{"X-Sabotage": "remove"})

        stats = middleware_of(handler).guard.stats
        assert (stats.total("guarded"), stats.by_reason("503"), stats.total("heal")) == (1, {"missing": 1}, 1)
        assert len(logged(caplog, "503 ")) == 1

    @pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
    def test_with_the_wsgi_guard_the_smaller_django_limit_wins(self, dirs: dict[str, Path], chunked: bool) -> None:
        """UPLOADGUARD_MAX_BODY_SIZE = "1M" in settings holds inside UploadGuard(get_wsgi_application()) too."""
        with override_settings(UPLOADGUARD_MAX_BODY_SIZE="1M"):
            handler = get_wsgi_application()
            outer = UploadGuard(handler, settings=Settings(temp_dir=dirs["temp"], min_free_space=0))
            if chunked:
                code, _, _ = call(outer, chunked_environ("/raw/", b"x" * (3 * MiB)))
                assert code == 413
            else:
                self.post(outer, size=3 * MiB, status=413)
        assert outer.stats.total("guarded") == 1
        assert outer.stats.total("413") + middleware_of(handler).guard.stats.total("413") == 1

    def test_a_designed_answer_is_not_logged_as_a_django_error(self, caplog: pytest.LogCaptureFixture) -> None:
        """A 503 the middleware answers is one WARNING line of uploadguard's, not also Django's ERROR."""
        handler = get_wsgi_application()
        with caplog.at_level(logging.WARNING):
            self.post(handler, **{"X-Sabotage": "remove"})
        responses = [r for r in caplog.records if r.name == "django.request" and "Service Unavailable" in r.getMessage()]
        assert responses == []
        assert len(logged(caplog, "503 ")) == 1

    def test_with_the_wsgi_guard_counts_in_the_outer_guard(self, dirs: dict[str, Path],
                                                          caplog: pytest.LogCaptureFixture) -> None:
        """The outer guard admitted the request; the middleware answers Django's error and counts it there."""
        handler = get_wsgi_application()
        outer = UploadGuard(handler, settings=Settings(temp_dir=dirs["temp"], min_free_space=0, retry_after=2))

        response = self.post(outer, **{"X-Sabotage": "remove"})

        assert response.headers["Retry-After"] == "2"
        assert (outer.stats.total("guarded"), outer.stats.by_reason("503")) == (1, {"missing": 1})
        assert not middleware_of(handler).guard.stats.counts
        assert len(logged(caplog, "503 ")) == 1

    def test_with_the_wsgi_guard_a_413_is_answered_once(self, dirs: dict[str, Path],
                                                        caplog: pytest.LogCaptureFixture) -> None:
        """The outer guard's 413 reaches neither Django nor the middleware."""
        handler = get_wsgi_application()
        outer = UploadGuard(handler, settings=Settings(temp_dir=dirs["temp"], max_body_size=8 * KiB))

        self.post(outer, status=413)

        assert outer.stats.total("413") == 1
        assert middleware_of(handler).guard.stats.total("413") == 0
        assert not dirs["store"].exists()
        assert len(logged(caplog, "413 ")) == 1

    def test_with_the_wsgi_guard_a_chunked_413_is_answered_once(self, dirs: dict[str, Path],
                                                                caplog: pytest.LogCaptureFixture) -> None:
        """A chunked body cut at the limit while Django code reads it is one 413, counted and logged once."""
        handler = get_wsgi_application()
        outer = UploadGuard(handler, settings=Settings(temp_dir=dirs["temp"], max_body_size=8000, min_free_space=0))

        code, _, _ = call(outer, chunked_environ("/raw/", b"x" * 9000))

        assert code == 413
        assert outer.stats.total("413") == 1
        assert len(logged(caplog, "413 ")) == 1

    def test_an_outer_guard_on_another_dir_does_not_stand_in_for_djangos(
        self, dirs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    ) -> None:
        """The middleware checks FILE_UPLOAD_TEMP_DIR itself when the WSGI guard watches another directory."""
        handler = get_wsgi_application()
        outer = UploadGuard(handler, settings=Settings(temp_dir=tmp_path / "elsewhere", min_free_space=0))
        shutil.rmtree(dirs["temp"])
        dirs["temp"].write_text("not a directory")

        response = self.post(outer)

        assert response.json["error"] == "not_a_directory"
        assert middleware_of(handler).guard.stats.by_reason("503") == {"not_a_directory": 1}
        assert outer.stats.total("guarded") == 1
        assert len(logged(caplog, "the WSGI UploadGuard guards")) == 1

    def test_uploads_spooled_outside_the_guarded_dir_are_logged(self, dirs: dict[str, Path],
                                                                caplog: pytest.LogCaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """Without FILE_UPLOAD_TEMP_DIR, a tempfile dir other than the guarded one is a WARNING at the first upload."""
        monkeypatch.setattr(tempfile, "tempdir", str(dirs["temp"].parent))
        with override_settings(FILE_UPLOAD_TEMP_DIR=None, UPLOADGUARD_TEMP_DIR=dirs["temp"]):
            handler = get_wsgi_application()
            first = self.post(handler, status=200)
            self.post(handler, status=200)

        assert first.json["stored"][0]["spooled_in"] == str(dirs["temp"].parent)
        assert len(logged(caplog, "Django spools uploads to")) == 1


@pytest.mark.slow
class TestGunicorn:
    """The test project under real gunicorn with the project's gunicorn_conf.py."""

    def serve(self, tmp_path: Path, temp: Path, store: Path, app: str = "django_project.wsgi:application",
              **env: str) -> Gunicorn:
        return Gunicorn(app, tmp_path=tmp_path, config=GUNICORN_CONF, workers=2, args=["--log-level", "info"], env={
            "DJANGO_SETTINGS_MODULE": "django_project.settings", "UPLOADGUARD_TEMP_DIR": str(temp),
            "UPLOADGUARD_MIN_FREE_SPACE": "0", "UPLOADGUARD_RETRY_AFTER": "1", "TEST_STORE_DIR": str(store), **env})

    @staticmethod
    def post(url: str, size: int, name: str = "photo.jpg", **headers: str) -> tuple[int, dict[str, str], bytes]:
        body, content_type = multipart(size, name)
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/upload/", body=body, headers={
                "Content-Type": content_type, "Accept": "application/json", **headers})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    @pytest.mark.parametrize("app", [
        pytest.param("django_project.wsgi:application", id="middleware"),
        pytest.param("django_project.wsgi:guarded", id="middleware-inside-UploadGuard"),
    ])
    def test_temp_dir_deleted_while_spooling_is_503_then_stored(self, tmp_path: Path, dirs: dict[str, Path],
                                                                app: str) -> None:
        """Django spools where gunicorn_conf points tempfile; a vanished dir is 503, the retry is stored."""
        server = self.serve(tmp_path, dirs["temp"], dirs["store"], app)
        try:
            status, headers, _ = self.post(server.url, 300 * KiB, **{"X-Sabotage": "remove"})
            retried, _, body = self.post(server.url, 300 * KiB)
            log = server.log()
        finally:
            server.stop()

        assert (status, headers["Retry-After"]) == (503, "1")
        assert retried == 200
        stored = json.loads(body)["stored"][0]
        assert stored["spooled_in"] == str(dirs["temp"])
        assert (dirs["store"] / "photo.jpg").read_bytes() == content(300 * KiB)
        assert "uploadguard: 503 POST /upload/" in log

    def test_unusable_dir_is_503_until_fixed(self, tmp_path: Path, dirs: dict[str, Path]) -> None:
        """A file where the dir should be: 503 for uploads, pages work; once it is gone, the dir is recreated."""
        server = self.serve(tmp_path, dirs["temp"], dirs["store"])
        try:
            shutil.rmtree(dirs["temp"])
            dirs["temp"].write_text("not a directory")
            refused, headers, body = self.post(server.url, 300 * KiB)
            page = urllib3.request("GET", server.url + "/form/", timeout=10).status
            dirs["temp"].unlink()
            healed, _, _ = self.post(server.url, 300 * KiB)
        finally:
            server.stop()

        assert (refused, json.loads(body)["error"], headers["Retry-After"]) == (503, "not_a_directory", "1")
        assert (page, healed) == (200, 200)
        assert dirs["temp"].is_dir()

    def test_oversized_upload_reads_the_413(self, tmp_path: Path, dirs: dict[str, Path]) -> None:
        """12 MB over an 8 MB limit: the client, still sending, reads the 413 (the body is drained)."""
        server = self.serve(tmp_path, dirs["temp"], dirs["store"], UPLOADGUARD_MAX_BODY_SIZE="8M")
        try:
            status, _, body = self.post(server.url, 12 * MiB)
        finally:
            server.stop()

        assert (status, json.loads(body)["limit"]) == (413, 8 * MiB)
        assert not dirs["store"].exists()

    @needs_root
    def test_full_tmpfs_is_503_that_a_5mb_upload_reads(self, tmp_path: Path, dirs: dict[str, Path]) -> None:
        """The measured failure: 5 MB into a full 2 MB tmpfs.  The client reads the 503 (the body is drained)."""
        with tmpfs(tmp_path / "tmpfs", size="2m") as mount:
            server = self.serve(tmp_path, mount, dirs["store"])
            try:
                fill(mount)
                status, headers, body = self.post(server.url, 5 * MiB)
            finally:
                server.stop()

        assert (status, json.loads(body)["error"]) == (503, "no_space")

    def test_dir_deleted_every_20ms_no_upload_fails(self, tmp_path: Path, dirs: dict[str, Path]) -> None:
        """4 clients, 40 uploads, the dir deleted every 20 ms: never a 500; every upload stored after retries."""
        server = self.serve(tmp_path, dirs["temp"], dirs["store"])
        stop = threading.Event()
        outcomes: list[int] = []

        def delete() -> None:
            while not stop.wait(0.02):
                shutil.rmtree(dirs["temp"], ignore_errors=True)

        def client(number: int) -> None:
            for i in range(10):
                for _ in range(50):
                    status, _, _ = self.post(server.url, 256 * KiB, name=f"c{number}-{i}.bin")
                    outcomes.append(status)
                    if status != 503:
                        break
                    time.sleep(0.05)

        deleter = threading.Thread(target=delete)
        clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        deleter.start()
        try:
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join(timeout=120)
        finally:
            stop.set()
            deleter.join()
            server.stop()

        assert set(outcomes) <= {200, 503}
        assert outcomes.count(200) == 40
        assert len(list(dirs["store"].iterdir())) == 40
