"""``uploadguard.flask.UploadGuard`` on a real Flask app (``tests/flask_app.py``).

In-process with Flask's test client, on real directories and (as root) real
tmpfs mounts; end to end under real gunicorn with ``gunicorn_conf.py``.
Werkzeug spools file parts over 500 KB to ``tempfile.gettempdir()``, so the
tests point :mod:`tempfile` at the guarded dir, as ``gunicorn_conf.py`` does,
and upload files larger than that.
"""

from __future__ import annotations

import gc
import hashlib
import http.client
import io
import json
import logging
import os
import shutil
import tempfile
import wsgiref.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import webtest
import urllib3

from tests.support import GUNICORN_CONF, Gunicorn, fill, needs_root, tmpfs

flask = pytest.importorskip("flask")

from flask.signals import got_request_exception  # noqa: E402

from tests.flask_app import create_app  # noqa: E402
from uploadguard import ConfigError, UploadGuard as WSGIUploadGuard  # noqa: E402
from uploadguard.flask import UploadGuard, settings_from_config  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
SPOOLED = 600 * KiB  # over Werkzeug's 500 KB in memory


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The guarded temp dir, which tempfile points at (as under gunicorn_conf.py), and the store."""
    temp = tmp_path / "upload-tmp"
    temp.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    for name in [name for name in os.environ if name.startswith("UPLOADGUARD_")]:
        monkeypatch.delenv(name)
    return {"temp": temp, "store": tmp_path / "stored"}


def make_app(dirs: dict[str, Path], **config: Any) -> flask.Flask:
    return create_app(**{"UPLOADGUARD_TEMP_DIR": dirs["temp"], "UPLOADGUARD_MIN_FREE_SPACE": 0,
                         "UPLOADGUARD_RETRY_AFTER": 2, "STORE_DIR": str(dirs["store"]), **config})


def content(size: int, name: str = "photo.jpg") -> bytes:
    return (hashlib.sha256(name.encode()).digest() * (size // 32 + 1))[:size]


def upload(app: flask.Flask, size: int = SPOOLED, **headers: str) -> Any:
    """POST a form with one file; the body is encoded here (the test client would spool it in the temp dir)."""
    body, content_type = urllib3.encode_multipart_formdata({"note": "hi", "file": ("photo.jpg", content(size))})
    return app.test_client().post("/upload", data=body, content_type=content_type,
                                  headers={"Accept": "application/json", **headers})


def chunked_environ(path: str, body: bytes) -> dict[str, Any]:
    """A WSGI environ as gunicorn builds it for a chunked request (no Content-Length, input terminated)."""
    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "HTTP_TRANSFER_ENCODING": "chunked",
                               "CONTENT_TYPE": "application/octet-stream", "wsgi.input": io.BytesIO(body),
                               "wsgi.input_terminated": True}
    wsgiref.util.setup_testing_defaults(environ)
    return environ


def call(app: Any, environ: dict[str, Any]) -> tuple[int, bytes]:
    started: list[str] = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: started.append(status)))
    return int(started[0].split()[0]), body


PROPAGATE = [pytest.param(False, id="production"), pytest.param(True, id="PROPAGATE_EXCEPTIONS")]

#: Werkzeug does not close the spool file of a form it failed to parse; Python warns when it is collected.
leaves_spool_file_open = pytest.mark.filterwarnings("ignore:Unclosed file:ResourceWarning")


@pytest.fixture(autouse=True)
def collect_garbage(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Free each test's leftovers within the test, so a warning on collection is charged to it.

    The log records of a caught exception (which pytest keeps after the test)
    hold its traceback, and so the files its frames had open.
    """
    yield
    for when in ("setup", "call"):
        caplog.get_records(when).clear()
    gc.collect()


