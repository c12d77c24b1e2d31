"""Django's test ``Client``, served by the documented ASGI stack instead of Django's WSGI handler.

``ASGIClient`` keeps the test client's API (``get``, ``post``, ``generic``,
cookies, ``response.json()``) so one table of cases runs through both Django
integrations (tests/test_django_resumable.py); each request is turned into an
ASGI scope and served, in-process, by ``UploadGuard(ResumableUploadsASGI(
ASGIHandler()), settings=settings_from_django())`` -- asgi.py as docs/django.md
shows it, built from the settings in force at the client's first request.
The body arrives in 64 KiB messages; after it, ``receive()`` waits until the
response is complete, then says the client went away, as a server does.
"""

from __future__ import annotations

import asyncio
from http.cookies import SimpleCookie
from typing import Any

from asgiref.sync import async_to_sync
from django.http import HttpResponse
from django.test import Client


def asgi_stack() -> Any:
    """The documented asgi.py, on Django's ASGI handler."""
    from django.core.handlers.asgi import ASGIHandler

    from uploadguard.asgi import UploadGuard
    from uploadguard.django import ResumableUploadsASGI, settings_from_django

    return UploadGuard(ResumableUploadsASGI(ASGIHandler()), settings=settings_from_django())


def scope_of(environ: dict[str, Any]) -> dict[str, Any]:
    """The ASGI scope of the request the test client composed as a WSGI environ."""
    headers = [(name[5:].replace("_", "-").lower().encode("latin-1"), str(value).encode("latin-1"))
               for name, value in environ.items() if name.startswith("HTTP_")]
    for name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(name):
            headers.append((name.replace("_", "-").lower().encode(), str(environ[name]).encode("latin-1")))
    path = environ["PATH_INFO"].encode("iso-8859-1")
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": environ["REQUEST_METHOD"],
            "scheme": environ.get("wsgi.url_scheme", "http"), "path": path.decode(), "raw_path": path,
            "query_string": environ.get("QUERY_STRING", "").encode("latin-1"), "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 50000),
            "server": (environ.get("SERVER_NAME", "testserver"), int(environ.get("SERVER_PORT", 80)))}


class ASGIClient(Client):  # type: ignore[misc]
    """``django.test.Client`` whose requests the ASGI stack (:func:`asgi_stack`) serves."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._app: Any = None
        self.handler = self._serve

    def _serve(self, environ: dict[str, Any]) -> HttpResponse:
        if self._app is None:
            self._app = asgi_stack()
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        status, headers, content = async_to_sync(_exchange)(self._app, scope_of(environ), body)
        response = HttpResponse(content, status=status)
        del response["Content-Type"]
        for name, value in headers:
            if name.lower() == "set-cookie":
                cookie: SimpleCookie = SimpleCookie()
                cookie.load(value)
                response.cookies.update(cookie)
            elif response.has_header(name):  # a repeated field: one list, as a client reads it
                response[name] = f"{response[name]}, {value}"
            else:
                response[name] = value
        response.wsgi_request = None  # there is none; Client.request asks it for a urlconf
        return response


async def _exchange(app: Any, scope: dict[str, Any], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    messages = [{"type": "http.request", "body": body[start:start + 65536], "more_body": start + 65536 < len(body)}
                for start in range(0, len(body), 65536)] or [{"type": "http.request", "body": b"", "more_body": False}]
    done = asyncio.Event()
    started: dict[str, Any] = {}
    content = bytearray()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)
        elif message["type"] == "http.response.body":
            content.extend(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    headers = [(bytes(name).decode("latin-1"), bytes(value).decode("latin-1")) for name, value in started["headers"]]
    return started["status"], headers, bytes(content)
