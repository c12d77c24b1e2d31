"""``ResumableUploads`` for ASGI: the tus 1.0 / IETF-draft endpoint on an event loop.

The same endpoint as :class:`uploadguard.resumable.ResumableUploads` (WSGI),
with the same keywords, stores and guarantees -- one protocol: every step is
:class:`~uploadguard.resumable.engine.Endpoint`'s, this module only drives
it::

    from uploadguard.asgi import UploadGuard
    from uploadguard.resumable.asgi import ResumableUploads

    app = UploadGuard(ResumableUploads(app, storage="/var/lib/uploads", on_complete=process))

    # FastAPI / Starlette: mount it (it answers 404 beside its prefix when it has no app)
    api.mount("/files", ResumableUploads(prefix="/files/", storage=...))

A pure ASGI application (standard library only); ``lifespan`` and
``websocket`` scopes and requests outside ``prefix`` go to ``app``.

* **No thread per connection.**  The body is read from ``receive()`` as it
  arrives and written to the store in pieces of up to 1 MiB (the WSGI
  endpoint's read size; a slow body: a second of its bytes), each write in
  a thread of the endpoint's own pool (``threads``; never the loop's default
  executor), as is every other store and lock call: a slow disk or S3
  stalls no other connection.  Waiting for a held upload polls the lock
  with ``asyncio.sleep``.  A thousand slow PATCHes are a thousand
  coroutines and a file descriptor each, watched by one timer of the
  loop's, which asks their release requests in one pool call and writes
  their quiet bytes in another.
* **A small pool for a local directory** (``threads=None``: 2 threads for
  a :class:`~uploadguard.resumable.store.LocalStore`, 8 for S3 or another
  store; :func:`default_threads` says why).  Measured with 1,000 phones
  arriving in 2 s (``bench/bench_capacity.py --configs asgi,asgi-pool8``),
  8 threads left ``GET /`` waiting over a second in most runs, 2 in none.
  The price: two long ``fsync`` calls at once (large uploads completing on
  a slow disk) hold the worker's other store calls until they end -- raise
  ``threads`` where ``fsync`` is slow (a network file system, a busy disk).
* **Preemption**: a request for an upload whose PATCH is stale (a silent
  drop) asks it to let go; the PATCH's read ends at the next poll (0.2 s),
  what arrived is kept, the lock goes to the newcomer.
* **The rate floor**: a PATCH that brings less than 16 KiB per
  ``idle_timeout`` (silence, a drip) ends, keeping what arrived.
* **A client gone** (``http.disconnect``) keeps every byte that arrived; the
  request ends quietly.
* ``on_complete`` and ``authorize`` may be plain functions or coroutine
  functions (awaited on the loop); ``authorize`` gets the scope.  A plain
  ``on_complete`` runs in a pool of its own (8 threads, named
  ``uploadguard-hook``), a plain ``authorize`` in the loop's default
  executor, both with the request's context variables: the application's
  code, of any duration, never holds a thread of the store's pool, and a
  slow ``on_complete`` never holds up ``authorize`` (every request's).
  ``on_complete`` runs once, after the data is durable.
* **104 Upload Resumption Supported** (IETF draft): a creation request in an
  interop version gets ``104`` with ``Location`` as soon as the upload
  exists, before its body is read -- where the server can send interim
  responses: a scope advertising ``http.response.informational`` in its
  ``extensions``, or gunicorn's ASGI worker (``gunicorn -c gunicorn_conf.py -k
  asgi``: its ``post_worker_init`` hook notes the worker class), which takes
  the message without advertising it.  Never under uvicorn, which refuses
  unknown messages, nor under a gunicorn without uploadguard's hooks.
* ``max_streams`` is accepted for parity and not applied: an event loop
  holds no thread per body (see :func:`uploadguard.config.stream_caps`).
* ``get()`` and ``delete()`` are the WSGI endpoint's plain methods (store
  calls, and ``delete`` may wait for a lock); from a coroutine, await
  :meth:`ResumableUploads.aget` and :meth:`ResumableUploads.adelete`: the
  store calls in the endpoint's pool, a wait for a held upload on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import os
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .. import guard
from ..asgi import ASGIApp, Message, Receive, Scope, Send
from ..config import Settings, server_pool
from ..errors import UploadGuardError
from . import core
from . import protocol as p
from .core import Head, Response
from .engine import Admit, Body, Endpoint, Hook, Lock, Steps, Upload
from .locking import HeldLock
from .store import Appender, LocalStore, Store

__all__ = ["ResumableUploads", "default_threads"]

log = logging.getLogger("uploadguard")


T = TypeVar("T")

_COALESCE = 1024 * 1024  # bytes gathered before one write to the store (256 KiB: ~1.5x the CPU per GiB)
_POLL = 0.2  # seconds between the watcher's looks at release requests, rate floors and quiet bodies
_FLUSH_AFTER = 1.0  # seconds a body's bytes wait in RAM at most before they are written
_LOCK_POLL = 0.05  # seconds between attempts on a held lock
_HOOK_THREADS = 8  # plain on_complete calls at once (the size the one shared pool had): completions are rare
_INFORMATIONAL = "http.response.informational"


def default_threads(store: Store) -> int:
    """The store pool's size when ``threads`` is not given: 2 for a local directory, 8 for any other store.

    A :class:`LocalStore` call is a few system calls, well under a
    millisecond: one thread keeps up with thousands a second, and every
    extra one is a thread coming back from ``fsync`` to take the GIL from
    the loop just when a burst of new uploads needs it most (bench/README.md
    has the numbers).  The second lets one long ``fsync`` (a large upload's
    completion on a slow disk) not hold every other call.  An S3 call waits
    tens of milliseconds on the network; several must be under way at once.
    """
    return 2 if isinstance(store, LocalStore) else 8


def can_send_informational(scope: Scope) -> bool:
    """Whether the server takes ``http.response.informational`` (a 1xx) for this request."""
    extensions = scope.get("extensions") or {}
    if _INFORMATIONAL in extensions:
        return True
    # gunicorn's ASGI worker takes the message but does not advertise it: known from the pool uploadguard's
    # post_worker_init hook noted (gunicorn_conf.py), never guessed from what a process happens to import.
    pool = server_pool()
    return pool is not None and pool.worker_class == "asgi" and scope.get("http_version", "1.1") != "1.0"


def _head_of(scope: Scope, owner: str | None) -> Head:
    """The request's head from an ASGI scope (repeated headers joined with ``, `` as WSGI servers do)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    wire = str(scope.get("method", "GET")).upper()
    method = p.method_of({"REQUEST_METHOD": wire, "HTTP_X_HTTP_METHOD_OVERRIDE": headers.get("x-http-method-override")})
    # A body without Content-Length runs to its end: chunked, or (HTTP/2 and 3) the end of its stream.
    streamed = (str(scope.get("http_version", "1.1")).startswith(("2", "3"))
                and wire not in ("GET", "HEAD", "OPTIONS", "TRACE"))
    return Head(method=method, wire_method=wire, path=_path(scope), root=str(scope.get("root_path", "")),
                lookup=lambda name: headers.get(name.lower()), content_length=headers.get("content-length"),
                terminated="transfer-encoding" in headers or streamed, owner=owner)


