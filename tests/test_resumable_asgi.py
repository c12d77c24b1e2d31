"""The resumable endpoint on ASGI: what only an event loop shows (the protocol itself is tests/resumable_cases.py).

Fast tests drive :class:`uploadguard.resumable.asgi.ResumableUploads` in-process:
requests run concurrently on one loop, their bodies fed message by message
through a queue, so a stalled, dripping or vanished client is a test's own
doing.  The slow ones run real uvicorn and ``gunicorn -k asgi`` on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import logging
import select
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from uploadguard.config import Settings
from uploadguard.resumable import LocalStore, Upload, UploadLocked, UploadNotFound
from uploadguard.resumable.asgi import _FLUSH_AFTER, ResumableUploads
from uploadguard.resumable.locking import UploadLock

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"


@dataclasses.dataclass
class Answer:
    status: int | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    informational: list[tuple[int, dict[str, str]]] = dataclasses.field(default_factory=list)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class Request:
    """One request in flight: ``feed`` body messages to it; ``answer`` is what it was sent."""

    def __init__(self, app: Any, method: str, path: str, headers: dict[str, str], *,
                 extensions: dict[str, Any] | None = None, http_version: str = "1.1") -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.answer = Answer()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": http_version, "method": method,
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
        if extensions is not None:
            scope["extensions"] = extensions
        self.task = asyncio.ensure_future(app(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        return await self.queue.get()

    async def _send(self, message: dict[str, Any]) -> None:
        headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        if message["type"] == "http.response.informational":
            self.answer.informational.append((message["status"], headers))
        elif message["type"] == "http.response.start":
            self.answer.status, self.answer.headers = message["status"], headers
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            self.answer.done.set()

    def feed(self, body: bytes, *, more: bool = True) -> None:
        self.queue.put_nowait({"type": "http.request", "body": body, "more_body": more})

    def disconnect(self) -> None:
        self.queue.put_nowait({"type": "http.disconnect"})

    async def result(self) -> Answer:
        await asyncio.wait_for(self.task, 30)
        return self.answer


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_environ({}, temp_dir=tmp_path / "tmp", min_free_space=0)


def endpoint(tmp_path: Path, settings: Settings, **options: Any) -> ResumableUploads:
    options.setdefault("storage", tmp_path / "uploads")
    return ResumableUploads(max_size=10_000_000, settings=settings, **options)


async def create(app: ResumableUploads, length: int | None = 10) -> str:
    request = Request(app, "POST", "/files/", {**TUS, "Upload-Length": str(length)})
    request.feed(b"", more=False)
    answer = await request.result()
    assert answer.status == 201
    return answer.headers["location"]


def patched(app: ResumableUploads, url: str, body: bytes, offset: int = 0) -> Request:
    """A PATCH of ``body`` at ``offset``, sent whole: ``await .result()`` for its answer."""
    request = patch(app, url, offset, len(body))
    request.feed(body, more=False)
    return request


def asked(app: ResumableUploads, url: str) -> Request:
    """A HEAD of ``url``, sent: ``await .result()`` for its answer."""
    request = Request(app, "HEAD", url, TUS)
    request.feed(b"", more=False)
    return request


def patch(app: ResumableUploads, url: str, offset: int, length: int | None) -> Request:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS}
    if length is not None:
        headers["Content-Length"] = str(length)
    else:
        headers["Transfer-Encoding"] = "chunked"
    return Request(app, "PATCH", url, headers)


def stored(tmp_path: Path, url: str) -> bytes:
    return (tmp_path / "uploads" / (url.rsplit("/", 1)[1] + ".bin")).read_bytes()


class CountingPool(concurrent.futures.ThreadPoolExecutor):
    """The endpoint's pool, counting its trips (``submitted``)."""

    submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(*args, **kwargs)


def counting_pool(app: ResumableUploads) -> CountingPool:
    pool = app._pool = CountingPool(app.threads)
    return pool


async def stalled_patches(app: ResumableUploads, tmp_path: Path, urls: list[str]) -> list[Request]:
    """A PATCH of 10 bytes for each upload that sends 3 and nothing more; back once each has stored them."""
    requests = []
    for url in urls:
        request = patch(app, url, 0, 10)
        request.feed(b"abc")  # and nothing more
        requests.append(request)
    for url in urls:  # every PATCH holds its upload and has stored its bytes
        while not (tmp_path / "uploads" / (url.rsplit("/", 1)[1] + ".bin")).stat().st_size:
            await asyncio.sleep(0.05)
    return requests