class TestFlaskBehaviour:
    """What Flask and Werkzeug do on their own, which the integration is built on."""

    @leaves_spool_file_open
    def test_temp_dir_error_is_a_500_with_the_exception_in_the_signal(self, dirs: dict[str, Path]) -> None:
        """Without uploadguard, Werkzeug spooling into a vanished tempfile dir is a 500; the signal has the error."""
        app = create_app(guarded=False, STORE_DIR=str(dirs["store"]))
        seen: list[BaseException] = []

        def receiver(sender: object, exception: BaseException, **extra: Any) -> None:
            seen.append(exception)

        got_request_exception.connect(receiver, app)
        try:
            response = upload(app, **{"X-Sabotage": "remove"})
        finally:
            got_request_exception.disconnect(receiver, app)

        assert response.status_code == 500
        assert isinstance(seen[0], FileNotFoundError)
        assert os.path.dirname(seen[0].filename) == str(dirs["temp"])


class TestSettings:
    def test_config_wins_over_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """UPLOADGUARD_* config keys override the variables; the others still come from the environment."""
        env = {"UPLOADGUARD_MAX_BODY_SIZE": "1M", "UPLOADGUARD_DRAIN_TIMEOUT": "3", "UPLOADGUARD_TEMP_DIR": "/srv/up"}

        resolved = settings_from_config({"UPLOADGUARD_MAX_BODY_SIZE": "2M", "UPLOADGUARD_RETRY_AFTER": 7}, env)

        assert (resolved.max_body_size, resolved.retry_after, resolved.drain_timeout) == (2 * MiB, 7, 3.0)
        assert str(resolved.temp_dir) == "/srv/up"

    @pytest.mark.parametrize(("config", "env", "limit"), [
        pytest.param({"MAX_CONTENT_LENGTH": 5 * MiB}, {}, 5 * MiB, id="MAX_CONTENT_LENGTH"),
        pytest.param({"MAX_CONTENT_LENGTH": 5 * MiB}, {"UPLOADGUARD_MAX_BODY_SIZE": "1M"}, MiB, id="variable"),
        pytest.param({"MAX_CONTENT_LENGTH": 5 * MiB, "UPLOADGUARD_MAX_BODY_SIZE": "2M"}, {}, 2 * MiB, id="config"),
        pytest.param({"MAX_CONTENT_LENGTH": None}, {}, 200 * MiB, id="default"),
    ])
    def test_max_content_length_is_the_limit_unless_uploadguard_has_one(
        self, config: dict[str, Any], env: dict[str, str], limit: int,
    ) -> None:
        """One limit for the app: Flask's MAX_CONTENT_LENGTH, unless UPLOADGUARD_MAX_BODY_SIZE is set somewhere."""
        assert settings_from_config(config, env).max_body_size == limit

    def test_typed_config_values_are_taken_as_they_are(self) -> None:
        """A float, an int or a Path in app.config is used as such, never turned into a string and parsed again."""
        resolved = settings_from_config({"UPLOADGUARD_CHECK_INTERVAL": 1e-05, "UPLOADGUARD_RETRY_AFTER": 0,
                                         "UPLOADGUARD_DRAIN_TIMEOUT": 2.5}, {})
        assert (resolved.check_interval, resolved.retry_after, resolved.drain_timeout) == (1e-05, 0, 2.5)

    def test_a_bad_value_stops_init_app(self, dirs: dict[str, Path]) -> None:
        """A bad value raises ConfigError naming the setting."""
        with pytest.raises(ConfigError, match="UPLOADGUARD_RETRY_AFTER='soon' is not a duration"):
            make_app(dirs, UPLOADGUARD_RETRY_AFTER="soon")

    def test_init_app_for_a_factory(self, dirs: dict[str, Path]) -> None:
        """guard.init_app(app) wraps wsgi_app and returns the app's core guard, kept in app.extensions."""
        app = flask.Flask(__name__)
        app.config["UPLOADGUARD_TEMP_DIR"] = dirs["temp"]

        core = UploadGuard().init_app(app)

        assert isinstance(core, WSGIUploadGuard)
        assert app.extensions["uploadguard"] is core is app.wsgi_app
        assert core.temp.path == str(dirs["temp"])
        with pytest.raises(RuntimeError, match="already set up"):
            UploadGuard(app)


