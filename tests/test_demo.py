"""The demo site and the Flask example, in-process: pages render, uploads are stored.

The Django demo runs with its own settings (applied with ``override_settings``
so that other Django tests in the same process keep theirs), its storage and
temp dirs moved under the test's tmp dir.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, free_port

django = pytest.importorskip("django")
PIL_Image = pytest.importorskip("PIL.Image")

from django.conf import settings  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

from uploadguard.images import HIGH_QUALITY, compress_image  # noqa: E402

DEMO = ROOT / "examples" / "django_demo"


def photo(size: tuple[int, int] = (640, 480)) -> bytes:
    """A noisy JPEG saved at quality 100, which re-compression makes smaller."""
    image = PIL_Image.effect_noise(size, 64).convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=100)
    return out.getvalue()


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    return {"storage": tmp_path / "uploads", "temp": tmp_path / "tmp"}


@pytest.fixture
def demo_settings(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(DEMO))
    if not settings.configured and "DJANGO_SETTINGS_MODULE" not in os.environ:
        settings.configure(SECRET_KEY="uploadguard-tests")  # a base to override; other tests may bring theirs
    django.setup()
    module = importlib.import_module("demo.settings")
    # LOGGING is applied by django.setup() only; DATABASES (none) cannot be overridden;
    # SECRET_KEY is used by nothing the demo does, and restoring an empty one fails.
    values: dict[str, Any] = {name: getattr(module, name) for name in dir(module)
                              if name.isupper() and name not in {"LOGGING", "DATABASES", "SECRET_KEY"}}
    values.update(
        ALLOWED_HOSTS=[*module.ALLOWED_HOSTS, "testserver"],
        DEMO_STORAGE_DIR=dirs["storage"],
        UPLOADGUARD_TEMP_DIR=dirs["temp"],
        FILE_UPLOAD_TEMP_DIR=str(dirs["temp"]),
        UPLOADGUARD_RESUMABLE_STORAGE=str(dirs["storage"].parent / "resumable"),
    )
    with override_settings(**values):
        yield


@pytest.fixture
def client(demo_settings: None) -> Client:
    """A browser-like client: CSRF checks on, the token taken from the page."""
    client = Client(enforce_csrf_checks=True)
    client.get("/")
    return client


def upload(client: Client, name: str, data: bytes, **fields: str) -> Any:
    file = io.BytesIO(data)
    file.name = name
    return client.post("/upload/", {"file": file, **fields}, headers={
        "Accept": "application/json", "X-CSRFToken": client.cookies["csrftoken"].value})


class TestDemoPages:
    def test_upload_page_has_the_form_and_the_helper(self, client: Client) -> None:
        """The page offers a multi-file form bound to upload.js, with a CSRF token."""
        page = client.get("/").content.decode()

        assert 'data-uploadguard' in page
        assert 'type="file" name="file" multiple' in page
        assert 'name="csrfmiddlewaretoken"' in page
        assert '<script src="/static/uploadguard/upload.js">' in page
        assert "Nothing stored yet." in page

    def test_favicon_is_answered_without_a_not_found(self, client: Client, caplog: pytest.LogCaptureFixture) -> None:
        """The page names an inline icon and /favicon.ico is a 204, so a browser's page load logs no "Not Found"."""
        page = client.get("/").content.decode()
        with caplog.at_level(logging.INFO):
            response = client.get("/favicon.ico")
        assert '<link rel="icon" href="data:,">' in page
        assert response.status_code == 204
        assert "Not Found" not in caplog.text

    def test_js_helper_is_served_through_staticfiles(self, client: Client) -> None:
        """uploadguard/upload.js comes from the package's static dir, even with DEBUG off."""
        response = client.get("/static/uploadguard/upload.js")
        shipped = ROOT / "uploadguard" / "static" / "uploadguard" / "upload.js"

        assert response.status_code == 200
        assert "javascript" in response["Content-Type"]
        assert b"".join(response.streaming_content) == shipped.read_bytes()

    @pytest.mark.parametrize("path", [
        pytest.param("/media/nothing.jpg", id="missing"),
        pytest.param("/media/.hidden.jpg.part", id="partial-upload"),
        pytest.param("/media/..", id="parent"),
        pytest.param("/media/a%00b", id="nul-byte"),
        pytest.param("/media/" + "x" * 300, id="name-too-long"),
    ])
    def test_unknown_stored_files_are_404(self, client: Client, dirs: dict[str, Path], path: str) -> None:
        """Only finished, stored files are served."""
        dirs["storage"].mkdir()
        (dirs["storage"] / ".hidden.jpg.part").write_bytes(b"partial")

        assert client.get(path).status_code == 404