class TestBody:
    def test_a_client_gone_mid_patch_keeps_every_byte_that_arrived(self, tmp_path: Path, settings: Settings,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
        """``http.disconnect`` mid-PATCH: the bytes before it are stored, nothing is answered, nothing is logged as an error."""
        app = endpoint(tmp_path, settings)

        async def test() -> None:
            url = await create(app, 10)
            request = patch(app, url, 0, 10)
            request.feed(b"abc")
            request.feed(b"def")
            request.disconnect()
            answer = await request.result()
            assert answer.status is None and stored(tmp_path, url) == b"abcdef"

        with caplog.at_level(logging.INFO, "uploadguard"):
            run(test)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    def test_a_silent_patch_is_preempted_by_a_head_and_keeps_its_bytes(self, tmp_path: Path,
                                                                        settings: Settings) -> None:
        """A HEAD for an upload whose PATCH went silent ends that PATCH: the HEAD answers the bytes it stored."""
        app = endpoint(tmp_path, settings, lock_timeout=10)

        async def test() -> None:
            url = await create(app, 10)
            stale = patch(app, url, 0, 10)
            stale.feed(b"abcd")
            while not (tmp_path / "uploads" / (url.rsplit("/", 1)[1] + ".bin")).stat().st_size:
                await asyncio.sleep(0.05)  # the bytes reach the store while the client is quiet
            head = asked(app, url)
            answer = await head.result()
            assert answer.status == 200 and answer.headers["upload-offset"] == "4"
            assert (await stale.result()).status == 204
            assert stored(tmp_path, url) == b"abcd"

        run(test)

    def test_a_drip_under_the_rate_floor_ends_and_keeps_its_bytes(self, tmp_path: Path, settings: Settings) -> None:
        """A PATCH bringing less than the floor per ``idle_timeout`` window ends with a 204 at the bytes it brought."""
        app = endpoint(tmp_path, settings, idle_timeout=0.5)

        async def test() -> None:
            url = await create(app, 1000)
            request = patch(app, url, 0, 1000)

            async def drip() -> None:
                while not request.task.done():
                    request.feed(b"x")
                    await asyncio.sleep(0.05)

            dripping = asyncio.ensure_future(drip())
            answer = await request.result()
            dripping.cancel()
            assert answer.status == 204
            kept = int(answer.headers["upload-offset"])
            assert 0 < kept < 1000 and stored(tmp_path, url) == b"x" * kept

        run(test)

    def test_an_http2_body_without_content_length_runs_to_the_end_of_its_stream(self, tmp_path: Path,
                                                                                 settings: Settings) -> None:
        """Over HTTP/2 a body needs no Content-Length: an IETF creation with the whole file in one is read to its end."""
        app = endpoint(tmp_path, settings)

        async def test() -> None:
            request = Request(app, "POST", "/files/", {"Upload-Draft-Interop-Version": "6", "Upload-Complete": "?1"},
                              http_version="2")
            request.feed(b"hel")
            request.feed(b"lo", more=False)
            answer = await request.result()
            assert answer.status == 201 and answer.headers["upload-offset"] == "5", answer
            assert answer.headers["upload-complete"] == "?1" and stored(tmp_path, answer.headers["location"]) == b"hello"

        run(test)

    def test_stalled_bodies_hold_no_thread(self, tmp_path: Path, settings: Settings) -> None:
        """Three times as many stalled PATCHes as the pool has threads: every one keeps its bytes, others are served."""
        app = endpoint(tmp_path, settings, threads=2)

        async def test() -> None:
            urls = [await create(app, 10) for _ in range(6)]
            stalled = await stalled_patches(app, tmp_path, urls)
            for url in urls:  # each HEAD preempts its PATCH: all of them read at once, on two threads
                head = asked(app, url)
                assert (await head.result()).headers["upload-offset"] == "3"
            assert [(await request.result()).status for request in stalled] == [204] * 6

        run(test)

    def test_bodies_read_at_once_share_one_pool_call_a_look(self, tmp_path: Path, settings: Settings,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """Ten slow PATCHes read at once: each look writes their quiet bytes in one pool call and asks their release requests in one."""
        asked = 0
        release_requested = UploadLock.release_requested

        def counted(lock: UploadLock) -> bool:
            nonlocal asked
            asked += 1
            return release_requested(lock)

        monkeypatch.setattr(UploadLock, "release_requested", counted)
        app = endpoint(tmp_path, settings)
        pool = counting_pool(app)

        async def test() -> None:
            urls = [await create(app, 10) for _ in range(10)]
            bodies = await stalled_patches(app, tmp_path, urls)
            asked_before, submitted_before = asked, pool.submitted
            for request in bodies:
                request.feed(b"def")  # and nothing more
            for url in urls:  # written by the looks
                while (tmp_path / "uploads" / (url.rsplit("/", 1)[1] + ".bin")).stat().st_size < 6:
                    await asyncio.sleep(0.05)
            while asked - asked_before < 10 * 5:  # five looks at each at least
                await asyncio.sleep(0.05)
            assert (pool.submitted - submitted_before) * 5 <= asked - asked_before, (pool.submitted, asked)
            for request in bodies:
                request.disconnect()
            for request in bodies:
                await request.result()

        run(test)
        pool.shutdown()

    def test_a_slow_body_is_written_in_pieces_of_a_second_not_one_a_message(self, tmp_path: Path,
                                                                            settings: Settings) -> None:
        """A body of small messages, 20 a second, is written at most once a second of its arrival, and whole."""
        writes = 0

        class CountingStore(LocalStore):
            def append(self, *args: Any, **kwargs: Any) -> Any:
                appender = super().append(*args, **kwargs)
                write = appender.write

                def counted(data: bytes) -> None:
                    nonlocal writes
                    writes += 1
                    write(data)

                appender.write = counted  # type: ignore[method-assign]
                return appender

        app = endpoint(tmp_path, settings, storage=CountingStore(tmp_path / "uploads"))
        messages = 60

        async def test() -> None:
            url = await create(app, 10 * messages)
            request = patch(app, url, 0, 10 * messages)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for n in range(messages):
                request.feed(b"%09d\n" % n, more=n < messages - 1)
                await asyncio.sleep(0.05)
            assert (await request.result()).status == 204
            elapsed = loop.time() - started
            assert writes <= elapsed / _FLUSH_AFTER + 1, (writes, elapsed)
            assert stored(tmp_path, url) == b"".join(b"%09d\n" % n for n in range(messages))

        run(test)

    def test_a_stuck_write_holds_back_no_later_look(self, tmp_path: Path, settings: Settings) -> None:
        """While the store is stuck writing one quiet body's bytes, another PATCH's bytes are written and a HEAD preempts it."""
        release, stuck = threading.Event(), threading.Event()
        stuck_ids: list[str] = []

        class StuckStore(LocalStore):
            def append(self, upload_id: str, *args: Any, **kwargs: Any) -> Any:
                appender = super().append(upload_id, *args, **kwargs)
                write = appender.write

                def stuck_write(data: bytes) -> None:
                    stuck.set()
                    assert release.wait(30), "never released"
                    write(data)

                if upload_id in stuck_ids:
                    appender.write = stuck_write  # type: ignore[method-assign]
                return appender

        app = endpoint(tmp_path, settings, storage=StuckStore(tmp_path / "uploads"))

        async def test() -> None:
            first = await create(app, 10)
            stuck_ids.append(first.rsplit("/", 1)[1])
            held = patch(app, first, 0, 10)
            held.feed(b"abc")  # and nothing more: the watcher writes it, and the write sticks
            while not stuck.is_set():
                await asyncio.sleep(0.05)
            other = await create(app, 10)
            quiet = patch(app, other, 0, 10)
            quiet.feed(b"xyz")  # and nothing more
            while not (tmp_path / "uploads" / (other.rsplit("/", 1)[1] + ".bin")).stat().st_size:
                await asyncio.sleep(0.05)  # written by a later look
            head = asked(app, other)
            answer = await head.result()
            assert answer.status == 200 and answer.headers["upload-offset"] == "3"
            assert (await quiet.result()).status == 204
            release.set()
            held.disconnect()
            await held.result()

        try:
            run(test)
        finally:
            release.set()

    def test_store_writes_leave_the_loop_free(self, tmp_path: Path, settings: Settings) -> None:
        """While the store is stuck writing a PATCH's bytes, another request is answered (the write is off the loop)."""
        release = threading.Event()

        class StuckStore(LocalStore):
            def append(self, *args: Any, **kwargs: Any) -> Any:
                appender = super().append(*args, **kwargs)
                write = appender.write

                def stuck(data: bytes) -> None:
                    assert release.wait(20), "the other request was never answered"
                    write(data)

                appender.write = stuck  # type: ignore[method-assign]
                return appender

        app = endpoint(tmp_path, settings, storage=StuckStore(tmp_path / "uploads"))

        async def test() -> None:
            url = await create(app, 3)
            writing = patch(app, url, 0, 3)
            writing.feed(b"abc", more=False)
            other = Request(app, "OPTIONS", "/files/", {})
            other.feed(b"", more=False)
            assert (await other.result()).status == 204
            release.set()
            assert (await writing.result()).status == 204

        run(test)

    @pytest.mark.parametrize("messages, writes", [
        pytest.param([64 * 1024] * 64, [1 << 20] * 4, id="64 KiB messages gathered to 1 MiB writes"),
        pytest.param([2 << 20, 1 << 20], [2 << 20, 1 << 20], id="messages of a MiB or more written as they came"),
    ])
    def test_a_fast_body_reaches_the_store_in_pieces_of_a_mib(self, tmp_path: Path, settings: Settings,
                                                              monkeypatch: pytest.MonkeyPatch, messages: list[int],
                                                              writes: list[int]) -> None:
        """A body that arrives fast is written in pieces of at least 1 MiB, one hop to the pool each, never copied to get there."""
        from uploadguard.resumable import asgi

        monkeypatch.setattr(asgi, "_POLL", 30.0)  # no watcher flush of a partial piece: the sizes are the writer's
        bodies = [bytes([i % 251]) * size for i, size in enumerate(messages)]
        written: list[bytes] = []

        class RecordingStore(LocalStore):
            def append(self, *args: Any, **kwargs: Any) -> Any:
                appender = super().append(*args, **kwargs)
                write = appender.write

                def recorded(data: bytes) -> None:
                    written.append(data)
                    write(data)

                appender.write = recorded  # type: ignore[method-assign]
                return appender

        app = endpoint(tmp_path, settings, storage=RecordingStore(tmp_path / "uploads"))

        async def test() -> None:
            url = await create(app, sum(messages))
            request = patch(app, url, 0, sum(messages))
            for i, body in enumerate(bodies):
                request.feed(body, more=i < len(bodies) - 1)
            assert (await request.result()).status == 204
            assert [len(data) for data in written] == writes
            if writes == messages:
                assert all(data is body for data, body in zip(written, bodies))
            assert stored(tmp_path, url) == b"".join(bodies)

        run(test)


class TestPoolSize:
    def test_a_local_directory_gets_two_threads_any_other_store_eight_and_an_explicit_size_stands(
            self, tmp_path: Path, settings: Settings) -> None:
        """Eight threads coming back from ``fsync`` at once took the GIL from the loop in a burst of new uploads
        (bench_capacity's ``asgi-pool8``); S3 calls wait on the network and need several under way at once."""
        from uploadguard.resumable.store import LocalStore

        class OtherStore:  # any store but a local directory: its calls may wait on a network
            def __init__(self, inner: LocalStore) -> None:
                self.inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

        local = endpoint(tmp_path, settings)
        assert local.threads == 2
        other = endpoint(tmp_path, settings, storage=OtherStore(LocalStore(tmp_path / "uploads")))
        assert other.threads == 8
        assert endpoint(tmp_path, settings, threads=5).threads == 5
        with pytest.raises(ValueError, match="at least 1"):
            endpoint(tmp_path, settings, threads=0)

        async def test() -> None:  # the pool is made of that many, and serves
            await create(local)
            await create(other)
        run(test)
        assert local._pool is not None and local._pool._max_workers == 2
        assert other._pool is not None and other._pool._max_workers == 8


class TestPoolTrips:
    def test_a_creation_and_a_head_are_one_trip_to_the_pool_a_patch_two_and_its_write_a_completing_one_three(
            self, tmp_path: Path, settings: Settings) -> None:
        """Each trip to the pool is a thread handoff and, on a busy host, a wait for the GIL: a burst of new
        uploads multiplies them (bench_capacity's arrival burst).  Lock, Admit and the append are fulfilled in
        the pool; only the body's reading and ``on_complete`` come back to the loop.  The application's code
        (plain ``on_complete`` and ``authorize``) runs in threads of neither the loop nor the store's pool."""
        hooked: list[str] = []
        hook_threads: list[tuple[str, str, int]] = []  # (hook, thread name, thread id)

        def on_complete(upload: Upload) -> None:
            hooked.append(upload.id)
            hook_threads.append(("on_complete", threading.current_thread().name, threading.get_ident()))

        def authorize(scope: dict[str, Any]) -> str:
            hook_threads.append(("authorize", threading.current_thread().name, threading.get_ident()))
            return "alice"

        app = endpoint(tmp_path, settings, on_complete=on_complete, authorize=authorize)
        pool = counting_pool(app)

        async def trips(method: str, url: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, int]:
            pool.submitted = 0
            request = Request(app, method, url, {**TUS, **headers})
            request.feed(body, more=False)
            answer = await request.result()
            assert answer.status is not None
            return answer.status, pool.submitted

        async def test() -> None:
            loop_thread = threading.get_ident()
            pool.submitted = 0
            url = await create(app, 10)
            assert pool.submitted == 1
            patching = {"Content-Type": OCTETS}
            assert await trips("PATCH", url, {**patching, "Upload-Offset": "0", "Content-Length": "4"}, b"abcd") \
                == (204, 3)  # up to the append; the body's one write; its commit to the answer
            assert await trips("HEAD", url, {}) == (200, 1)
            assert await trips("PATCH", url, {**patching, "Upload-Offset": "4", "Content-Length": "6"}, b"efghij") \
                == (204, 4)  # the last: the commit and fsync up to on_complete; its record to the answer
            assert hooked == [url.rsplit("/", 1)[1]]
            assert [hook for hook, _, _ in hook_threads].count("authorize") == 4  # each request's
            assert [(hook, name.split("_")[0]) for hook, name, _ in hook_threads if hook == "on_complete"] \
                == [("on_complete", "uploadguard-hook")]
            assert not any(name.startswith("uploadguard-resumable") or ident == loop_thread
                           for _, name, ident in hook_threads)
            assert stored(tmp_path, url) == b"abcdefghij"

        run(test)
        pool.shutdown()


class MessageAtTheCut(Request):
    """A PATCH whose client sends ``first``, then nothing -- until the reading is cancelled: ``at_cut`` arrives at
    that very moment.

    Python 3.11's ``asyncio.wait_for`` (inside gunicorn's ASGI ``receive``) then hands the message over and swallows
    the cancel: ``receive()`` returns it, as here.  ``waiting`` is set once ``first`` was taken; ``read_again`` if the
    body is asked for once more after that (a silent client would hold the request there).
    """

    def __init__(self, app: Any, url: str, length: int, first: bytes, at_cut: bytes) -> None:
        self.first, self.at_cut = first, at_cut
        self.waiting, self.read_again = asyncio.Event(), asyncio.Event()
        self.swallowed = False
        super().__init__(app, "PATCH", url, {**TUS, "Upload-Offset": "0", "Content-Type": OCTETS,
                                             "Content-Length": str(length)})

    async def _receive(self) -> dict[str, Any]:
        if self.first:
            body, self.first = self.first, b""
            return {"type": "http.request", "body": body, "more_body": True}
        if self.swallowed:
            self.read_again.set()
        self.waiting.set()
        try:
            await asyncio.get_running_loop().create_future()  # the client is silent
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed = True
        return {"type": "http.request", "body": self.at_cut, "more_body": True}


class TestCut:
    def test_a_cut_that_meets_a_message_keeps_it_and_ends_the_patch(self, tmp_path: Path, settings: Settings) -> None:
        """A PATCH preempted at the moment its next message arrives (the server's receive returns the message and
        swallows the cancel) keeps that message and ends at once, without asking a silent client for more."""
        app = endpoint(tmp_path, settings, lock_timeout=30)

        async def test() -> None:
            url = await create(app, 10)
            stale = MessageAtTheCut(app, url, 10, b"abcd", b"ef")
            await stale.waiting.wait()  # the PATCH holds the upload and waits for more
            head = asked(app, url)  # asks the PATCH to let go: the watcher cuts its reading
            read_again = asyncio.ensure_future(stale.read_again.wait())
            await asyncio.wait((stale.task, read_again), return_when=asyncio.FIRST_COMPLETED)
            assert not read_again.done(), "the PATCH asked its silent client for more after the cut"
            read_again.cancel()
            assert stale.swallowed
            answer = await stale.result()
            assert answer.status == 204 and answer.headers["upload-offset"] == "6"
            assert (await head.result()).headers["upload-offset"] == "6"
            assert stored(tmp_path, url) == b"abcdef"

        run(test)


class TestHooks:
    def test_coroutine_hooks_are_awaited(self, tmp_path: Path, settings: Settings) -> None:
        """``authorize`` and ``on_complete`` may be coroutine functions: the owner is theirs, the hook runs once."""
        completed: list[tuple[str | None, int]] = []

        async def authorize(scope: dict[str, Any]) -> str:
            return "alice"

        async def on_complete(upload: Upload) -> None:
            completed.append((upload.owner, upload.length))

        app = endpoint(tmp_path, settings, authorize=authorize, on_complete=on_complete)

        async def test() -> None:
            url = await create(app, 3)
            request = patched(app, url, b"abc")
            assert (await request.result()).status == 204
            head = asked(app, url)
            assert (await head.result()).status == 200

        run(test)
        assert completed == [("alice", 3)]


    def test_a_plain_on_complete_that_raises_is_a_500_and_runs_again_on_the_next_request(
            self, tmp_path: Path, settings: Settings) -> None:
        """The upload is complete but not handed over: the client's retry (HEAD, or the last PATCH again) runs it
        again, until it succeeds -- once."""
        calls: list[str] = []

        def on_complete(upload: Upload) -> None:
            calls.append(upload.id)
            if len(calls) == 1:
                raise RuntimeError("the hook failed")

        app = endpoint(tmp_path, settings, on_complete=on_complete)

        async def test() -> None:
            url = await create(app, 3)
            request = patched(app, url, b"abc")
            assert (await request.result()).status == 500
            for _ in range(2):  # the first runs the hook again; the second finds it done
                head = asked(app, url)
                answer = await head.result()
                assert (answer.status, answer.headers["upload-offset"]) == (200, "3")

        run(test)
        assert len(calls) == 2 and calls[0] == calls[1]

    def test_a_plain_on_complete_returning_an_awaitable_is_awaited(self, tmp_path: Path,
                                                                   settings: Settings) -> None:
        """A plain function may hand back a coroutine (a wrapper around an async hook): it runs on the loop."""
        awaited: list[str] = []

        async def later(upload_id: str) -> None:
            awaited.append(upload_id)

        app = endpoint(tmp_path, settings, on_complete=lambda upload: later(upload.id))

        async def test() -> None:
            url = await create(app, 3)
            request = patched(app, url, b"abc")
            assert (await request.result()).status == 204
            assert awaited == [url.rsplit("/", 1)[1]]

        run(test)

    def test_a_slow_plain_on_complete_holds_up_no_other_request(self, tmp_path: Path, settings: Settings) -> None:
        """``on_complete`` has a pool of its own: while one takes its time, a creation (with a plain
        ``authorize``, in the loop's default executor, here of one thread) and a HEAD are answered."""
        started, release = threading.Event(), threading.Event()

        def on_complete(upload: Upload) -> None:
            started.set()
            assert release.wait(20)

        app = endpoint(tmp_path, settings, on_complete=on_complete, authorize=lambda scope: "alice")

        async def test() -> None:
            asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
            url = await create(app, 3)
            request = patched(app, url, b"abc")
            while not started.is_set():
                await asyncio.sleep(0.01)
            try:
                other = await asyncio.wait_for(create(app, 5), 10)
                head = asked(app, other)
                assert (await asyncio.wait_for(head.result(), 10)).status == 200
                assert not request.task.done()
            finally:
                release.set()
            assert (await request.result()).status == 204

        run(test)

    def test_plain_hooks_see_the_request_s_context_variables(self, tmp_path: Path, settings: Settings) -> None:
        """What a middleware ahead of the endpoint set for the request (a request id for the logs, a tenant) is
        what a plain ``authorize`` and ``on_complete`` see, as in a coroutine hook."""
        tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="unset")
        seen: list[tuple[str, str]] = []

        def authorize(scope: dict[str, Any]) -> str:
            seen.append(("authorize", tenant.get()))
            return "alice"

        def on_complete(upload: Upload) -> None:
            seen.append(("on_complete", tenant.get()))

        app = endpoint(tmp_path, settings, authorize=authorize, on_complete=on_complete)

        async def test() -> None:
            tenant.set("acme")  # the requests' tasks start from this context
            url = await create(app, 3)
            assert (await patched(app, url, b"abc").result()).status == 204

        run(test)
        assert seen == [("authorize", "acme"), ("authorize", "acme"), ("on_complete", "acme")]

    def test_eight_plain_on_complete_calls_run_at_once(self, tmp_path: Path, settings: Settings) -> None:
        """Completions are rare, but a burst of them (a class uploading the same assignment) may each take a
        while: eight run side by side, as in the one pool they shared with the store before."""
        together = threading.Barrier(8, timeout=10)  # broken -- and the hook fails, a 500 -- unless all 8 meet

        def on_complete(upload: Upload) -> None:
            together.wait()

        app = endpoint(tmp_path, settings, on_complete=on_complete)

        async def test() -> None:
            urls = [await create(app, 3) for _ in range(8)]
            answers = await asyncio.gather(*(patched(app, url, b"abc").result() for url in urls))
            assert [answer.status for answer in answers] == [204] * 8

        run(test)

    def test_a_request_cancelled_by_the_server_still_runs_on_complete_once(self, tmp_path: Path,
                                                                         settings: Settings) -> None:
        """The server cancels a request whose client left while ``on_complete`` runs: it runs once, and counts."""
        started, release = threading.Event(), threading.Event()
        calls: list[str] = []

        def on_complete(upload: Upload) -> None:
            calls.append(upload.id)
            started.set()
            assert release.wait(20)

        app = endpoint(tmp_path, settings, on_complete=on_complete, lock_timeout=20)

        async def test() -> None:
            url = await create(app, 3)
            request = patched(app, url, b"abc")
            while not started.is_set():
                await asyncio.sleep(0.01)
            request.task.cancel()  # as gunicorn's ASGI worker does a few seconds after a disconnect
            release.set()
            head = asked(app, url)
            assert (await head.result()).headers["upload-offset"] == "3"

        run(test)
        assert len(calls) == 1

class Recorded:
    """An appender whose ``write``, ``commit`` and ``abort`` are noted; ``after_write`` runs in the pool after each write."""

    def __init__(self, appender: Any, calls: list[str], after_write: Callable[[], None]) -> None:
        self._appender, self._calls, self._after_write = appender, calls, after_write

    def write(self, data: bytes) -> None:
        self._appender.write(data)
        self._calls.append("write")
        self._after_write()

    def commit(self) -> int:
        self._calls.append("commit")
        return int(self._appender.commit())

    def abort(self) -> None:
        self._calls.append("abort")
        self._appender.abort()


class TestLoopClosing:
    def test_a_commit_still_queued_for_the_pool_is_aborted_when_the_loop_closes(self, tmp_path: Path,
                                                                                settings: Settings) -> None:
        """The loop closes (the server stopping) while a body's commit waits for a pool thread: the commit never
        runs, and the appender is aborted -- its descriptors closed, nothing left half-done."""
        calls: list[str] = []
        running, release = threading.Event(), threading.Event()
        app: ResumableUploads

        def hold() -> None:
            running.set()
            release.wait(30)

        def occupy_the_pool() -> None:  # queued right behind the write, so before the commit
            app._executor().submit(hold)

        class Store(LocalStore):
            def append(self, *args: Any, **kwargs: Any) -> Any:
                return Recorded(super().append(*args, **kwargs), calls, occupy_the_pool)

        app = endpoint(tmp_path, settings, storage=Store(tmp_path / "uploads"), threads=1)

        async def test() -> None:
            url = await create(app, 10)
            request = patch(app, url, 0, 4)
            request.feed(b"abcd", more=False)
            while not running.is_set():
                await asyncio.sleep(0.01)
            while not app._executor()._work_queue.qsize():  # the commit's trip, queued behind the pool's one thread
                await asyncio.sleep(0.01)
            # returning leaves the request running: asyncio.run cancels it, as a closing loop does

        run(test)
        release.set()
        app._executor().shutdown(wait=True)
        assert calls == ["write", "abort"]


class BlockingGet(LocalStore):
    """A store whose ``get`` waits until the test lets it go: on the loop's thread it would wait forever."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.go = threading.Event()
        self.blocking = False
        self.threads: list[str] = []

    def get(self, upload_id: str) -> Any:
        if self.blocking:
            self.threads.append(threading.current_thread().name)
            assert self.go.wait(30), "get() blocked the loop that was to let it go"
        return super().get(upload_id)


class TestFromCoroutines:
    def test_aget_runs_the_store_off_the_loop(self, tmp_path: Path, settings: Settings) -> None:
        """``aget`` gives the completed upload as ``get`` does, its store calls in the endpoint's pool: the loop
        stays free to serve while a store call waits (on the loop, this test would wait 30 s and fail)."""
        store = BlockingGet(tmp_path / "uploads")
        app = endpoint(tmp_path, settings, storage=store)

        async def test() -> None:
            url = await create(app, 3)
            request = patched(app, url, b"abc")
            assert (await request.result()).status == 204
            store.blocking = True
            task = asyncio.ensure_future(app.aget(url))
            while not store.threads:
                await asyncio.sleep(0.01)  # the loop runs: the get waits in another thread
            store.go.set()
            upload = await task
            with upload.open() as data:
                assert upload.length == 3 and data.read() == b"abc"
            assert all(name.startswith("uploadguard-resumable") for name in store.threads)
            with pytest.raises(UploadNotFound):
                await app.aget(url[:-1] + ("A" if url[-1] != "A" else "B"))

        run(test)

    def test_adelete_waits_for_a_held_upload_on_the_loop_then_removes_it(self, tmp_path: Path,
                                                                        settings: Settings) -> None:
        """``adelete`` of an upload a request holds waits (asking it to let go) without taking a pool thread,
        then removes it; past ``lock_timeout`` it is ``UploadLocked``."""
        app = endpoint(tmp_path, settings, threads=1, lock_timeout=30)

        async def test() -> None:
            url = await create(app, 3)
            request = patched(app, url, b"abc")
            assert (await request.result()).status == 204
            upload_id = url.rsplit("/", 1)[1]
            held = app.locker.try_acquire(upload_id)
            assert held is not None
            deleting = asyncio.ensure_future(app.adelete(url))
            while not (tmp_path / "uploads" / f"{upload_id}.release").exists():
                await asyncio.sleep(0.01)  # it asked the holder to let go
            assert (await app.aget(url)).length == 3  # the pool's one thread is free meanwhile
            assert not deleting.done()
            held.release()
            await deleting
            with pytest.raises(UploadNotFound):
                await app.aget(url)
            assert not (tmp_path / "uploads" / f"{upload_id}.bin").exists()

            url = await create(app, 0)
            quick = endpoint(tmp_path, settings, lock_timeout=0.1)
            held = quick.locker.try_acquire(url.rsplit("/", 1)[1])
            assert held is not None
            with pytest.raises(UploadLocked):
                await quick.adelete(url)
            held.release()

        run(test)


class TestInterim:
    def ietf_creation(self, app: ResumableUploads, extensions: dict[str, Any] | None) -> Answer:
        answers: list[Answer] = []

        async def test() -> None:
            request = Request(app, "POST", "/files/", {"Upload-Draft-Interop-Version": "6", "Upload-Complete": "?1",
                                                      "Transfer-Encoding": "chunked"}, extensions=extensions)
            request.feed(b"hel")
            while not request.answer.informational and extensions is not None:
                await asyncio.sleep(0.01)  # the 104 comes before the rest of the body is sent
            request.feed(b"lo", more=False)
            answers.append(await request.result())

        run(test)
        return answers[0]

    def test_104_with_location_where_the_server_takes_interim_responses(self, tmp_path: Path,
                                                                        settings: Settings) -> None:
        """A creation in an IETF interop version gets 104 with the Location before its body is read."""
        answer = self.ietf_creation(endpoint(tmp_path, settings), {"http.response.informational": {}})
        assert answer.status == 201
        [(status, headers)] = answer.informational
        assert status == 104 and headers["location"] == answer.headers["location"]
        assert headers["upload-draft-interop-version"] == "6"

    def test_no_104_where_the_server_does_not_take_it(self, tmp_path: Path, settings: Settings) -> None:
        """Without the server's word (uvicorn), no interim response is sent and the creation works."""
        answer = self.ietf_creation(endpoint(tmp_path, settings), None)
        assert answer.status == 201 and answer.informational == []

    def test_gunicorns_asgi_worker_is_known_by_the_pool_not_by_imports(self, tmp_path: Path, settings: Settings,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        """gunicorn's ASGI worker takes a 104 without advertising it: the endpoint knows it from the pool the
        hooks noted -- a process that merely imported gunicorn's ASGI modules (this one) sends none."""
        import gunicorn.asgi.protocol  # noqa: F401  (what a guess from sys.modules would have taken for the server)

        from uploadguard import config

        assert self.ietf_creation(endpoint(tmp_path, settings), None).informational == []
        monkeypatch.setattr(config, "_server_pool", config.ServerPool(workers=2, threads=1, worker_class="asgi"))
        answer = self.ietf_creation(endpoint(tmp_path, settings), {})
        assert [status for status, _ in answer.informational] == [104]


class TestRouting:
    def test_other_paths_and_scopes_go_to_the_app(self, tmp_path: Path, settings: Settings) -> None:
        """Requests outside the prefix, and lifespan scopes, reach the wrapped application."""
        seen: list[tuple[str, str]] = []

        async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
            seen.append((scope["type"], scope.get("path", "")))
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"app"})

        app = endpoint(tmp_path, settings)
        app.app = inner

        async def test() -> None:
            request = Request(app, "GET", "/elsewhere", {})
            assert (await request.result()).status == 200
            await app({"type": "lifespan"}, None, None)  # type: ignore[arg-type]

        run(test)
        assert seen == [("http", "/elsewhere"), ("lifespan", "")]

    def test_without_an_app_other_paths_are_404(self, tmp_path: Path, settings: Settings) -> None:
        """With no application, a path outside the prefix is 404."""
        app = endpoint(tmp_path, settings)

        async def test() -> None:
            request = Request(app, "GET", "/elsewhere", {})
            assert (await request.result()).status == 404

        run(test)

    def test_a_small_temp_dir_does_not_refuse_a_patch_the_storage_holds(self, tmp_path: Path) -> None:
        """Behind the ASGI guard, a 1 MiB tmpfs temp dir still takes a 3 MiB PATCH (it goes to the storage),
        while a body the app may spool there still needs the room."""
        import os

        from tests.support import tmpfs
        from tests.test_asgi import call
        from uploadguard.asgi import UploadGuard

        with tmpfs(tmp_path / "tmp", size="1m") as temp:
            settings = Settings.from_environ({}, temp_dir=temp, min_free_space=0)
            guarded = UploadGuard(ResumableUploads(storage=tmp_path / "uploads", settings=settings), settings=settings)
            data = os.urandom(3 * MiB)
            created = call(guarded, method="POST", path="/files/", headers={**TUS, "Upload-Length": str(len(data))})
            url = created.headers["location"]
            patched = call(guarded, method="PATCH", path=url, chunks=[data],
                           headers={**TUS, "Upload-Offset": "0", "Content-Type": OCTETS})
            form = call(guarded, method="POST", path=url, chunks=[data],
                        headers={**TUS, "Content-Type": "multipart/form-data; boundary=x"})
        assert patched.status == 204 and stored(tmp_path, url) == data
        assert form.status == 503

    def test_storage_trouble_is_503_with_retry_after(self, tmp_path: Path, settings: Settings) -> None:
        """A storage directory that is a file: a creation gets 503 + Retry-After."""
        (tmp_path / "uploads").write_text("not a directory")
        app = endpoint(tmp_path, settings)

        async def test() -> None:
            request = Request(app, "POST", "/files/", {**TUS, "Upload-Length": "3"})
            request.feed(b"", more=False)
            answer = await request.result()
            assert answer.status == 503 and answer.headers["retry-after"] == str(settings.retry_after)

        run(test)


