"""``UploadGuard`` for ASGI: the WSGI guard's promises on an event loop.

Wrap any ASGI application (FastAPI, Starlette, Django's ``get_asgi_application()``)::

    from uploadguard.asgi import UploadGuard
    app = UploadGuard(app)              # or, with Starlette/FastAPI: app.add_middleware(UploadGuard)

A pure ASGI middleware (standard library only): the keywords and settings
are the WSGI guard's (:class:`uploadguard.wsgi.UploadGuard`; the docs'
"Settings reference"), and every decision is the same function of
:mod:`uploadguard.guard`.  For a request with a body:

* **413 the client reads.**  A ``Content-Length`` over the limit is answered
  before the application runs; a chunked body is cut as soon as it passes
  the limit (``receive()`` raises :class:`~uploadguard.errors.BodyTooLarge`
  into the application, and whatever the application makes of it -- FastAPI
  answers 400 -- becomes the 413).  Before the answer the rest of the body is
  read and discarded within ``drain_max`` bytes and ``drain_timeout``
  seconds, so the client, which reads only once it has sent, sees it.
* **Expect: 100-continue.**  uvicorn and gunicorn's ASGI worker send
  ``100 Continue`` when the application first calls ``receive()``; a 413 or
  503 decided before that goes out instead, and the client never sends the body.
* **The temp dir.**  Before the application reads a byte the temp dir is
  checked (a cached verdict with one ``lstat`` on the loop, a full check in
  a thread: a hung file system must not stop the loop); a
  vanished one is recreated, an unusable one answered 503 + ``Retry-After``
  while the rest of the site works.  :mod:`tempfile` (and ``TMPDIR``) point
  at it, so FastAPI's ``UploadFile`` and Django's body spool land there.  An
  ``OSError`` about it raised by the application is the same 503; a 400 a
  framework made of one (FastAPI) too, when a fresh check blames the dir.
  Any other ``OSError`` is a logged 500; other exceptions propagate to the
  server, which logs them and answers 500.
* **A client gone mid-body** ends the request quietly (one INFO line), never
  with a traceback: nothing can be answered to it.

``http.response.start`` is held until the first body message, so an error
raised in between can still be answered.  Requests without a body, and
``lifespan`` and ``websocket`` scopes, pass straight through.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from . import guard
from .config import Settings
from .errors import BadRequest, BodyTooLarge, UploadGuardError
from .stats import Event, GuardStats
from .tempdir import Health, use_as_tempdir

__all__ = ["UploadGuard"]

log = logging.getLogger("uploadguard")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCOPE_GUARD = "uploadguard.guard"  # the outermost guard, which counts the request
SCOPE_BODY = "uploadguard.body"  # its body counter


def _head(scope: Scope) -> dict[str, Any] | None:
    """The body headers under their WSGI names (what :func:`guard.body_length` reads); ``None`` for no body.

    One pass over the headers (this runs for every request): the first
    ``Content-Length``, the last ``Transfer-Encoding`` and whether the client
    asked for ``100-continue`` (``HTTP_EXPECT``, lowered).
    """
    length = encoding = None
    expect = ""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            if length is None:
                length = value.decode("latin-1")
        elif name == b"transfer-encoding":
            encoding = value.decode("latin-1")
        elif name == b"expect" and value.lower() == b"100-continue":
            expect = "100-continue"
    if length:  # all that body_length reads then: the common upload's dict is the small one
        return {"CONTENT_LENGTH": length, "HTTP_TRANSFER_ENCODING": encoding or "", "HTTP_EXPECT": expect}
    version = str(scope.get("http_version", "1.1"))
    if encoding is None and not version.startswith(("2", "3")):
        return None
    return {"CONTENT_LENGTH": length, "HTTP_TRANSFER_ENCODING": encoding or "", "HTTP_EXPECT": expect,
            "wsgi.input_terminated": True, "SERVER_PROTOCOL": f"HTTP/{version}",
            "REQUEST_METHOD": scope.get("method", "")}


class _Body:
    """The application's ``receive`` and ``send`` (a :class:`guard.BodyState`).

    ``receive`` counts the body and cuts it at the limit; ``send`` holds
    ``http.response.start`` until the first body message.  One object for
    both: it is made for every request with a body.
    """

    __slots__ = ("_receive", "length", "limit", "consumed", "exceeded", "failed", "eof", "asked", "expects_continue",
                 "_send", "_guard", "start", "sent", "replaced")

    def __init__(self, receive: Receive, send: Send, guard: UploadGuard, length: int | None, limit: int,
                 expects_continue: bool) -> None:
        self._receive = receive
        self._send = send
        self._guard = guard  # decides what replaces the application's answer
        self.start: Message | None = None
        self.sent = False  # the server has the response start
        self.replaced: UploadGuardError | None = None  # our answer instead of the application's
        self.length = length
        self.limit = limit  # bytes; 0 = none
        self.consumed = 0
        self.exceeded = False
        self.failed = False  # the client went away before the body ended
        self.eof = False
        self.asked = False  # receive() was called: the server has sent any 100 Continue
        self.expects_continue = expects_continue

    @property
    def waiting(self) -> bool:
        """The client still waits for a ``100 Continue`` nobody sent: it has sent no body."""
        return self.expects_continue and not self.asked

    @property
    def remaining(self) -> int | None:
        return None if self.length is None else self.length - self.consumed

    def tighten(self, limit: int) -> None:
        """Apply a smaller limit (a nested guard's); a larger one or 0 changes nothing."""
        if limit and (not self.limit or limit < self.limit):
            self.limit = limit

    async def receive(self) -> Message:
        if self.exceeded:
            raise BodyTooLarge(self.limit)
        self.asked = True
        message = await self._receive()
        self._count(message)  # a plain call, not one more coroutine per message: this runs for every body
        if self.limit and self.consumed > self.limit:
            self.exceeded = True
            raise BodyTooLarge(self.limit)
        return message

    async def next(self) -> Message:
        """The server's next message, counted (past the limit too: the drain's read)."""
        self.asked = True
        message = await self._receive()
        self._count(message)
        return message

    def _count(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.request":
            self.consumed += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.eof = True
        elif kind == "http.disconnect" and not self.eof:
            self.failed = True

    async def send(self, message: Message) -> None:
        if self.replaced is not None or self.failed:
            return  # replaced by our answer, or the client is gone: the rest goes nowhere
        if self.start is None and not self.sent and message.get("type") == "http.response.start":
            self.start = message
            return
        if self.start is not None and not self.sent:
            status = int(self.start["status"])
            if status == 400 or self.exceeded:  # most answers: kept without a look (see _replacement)
                self.replaced = await self._guard._replacement(status, self)
                if self.replaced is not None:
                    return
            self.sent = True
            await self._send(self.start)
        await self._send(message)

    async def drain(self, *, max_bytes: int, timeout: float) -> bool:
        """Read and discard the rest within the bounds (:func:`guard.drain_plan`); ``True`` if all was read."""
        plan = guard.drain_plan(waiting=self.waiting, eof=self.eof or self.failed, remaining=self.remaining,
                                max_bytes=max_bytes, timeout=timeout)
        if plan is not guard.Drain.READ:
            return plan is guard.Drain.DONE
        budget = self.consumed + max_bytes
        try:
            async with asyncio.timeout(timeout):
                while not (self.eof or self.failed) and self.consumed <= budget:
                    await self.next()
        except TimeoutError:
            return False
        return self.eof


class UploadGuard:
    """ASGI middleware; see the module documentation for what it guarantees and how."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        temp_dir: str | os.PathLike[str] | None = None,
        max_body_size: int | str | None = None,  # bytes, or "200M"; 0 = no limit
        retry_after: int | None = None,  # seconds
        min_free_space: int | str | None = None,  # bytes, or "16M"
        drain_max: int | str | None = None,  # bytes, or "400M"
        drain_timeout: float | None = None,  # seconds
        check_interval: float | None = None,  # seconds
        settings: Settings | None = None,
    ) -> None:
        self.settings, self.temp = guard.configure(settings, dict(
            temp_dir=temp_dir, max_body_size=max_body_size, retry_after=retry_after,
            min_free_space=min_free_space, drain_max=drain_max, drain_timeout=drain_timeout,
            check_interval=check_interval,
        ))
        self.app = app
        self.stats = GuardStats()
        from . import metrics  # Prometheus counters when prometheus_client is installed; else nothing

        metrics.install(self)

    def __repr__(self) -> str:
        return f"<asgi.UploadGuard {self.settings.describe()}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan, websocket: not ours
            return
        head = _head(scope)
        if head is None:
            await self.app(scope, receive, send)  # the common case, no body: nothing to guard
            return
        outer = scope.get(SCOPE_GUARD)
        try:
            length = guard.body_length(head)
        except BadRequest as malformed:
            if outer is not None:
                await self.app(scope, receive, send)
            else:
                await self._answer(malformed, scope, send, None)
            return
        if length == 0:
            await self.app(scope, receive, send)
            return
        if outer is not None:
            await self._nested(scope, receive, send, length)
            return
        # The guarded request, here rather than in a coroutine of its own: one frame less on every body.
        limit = self.settings.max_body_size
        body = _Body(receive, send, self, length, limit, head["HTTP_EXPECT"] == "100-continue")
        self.stats.record(Event.GUARDED)
        refusal: UploadGuardError | None = guard.limit_refusal(limit, length)
        if refusal is None:
            # A body the application stores elsewhere (the resumable endpoint's) needs no room here;
            # the cached verdict (one lstat) without a coroutine: this runs for every body.
            spools = getattr(self.app, "spools_body", None)
            need = (length or 0) if spools is None or spools(scope) else 0
            health = self.temp.cached(need) or await self._checked_temp_dir(need)
            refusal = None if health.ok else self._unavailable(health)
        if refusal is not None:
            await self._answer(refusal, scope, send, body)
            return
        if tempfile.tempdir != self.temp.path:  # FastAPI's UploadFile, Django's body spool: the guarded, healthy dir
            use_as_tempdir(self.temp.path)
        scope = {**scope, SCOPE_GUARD: self, SCOPE_BODY: body}
        try:
            await self.app(scope, body.receive, body.send)
        except Exception as exc:
            if body.failed:
                log.info("client went away during the body of %s; %s ended the request",
                         _where(scope), type(exc).__name__)
                return
            if body.sent:
                log.error("error after the response started (%s); cannot answer it", _where(scope), exc_info=True)
                raise
            fresh = await self._checked_temp_dir(fresh=True) if guard.needs_health(exc, body) else None
            error = guard.classify(exc, body, fresh, temp=self.temp, retry_after=self.settings.retry_after,
                                   spooled=body.consumed or (length or 0))
            if error is None:
                raise
            await self._answer(error, scope, send, body)
            return
        if body.failed:
            log.info("client went away during the body of %s", _where(scope))
            return
        if body.replaced is None and body.start is not None and not body.sent:
            body.replaced = await self._replacement(int(body.start["status"]), body)
            if body.replaced is None:
                await send(body.start)  # a start without a body message: pass it on as it came
        if body.replaced is None and body.start is None and body.exceeded:
            body.replaced = BodyTooLarge(body.limit)  # the application answered nothing at all
        if body.replaced is not None:
            await self._answer(body.replaced, scope, send, body)

    async def _nested(self, scope: Scope, receive: Receive, send: Send, length: int | None) -> None:
        """Inside another guard: not counted again; this guard's smaller limit, and its own temp dir."""
        refusal: UploadGuardError | None = guard.limit_refusal(self.settings.max_body_size, length)
        body = scope.get(SCOPE_BODY)
        if isinstance(body, _Body):
            body.tighten(self.settings.max_body_size)
        outer = scope.get(SCOPE_GUARD)
        if refusal is None and not (isinstance(outer, UploadGuard) and outer.temp.path == self.temp.path):
            health = await self._checked_temp_dir(length or 0)
            refusal = None if health.ok else self._unavailable(health)
        if refusal is not None:
            await self._answer(refusal, scope, send, body if isinstance(body, _Body) else None)
            return
        await self.app(scope, receive, send)

    # -- deciding ----------------------------------------------------------------------

    async def _replacement(self, status: int, body: _Body) -> UploadGuardError | None:
        """What replaces the application's response of ``status``, or ``None`` to keep it (asked only for a 400 or a cut body)."""
        if body.exceeded:
            return BodyTooLarge(body.limit)  # the application swallowed our 413 and answered something else
        if status == 400:
            health = await self._checked_temp_dir(fresh=True)
            return guard.classify_status(status, health, path=self.temp.path, retry_after=self.settings.retry_after)
        return None

    async def _checked_temp_dir(self, need: int = 0, *, fresh: bool = False) -> Health:
        """The temp dir's health (a vanished one recreated and counted).

        A verdict still cached (``check_interval``) costs one ``lstat`` on the
        loop; a full check or a heal runs in a thread, so a hung file system
        cannot stop the loop.
        """
        cached = None if fresh else self.temp.cached(need)
        if cached is not None:
            return cached
        health = await asyncio.to_thread(self.temp.preflight, need, fresh=fresh)
        if health.healed:
            self.stats.record(Event.HEALED)
        return health

    def _unavailable(self, health: Health) -> UploadGuardError:
        return guard.unavailable(health, path=self.temp.path, retry_after=self.settings.retry_after)

    # -- answering ---------------------------------------------------------------------

    async def _answer(self, error: UploadGuardError, scope: Scope, send: Send, body: _Body | None) -> None:
        guard.record(error, _where(scope), self.stats)
        if body is not None:
            await body.drain(max_bytes=self.settings.drain_bytes, timeout=self.settings.drain_timeout)
        accept = ""
        for name, value in scope.get("headers", ()):
            if name == b"accept":
                accept = value.decode("latin-1")
        content_type, payload = error.render(accept)
        headers = [("content-type", content_type), ("content-length", str(len(payload))), *error.headers()]
        await send({"type": "http.response.start", "status": error.status_code,
                    "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]})
        await send({"type": "http.response.body", "body": payload, "more_body": False})


def _where(scope: Scope) -> str:
    return guard.printable(f"{scope.get('method', '?')} {scope.get('path', '')}")