class TestBodyLimit:
    @pytest.mark.parametrize("config", [
        pytest.param({"UPLOADGUARD_MAX_BODY_SIZE": "1M"}, id="uploadguard-setting"),
        pytest.param({"MAX_CONTENT_LENGTH": MiB}, id="MAX_CONTENT_LENGTH"),
    ])
    def test_an_outer_wsgi_guard_keeps_the_apps_smaller_limit(self, dirs: dict[str, Path],
                                                              config: dict[str, Any]) -> None:
        """UploadGuard(app) around a guarded Flask app: the app's 1 MiB limit still answers 3 MiB with a 413."""
        app = make_app(dirs, **config)
        outer = WSGIUploadGuard(app, temp_dir=dirs["temp"], min_free_space=0)
        body, content_type = urllib3.encode_multipart_formdata({"file": ("photo.jpg", content(3 * MiB))})
        response = webtest.TestApp(outer).request("/upload", method="POST", body=body, content_type=content_type,
                                                  status="*")
        assert response.status_int == 413
        assert outer.stats.total("guarded") == 1
        assert outer.stats.total("413") + app.extensions["uploadguard"].stats.total("413") == 1

    def test_nested_chunked_body_is_cut_at_the_smaller_limit(self, dirs: dict[str, Path]) -> None:
        """A chunked body through an outer 200 MiB guard is cut at the app's 1 KiB."""
        app = make_app(dirs, UPLOADGUARD_MAX_BODY_SIZE=1024)
        outer = WSGIUploadGuard(app, temp_dir=dirs["temp"], min_free_space=0)
        status, _ = call(outer, chunked_environ("/raw", b"x" * 5000))
        assert status == 413

    def test_content_length_over_the_limit_is_413_before_flask_reads(self, dirs: dict[str, Path]) -> None:
        """The 413 names the limit; the view never runs."""
        app = make_app(dirs, UPLOADGUARD_MAX_BODY_SIZE=64 * KiB)

        response = upload(app, 100 * KiB)

        assert response.status_code == 413
        assert response.json["limit"] == 64 * KiB
        assert "X-Inner-Hook" not in response.headers
        assert not dirs["store"].exists()

    def test_flask_still_applies_a_smaller_max_content_length(self, dirs: dict[str, Path]) -> None:
        """With both limits set, the smaller one wins: here Flask's, when the view reads the form."""
        app = make_app(dirs, UPLOADGUARD_MAX_BODY_SIZE=MiB, MAX_CONTENT_LENGTH=64 * KiB)

        response = upload(app, 100 * KiB)

        assert response.status_code == 413
        assert app.extensions["uploadguard"].stats.total("413") == 0
        assert response.headers["X-Inner-Hook"] == "seen"

    @pytest.mark.parametrize(("size", "status"), [
        pytest.param(5000, 200, id="under"),
        pytest.param(9000, 413, id="over"),
    ])
    def test_a_chunked_body_is_cut_at_the_limit(self, dirs: dict[str, Path], size: int, status: int) -> None:
        """A chunked body is counted as Flask reads it and answered 413 past the limit."""
        app = make_app(dirs, UPLOADGUARD_MAX_BODY_SIZE=8000)

        code, body = call(app, chunked_environ("/raw", b"x" * size))

        assert code == status
        if status == 200:
            assert json.loads(body) == {"size": size}
        assert app.extensions["uploadguard"].stats.total("413") == (status == 413)  # answered and counted once

    def test_a_zero_max_content_length_is_left_to_flask(self, dirs: dict[str, Path]) -> None:
        """MAX_CONTENT_LENGTH = 0 means "no body" to Werkzeug; it must not switch uploadguard's limit off."""
        assert settings_from_config({"MAX_CONTENT_LENGTH": 0}, {}).max_body_size == 200 * MiB


