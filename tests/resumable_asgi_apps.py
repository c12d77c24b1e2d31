"""ASGI apps for the real-server tests of the resumable endpoint (tests/test_resumable_asgi.py).

``application`` is ``UploadGuard(ResumableUploads(...))`` from the ASGI side of
uploadguard -- the stack to run under ``uvicorn`` or ``gunicorn -k asgi``;
``fastapi_app`` is a FastAPI application with the endpoint mounted at
``/files``.  Storage is ``$TEST_RESUMABLE_STORAGE``; each completed upload is
recorded as ``$TEST_RECORDS/<id>.json`` (tests/resumable_client_apps.py's
``record``, called from a coroutine ``on_complete``); ``$TEST_IDLE_TIMEOUT``
sets ``idle_timeout``.  Beside ``/files/``, ``application`` serves
``/page/<name>`` from ``$TEST_PAGES`` as the WSGI one does (the browser test's
page and ``upload.js``, same origin as the endpoint).
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at runtime.
import asyncio
import logging
import mimetypes
import os
from pathlib import Path
from typing import Any

from resumable_client_apps import record
from uploadguard.asgi import UploadGuard
from uploadguard.resumable.asgi import ResumableUploads

if not logging.getLogger("uploadguard").handlers:  # uvicorn: show the endpoint's INFO lines
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("uploadguard").addHandler(_handler)
    logging.getLogger("uploadguard").setLevel(logging.INFO)


async def on_complete(upload: Any) -> None:
    await asyncio.to_thread(record, upload)


async def pages(scope: Any, receive: Any, send: Any) -> None:
    """Everything outside ``/files/``: static test pages from ``$TEST_PAGES``, else 404; lifespan accepted."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    name = path.removeprefix("/page/")
    root = os.environ.get("TEST_PAGES")
    status, kind, body = 404, "text/plain", b"not found"
    if root and path.startswith("/page/") and "/" not in name and (Path(root) / name).is_file():
        body = await asyncio.to_thread((Path(root) / name).read_bytes)
        status, kind = 200, mimetypes.guess_type(name)[0] or "application/octet-stream"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


def _endpoint(prefix: str = "/files/", app: Any = None) -> ResumableUploads:
    return ResumableUploads(app, prefix=prefix, storage=os.environ.get("TEST_RESUMABLE_STORAGE"),
                            on_complete=on_complete, idle_timeout=os.environ.get("TEST_IDLE_TIMEOUT"), lock_timeout=10)


application = UploadGuard(_endpoint(app=pages))


def make_fastapi() -> Any:
    """FastAPI with the endpoint mounted at ``/files`` (mounted, its prefix is ``/``) and a page of its own."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI()

    @app.get("/", response_class=PlainTextResponse)
    async def page() -> str:
        return "page"

    app.mount("/files", _endpoint(prefix="/"))
    return UploadGuard(app)


fastapi_app = make_fastapi()


def __getattr__(name: str) -> Any:
    """``django_app``: Django's ASGI handler (tests/django_project) with the endpoint in front of it.

    Django's ASGI handler reads the whole body before any middleware runs, so
    the endpoint wraps the handler rather than sitting in ``MIDDLEWARE``.
    """
    if name == "django_app":
        from asgi_apps import make_django

        return UploadGuard(ResumableUploads(make_django(), storage=os.environ.get("TEST_RESUMABLE_STORAGE"),
                                            on_complete=on_complete))
    raise AttributeError(name)


def _cases_app() -> Any:
    """The endpoint as tests/resumable_cases.py configures it (max_size, CORS origin, short lock wait)."""
    from resumable_cases import MAX_SIZE

    return ResumableUploads(storage=os.environ.get("TEST_RESUMABLE_STORAGE"), max_size=MAX_SIZE,
                            cors_origins=["https://app.example"], lock_timeout=0.3)


cases_app = _cases_app()
