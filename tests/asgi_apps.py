"""ASGI applications for the tests: a plain ASGI app, a FastAPI app and a Starlette app, each guarded.

Importable as server targets (``uvicorn tests.asgi_apps:fastapi_guarded``,
``gunicorn -k asgi tests.asgi_apps:django_guarded``); the guards read the
``UPLOADGUARD_*`` environment like any deployment.  Every app answers
``GET /`` with ``page`` and stores an upload by spooling it through
:mod:`tempfile` (the guarded temp dir), answering ``stored N``.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at runtime.
import logging
import os
import shutil
import tempfile
from typing import Any

from uploadguard.asgi import UploadGuard

if not logging.getLogger("uploadguard").handlers:  # uvicorn: show the guard's INFO lines (gunicorn's hooks route them)
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("uploadguard").addHandler(_handler)
    logging.getLogger("uploadguard").setLevel(logging.INFO)


async def plain(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app: reads the whole body into a temporary file, answers its size."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] == "GET":
        body = b"page"
    else:
        size = 0
        with tempfile.TemporaryFile() as spool:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise OSError("client disconnected")  # as frameworks raise on a vanished client
                spool.write(message.get("body", b""))
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
        body = b"stored %d" % size
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def make_fastapi() -> Any:
    """FastAPI with an ``UploadFile`` endpoint (multipart, spooled by Starlette into :mod:`tempfile`)."""
    from fastapi import FastAPI, File, UploadFile
    from fastapi.responses import PlainTextResponse

    app = FastAPI()

    @app.get("/", response_class=PlainTextResponse)
    async def page() -> str:
        return "page"

    @app.post("/", response_class=PlainTextResponse)
    async def upload(file: UploadFile = File()) -> str:
        data = await file.read()
        return f"stored {len(data)}"

    return app


def make_starlette() -> Any:
    """Starlette reading the raw body stream into a temporary file."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def endpoint(request: Request) -> PlainTextResponse:
        if request.method == "GET":
            return PlainTextResponse("page")
        size = 0
        with tempfile.TemporaryFile() as spool:
            async for chunk in request.stream():
                spool.write(chunk)
                size += len(chunk)
        return PlainTextResponse(f"stored {size}")

    return Starlette(routes=[Route("/", endpoint, methods=["GET", "POST"])])


def make_django() -> Any:
    """Django's ASGI handler for tests/django_project (its body spool is :mod:`tempfile`'s)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.settings")
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


def sabotaging(app: Any) -> Any:
    """Between the guard and ``app``: ``X-Sabotage: file`` puts a file where the temp dir was.

    The race the guard cannot prevent (the dir breaks after its check, before
    the app spools the body), made deterministic.
    """
    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (b"x-sabotage", b"file") in scope["headers"]:
            path = os.environ["UPLOADGUARD_TEMP_DIR"]
            shutil.rmtree(path)
            with open(path, "w") as fh:
                fh.write("not a directory")
        await app(scope, receive, send)

    return wrapped


def __getattr__(name: str) -> Any:
    """Server targets, made on first use: ``plain_guarded``, ``fastapi_guarded``, ``fastapi_added``, ..."""
    if name == "plain_guarded":
        return UploadGuard(plain)
    if name == "fastapi_guarded":
        return UploadGuard(make_fastapi())
    if name == "fastapi_added":  # Starlette's own way: app.add_middleware
        app = make_fastapi()
        app.add_middleware(UploadGuard)
        return app
    if name == "starlette_guarded":
        return UploadGuard(make_starlette())
    if name == "django_guarded":
        return UploadGuard(make_django())
    if name == "django_sabotaged":
        return UploadGuard(sabotaging(make_django()))
    if name == "django_settings_guarded":  # the documented asgi.py: the UPLOADGUARD_* Django settings
        app = make_django()
        from uploadguard.django import settings_from_django

        return UploadGuard(app, settings=settings_from_django())
    raise AttributeError(name)
