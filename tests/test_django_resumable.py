"""Resumable uploads in Django: ``ResumableUploadsMiddleware`` (WSGI), ``ResumableUploadsASGI`` and ``resumable_file``.

The endpoint's Django decisions are made after the session, CSRF and
authentication middleware, so CSRF holds for cookie-authenticated requests
and an upload belongs to whoever created it.  In-process with Django's test
client; every case runs twice, through both integrations: ``wsgi`` (Django's
WSGI handler, the endpoint inside it) and ``asgi`` (the documented asgi.py,
``UploadGuard(ResumableUploadsASGI(get_asgi_application()))``:
tests/django_asgi_client.py), so the two cannot drift.  The protocol itself is
specified in tests/test_resumable_wsgi.py; real servers in
tests/test_django_asgi.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from django.test import Client, override_settings

from tests.support import needs_root, tmpfs
from tests.test_django import dirs, project  # noqa: F401  (fixtures: the test project's settings)

MIDDLEWARE = [
    "uploadguard.django.UploadGuardMiddleware",
    "tests.django_project.middleware.Sabotage",
    "django.middleware.csrf.CsrfViewMiddleware",
    "tests.test_django_resumable.FakeLogin",
    "uploadguard.django.ResumableUploadsMiddleware",
]


class FakeLogin:
    """Stands in for AuthenticationMiddleware (the test project has no database): ``X-Test-User`` logs in."""

    class User:
        is_authenticated = True

        def __init__(self, pk: str) -> None:
            self.pk = pk

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        name = request.headers.get("X-Test-User")
        if name:
            request.user = self.User(name)
        return self.get_response(request)


#: The client class the cases use: Django's own (WSGI) or the one the ASGI stack serves; set by ``integration``.
_client_class: type[Client] = Client


@pytest.fixture(autouse=True, params=["wsgi", "asgi"])
def integration(request: pytest.FixtureRequest, dirs: dict[str, Path], project: None,  # noqa: F811
                monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Any:
    """Each case through WSGI and through ASGI; the name of the integration.

    Under ASGI no endpoint request may reach Django (whose middleware would
    serve it too, from Django's spooled copy of the body, and say so).
    """
    import tempfile

    from tests.django_asgi_client import ASGIClient

    # The ASGI guard points this process's tempfile (and TMPDIR) at the guarded dir: put them back after.
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setenv("TMPDIR", os.environ.get("TMPDIR", ""))
    if not os.environ["TMPDIR"]:
        monkeypatch.delenv("TMPDIR")
    monkeypatch.setattr(f"{__name__}._client_class", ASGIClient if request.param == "asgi" else Client)
    with override_settings(MIDDLEWARE=MIDDLEWARE, UPLOADGUARD_RESUMABLE_STORAGE=str(dirs["temp"].parent / "tus")):
        yield request.param
    assert not [record for record in caplog.get_records("call") if "under ASGI" in record.getMessage()]


def metadata(**values: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in values.items())


TUS = {"HTTP_TUS_RESUMABLE": "1.0.0"}


def csrf_client() -> tuple[Client, str]:
    """A browser-like client that enforces CSRF, with the token a page would have given it."""
    client = _client_class(enforce_csrf_checks=True, raise_request_exception=False)
    token = client.get("/form/").json()["csrf"]
    return client, token


def create(client: Client, token: str | None, size: int, **extra: str) -> Any:
    headers = {**TUS, "HTTP_UPLOAD_LENGTH": str(size), "HTTP_UPLOAD_METADATA": metadata(filename="cat.jpg",
                                                                                         filetype="image/jpeg")}
    if token is not None:
        headers["HTTP_X_CSRFTOKEN"] = token
    return client.generic("POST", "/files/", b"", content_type="application/offset+octet-stream", **headers, **extra)


def patch(client: Client, token: str, url: str, offset: int, data: bytes, **extra: str) -> Any:
    return client.patch(url, data, content_type="application/offset+octet-stream", **TUS,
                        HTTP_UPLOAD_OFFSET=str(offset), HTTP_X_CSRFTOKEN=token, **extra)


class TestCsrfAndOwnership:
    def test_creation_without_the_csrf_token_is_refused(self) -> None:
        """A cookie-authenticated creation without X-CSRFToken is Django's 403, and nothing is created."""
        client, _ = csrf_client()
        response = create(client, None, 10)
        assert response.status_code == 403

    def test_upload_then_fetch_it_in_a_view(self, dirs: dict[str, Path]) -> None:  # noqa: F811
        """Created and sent in two PATCHes, the upload is an UploadedFile in the visitor's next form post."""
        client, token = csrf_client()
        data = bytes(range(256)) * 400
        created = create(client, token, len(data))
        assert created.status_code == 201, created.content
        url = created["Location"]
        assert patch(client, token, url, 0, data[:60000]).status_code == 204
        done = patch(client, token, url, 60000, data[60000:])
        assert (done.status_code, done["Upload-Offset"]) == (204, str(len(data)))

        response = client.post("/resumable-done/", {"upload": url, "csrfmiddlewaretoken": token})

        assert response.status_code == 200, response.content
        assert response.json() == {"name": "cat.jpg", "size": len(data), "content_type": "image/jpeg",
                                   "sha256": hashlib.sha256(data).hexdigest()}
        assert (dirs["store"] / "cat.jpg").read_bytes() == data

    def test_the_owner_deletes_it_once_stored(self, dirs: dict[str, Path]) -> None:  # noqa: F811
        """delete_resumable removes the stored upload for its owner; another visitor gets 404 and changes nothing."""
        from django.http import Http404
        from django.test import RequestFactory

        from uploadguard.django import delete_resumable

        client, token = csrf_client()
        url = create(client, token, 3)["Location"]
        patch(client, token, url, 0, b"abc")
        stranger = RequestFactory().post("/")
        stranger.META["CSRF_COOKIE"] = csrf_client()[0].cookies["csrftoken"].value
        with pytest.raises(Http404):
            delete_resumable(stranger, url)
        assert client.head(url, **TUS).status_code == 200

        response = client.post("/resumable-done/", {"upload": url, "delete": "1", "csrfmiddlewaretoken": token})

        assert response.status_code == 200 and response.json()["size"] == 3
        assert client.head(url, **TUS).status_code == 404
        assert sorted(path.name for path in (dirs["temp"].parent / "tus").iterdir()) == []

    def test_another_visitor_sees_nothing(self) -> None:
        """Whoever did not create the upload gets 404 for its HEAD, its PATCH and resumable_file."""
        owner, token = csrf_client()
        url = create(owner, token, 3)["Location"]
        patch(owner, token, url, 0, b"abc")

        stranger, stranger_token = csrf_client()
        assert stranger.head(url, **TUS).status_code == 404
        assert patch(stranger, stranger_token, url, 3, b"d").status_code == 404
        refused = stranger.post("/resumable-done/", {"upload": url, "csrfmiddlewaretoken": stranger_token})
        assert refused.status_code == 404

    def test_a_logged_in_user_owns_uploads_across_clients(self) -> None:
        """A logged-in user's upload is theirs from any browser, and not another user's."""
        first, token = csrf_client()
        url = create(first, token, 3, HTTP_X_TEST_USER="7")["Location"]
        second, _ = csrf_client()
        assert second.head(url, **TUS, HTTP_X_TEST_USER="7").status_code == 200
        assert second.head(url, **TUS, HTTP_X_TEST_USER="8").status_code == 404

    def test_behind_a_prefix_the_location_is_where_the_client_finds_it(self) -> None:
        """With FORCE_SCRIPT_NAME (the site mounted at /app by a proxy that strips it), the upload's Location is
        under /app, where the client reaches it, and the upload continues there."""
        client, token = csrf_client()
        with override_settings(FORCE_SCRIPT_NAME="/app"):
            location = create(client, token, 3)["Location"]
            assert location.startswith("/app/files/")
            assert patch(client, token, location.removeprefix("/app"), 0, b"abc").status_code == 204

    def test_an_incomplete_upload_is_a_clear_error(self) -> None:
        """resumable_file on an upload still in progress is Django's 400 in any view, not a 500."""
        from uploadguard.resumable import UploadIncomplete

        client, token = csrf_client()
        url = create(client, token, 10)["Location"]
        response = client.post("/resumable-done/", {"upload": url, "csrfmiddlewaretoken": token})
        assert response.status_code == 400
        with pytest.raises(UploadIncomplete, match="not complete"):
            from django.test import RequestFactory

            from uploadguard.django import resumable_file

            request = RequestFactory().get("/")
            request.META["CSRF_COOKIE"] = client.cookies["csrftoken"].value
            resumable_file(request, url)


class TestBodyIsNeverAForm:
    @pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
    def test_ietf_creation_with_a_form_content_type_keeps_its_body(self, content_type: str) -> None:
        """The draft lets a creation carry the file under its own media type; the CSRF check (which reads
        ``request.POST`` for a form type) must not swallow it: the token comes in the header."""
        client, token = csrf_client()
        data = b"csrfmiddlewaretoken=nothing&name=value&" + bytes(range(256)) * 40
        created = client.generic("POST", "/files/", data, content_type=content_type, HTTP_X_CSRFTOKEN=token,
                                 HTTP_UPLOAD_DRAFT_INTEROP_VERSION="6", HTTP_UPLOAD_COMPLETE="?1")
        assert created.status_code == 201, created.content
        response = client.post("/resumable-done/", {"upload": created["Location"], "csrfmiddlewaretoken": token})
        assert response.status_code == 200, response.content
        assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()

    def test_a_form_field_does_not_stand_in_for_the_header(self) -> None:
        """Only the X-CSRFToken header counts for the endpoint: a token in a form body is upload data."""
        client, token = csrf_client()
        created = client.generic("POST", "/files/", f"csrfmiddlewaretoken={token}".encode(),
                                 content_type="application/x-www-form-urlencoded",
                                 HTTP_UPLOAD_DRAFT_INTEROP_VERSION="6", HTTP_UPLOAD_COMPLETE="?1")
        assert created.status_code == 403


class TestGuardCoversIt:
    def test_an_unusable_temp_dir_is_the_retryable_503(self, dirs: dict[str, Path]) -> None:  # noqa: F811
        """A PATCH meets the guard first: with the temp dir replaced by a file it is a 503 + Retry-After."""
        client, token = csrf_client()
        url = create(client, token, 3)["Location"]
        shutil.rmtree(dirs["temp"])
        dirs["temp"].write_text("in the way")
        response = patch(client, token, url, 0, b"abc")
        assert response.status_code == 503 and response["Retry-After"] == "2"

    @needs_root
    def test_a_small_temp_dir_does_not_refuse_a_patch_the_storage_holds(self, dirs: dict[str, Path]) -> None:  # noqa: F811
        """The middleware knows the endpoint's bodies go to the upload storage: a 1 MiB tmpfs temp dir takes a
        3 MiB PATCH (it needs to be usable, not to hold it)."""
        data = os.urandom(3 * 1024 * 1024)
        with tmpfs(dirs["temp"], size="1m", options="mode=700"), override_settings(UPLOADGUARD_MIN_FREE_SPACE=0):
            client, token = csrf_client()
            url = create(client, token, len(data))["Location"]
            response = patch(client, token, url, 0, data)
        assert response.status_code == 204, response.content
        assert response["Upload-Offset"] == str(len(data))

    @needs_root
    def test_an_outer_wsgi_guard_knows_the_endpoint_too(self, dirs: dict[str, Path],  # noqa: F811
                                                        integration: str) -> None:
        """UploadGuard(get_wsgi_application()) -- the documented WSGI wrapping -- finds the middleware's endpoint
        as well: a 3 MiB PATCH passes a 1 MiB tmpfs temp dir."""
        if integration == "asgi":
            pytest.skip("the WSGI wrapping (the ASGI one is every case's asgi run)")
        import webtest
        from django.core.handlers.wsgi import WSGIHandler

        from uploadguard import UploadGuard

        data = os.urandom(3 * 1024 * 1024)
        with tmpfs(dirs["temp"], size="1m", options="mode=700"), override_settings(UPLOADGUARD_MIN_FREE_SPACE=0):
            app = webtest.TestApp(UploadGuard(WSGIHandler(), temp_dir=dirs["temp"], min_free_space=0))
            token = app.get("/form/").json["csrf"]
            headers = {"Tus-Resumable": "1.0.0", "X-CSRFToken": token}
            created = app.post("/files/", headers={**headers, "Upload-Length": str(len(data))}, status=201)
            url = created.headers["Location"].split("localhost:80", 1)[-1]
            response = app.request(url, method="PATCH", body=data, content_type="application/offset+octet-stream",
                                   headers={**headers, "Upload-Offset": "0"}, status="*")
        assert response.status_int == 204, response.body[:300]
        assert response.headers["Upload-Offset"] == str(len(data))

    def test_chunk_over_the_body_limit_is_413(self) -> None:
        """A PATCH whose body is over UPLOADGUARD_MAX_BODY_SIZE is the guard's 413 before Django reads it."""
        with override_settings(UPLOADGUARD_MAX_BODY_SIZE=1024):
            client, token = csrf_client()
            url = create(client, token, 1000)["Location"]
            assert patch(client, token, url, 0, b"x" * 2000).status_code == 413


class TestAnonymousOwnership:
    def test_uploads_started_at_once_all_stay_the_visitors(self) -> None:
        """Creations racing before any response came back name the same owner: no upload is orphaned."""
        client, token = csrf_client()
        cookie = client.cookies["csrftoken"].value
        urls = []
        for _ in range(2):  # each as if sent before the other's response (same cookies, nothing new kept)
            racer = _client_class(enforce_csrf_checks=True, raise_request_exception=False)
            racer.cookies["csrftoken"] = cookie
            response = create(racer, token, 3)
            assert response.status_code == 201
            assert "Set-Cookie" not in response.headers or "csrftoken" not in response.headers["Set-Cookie"]
            urls.append(response["Location"])
        for url in urls:
            assert client.head(url, **TUS).status_code == 200


class Backend:
    """An authentication backend without a database: each user id names an unsaved ``User``."""

    def get_user(self, user_id: int) -> Any:
        from django.contrib.auth.models import User

        return User(id=user_id, username=f"user{user_id}")


LOGIN_MIDDLEWARE = [
    "uploadguard.django.UploadGuardMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "uploadguard.django.ResumableUploadsMiddleware",
]


@pytest.fixture
def logins() -> Any:
    """Django's own sessions (signed cookies: no database), authentication and login()."""
    from django.contrib.auth.signals import user_logged_in

    with override_settings(INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth",
                                           "uploadguard.django.UploadGuardConfig"],
                           MIDDLEWARE=LOGIN_MIDDLEWARE, AUTHENTICATION_BACKENDS=[f"{__name__}.Backend"],
                           SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies"):
        user_logged_in.disconnect(dispatch_uid="update_last_login")  # it saves the user: there is no database
        yield


def log_in(client: Client, token: str, user: int) -> str:
    """Log ``client`` in as ``user``; return the CSRF token it holds from then on (login rotates it)."""
    response = client.post("/login/", {"user": str(user), "csrfmiddlewaretoken": token})
    assert response.status_code == 200, response.content
    rotated: str = client.cookies["csrftoken"].value
    assert rotated != token
    return rotated


@pytest.mark.usefixtures("logins")
class TestLoggingIn:
    def test_an_upload_begun_before_logging_in_is_the_users(self, dirs: dict[str, Path]) -> None:  # noqa: F811
        """Begun anonymously, an upload resumes, completes and is fetched after login, as the user's own."""
        client, token = csrf_client()
        url = create(client, token, 6)["Location"]
        assert patch(client, token, url, 0, b"abc").status_code == 204

        token = log_in(client, token, 7)

        head = client.head(url, **TUS)
        assert (head.status_code, head["Upload-Offset"]) == (200, "3")
        assert patch(client, token, url, 3, b"def").status_code == 204
        done = client.post("/resumable-done/", {"upload": url, "csrfmiddlewaretoken": token})
        assert done.status_code == 200 and done.json()["size"] == 6
        assert (dirs["store"] / "cat.jpg").read_bytes() == b"abcdef"
        elsewhere, other_token = csrf_client()
        log_in(elsewhere, other_token, 7)
        assert elsewhere.head(url, **TUS).status_code == 200  # the user's, from any browser now

    def test_the_middleware_ahead_adds_its_cookies_and_headers(self) -> None:
        """The session cookie SessionMiddleware refreshes (SESSION_SAVE_EVERY_REQUEST) and its Vary: Cookie come
        with the endpoint's answer, as any response passes the middleware on its way out."""
        client, token = csrf_client()
        token = log_in(client, token, 7)
        url = create(client, token, 3)["Location"]
        with override_settings(SESSION_SAVE_EVERY_REQUEST=True):
            response = client.head(url, **TUS)
        assert response.status_code == 200
        assert "sessionid" in response.cookies and "Cookie" in response.get("Vary", "")

    def test_vary_names_both_the_origin_and_the_cookie(self) -> None:
        """A cross-origin HEAD of a user's upload varies on Origin (the endpoint's CORS answer) and on Cookie (the
        session the middleware ahead read), as Django merges Vary on the way out: neither replaces the other."""
        with override_settings(MIDDLEWARE=[*LOGIN_MIDDLEWARE[:-1], "tests.django_project.middleware.CorsUploads"]):
            client, token = csrf_client()
            token = log_in(client, token, 7)
            url = create(client, token, 3)["Location"]
            response = client.head(url, HTTP_ORIGIN="https://app.example", **TUS)
        assert response.status_code == 200
        assert {"Origin", "Cookie"} <= {name.strip() for name in response["Vary"].split(",")}

    def test_parts_begun_before_logging_in_are_joined_after(self) -> None:
        """The parts of a concatenation, uploaded anonymously, are joined by the user they now belong to."""
        client, token = csrf_client()
        parts = []
        for data in (b"abc", b"def"):
            url = create(client, token, 3, HTTP_UPLOAD_CONCAT="partial")["Location"]
            assert patch(client, token, url, 0, data).status_code == 204
            parts.append(url)

        token = log_in(client, token, 7)

        final = client.generic("POST", "/files/", b"", **TUS, HTTP_X_CSRFTOKEN=token,
                               HTTP_UPLOAD_CONCAT="final;" + " ".join(parts))
        assert final.status_code == 201, final.content
        assert client.head(final["Location"], **TUS)["Upload-Offset"] == "6"

    def test_another_browser_logging_in_takes_nothing(self) -> None:
        """Uploads begun anonymously in one browser stay its own when anybody logs in elsewhere."""
        owner, owner_token = csrf_client()
        url = create(owner, owner_token, 3)["Location"]
        thief, thief_token = csrf_client()
        thief_token = log_in(thief, thief_token, 7)

        assert thief.head(url, **TUS).status_code == 404
        assert patch(thief, thief_token, url, 0, b"abc").status_code == 404
        assert thief.post("/resumable-done/", {"upload": url, "csrfmiddlewaretoken": thief_token}).status_code == 404
        assert owner.head(url, **TUS).status_code == 200
        log_in(owner, owner_token, 8)
        assert owner.head(url, **TUS).status_code == 200


    def test_an_upload_held_while_it_would_be_adopted_is_incomplete_not_a_500(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """resumable_file after login, for an upload a request holds: 400 (not complete), never a 500."""
        import uploadguard.django as integration

        client, token = csrf_client()
        url = create(client, token, 6)["Location"]
        assert patch(client, token, url, 0, b"abc").status_code == 204
        token = log_in(client, token, 7)
        assert integration._endpoint is not None
        uploads = integration._endpoint.uploads
        monkeypatch.setattr(uploads, "lock_timeout", 0.2)
        with uploads.locker.try_acquire(url.rsplit("/", 1)[1]) or pytest.fail("not acquired"):
            done = client.post("/resumable-done/", {"upload": url, "csrfmiddlewaretoken": token})
        assert done.status_code == 400, done.content


class TestDataTakenByOnComplete:
    def test_resumable_file_of_moved_data_is_a_404(self) -> None:
        """resumable_file and save_resumable for an upload whose data on_complete moved away: 404, not a 500."""
        from django.core.files.storage import FileSystemStorage
        from django.http import Http404
        from django.test import RequestFactory

        from uploadguard.django import save_resumable

        with override_settings(MIDDLEWARE=[*MIDDLEWARE[:-1], "tests.django_project.middleware.TakingUploads"]):
            client, token = csrf_client()
            url = create(client, token, 3)["Location"]
            assert patch(client, token, url, 0, b"abc").status_code == 204

            response = client.post("/resumable-done/", {"upload": url, "csrfmiddlewaretoken": token})

            assert response.status_code == 404
            request = RequestFactory().post("/photos/")
            request.META["CSRF_COOKIE"] = client.cookies["csrftoken"].value
            with pytest.raises(Http404):
                save_resumable(request, url, storage=FileSystemStorage(location=os.devnull + "-never"))


class TestSaveResumable:
    def test_saves_into_a_django_storage_for_the_owner_only(self, tmp_path: Path) -> None:
        """save_resumable copies a finished upload into any storage under its filename; a stranger gets 404."""
        from django.core.files.storage import FileSystemStorage
        from django.test import RequestFactory

        from uploadguard.django import save_resumable
        from uploadguard.resumable import UploadNotFound

        client, token = csrf_client()
        data = b"resumed bytes" * 1000
        url = create(client, token, len(data))["Location"]
        assert patch(client, token, url, 0, data).status_code == 204
        request = RequestFactory().post("/photos/")
        request.META["CSRF_COOKIE"] = client.cookies["csrftoken"].value
        storage = FileSystemStorage(location=tmp_path / "media")

        name = save_resumable(request, url, storage=storage)

        assert name == "cat.jpg" and (tmp_path / "media" / "cat.jpg").read_bytes() == data
        stranger = RequestFactory().post("/photos/")
        stranger.META["CSRF_COOKIE"] = "x" * 32
        with pytest.raises(UploadNotFound):
            save_resumable(stranger, url, storage=storage)


def test_bodyless_answers_claim_no_content_type() -> None:
    """A 204 of the endpoint carries no Content-Type (Django would add text/html for a body there is not)."""
    client, token = csrf_client()
    response = client.options("/files/", HTTP_TUS_RESUMABLE="1.0.0")
    assert response.status_code == 204 and "Content-Type" not in response.headers