# -- real servers ---------------------------------------------------------------------------------------

MiB = 1024 * 1024


class Served:
    """``tests.resumable_asgi_apps:<app>`` under uvicorn or ``gunicorn -c gunicorn_conf.py -k asgi``."""

    def __init__(self, kind: str, tmp_path: Path, app: str = "application", **env: str) -> None:
        from tests.support import GUNICORN_CONF, Gunicorn
        from tests.test_asgi import Uvicorn

        self.kind = kind
        self.storage = tmp_path / "uploads"
        self.records = tmp_path / "records"
        self.temp = tmp_path / "tmp"
        full_env = {"UPLOADGUARD_TEMP_DIR": str(self.temp), "UPLOADGUARD_MIN_FREE_SPACE": "0",
                    "UPLOADGUARD_RETRY_AFTER": "1", "TEST_RESUMABLE_STORAGE": str(self.storage),
                    "TEST_RECORDS": str(self.records), "PYTHONPATH": str(Path(__file__).parent), **env}
        if kind == "uvicorn":
            self.server: Any = Uvicorn(f"resumable_asgi_apps:{app}", tmp_path=tmp_path, env=full_env)
        else:
            self.server = Gunicorn(f"resumable_asgi_apps:{app}", tmp_path=tmp_path, config=GUNICORN_CONF,
                                   args=["-k", "asgi", "--log-level", "info"], env=full_env)
        self.port = self.server.port
        self.endpoint = f"http://127.0.0.1:{self.port}/files/"

    def log(self) -> str:
        return str(self.server.log())

    def record(self, url: str) -> dict[str, Any] | None:
        import json

        path = self.records / f"{url.rstrip('/').rsplit('/', 1)[-1]}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def data(self, url: str) -> bytes:
        return (self.storage / (url.rstrip("/").rsplit("/", 1)[-1] + ".bin")).read_bytes()


