"""Run every Python code block of one Markdown page, in order, in one namespace (Sybil parses the page).

``python -m tests.run_snippets PAGE`` runs in a fresh process per page (tests/test_docs.py starts it), so
a block that sets up Django, points ``tempfile`` somewhere or sets environment variables changes nothing
for other pages or tests.  The working directory and every ``UPLOADGUARD_*`` directory are a fresh temp
dir: a block may not rely on paths a fresh machine lacks.  A block that cannot run alone is marked in the
page with ``<!-- skip: next "why" -->`` and is tested elsewhere.

Some pages show fragments of a larger program (a view's body); :func:`fixtures` gives those pages the
names the surrounding program would have (a request with an uploaded photo, a Django storage), real where
the real thing runs here.  Then :func:`check` asks more than "it ran": a WSGI app the page built answers a
request, the photo fragment stored a JPEG, and every Django settings fragment (``MIDDLEWARE``,
``INSTALLED_APPS``) passes uploadguard's system checks in a settings module made from it.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser


def fixtures(page: Path) -> dict[str, Any]:
    """The names a fragment on ``page`` expects from the program around it."""
    if page.name == "photos.md":
        import uuid

        from PIL import Image

        photo = io.BytesIO()
        Image.linear_gradient("L").resize((640, 480)).convert("RGB").save(photo, "JPEG", quality=95)
        photo.seek(0)
        saved: dict[str, bytes] = {}

        class Form:
            def add_error(self, field: str, message: str) -> None:
                raise AssertionError(f"the photo was refused: {field}: {message}")

        class Storage:  # the two calls the fragment makes of Django's default_storage
            def save(self, name: str, content: bytes) -> str:
                saved[name] = content
                return name

        return {"request": type("Request", (), {"FILES": {"photo": photo}})(), "form": Form(),
                "default_storage": Storage(), "ContentFile": bytes, "uuid": uuid, "saved": saved}
    if page.name in {"guard.md", "operations.md"}:
        def application(environ: Any, start_response: Any) -> list[bytes]:  # "your WSGI app"
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]

        return {"application": application}
    return {}


def check(page: Path, namespace: dict[str, Any]) -> None:
    """What a page's blocks must have produced, beyond running: a WSGI app that answers, a stored photo."""
    app = namespace.get("application")
    if callable(app) and page.name in {"README.md", "guard.md", "operations.md", "resumable.md"}:
        from wsgiref.util import setup_testing_defaults

        environ: dict[str, Any] = {}
        setup_testing_defaults(environ)
        answer: list[str] = []
        body = b"".join(app(environ, lambda status, headers, exc_info=None: answer.append(status)))
        assert answer and answer[0][:3] in {"200", "404"}, (answer, body)
    for dotted in [*namespace.get("MIDDLEWARE", []), *namespace.get("INSTALLED_APPS", [])]:
        if isinstance(dotted, str):  # a Django settings fragment: every class it names exists
            import django
            from django.conf import settings
            from django.utils.module_loading import import_string

            if not settings.configured:  # the contrib apps the fragment's middleware belong to
                settings.configure(SECRET_KEY="snippets", INSTALLED_APPS=[
                    "django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"])
                django.setup()

            import_string(dotted)
    if page.name in ASGI_DJANGO_PAGES:  # the asgi.py the page builds answers resumable-upload requests itself
        status, headers = _asgi_options(namespace["application"], "/files/")
        assert status == 204 and headers.get(b"tus-resumable") == b"1.0.0", (status, headers)
    if page.name == "photos.md":
        [(name, data)] = namespace["saved"].items()
        assert name.startswith("photos/") and name.endswith(".jpg") and data[:2] == b"\xff\xd8", name


#: Pages whose asgi.py serves resumable uploads, and the settings module standing in for ``mysite.settings``.
ASGI_DJANGO_PAGES = {"asgi.md", "django.md"}
ASGI_DJANGO_SETTINGS = "tests.django_project.settings_asgi"


def _asgi_options(app: Any, path: str) -> tuple[int, dict[bytes, bytes]]:
    """An ``OPTIONS`` request through the ASGI application ``app``: the status and headers it answers."""
    import asyncio

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "OPTIONS",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"tus-resumable", b"1.0.0")], "client": ("127.0.0.1", 1),
             "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(message for message in sent if message["type"] == "http.response.start")
    return start["status"], dict(start["headers"])


def check_django_fragments(fragments: list[dict[str, Any]]) -> None:
    """Each Django settings fragment, put into a settings module, passes uploadguard's system checks.

    A fragment's ``MIDDLEWARE`` and ``INSTALLED_APPS`` are taken as written (their ``...`` placeholders
    left out), beside the contrib apps its middleware belong to; its ``FILE_UPLOAD_TEMP_DIR`` (a production
    path) becomes the run's temp dir, as it would on a machine that has the directory.
    """
    import django
    from django.conf import settings
    from django.core.checks import run_checks
    from django.test.utils import override_settings
    from django.utils.module_loading import import_string

    apps = {"django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"}
    for fragment in fragments:
        apps.update(app for app in fragment.get("INSTALLED_APPS", []) if isinstance(app, str))
    if settings.configured:  # a block set Django up (an asgi.py): the fragments' apps over its settings
        base = override_settings(INSTALLED_APPS=sorted(apps), FILE_UPLOAD_TEMP_DIR=os.environ["UPLOADGUARD_TEMP_DIR"])
    else:
        settings.configure(SECRET_KEY="snippets", INSTALLED_APPS=sorted(apps),
                           FILE_UPLOAD_TEMP_DIR=os.environ["UPLOADGUARD_TEMP_DIR"])
        django.setup()
        base = override_settings()
    for fragment in fragments:
        middleware = [entry for entry in fragment.get("MIDDLEWARE", []) if isinstance(entry, str)]
        for dotted in middleware:
            import_string(dotted)  # every class the fragment names exists
        with base, override_settings(MIDDLEWARE=middleware):
            found = [f"{message.id}: {message.msg}" for message in run_checks() if message.id.startswith("uploadguard.")]
        assert not found, found


def main(argv: list[str]) -> int:
    page = Path(argv[0]).resolve()
    work = Path(tempfile.mkdtemp(prefix="uploadguard-snippets-"))
    os.chdir(work)
    os.environ.update(UPLOADGUARD_TEMP_DIR=str(work / "tmp"), UPLOADGUARD_RESUMABLE_STORAGE=str(work / "uploads"),
                      HOME=str(work / "home"), XDG_CACHE_HOME="", XDG_DATA_HOME="")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE",
                          ASGI_DJANGO_SETTINGS if page.name in ASGI_DJANGO_PAGES else "tests.django_project.settings")
    (work / "home").mkdir()
    document = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()]).parse(page)
    document.namespace.update(fixtures(page), __name__="__main__")  # as in a script: Flask(__name__) finds its root
    ran = 0
    fragments: list[dict[str, Any]] = []  # the Django settings fragments, each as its block left them
    for example in document.examples():
        before = {name: document.namespace.get(name) for name in ("MIDDLEWARE", "INSTALLED_APPS")}
        try:
            example.evaluate()
        except Exception:
            print(f"{page.name}, line {example.line}: the block fails", file=sys.stderr)
            traceback.print_exc()
            return 1
        after = {name: document.namespace.get(name) for name in before}
        if any(after[name] is not before[name] for name in after):
            fragments.append({name: value for name, value in after.items() if value is not None})
        ran += 1
    if fragments:
        check_django_fragments(fragments)
    check(page, document.namespace)
    print(f"{page.name}: {ran} blocks ran")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