class TestTempDir:
    @leaves_spool_file_open
    @pytest.mark.parametrize("propagate", PROPAGATE)
    def test_a_dir_deleted_while_werkzeug_spools_is_503_then_healed(self, dirs: dict[str, Path],
                                                                   propagate: bool) -> None:
        """The error becomes a retryable 503, counted once, whatever PROPAGATE_EXCEPTIONS says; the retry is stored."""
        app = make_app(dirs, PROPAGATE_EXCEPTIONS=propagate)

        broken = upload(app, **{"X-Sabotage": "remove"})
        retried = upload(app)

        assert broken.status_code == 503
        assert broken.json == {"error": "missing", "status": 503, "retry_after": 2,
                               "detail": "Uploads are temporarily unavailable; please retry in 2 seconds."}
        assert (broken.headers["Retry-After"], broken.headers["Cache-Control"]) == ("2", "no-store")
        assert retried.status_code == 200
        assert retried.json["fields"] == {"note": "hi"}
        assert (dirs["store"] / "photo.jpg").read_bytes() == content(SPOOLED)
        stats = app.extensions["uploadguard"].stats
        assert (stats.by_reason("503"), stats.total("heal"), stats.total("guarded")) == ({"missing": 1}, 1, 2)

    @leaves_spool_file_open
    def test_headers_of_after_request_functions_are_kept(self, dirs: dict[str, Path]) -> None:
        """The 503 replacing Flask's 500 keeps what other after_request functions added, not the 500's content."""
        app = make_app(dirs)

        response = upload(app, **{"X-Sabotage": "remove"})

        assert response.headers["X-Inner-Hook"] == "seen"
        assert response.headers["Content-Type"] == "application/json"
        assert int(response.headers["Content-Length"]) == len(response.data)

    def test_a_deleted_dir_is_recreated_before_werkzeug_spools(self, dirs: dict[str, Path]) -> None:
        """The upload is stored; the directory is back."""
        shutil.rmtree(dirs["temp"])

        response = upload(make_app(dirs))

        assert response.status_code == 200
        assert dirs["temp"].is_dir()

    def test_a_file_in_its_place_is_503_before_flask_reads(self, dirs: dict[str, Path]) -> None:
        """An unusable dir is answered 503 before the app runs; requests without a body still work."""
        app = make_app(dirs)
        shutil.rmtree(dirs["temp"])
        dirs["temp"].write_text("not a directory")

        response = upload(app)

        assert response.status_code == 503
        assert response.json["error"] == "not_a_directory"
        assert "X-Inner-Hook" not in response.headers
        assert app.test_client().get("/").status_code == 200

    def test_other_errors_keep_flasks_500(self, dirs: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
        """An OSError that is not about the temp dir is Flask's 500, logged once, by Flask."""
        app = make_app(dirs)

        response = app.test_client().post("/broken", data={"field": "value"})

        assert response.status_code == 500
        assert [r.name for r in caplog.records if r.levelno >= logging.ERROR] == [app.logger.name]
        assert not app.extensions["uploadguard"].stats.by_reason("503")

    def test_uploads_spooled_outside_the_guarded_dir_are_logged(self, dirs: dict[str, Path], tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
        """A tempfile dir other than the guarded one is a WARNING, once, at the first upload."""
        app = make_app(dirs, UPLOADGUARD_TEMP_DIR=tmp_path / "guarded")

        upload(app)
        upload(app)

        assert len([r for r in caplog.records if r.name == "uploadguard" and r.getMessage().startswith("Werkzeug spools")]) == 1

    @leaves_spool_file_open
    @needs_root
    @pytest.mark.parametrize("propagate", PROPAGATE)
    @pytest.mark.parametrize(("sabotage", "size", "hook_ran"), [
        pytest.param("full", 5 * MiB, False, id="full"),
        pytest.param("fill", MiB, True, id="fills-up-while-spooling"),
    ])
    def test_tmpfs(self, dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sabotage: str,
                   size: int, hook_ran: bool, propagate: bool) -> None:
        """A real 2 MB tmpfs that is or becomes full: 503 no_space, whether found before or during spooling."""
        with tmpfs(tmp_path / "tmpfs", size="2m") as mount:
            monkeypatch.setattr(tempfile, "tempdir", str(mount))
            app = make_app(dirs, UPLOADGUARD_TEMP_DIR=mount, PROPAGATE_EXCEPTIONS=propagate)
            if sabotage == "full":
                fill(mount)
                response = upload(app, size)
            else:
                response = upload(app, size, **{"X-Sabotage": "fill"})

        assert response.status_code == 503
        assert response.json["error"] == "no_space"
        assert ("X-Inner-Hook" in response.headers) is (hook_ran and not propagate)


@pytest.mark.slow
class TestGunicorn:
    """tests/flask_app.py under real gunicorn with the project's gunicorn_conf.py."""

    @pytest.fixture
    def server(self, tmp_path: Path, dirs: dict[str, Path]) -> Iterator[Gunicorn]:
        server = Gunicorn("flask_app:app", tmp_path=tmp_path, config=GUNICORN_CONF, workers=2, env={
            "UPLOADGUARD_TEMP_DIR": str(dirs["temp"]), "UPLOADGUARD_MIN_FREE_SPACE": "0",
            "UPLOADGUARD_RETRY_AFTER": "1", "TEST_STORE_DIR": str(dirs["store"])})
        yield server
        server.stop()

    @staticmethod
    def post(url: str, size: int = SPOOLED, **headers: str) -> tuple[int, dict[str, str], bytes]:
        body, content_type = urllib3.encode_multipart_formdata({"file": ("photo.jpg", content(size))})
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/upload", body=body,
                         headers={"Content-Type": content_type, "Accept": "application/json", **headers})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def test_temp_dir_deleted_while_spooling_is_503_then_stored(self, server: Gunicorn,
                                                                dirs: dict[str, Path]) -> None:
        """Werkzeug spools where gunicorn_conf points tempfile; a vanished dir is 503, the retry is stored."""
        status, headers, body = self.post(server.url, **{"X-Sabotage": "remove"})
        retried, _, _ = self.post(server.url)

        assert status == 503, (status, body, server.log())
        assert (headers["Retry-After"], json.loads(body)["error"]) == ("1", "missing")
        assert retried == 200
        assert (dirs["store"] / "photo.jpg").read_bytes() == content(SPOOLED)

    def test_unusable_dir_is_503_until_fixed(self, server: Gunicorn, dirs: dict[str, Path]) -> None:
        """A file where the dir should be: 503 for uploads, pages work; once it is gone, the dir is recreated."""
        shutil.rmtree(dirs["temp"])
        dirs["temp"].write_text("not a directory")
        refused, _, body = self.post(server.url)
        page = urllib3.request("GET", server.url + "/", timeout=10).status
        dirs["temp"].unlink()
        healed, _, _ = self.post(server.url)

        assert (refused, json.loads(body)["error"]) == (503, "not_a_directory")
        assert (page, healed) == (200, 200)


TUS = {"Tus-Resumable": "1.0.0"}


def tus_metadata(**values: str) -> str:
    import base64

    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in values.items())