@pytest.fixture(params=["uvicorn", "gunicorn"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    started: list[Served] = []

    def start(app: str = "application", **env: str) -> Served:
        served = Served(request.param, tmp_path, app, **env)
        started.append(served)
        return served

    yield start
    for served in started:
        served.server.stop()


def _http(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict[str, str]]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def _open_patch(port: int, url: str, offset: int, length: int, first: bytes) -> Any:
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall((f"PATCH {url} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
                  f"Content-Type: {OCTETS}\r\nContent-Length: {length}\r\n\r\n").encode() + first)
    return sock


def _wait_for_size(path: Path, size: int) -> None:
    import time

    deadline = time.monotonic() + 30
    while not (path.exists() and path.stat().st_size >= size):
        assert time.monotonic() < deadline, f"{path} never reached {size} bytes"
        time.sleep(0.05)


@pytest.mark.slow
def ietf_creation_of_five_bytes(port: int, kind: str, head: str = "") -> bytes:
    """A raw IETF-draft creation with a 5-byte body, sent in two parts: under gunicorn (``kind``) the first
    part must bring a 104 with the Location before the rest is sent; under uvicorn none comes.  What the
    server answered after the whole body, up to its 201 head.  ``head``: more header lines (``Name: value\\r\\n``)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /files/ HTTP/1.1\r\nHost: x\r\n{head}Upload-Draft-Interop-Version: 6\r\n"
                     "Upload-Complete: ?1\r\nContent-Length: 5\r\n\r\nhel".encode())
        if kind == "gunicorn":
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += sock.recv(4096)  # before the rest of the body is sent
            assert interim.startswith(b"HTTP/1.1 104 ") and b"location: /files/" in interim.lower()
        sock.sendall(b"lo")
        raw = b""
        while b"201 Created" not in raw or not raw.endswith(b"\r\n\r\n"):
            chunk = sock.recv(4096)
            assert chunk, raw
            raw += chunk
    if kind == "uvicorn":
        assert b" 104 " not in raw
    return raw


class TestServers:
    def test_tuspy_upload_is_byte_identical(self, serve: Any) -> None:
        """tuspy uploads 8 MiB in 1 MiB chunks; what is stored and what on_complete read are the file."""
        import hashlib
        import io
        import os

        from tusclient import client as tus_client

        served = serve()
        data = os.urandom(8 * MiB)
        uploader = tus_client.TusClient(served.endpoint).uploader(file_stream=io.BytesIO(data), chunk_size=MiB)
        uploader.upload()
        assert served.data(uploader.url) == data
        record = served.record(uploader.url)
        assert record is not None and record["sha256"] == hashlib.sha256(data).hexdigest()

    @pytest.mark.parametrize("protocol", ["tus-v1", "ietf-draft-03", "ietf-draft-05"])
    def test_tus_js_client(self, serve: Any, tmp_path: Path, protocol: str) -> None:
        """tus-js-client uploads 3 MiB in 1 MiB chunks in tus 1.0 and both IETF modes; on_complete saw the file."""
        from tests.test_interop_js import NODE, JS, blob, run_client

        if NODE is None or not (JS / "node_modules" / "tus-js-client").is_dir():
            pytest.skip("needs node and tests/js/node_modules (npm ci --prefix tests/js)")
        served = serve()
        path, digest = blob(tmp_path, 3 * MiB)
        events = run_client(endpoint=served.endpoint, file=str(path), chunkSize=MiB, protocol=protocol)
        assert events[-1]["event"] == "success", events[-5:]
        record = served.record(events[-1]["url"])
        assert record is not None and record["sha256"] == digest

    def test_104_under_gunicorn_and_none_under_uvicorn(self, serve: Any) -> None:
        """A raw IETF creation: gunicorn -k asgi sends 104 with the Location before the body; uvicorn sends none."""
        served = serve()
        raw = ietf_creation_of_five_bytes(served.port, served.kind)
        final = raw[raw.index(b"HTTP/1.1 201"):].decode().lower()
        assert "upload-complete: ?1" in final

    def test_a_silent_patch_is_preempted_by_a_head(self, serve: Any) -> None:
        """A PATCH whose client went silent holds the upload until a HEAD asks for it: the HEAD gets its offset."""
        served = serve()
        status, headers = _http(served.port, "POST", "/files/", {**TUS, "Upload-Length": str(MiB)})
        url = headers["location"]
        with _open_patch(served.port, url, 0, MiB, b"a" * 1000):
            _wait_for_size(served.storage / (url.rsplit("/", 1)[1] + ".bin"), 1000)
            status, headers = _http(served.port, "HEAD", url, TUS)
            assert status == 200 and headers["upload-offset"] == "1000"

    def test_a_drip_patch_is_ended_by_the_rate_floor_and_keeps_its_bytes(self, serve: Any) -> None:
        """A PATCH dripping a byte at a time under the rate floor is answered 204 with what it brought."""
        served = serve(TEST_IDLE_TIMEOUT="1")
        status, headers = _http(served.port, "POST", "/files/", {**TUS, "Upload-Length": "1000"})
        url = headers["location"]
        with _open_patch(served.port, url, 0, 1000, b"x") as sock:
            raw = b""
            for _ in range(300):  # at most 30 s of dripping
                # Read whenever the answer is there, send only when it is not: a byte sent after the
                # server answered and closed draws a reset, which would discard the unread answer.
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable:
                    chunk = sock.recv(4096)
                    raw += chunk
                    if not chunk or b"\r\n\r\n" in raw:
                        break
                    continue
                with contextlib.suppress(OSError):
                    sock.sendall(b"x")
        assert raw.startswith(b"HTTP/1.1 204"), (raw, served.log()[-3000:])
        status, headers = _http(served.port, "HEAD", url, TUS)
        kept = int(headers["upload-offset"])
        assert 0 < kept < 1000 and served.data(url) == b"x" * kept

    def test_a_client_gone_mid_patch_keeps_its_bytes_without_a_traceback(self, serve: Any) -> None:
        """A client that closes mid-PATCH: the bytes that arrived are stored, the server log has no traceback."""
        served = serve()
        status, headers = _http(served.port, "POST", "/files/", {**TUS, "Upload-Length": str(MiB)})
        url = headers["location"]
        path = served.storage / (url.rsplit("/", 1)[1] + ".bin")
        with _open_patch(served.port, url, 0, MiB, b"b" * 5000):
            _wait_for_size(path, 5000)
        status, headers = _http(served.port, "HEAD", url, TUS)
        assert headers["upload-offset"] == "5000" and served.data(url) == b"b" * 5000
        assert "Traceback" not in served.log()
        assert [p for p in served.temp.rglob("*") if p.is_file()] == []  # nothing left in the temp dir

    def test_a_refused_patch_is_answered_after_its_body(self, serve: Any) -> None:
        """A PATCH at a wrong offset with a 4 MiB body: the client, which reads only once it has sent, reads the 409."""
        from tests.support import raw_http

        served = serve()
        status, headers = _http(served.port, "POST", "/files/", {**TUS, "Upload-Length": str(8 * MiB)})
        url = headers["location"]
        body = b"z" * (4 * MiB)
        head = (f"PATCH {url} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 5\r\n"
                f"Content-Type: {OCTETS}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        raw, error = raw_http(served.port, head, body=body, timeout=30)
        assert error is None and raw.startswith(b"HTTP/1.1 409 "), (error, raw[:200])
        assert _http(served.port, "HEAD", url, TUS)[1]["upload-offset"] == "0"

    def test_broken_storage_is_503_with_retry_after(self, serve: Any, tmp_path: Path) -> None:
        """The storage directory replaced by a file: a creation is 503 + Retry-After."""
        served = serve()
        served.storage.mkdir(exist_ok=True)
        served.storage.rmdir()
        served.storage.write_text("not a directory")
        status, headers = _http(served.port, "POST", "/files/", {**TUS, "Upload-Length": "3"})
        assert status == 503 and headers["retry-after"] == "1"

    def test_django_asgi_behind_the_endpoint(self, serve: Any) -> None:
        """Django's ASGI handler wrapped by the endpoint: tuspy uploads under /files/, Django answers the rest."""
        import io
        import os

        from tusclient import client as tus_client

        served = serve("django_app")
        data = os.urandom(3 * MiB)
        uploader = tus_client.TusClient(served.endpoint).uploader(file_stream=io.BytesIO(data), chunk_size=MiB)
        uploader.upload()
        assert served.data(uploader.url) == data and served.record(uploader.url) is not None
        assert _http(served.port, "GET", "/form/", {})[0] == 200

    def test_fastapi_mount(self, serve: Any) -> None:
        """Mounted in FastAPI at /files: creation answers a Location under /files/, PATCH and HEAD work there."""
        served = serve("fastapi_app")
        status, headers = _http(served.port, "POST", "/files/", {**TUS, "Upload-Length": "3"})
        assert status == 201 and headers["location"].startswith("/files/")
        url = headers["location"]
        status, headers = _http(served.port, "PATCH", url, {**TUS, "Upload-Offset": "0", "Content-Type": OCTETS}, b"abc")
        assert status == 204 and headers["upload-offset"] == "3" and served.data(url) == b"abc"
        assert _http(served.port, "GET", "/", {})[0] == 200


@pytest.mark.slow
def test_one_upload_started_on_wsgi_is_finished_on_asgi(tmp_path: Path) -> None:
    """The same storage behind WSGI gunicorn and ASGI gunicorn: a PATCH on one, the rest on the other."""
    from tests.support import GUNICORN_CONF, Gunicorn

    env = {"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"), "TEST_RESUMABLE_STORAGE": str(tmp_path / "uploads"),
           "TEST_RECORDS": str(tmp_path / "records")}
    wsgi = Gunicorn("resumable_client_apps:application", tmp_path=tmp_path, config=GUNICORN_CONF, env=env)
    try:
        asgi = Served("gunicorn", tmp_path)
        try:
            status, headers = _http(wsgi.port, "POST", "/files/", {**TUS, "Upload-Length": "6"})
            url = headers["location"]
            assert _http(wsgi.port, "PATCH", url, {**TUS, "Upload-Offset": "0", "Content-Type": OCTETS}, b"abc")[0] == 204
            status, headers = _http(asgi.port, "HEAD", url, TUS)
            assert status == 200 and headers["upload-offset"] == "3"
            status, headers = _http(asgi.port, "PATCH", url, {**TUS, "Upload-Offset": "3", "Content-Type": OCTETS},
                                    b"def")
            assert status == 204 and headers["upload-offset"] == "6"
            assert asgi.data(url) == b"abcdef" and asgi.record(url) is not None
        finally:
            asgi.server.stop()
    finally:
        wsgi.stop()


@pytest.mark.slow
def test_the_readme_block_runs_as_written(tmp_path: Path) -> None:
    """The README's FastAPI block, saved as app.py under uvicorn, takes a tuspy upload; on_complete moves it intact."""
    import io
    import os
    import re

    from tusclient import client as tus_client

    import signal
    import subprocess
    import sys

    from tests.support import free_port, wait_for_port

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Resumable uploads on ASGI"):]
    block = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert block is not None
    work = tmp_path / "work"
    work.mkdir()
    (work / "app.py").write_text(block.group(1))
    port = free_port()
    log_path = tmp_path / "uvicorn.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
                                   "app:app"], stdout=log_file, stderr=subprocess.STDOUT, cwd=str(work),
                                  env={**os.environ, "UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp")},
                                  start_new_session=True)
        try:
            wait_for_port(port, proc=server)
            data = os.urandom(3 * MiB + 17)
            uploader = tus_client.TusClient(f"http://127.0.0.1:{port}/files/").uploader(
                file_stream=io.BytesIO(data), chunk_size=MiB)
            uploader.upload()
            assert (work / "media" / uploader.url.rsplit("/", 1)[1]).read_bytes() == data
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