def _path(scope: Scope) -> str:
    """The path below the application's root (servers and Starlette's ``Mount`` keep ``root_path`` in ``path``)."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", "")).rstrip("/")
    return path[len(root):] if root and path.startswith(root + "/") else path


class ResumableUploads(Endpoint):
    """The resumable-upload endpoint under ``prefix`` as an ASGI application; everything else goes to ``app``."""

    def __init__(
        self,
        app: ASGIApp | None = None,
        *,
        prefix: str = "/files/",
        storage: str | os.PathLike[str] | Store | None = None,  # a directory, "s3://bucket/prefix", or a Store
        max_size: int | str | None = None,  # bytes per upload; None = settings.max_body_size; 0 = no limit
        expires_after: float | str | None = None,  # seconds of inactivity; None = settings (24 h); 0 = never
        on_complete: Callable[[Upload], object] | None = None,  # or a coroutine function
        authorize: Callable[[Scope], object] | None = None,  # -> owner (str | None), or a coroutine function
        settings: Settings | None = None,
        cors_origins: Iterable[str] | str = (),  # "*" or exact origins ("https://example.com")
        lock_timeout: float = 5.0,  # seconds a request waits for a held upload before a 423
        idle_timeout: float | str | None = None,  # seconds without a byte that end a PATCH; None = settings
        keep_completed: float | str | None = None,  # seconds a completed upload is kept; None = settings; 0 = forever
        max_streams: int | str | None = None,  # accepted for parity with WSGI; not applied on an event loop
        threads: int | None = None,  # the pool for store and lock calls; None = 2 for a directory, 8 for S3
    ) -> None:
        super().__init__(prefix=prefix, storage=storage, max_size=max_size, expires_after=expires_after,
                         on_complete=on_complete, settings=settings, cors_origins=cors_origins,
                         lock_timeout=lock_timeout, idle_timeout=idle_timeout, keep_completed=keep_completed)
        if threads is None:
            threads = default_threads(self.store)
        if threads < 1:
            raise ValueError(f"threads={threads!r} must be at least 1")
        self.app = app
        self.authorize = authorize
        self.max_streams = max_streams
        self.threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._hook_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._running: set[asyncio.Future[None]] = set()  # requests left to finish after a cancellation
        self._watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watch] = weakref.WeakKeyDictionary()

    # -- ASGI ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.serves_path(_path(scope)):
            if self.app is not None:
                await self.app(scope, receive, send)
            elif scope["type"] == "lifespan":
                await _lifespan(receive, send)
            elif scope["type"] == "http":
                await _send(send, Response("404 Not Found", [("Content-Type", "text/plain"),
                                                            ("Content-Length", "10")], [b"Not Found\n"]))
            return
        try:
            owner = await self._owner(scope)
        except UploadGuardError as error:
            await _send(send, self.error(_head_of(scope, None), error))
            return
        # Shielded: a server cancels a request whose client left (gunicorn's ASGI worker after a grace
        # period), but a request that holds an upload finishes its steps -- what arrived is committed,
        # on_complete runs to its end and is recorded once -- and only then lets go of the upload.
        task = asyncio.ensure_future(self._serve(_head_of(scope, owner), scope, receive, send))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        await asyncio.shield(task)

    async def _serve(self, head: Head, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = _Exchange(scope, receive, send, head)
        steps = self.serve(head)
        try:
            response = await self._drive(steps, head, exchange)
        except (UploadGuardError, OSError) as exc:
            response = self.error(head, self.classify(exc))
            await exchange.drain(max_bytes=self.settings.drain_bytes, timeout=self.settings.drain_timeout)
        finally:
            if inspect.getgeneratorstate(steps) == inspect.GEN_SUSPENDED:
                self._executor().submit(steps.close)  # ended by an error of its own: locks released in the pool
        if exchange.gone:
            log.info("client went away during %s %s", head.method, head.path)
            return
        await _send(send, response)

    def spools_body(self, scope: Scope) -> bool:
        """Whether the request's body may be spooled into the guard's temp dir (asked by :class:`uploadguard.asgi.UploadGuard`).

        The endpoint's own bodies: :meth:`~.engine.Endpoint.spools`; any other
        request's: the wrapped application's answer (yes when it has none).
        """
        if scope.get("type") == "http" and self.serves_path(_path(scope)):
            head = _head_of(scope, None)
            return self.spools(head.header("Content-Type"), head.header("Upload-Checksum") is not None)
        ask = getattr(self.app, "spools_body", None)
        return True if ask is None else bool(ask(scope))

    async def _owner(self, scope: Scope) -> str | None:
        if self.authorize is None:
            return None
        if inspect.iscoroutinefunction(self.authorize):
            owner = await self.authorize(scope)
        else:
            owner = await asyncio.to_thread(self.authorize, scope)
            if inspect.isawaitable(owner):
                owner = await owner
        return None if owner is None else str(owner)

    # -- driving the engine --------------------------------------------------------------

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="uploadguard-resumable")
        return self._pool

    def _hooks(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._hook_pool is None:
            self._hook_pool = concurrent.futures.ThreadPoolExecutor(_HOOK_THREADS, thread_name_prefix="uploadguard-hook")
        return self._hook_pool

    async def aget(self, id_or_url: str, *, owner: str | None = None) -> Upload:
        """:meth:`get` for a coroutine: its store calls (a file read, an S3 round trip) run in the
        endpoint's pool, so the loop keeps serving every other connection meanwhile."""
        return await self._run(lambda: self.get(id_or_url, owner=owner))

    async def adelete(self, id_or_url: str, *, owner: str | None = None) -> None:
        """:meth:`delete` for a coroutine: store calls in the endpoint's pool, and the wait for an upload
        a request still holds (up to ``lock_timeout``, then
        :class:`~uploadguard.resumable.protocol.UploadLocked`) on the loop, as a request's -- never a
        thread of the pool blocked for it."""
        steps = self._terminate(id_or_url, owner)
        value: Any = None
        error: Exception | None = None
        while True:
            done, effect = await self._run(_step, steps, value, error)
            if done:
                return
            try:
                if not isinstance(effect, Lock):
                    raise TypeError(f"unexpected effect {effect!r} while deleting")
                value, error = await self._lock(effect.upload_id), None
            except Exception as exc:  # noqa: BLE001 -- handed to the steps, which decide
                value, error = None, exc

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in the endpoint's pool: one short hop off the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor(), lambda: function(*args))

    async def _drive(self, steps: Steps[Response], head: Head, exchange: _Exchange) -> Response:
        """Run the engine in the pool, coming back to the loop only for what needs it (see :func:`_advance`).

        A creation or a HEAD is one hop to the pool; a PATCH two (up to its
        body's append, then from its commit to the response; the last one a
        third, after ``on_complete`` ran outside the pool) -- each hop is a
        thread handoff and, on a busy host, a wait for the GIL, which a burst
        of new uploads multiplies.
        """
        value: Any = None
        error: Exception | None = None
        first: Callable[[], Any] | None = None
        committing: Appender | None = None  # the appender ``first`` commits
        while True:
            try:
                done, result = await self._run(_advance, self, steps, value, error, first)
            except BaseException:
                if committing is not None:  # cancelled (the loop closing), perhaps before the commit ran
                    self._executor().submit(committing.abort)
                raise
            if done:
                response: Response = result
                return response
            first = committing = None
            try:
                if isinstance(result, _Appending):
                    cut = await self._read_appended(result, head, exchange)
                    first, value, error = functools.partial(_commit, result.appender, cut), None, None
                    committing = result.appender
                    continue
                value, error = await self._fulfil(result, head, exchange), None
            except Exception as exc:  # noqa: BLE001 -- handed to the steps, which decide
                value, error = None, exc

    async def _fulfil(self, effect: Any, head: Head, exchange: _Exchange) -> Any:
        """What :func:`_advance` left to the loop: a held upload's wait, ``on_complete``."""
        if isinstance(effect, Lock):
            return await self._lock(effect.upload_id)
        if isinstance(effect, Hook):
            hook = self.on_complete
            assert hook is not None
            if inspect.iscoroutinefunction(hook):
                return await hook(effect.upload)
            call = functools.partial(contextvars.copy_context().run, hook, effect.upload)
            value = await asyncio.get_running_loop().run_in_executor(self._hooks(), call)
            return await value if inspect.isawaitable(value) else value
        raise TypeError(f"unknown effect {effect!r}")

    async def _lock(self, upload_id: str) -> HeldLock:
        """The upload's lock, asking a holder to let go; 423 after ``lock_timeout`` -- waiting on the loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_timeout
        request_release = getattr(self.locker, "request_release", None)
        while True:
            lock = await self._run(self.locker.try_acquire, upload_id)
            if lock is not None:
                return lock
            if request_release is not None:
                await self._run(request_release, upload_id)
            if loop.time() >= deadline:
                raise p.UploadLocked(f"Upload {upload_id} is in use by another request; retry in 1 s.", retry_after=1)
            await asyncio.sleep(_LOCK_POLL)

    async def _read_appended(self, appending: _Appending, head: Head, exchange: _Exchange) -> str | None:
        """Read the body into the appender :func:`_advance` opened: why it ended early, or ``None``.

        Any error aborts the appender (in the pool) before it reaches the steps.
        """
        body, appender = appending.body, appending.appender
        try:
            hint = core.interim_headers(head)
            if hint is not None and can_send_informational(exchange.scope):
                await exchange.send({"type": _INFORMATIONAL, "status": 104, "headers": _encode(hint)})
            cut = await self._pump(body, appender, exchange)
        except BaseException:
            self._executor().submit(appender.abort)
            raise
        exchange.cut = cut is not None
        return cut

    async def _pump(self, body: Body, appender: Appender, exchange: _Exchange) -> str | None:
        """Read the body to its end in a task of its own, watched: why it ended early, or ``None``.

        The reading task does nothing per message but take it and hand it to
        the writer.  The loop's one :class:`_Watch` (shared by every body read
        on it, so a thousand slow PATCHes cost one timer, not a thousand) looks
        every ``_POLL`` seconds at the rate floor and -- in one hop to the pool
        for all of them each -- writes the bytes quiet bodies left in RAM and
        asks whether another request wants an upload, and cuts a read that must end.
        A write under way is never cancelled.
        """
        loop = asyncio.get_running_loop()
        writer = _Writer(self, appender)
        reading = _Reading(body.lock, core.RateFloor(self.idle_timeout, loop.time()), writer)
        reading.task = asyncio.ensure_future(_read(exchange, reading.floor, writer, reading.stop))
        watch = _Watch.of(self, loop)
        watch.add(reading)
        try:
            await asyncio.wait((reading.task,))
        finally:
            watch.discard(reading)
            reader = reading.task
            if not reader.done():  # cancelled from outside (the loop is closing): end the read as a cut does
                reading.stop.set()
                while not reader.done():
                    reader.cancel()
                    await asyncio.wait((reader,), timeout=_POLL)
            await writer.close()
        if reading.cut is None and reading.error is None:
            return reader.result()
        if not reader.cancelled():
            reader.exception()  # retrieved: its outcome no longer matters, the cut stands
        if reading.error is not None:
            raise reading.error
        if reading.cut == "slow":
            log.info("upload %s: the PATCH brings too few bytes; ending it", body.upload_id)
        else:
            log.info("upload %s was asked for by another request; ending this PATCH", body.upload_id)
        return reading.cut


class _Reading:
    """One body being read, as :class:`_Watch` sees it: its lock, rate floor, writer and reading task."""

    __slots__ = ("lock", "floor", "writer", "stop", "task", "cut", "error")

    def __init__(self, lock: HeldLock, floor: core.RateFloor, writer: _Writer) -> None:
        self.lock = lock
        self.floor = floor
        self.writer = writer
        self.stop = asyncio.Event()  # the read ends at its next message even if a cancel is lost
        self.task: asyncio.Future[str | None] | None = None
        self.cut: str | None = None  # "slow" or "preempted": why the read was ended
        self.error: BaseException | None = None  # the release check failed: the body's error

    def end(self, cut: str | None, error: BaseException | None = None) -> None:
        """Cut the read (again, if an earlier cancel was lost)."""
        if self.cut is None and self.error is None:
            self.cut, self.error = cut, error
        self.stop.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()


class _Watch:
    """The loop's watcher over every body read on it (for one endpoint): one timer, two pool calls a tick.

    Each ``_POLL`` seconds: a body under the rate floor is cut; the bytes of
    every body that waited ``_FLUSH_AFTER`` are written in one call in the
    pool, and every held upload's release request is asked in another; a cut
    whose cancel was lost (Python 3.11's ``asyncio.wait_for`` inside a
    server's ``receive`` can swallow one that meets a message) is cancelled
    again.  It runs only while there are bodies to watch.
    """

    def __init__(self, endpoint: ResumableUploads) -> None:
        self._endpoint = endpoint
        self._readings: dict[_Reading, None] = {}  # insertion-ordered set
        self._task: asyncio.Future[None] | None = None

    @classmethod
    def of(cls, endpoint: ResumableUploads, loop: asyncio.AbstractEventLoop) -> _Watch:
        watch = endpoint._watches.get(loop)
        if watch is None:
            watch = endpoint._watches[loop] = cls(endpoint)
        return watch

    def add(self, reading: _Reading) -> None:
        self._readings[reading] = None
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def discard(self, reading: _Reading) -> None:
        self._readings.pop(reading, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._readings:
            await asyncio.sleep(_POLL)
            now = loop.time()
            asking: list[_Reading] = []
            pieces: list[tuple[_Writer, asyncio.Future[None], bytes]] = []
            for reading in list(self._readings):
                if reading.cut is not None or reading.error is not None:
                    reading.end(None)  # not ended yet: its cancel was lost
                elif reading.floor.slow(now):
                    reading.end("slow")
                else:
                    asking.append(reading)
                    quiet = reading.writer.take_quiet(now)
                    if quiet is not None:
                        pieces.append((reading.writer, *quiet))
            if pieces:
                # Not waited for here: a slow write (an S3 part) delays the pieces beside it, never
                # the next look; each writer waits for its own piece.
                _write_pieces(loop, self._endpoint._executor(), pieces)
            if not asking:
                continue
            try:
                asked = await self._endpoint._run(_release_requested, [reading.lock for reading in asking])
            except Exception as exc:  # noqa: BLE001 -- the pool is gone (shutting down): every body's error
                asked = [exc] * len(asking)
            answers: list[bool | BaseException] = [*asked]
            for reading, answer in zip(asking, answers):
                if isinstance(answer, BaseException):
                    reading.end(None, answer)
                elif answer:
                    reading.end("preempted")


def _release_requested(locks: list[HeldLock]) -> list[bool | Exception]:
    """Each lock's :meth:`~.locking.HeldLock.release_requested`, or the error that asking it raised."""
    answers: list[bool | Exception] = []
    for lock in locks:
        try:
            answers.append(lock.release_requested())
        except Exception as exc:  # noqa: BLE001 -- that body's error, not the others'
            answers.append(exc)
    return answers


def _write_all(pieces: list[tuple[Appender, bytes]]) -> list[Exception | None]:
    """In the pool: each piece to its appender, in one call; each outcome its own (an error is that body's)."""
    written: list[Exception | None] = []
    for appender, piece in pieces:
        try:
            appender.write(piece)
            written.append(None)
        except Exception as exc:  # noqa: BLE001 -- that body's error
            written.append(exc)
    return written


def _write_pieces(loop: asyncio.AbstractEventLoop, pool: concurrent.futures.Executor,
                  pieces: list[tuple[_Writer, asyncio.Future[None], bytes]]) -> None:
    """Write a tick's quiet pieces in one pool call; each writer's future gets its piece's outcome."""
    futures = [future for _, future, _ in pieces]

    def settle(done: asyncio.Future[list[Exception | None]]) -> None:
        if done.cancelled():
            errors: list[BaseException | None] = [asyncio.CancelledError()] * len(futures)
        elif done.exception() is not None:
            errors = [done.exception()] * len(futures)
        else:
            errors = [*done.result()]
        for future, error in zip(futures, errors):
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    try:
        job = loop.run_in_executor(pool, _write_all, [(writer._appender, piece) for writer, _, piece in pieces])
    except Exception as exc:  # noqa: BLE001 -- the pool is gone (shutting down): each writer's error
        for future in futures:
            future.set_exception(exc)
        return
    job.add_done_callback(settle)


async def _read(exchange: _Exchange, floor: core.RateFloor, writer: _Writer, stop: asyncio.Event) -> str | None:
    """Take the body's messages as they come: ``"disconnect"`` if the client went first, else ``None``.

    Ends at ``stop`` too (the watcher cut the body), after storing the message in hand.
    """
    loop = asyncio.get_running_loop()
    while True:
        message = await exchange.receive()
        if message.get("type") == "http.disconnect":
            return "disconnect"
        data = message.get("body", b"")
        now = loop.time()
        floor.count(len(data), now)
        more = message.get("more_body", False)
        await writer.add(data, now, flush=not more)
        if not more or stop.is_set():
            return None


class _Writer:
    """Pieces of a body on their way to the store: gathered to ``_COALESCE`` bytes, one write in flight.

    While a piece is written in the pool the next is received: the network
    and the disk work at once, and a slow disk holds the body back (one
    piece at most is buffered beside the one being written).  Bytes wait in
    RAM about ``_FLUSH_AFTER`` seconds at most: the watcher takes them
    (:meth:`take_quiet`) and writes them with every other quiet body's in
    one pool call a tick, so a slow body costs a write a second, not one
    per message, and no hop of its own.  A piece is handed over only when no
    write is in flight, so pieces go out in order.  Writes are shielded:
    cancelling the read never cancels a write under way.  The server's
    messages are kept as they came and joined once per piece (a message of
    ``_COALESCE`` bytes or more goes to the store as it is): at hundreds of
    MiB/s each copy of the body costs a measurable share.
    """

    def __init__(self, endpoint: ResumableUploads, appender: Appender) -> None:
        self._endpoint = endpoint
        self._appender = appender
        self._pieces: list[bytes] = []
        self._size = 0  # bytes in _pieces
        self._since = 0.0  # loop time of the oldest byte in _pieces
        self._inflight: asyncio.Future[None] | None = None

    async def add(self, data: bytes, now: float, *, flush: bool) -> None:
        if data:
            if not self._size:
                self._since = now
            self._pieces.append(data if type(data) is bytes else bytes(data))  # a server's buffer may be reused
            self._size += len(data)
        if self._size and (flush or self._size >= _COALESCE):
            await self._settle()
            self._submit()

    def take_quiet(self, now: float) -> tuple[asyncio.Future[None], bytes] | None:
        """For the watcher: the bytes that waited ``_FLUSH_AFTER``, and the future their write will settle.

        ``None`` while a write is under way, or when nothing waited that long.
        """
        if not (self._size and now - self._since >= _FLUSH_AFTER and self._idle()):
            return None
        piece = self._take()
        self._inflight = asyncio.get_running_loop().create_future()
        return self._inflight, piece

    def _idle(self) -> bool:
        """No write in flight (a failed one counts as in flight: its error is raised by :meth:`_settle`)."""
        inflight = self._inflight
        return inflight is None or (inflight.done() and not inflight.cancelled() and inflight.exception() is None)

    def _take(self) -> bytes:
        """The gathered bytes as one piece, joined once (one message: as it came)."""
        pieces = self._pieces
        piece = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._pieces, self._size = [], 0
        return piece

    def _submit(self) -> None:
        if self._size:
            self._inflight = asyncio.get_running_loop().run_in_executor(
                self._endpoint._executor(), self._appender.write, self._take())

    async def _settle(self) -> None:
        while self._inflight is not None:  # the watcher may hand a piece over while this waits: wait for it too
            inflight = self._inflight
            await asyncio.shield(inflight)  # raises the write's error; kept for close() if cancelled here
            if self._inflight is inflight:
                self._inflight = None

    async def close(self) -> None:
        """Write what is left and wait for it (its errors are the body's)."""
        await self._settle()
        self._submit()
        await self._settle()


def _step(steps: Steps[Any], value: Any, error: Exception | None) -> tuple[bool, Any]:
    """One step of the engine, up to its next effect: ``(False, effect)`` or ``(True, response)``."""
    try:
        return False, (steps.throw(error) if error is not None else steps.send(value))
    except StopIteration as stop:
        return True, stop.value


@dataclasses.dataclass(frozen=True)
class _Appending:
    """A :class:`~.engine.Body` effect met in the pool: its appender is open; the loop reads the body."""

    body: Body
    appender: Appender


def _commit(appender: Appender, cut: str | None) -> tuple[int, str | None]:
    """In the pool: the body's bytes committed, as :class:`~.engine.Body` answers; aborted if that fails."""
    try:
        return appender.commit(), cut
    except BaseException:
        appender.abort()
        raise


def _advance(endpoint: ResumableUploads, steps: Steps[Any], value: Any, error: Exception | None,
             first: Callable[[], Any] | None = None) -> tuple[bool, Any]:
    """In the pool: the engine's steps, fulfilling every effect that needs no loop, until the response
    (``(True, response)``) or one only the loop can fulfil (``(False, what)``).

    Fulfilled here: ``Admit`` (no cap on an event loop: a body holds no
    thread), a ``Lock`` nobody holds, and a ``Body``'s append (its reading
    is the loop's: an :class:`_Appending`).  Left to the loop: a held lock's
    wait (it polls with ``asyncio.sleep``) and ``on_complete`` (a coroutine
    awaited there, a plain function sent to the endpoint's hook pool: the
    application's code never holds the store's pool).  ``first`` runs before
    the first step, its value or error sent in (a body's commit).
    """
    if first is not None:
        try:
            value, error = first(), None
        except Exception as exc:  # noqa: BLE001 -- handed to the steps, which decide
            value, error = None, exc
    while True:
        done, effect = _step(steps, value, error)
        if done:
            return True, effect
        value, error = None, None
        try:
            if isinstance(effect, Admit):
                continue
            if isinstance(effect, Lock):
                value = endpoint.locker.try_acquire(effect.upload_id)
                if value is None:
                    return False, effect  # held: the loop waits for it, asking the holder to let go
                continue
            if isinstance(effect, Body):
                appender = endpoint.store.append(effect.upload_id, effect.offset, effect.budget,
                                                 checksum=effect.checksum)
                return False, _Appending(effect, appender)
            return False, effect
        except Exception as exc:  # noqa: BLE001 -- handed to the steps, which decide
            value, error = None, exc


class _Exchange:
    """The request's ``receive``/``send``: what of the body was read, whether the client went away."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, head: Head) -> None:
        self.scope = scope
        self._receive = receive
        self.send = send
        self.gone = False
        self.eof = False
        self.cut = False  # the body's reading was ended on purpose (preempted, too slow): never read again
        self.consumed = 0
        try:
            self.length = head.content_length()
        except UploadGuardError:
            self.length = None
        self.expects_continue = (head.header("Expect") or "").lower() == "100-continue"
        self.asked = False

    async def receive(self) -> Message:
        self.asked = True
        message = await self._receive()
        if message.get("type") == "http.disconnect":
            self.gone = True
        elif message.get("type") == "http.request":
            self.consumed += len(message.get("body", b""))
            self.eof = not message.get("more_body", False)
        return message

    async def drain(self, *, max_bytes: int, timeout: float) -> None:
        """Read and discard the rest of a refused body within the bounds, so the client reads the answer.

        Skipped for a client still waiting for its ``100 Continue`` (the
        server sends it on the first ``receive()``: nothing was sent), a body
        already cut, or one announced past ``max_bytes`` (:func:`guard.drain_plan`).
        """
        if self.cut or self.gone:
            return
        remaining = None if self.length is None else self.length - self.consumed
        plan = guard.drain_plan(waiting=self.expects_continue and not self.asked, eof=self.eof,
                                remaining=remaining, max_bytes=max_bytes, timeout=timeout)
        if plan is not guard.Drain.READ:
            return
        budget = self.consumed + max_bytes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not (self.eof or self.gone) and self.consumed <= budget:
                    await self.receive()


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


async def _send(send: Send, response: Response) -> None:
    status = int(response.status.split(" ", 1)[0])
    await send({"type": "http.response.start", "status": status, "headers": _encode(response.headers)})
    await send({"type": "http.response.body", "body": b"".join(response.body), "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Without an application: accept the server's startup and shutdown."""
    while True:
        message = await receive()
        kind = message.get("type")
        if kind == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif kind == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