class TestResumableUploads:
    @pytest.fixture
    def app(self, dirs: dict[str, Path], tmp_path: Path) -> flask.Flask:
        return make_app(dirs, RESUMABLE_STORAGE=str(tmp_path / "tus"))

    def create(self, client: Any, size: int) -> str:
        response = client.post("/files/", headers={**TUS, "Upload-Length": str(size),
                                                   "Upload-Metadata": tus_metadata(filename="cat.jpg",
                                                                                   filetype="image/jpeg")})
        assert response.status_code == 201, response.data
        return str(response.headers["Location"])

    def patch(self, client: Any, url: str, offset: int, data: bytes) -> Any:
        return client.patch(url, data=data, headers={**TUS, "Upload-Offset": str(offset),
                                                     "Content-Type": "application/offset+octet-stream"})

    def test_upload_then_fetch_it_in_a_view(self, app: flask.Flask, dirs: dict[str, Path]) -> None:
        """Created and sent in two PATCHes, the upload is a FileStorage in the visitor's next form post."""
        client = app.test_client()
        data = bytes(range(256)) * 400
        url = self.create(client, len(data))
        assert self.patch(client, url, 0, data[:70000]).status_code == 204
        assert self.patch(client, url, 70000, data[70000:]).headers["Upload-Offset"] == str(len(data))
        response = client.post("/resumable-done", data={"upload": url})
        assert response.status_code == 200, response.data
        assert response.json == {"name": "cat.jpg", "size": len(data), "content_type": "image/jpeg",
                                 "sha256": hashlib.sha256(data).hexdigest()}

    def test_the_owner_deletes_it_once_stored(self, app: flask.Flask, tmp_path: Path) -> None:
        """delete_resumable removes the stored upload for its owner; another session gets 404 and changes nothing."""
        from werkzeug.exceptions import NotFound

        from uploadguard.flask import delete_resumable

        client = app.test_client()
        url = self.create(client, 3)
        self.patch(client, url, 0, b"abc")
        with app.test_request_context("/photos"), pytest.raises(NotFound):
            delete_resumable(url)
        assert client.head(url, headers=TUS).status_code == 200

        response = client.post("/resumable-done", data={"upload": url, "delete": "1"})

        assert response.status_code == 200 and response.json["size"] == 3
        assert client.head(url, headers=TUS).status_code == 404
        assert list((tmp_path / "tus").iterdir()) == []

    def test_another_visitor_sees_nothing(self, app: flask.Flask) -> None:
        """Another session gets 404 for the upload's HEAD and from resumable_file."""
        owner = app.test_client()
        url = self.create(owner, 3)
        self.patch(owner, url, 0, b"abc")
        stranger = app.test_client()
        assert stranger.head(url, headers=TUS).status_code == 404
        assert stranger.post("/resumable-done", data={"upload": url}).status_code == 404

    def test_options_is_the_endpoints_own(self, app: flask.Flask) -> None:
        """OPTIONS is answered by the tus endpoint (its extensions), not Flask's automatic reply."""
        response = app.test_client().options("/files/", headers=TUS)
        assert response.status_code == 204 and "creation" in response.headers["Tus-Extension"]

    def test_an_unusable_temp_dir_is_the_retryable_503(self, app: flask.Flask, dirs: dict[str, Path]) -> None:
        """The guard checks the PATCH first: a temp dir replaced by a file is a 503 + Retry-After."""
        client = app.test_client()
        url = self.create(client, 3)
        shutil.rmtree(dirs["temp"])
        dirs["temp"].write_text("in the way")
        response = self.patch(client, url, 0, b"abc")
        assert response.status_code == 503 and response.headers["Retry-After"] == "2"

    @needs_root
    def test_a_small_temp_dir_does_not_refuse_a_patch_the_storage_holds(self, dirs: dict[str, Path],
                                                                         tmp_path: Path) -> None:
        """The guard asks the app's resumable endpoint: a 1 MiB tmpfs temp dir takes a 3 MiB PATCH, while a form
        upload to the app, which Werkzeug may spool there, is still refused for want of room."""
        data = os.urandom(3 * 1024 * 1024)
        with tmpfs(dirs["temp"], size="1m", options="mode=700"):
            app = make_app(dirs, RESUMABLE_STORAGE=str(tmp_path / "tus"))
            client = app.test_client()
            url = self.create(client, len(data))
            response = self.patch(client, url, 0, data)
            refused = upload(app, len(data))
        assert (response.status_code, response.headers["Upload-Offset"]) == (204, str(len(data)))
        assert refused.status_code == 503 and refused.json["error"] == "no_space"

    @needs_root
    def test_an_outer_guard_knows_the_endpoint_too(self, dirs: dict[str, Path], tmp_path: Path) -> None:
        """UploadGuard(flask_app) -- the documented WSGI wrapping -- finds the app's endpoint as well: a 3 MiB
        PATCH passes a 1 MiB tmpfs temp dir."""
        from werkzeug.test import Client

        from uploadguard import UploadGuard as WSGIUploadGuard

        data = os.urandom(3 * 1024 * 1024)
        with tmpfs(dirs["temp"], size="1m", options="mode=700"):
            app = make_app(dirs, RESUMABLE_STORAGE=str(tmp_path / "tus"))
            client = Client(WSGIUploadGuard(app, temp_dir=dirs["temp"], min_free_space=0))
            url = self.create(client, len(data))
            response = self.patch(client, url, 0, data)
        assert (response.status_code, response.headers["Upload-Offset"]) == (204, str(len(data)))

    def test_resumable_file_errors_are_flasks_own(self, app: flask.Flask) -> None:
        """An unknown upload is Werkzeug's NotFound (Flask's 404 in any view), still an UploadNotFound."""
        from werkzeug.exceptions import NotFound

        from uploadguard.flask import resumable_file
        from uploadguard.resumable import UploadNotFound

        with app.test_request_context("/photos"), pytest.raises(NotFound) as caught:
            resumable_file("/files/" + "A" * 24)
        assert isinstance(caught.value, UploadNotFound) and caught.value.code == 404