@pytest.mark.slow
class TestS3:
    def test_an_upload_to_s3_in_pieces_survives_a_vanished_client(self, seaweed: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        """Over S3: 6 MiB arrive in 64 KiB pieces, the client vanishes; the resumed PATCH completes the upload intact."""
        import hashlib
        import os

        for name, value in seaweed.env().items():
            monkeypatch.setenv(name, value)
        settings = Settings.from_environ({}, temp_dir=tmp_path / "tmp", min_free_space=0)
        seen: list[str] = []

        def on_complete(upload: Upload) -> None:
            with upload.open() as data:
                seen.append(hashlib.sha256(data.read()).hexdigest())

        app = ResumableUploads(storage=f"s3://{seaweed.new_bucket()}/uploads", settings=settings,
                               max_size=100 * MiB, on_complete=on_complete)
        data = os.urandom(10 * MiB)
        piece = 64 * 1024

        async def test() -> None:
            url = await create(app, len(data))
            first = patch(app, url, 0, len(data))
            for start in range(0, 6 * MiB, piece):
                first.feed(data[start:start + piece])
            first.disconnect()
            assert (await first.result()).status is None
            head = asked(app, url)
            offset = int((await head.result()).headers["upload-offset"])
            assert offset == 6 * MiB
            rest = patch(app, url, offset, len(data) - offset)
            for start in range(offset, len(data), piece):
                rest.feed(data[start:start + piece], more=start + piece < len(data))
            answer = await rest.result()
            assert answer.status == 204 and answer.headers["upload-offset"] == str(len(data))

        run(test)
        assert seen == [hashlib.sha256(data).hexdigest()]