class TestDemoUploads:
    @pytest.mark.parametrize(("fields", "quality"), [
        pytest.param({}, 85, id="default-q85"),
        pytest.param({"quality": "high"}, HIGH_QUALITY, id="high-quality-q95"),
    ])
    def test_photo_is_stored_recompressed(self, client: Client, dirs: dict[str, Path], fields: dict[str, str],
                                          quality: int) -> None:
        """A JPEG is stored as the compression helper's output at the chosen quality."""
        original = photo()

        response = upload(client, "holiday photo.jpg", original, **fields)

        assert response.status_code == 200
        [stored] = response.json()["stored"]
        data = (dirs["storage"] / stored["name"]).read_bytes()
        assert data == compress_image(io.BytesIO(original), quality=quality).data
        assert stored == {**stored, "kind": "image", "format": "JPEG", "changed": True, "quality": quality, "width": 640, "height": 480,
                          "title": "holiday_photo.jpg", "original_size": len(original), "size": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()}
        assert len(data) < len(original)

    @pytest.mark.parametrize(("name", "title"), [
        pytest.param("notes.bin", "notes.bin", id="other-file"),
        pytest.param("broken.jpg", "broken.jpg.bin", id="not-really-a-jpeg"),
    ])
    def test_other_files_are_stored_as_is(self, client: Client, dirs: dict[str, Path], name: str, title: str) -> None:
        """A file that is not an image is stored byte for byte, never named as an image, and served as a download."""
        blob = os.urandom(300_000)

        [stored] = upload(client, name, blob).json()["stored"]
        served = client.get(stored["url"])

        assert (stored["kind"], stored["title"], stored["is_image"]) == ("file", title, False)
        assert stored["note"].startswith("The file is not an image in a supported format")
        assert (dirs["storage"] / stored["name"]).read_bytes() == blob
        assert stored["sha256"] == hashlib.sha256(blob).hexdigest()
        assert served["Content-Disposition"] == f'attachment; filename="{title}"'
        assert b"".join(served.streaming_content) == blob

    @pytest.mark.parametrize(("name", "data"), [
        pytest.param("漢" * 90 + ".txt", b"text", id="cjk-file"),
        pytest.param("漢" * 90 + ".jpg", photo((32, 32)), id="cjk-photo"),
        pytest.param("漢" * 90 + "." + "漢" * 90, b"text", id="cjk-suffix"),
    ])
    def test_long_multibyte_names_are_shortened_to_fit(self, client: Client, dirs: dict[str, Path], name: str,
                                                        data: bytes) -> None:
        """A name of many multibyte characters is cut to whole characters so the stored file name fits in 255 bytes."""
        response = upload(client, name, data)
        [stored] = response.json()["stored"]
        served = client.get(stored["url"])
        served.close()

        assert response.status_code == 200
        assert len(os.fsencode(f".{stored['name']}.part")) <= 255
        assert stored["title"].startswith("漢" * 20)
        assert (dirs["storage"] / stored["name"]).is_file()
        assert served.status_code == 200

    def test_gallery_lists_stored_photos(self, client: Client) -> None:
        """After an upload the page shows its thumbnail, served as a JPEG."""
        [stored] = upload(client, "cat.jpg", photo()).json()["stored"]

        page = client.get("/").content.decode()
        image = client.get(stored["url"])

        assert f'<img src="{stored["url"]}"' in page
        assert '<p id="empty" hidden>' in page
        assert (image.status_code, image["Content-Type"]) == (200, "image/jpeg")
        image.close()

    def test_a_resumable_upload_is_stored_like_a_form_upload(self, client: Client, dirs: dict[str, Path]) -> None:
        """A photo sent to /files/ in two PATCHes, then named to /resumable/, is stored re-compressed."""
        import base64

        data = photo()
        token = client.cookies["csrftoken"].value
        tus = {"HTTP_TUS_RESUMABLE": "1.0.0", "HTTP_X_CSRFTOKEN": token}
        name = base64.b64encode(b"cat.jpg").decode()
        created = client.generic("POST", "/files/", b"", content_type="application/offset+octet-stream",
                                 HTTP_UPLOAD_LENGTH=str(len(data)), HTTP_UPLOAD_METADATA=f"filename {name}", **tus)
        assert created.status_code == 201, created.content
        url = created["Location"]
        half = len(data) // 2
        for offset, chunk in ((0, data[:half]), (half, data[half:])):
            response = client.patch(url, chunk, content_type="application/offset+octet-stream",
                                    HTTP_UPLOAD_OFFSET=str(offset), **tus)
            assert response.status_code == 204, response.content
        stored = client.post("/resumable/", {"upload": url}, headers={"Accept": "application/json",
                                                                       "X-CSRFToken": token})
        assert stored.status_code == 200, stored.content
        [entry] = stored.json()["stored"]
        assert entry["kind"] == "image" and entry["original_size"] == len(data) and entry["title"] == "cat.jpg"
        assert (dirs["storage"] / entry["name"]).stat().st_size == entry["size"] < len(data)
        # stored once: the resumable copy is gone (a completed upload never expires on its own)
        assert client.head(url, HTTP_TUS_RESUMABLE="1.0.0").status_code == 404

    def test_a_resumable_upload_of_someone_else_is_404(self, client: Client, demo_settings: None) -> None:
        """Naming an upload URL this visitor did not create is a 404 JSON answer, not a 500."""
        response = client.post("/resumable/", {"upload": "/files/" + "A" * 24},
                               headers={"Accept": "application/json", "X-CSRFToken": client.cookies["csrftoken"].value})
        assert response.status_code == 404 and response.json()["error"]

    def test_csrf_token_is_required(self, client: Client, dirs: dict[str, Path]) -> None:
        """An upload without the CSRF token is refused with a message to show, and nothing is stored."""
        file = io.BytesIO(b"x")
        file.name = "x.txt"

        response = client.post("/upload/", {"file": file}, headers={"Accept": "application/json"})

        assert response.status_code == 403
        assert response.json()["detail"].startswith("The page's security token (CSRF) is missing or out of date")
        assert not dirs["storage"].exists()

    def test_missing_file_is_a_clear_400(self, client: Client) -> None:
        """A post without a file says so."""
        response = client.post("/upload/", {"quality": "high"}, headers={
            "Accept": "application/json", "X-CSRFToken": client.cookies["csrftoken"].value})

        assert response.status_code == 400
        assert response.json()["detail"] == "No file was sent: choose one or more files."

    def test_form_post_without_javascript_redirects_to_the_page(self, client: Client, dirs: dict[str, Path]) -> None:
        """A plain form post stores every file and comes back to the page (303)."""
        first, second = io.BytesIO(b"one"), io.BytesIO(b"two")
        first.name, second.name = "one.txt", "two.txt"

        response = client.post("/upload/", {"file": [first, second],
                                            "csrfmiddlewaretoken": client.cookies["csrftoken"].value})

        assert (response.status_code, response["Location"]) == (303, "/")
        assert sorted(p.read_bytes() for p in dirs["storage"].iterdir()) == [b"one", b"two"]


def load_flask_example(storage: Path) -> Any:
    spec = importlib.util.spec_from_file_location("examples_flask_app", ROOT / "examples" / "flask_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.app.config["STORAGE_DIR"] = storage
    return module.app


class TestFlaskExample:
    def test_upload_is_stored_and_listed(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The Flask example stores an upload as-is and lists it on its page."""
        pytest.importorskip("flask")
        monkeypatch.setenv("UPLOADGUARD_TEMP_DIR", str(tmp_path / "tmp"))  # not ~/.cache/uploadguard/tmp
        app = load_flask_example(tmp_path / "flask")
        blob = os.urandom(100_000)

        with app.test_client() as client:
            response = client.post("/upload", data={"file": (io.BytesIO(blob), "data.bin")},
                                   headers={"Accept": "application/json"})
            page = client.get("/").get_data(as_text=True)
            script = client.get("/upload.js")

        assert response.json == {"stored": [{"name": "data.bin", "size": len(blob),
                                             "sha256": hashlib.sha256(blob).hexdigest()}]}
        assert (tmp_path / "flask" / "data.bin").read_bytes() == blob
        assert "data.bin" in page and "data-uploadguard" in page
        assert script.status_code == 200 and b"UploadGuard.upload" in script.data
        script.close()

    @pytest.mark.slow
    @pytest.mark.parametrize(("host", "listening"), [
        pytest.param(None, "127.0.0.1", id="PORT-alone-stays-on-loopback"),
        pytest.param("127.0.0.2", "127.0.0.2", id="HOST-named-explicitly"),
    ])
    def test_documented_command_listens_on_loopback_unless_host_is_named(self, tmp_path: Path, host: str | None,
                                                                         listening: str) -> None:
        """The example's documented gunicorn command (the docs' too) with PORT set listens on loopback, on HOST if set."""
        pytest.importorskip("flask")
        doc = (ROOT / "examples" / "flask_app.py").read_text()
        [command] = [line.strip() for line in doc.splitlines() if line.strip().startswith("gunicorn ")]
        assert f"(`{command}`" in (ROOT / "docs" / "getting-started.md").read_text()
        port = free_port()
        env = {name: value for name, value in os.environ.items() if not name.startswith(("UPLOADGUARD_", "HOST"))}
        env.update(PORT=str(port), HOME=str(tmp_path), WEB_CONCURRENCY="1", UPLOADGUARD_TEMP_DIR=str(tmp_path),
                   FLASK_STORAGE_DIR=str(tmp_path / "flask"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if host is not None:
            env["HOST"] = host
        log = tmp_path / "gunicorn.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while "Listening at:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        assert f"Listening at: http://{listening}:{port} " in log.read_text(), log.read_text()

    def test_writes_nothing_outside_its_tmp_dir(self, tmp_path: Path) -> None:
        """Run in a pytest of its own with an empty HOME, the upload test leaves that home empty."""
        pytest.importorskip("flask")
        home = tmp_path / "home"
        home.mkdir()
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("UPLOADGUARD_", "XDG_", "PYTEST_"))}
        env.update(HOME=str(home), TMPDIR=str(tmp_path))
        test = "tests/test_demo.py::TestFlaskExample::test_upload_is_stored_and_listed"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--basetemp={tmp_path / 'base'}", test],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [str(path.relative_to(home)) for path in home.rglob("*")] == []
