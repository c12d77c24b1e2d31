"""gunicorn_conf.py and uploadguard.gunicorn: production settings, and hooks that keep the server up.

The real-process tests pin what gunicorn 27 does without the configuration
(a deleted ``TMPDIR`` or ``worker_tmp_dir`` makes the master exit on the next
recycle or at startup; ``100 Continue`` is sent for any body) and show the
configuration defeating it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import json
import logging
import os
import re
import runpy
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
from gunicorn.config import KNOWN_SETTINGS, Config
from gunicorn.http.parser import RequestParser

import uploadguard
from tests.support import GUNICORN_CONF, ROOT, TESTS, Gunicorn, raw_http
from uploadguard.config import ConfigError

MODULE = "uploadguard.gunicorn"
SETTING_NAMES = frozenset(setting.name for setting in KNOWN_SETTINGS)
#: Variables the configuration reads; cleared so the caller's environment cannot leak in.
ENV_NAMES = ("PORT", "WEB_CONCURRENCY", "GUNICORN_MAX_REQUESTS", "GUNICORN_MAX_REQUESTS_JITTER",
             "GUNICORN_TIMEOUT", "GUNICORN_GRACEFUL_TIMEOUT", "GUNICORN_CMD_ARGS")
HOOKS = ("on_starting", "nworkers_changed", "child_exit", "post_worker_init", "pre_request")


def public(namespace: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in namespace.items() if not name.startswith("_")}


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, Any]]:
    """Load the configuration afresh under a patched environment, as a gunicorn master does.

    ``load("file", **env)`` runs gunicorn_conf.py; ``load("module", **env)``
    imports uploadguard.gunicorn (what ``-c python:uploadguard.gunicorn`` reads).
    """
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)

    def load_(source: str = "file", **env: str) -> dict[str, Any]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delitem(sys.modules, MODULE, raising=False)
        monkeypatch.delattr(uploadguard, "gunicorn", raising=False)
        if source == "file":
            return public(runpy.run_path(str(GUNICORN_CONF)))
        return public(vars(importlib.import_module(MODULE)))

    return load_


class TestSettings:
    def test_production_defaults(self, load: Callable[..., dict[str, Any]]) -> None:
        """Without environment the seed system's production values apply."""
        conf = load()
        assert {name: conf[name] for name in ("max_requests", "max_requests_jitter", "timeout", "graceful_timeout")} == {
            "max_requests": 500, "max_requests_jitter": 100, "timeout": 600, "graceful_timeout": 60}
        assert conf["bind"] == ["127.0.0.1:8000"]
        assert conf["accesslog"] == conf["errorlog"] == "-"

    def test_workers_default_to_twice_the_cpus_plus_one_capped(self, load: Callable[..., dict[str, Any]]) -> None:
        """Without WEB_CONCURRENCY there are 2 x usable CPUs + 1 workers, at most 8."""
        assert load()["workers"] == min(2 * len(os.sched_getaffinity(0)) + 1, 8)

    @pytest.mark.parametrize(("env", "name", "expected"), [
        pytest.param({"PORT": "8080"}, "bind", ["0.0.0.0:8080"], id="PORT"),
        pytest.param({"WEB_CONCURRENCY": "3"}, "workers", 3, id="WEB_CONCURRENCY"),
        pytest.param({"GUNICORN_MAX_REQUESTS": "1000"}, "max_requests", 1000, id="max_requests"),
        pytest.param({"GUNICORN_MAX_REQUESTS": "0"}, "max_requests", 0, id="max_requests-off"),
        pytest.param({"GUNICORN_MAX_REQUESTS_JITTER": "50"}, "max_requests_jitter", 50, id="jitter"),
        pytest.param({"GUNICORN_TIMEOUT": "120"}, "timeout", 120, id="timeout-seconds"),
        pytest.param({"GUNICORN_TIMEOUT": "5m"}, "timeout", 300, id="timeout-minutes"),
        pytest.param({"GUNICORN_TIMEOUT": " "}, "timeout", 600, id="timeout-blank-is-default"),
        pytest.param({"GUNICORN_GRACEFUL_TIMEOUT": "30"}, "graceful_timeout", 30, id="graceful_timeout"),
    ])
    def test_environment_overrides(self, load: Callable[..., dict[str, Any]], env: dict[str, str], name: str,
                                   expected: object) -> None:
        """Each setting has an environment variable; a blank one means the default."""
        assert load(**env)[name] == expected

    @pytest.mark.parametrize("env", [
        pytest.param({"PORT": "http"}, id="PORT-word"),
        pytest.param({"PORT": "70000"}, id="PORT-range"),
        pytest.param({"WEB_CONCURRENCY": "0"}, id="WEB_CONCURRENCY-zero"),
        pytest.param({"WEB_CONCURRENCY": "two"}, id="WEB_CONCURRENCY-word"),
        pytest.param({"GUNICORN_MAX_REQUESTS": "-1"}, id="max_requests-negative"),
        pytest.param({"GUNICORN_MAX_REQUESTS_JITTER": "1e3"}, id="jitter-float"),
        pytest.param({"GUNICORN_TIMEOUT": "soon"}, id="timeout-word"),
        pytest.param({"GUNICORN_TIMEOUT": "0.4"}, id="timeout-rounds-to-no-timeout"),
        pytest.param({"GUNICORN_TIMEOUT": "400000d"}, id="timeout-overflows-select"),
        pytest.param({"GUNICORN_GRACEFUL_TIMEOUT": "9" * 400}, id="graceful-timeout-400-digits"),
        pytest.param({"WEB_CONCURRENCY": "9" * 5000}, id="workers-5000-digits"),
    ])
    def test_bad_value_names_the_variable(self, load: Callable[..., dict[str, Any]], env: dict[str, str]) -> None:
        """A value that is not a usable number raises ConfigError naming the variable and the value."""
        [(name, value)] = env.items()
        with pytest.raises(ConfigError, match=f"^{name}={value!r}"):
            load(**env)

    @pytest.mark.skipif(not (os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)), reason="no writable /dev/shm")
    def test_worker_tmp_dir_on_dev_shm(self, load: Callable[..., dict[str, Any]]) -> None:
        """Heartbeat files go to the /dev/shm tmpfs, as gunicorn's FAQ advises."""
        assert load()["worker_tmp_dir"] == "/dev/shm"

    def test_worker_tmp_dir_fallback(self, tmp_path: Path) -> None:
        """Without a usable /dev/shm, heartbeat files go to a directory beside the default upload dir."""
        from uploadguard.gunicorn import _worker_tmp_dir

        chosen = _worker_tmp_dir({"XDG_CACHE_HOME": str(tmp_path)}, shm=str(tmp_path / "no-shm"))
        assert chosen == str(tmp_path / "uploadguard" / "gunicorn")
        assert not os.path.exists(chosen), "choosing creates nothing; the master's hooks do"

    def test_file_is_the_module(self, load: Callable[..., dict[str, Any]]) -> None:
        """gunicorn_conf.py and -c python:uploadguard.gunicorn set the same settings to the same values."""
        env = {"PORT": "8123", "GUNICORN_TIMEOUT": "90"}
        file, module = load("file", **env), load("module", **env)
        assert file.keys() == module.keys()
        assert {k: v for k, v in file.items() if k not in HOOKS} == {k: v for k, v in module.items() if k not in HOOKS}


class TestSettingNames:
    @pytest.mark.parametrize("source", ["file", "module"])
    def test_every_public_name_is_a_gunicorn_setting(self, load: Callable[..., dict[str, Any]], source: str) -> None:
        """gunicorn silently ignores unknown names, so a typo would be invisible: there is none."""
        names = load(source).keys()
        assert names - SETTING_NAMES == set()
        assert set(HOOKS) <= names

    @pytest.mark.parametrize("source", ["file", "module"])
    def test_every_value_passes_gunicorn_validation(self, load: Callable[..., dict[str, Any]], source: str) -> None:
        """gunicorn's own validators accept every value, including each hook's arity."""
        cfg = Config()
        for name, value in load(source).items():
            cfg.set(name, value)
        assert cfg.max_requests == 500


@pytest.fixture
def module() -> types.ModuleType:
    return importlib.import_module(MODULE)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType, tmp_path: Path) -> Path:
    """Hooks run in this process may point tempfile and TMPDIR elsewhere; undone afterwards."""
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setenv("TMPDIR", os.environ.get("TMPDIR", tempfile.gettempdir()))
    monkeypatch.setenv("UPLOADGUARD_TEMP_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("UPLOADGUARD_MAX_BODY_SIZE", "1K")
    return tmp_path / "uploads"


class TestNeverRaises:
    @pytest.mark.parametrize(("owner", "logger"), [
        pytest.param(types.SimpleNamespace(log=logging.getLogger("tests.gunicorn")), "tests.gunicorn",
                     id="server-or-worker-log"),
        pytest.param(object(), "uploadguard", id="no-log-falls-back-to-uploadguard"),
    ])
    def test_exception_is_logged_not_raised(self, module: types.ModuleType, caplog: pytest.LogCaptureFixture,
                                            owner: object, logger: str) -> None:
        """A failing hook logs its traceback at ERROR, naming the hook, and returns."""
        def post_fork(server: object, worker: object) -> None:
            raise OSError("boom")

        with caplog.at_level(logging.ERROR):
            assert module._never_raises(post_fork)(owner, object()) is None
        [record] = caplog.records
        assert record.name == logger
        assert "post_fork hook failed" in record.getMessage()
        assert record.exc_info and str(record.exc_info[1]) == "boom"

    @pytest.mark.parametrize(("hook", "args"), [
        pytest.param("nworkers_changed", (object(), 2, 1), id="nworkers_changed"),
        pytest.param("child_exit", (object(), object()), id="child_exit"),
        pytest.param("post_worker_init", (object(),), id="post_worker_init"),
        pytest.param("pre_request", (object(), object()), id="pre_request"),
    ])
    @pytest.mark.usefixtures("isolated")
    def test_hooks_swallow_their_errors(self, module: types.ModuleType, caplog: pytest.LogCaptureFixture,
                                        hook: str, args: tuple[object, ...]) -> None:
        """Given objects they cannot use, the worker and master hooks log and return instead of raising."""
        with caplog.at_level(logging.ERROR, logger="uploadguard"):
            getattr(module, hook)(*args)
        assert f"{hook} hook failed" in caplog.text

    def test_on_starting_raises_only_for_bad_settings(self, module: types.ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
        """on_starting stops gunicorn for a bad UPLOADGUARD_* value; anything else it logs."""
        monkeypatch.setenv("UPLOADGUARD_RETRY_AFTER", "later")
        with pytest.raises(RuntimeError, match="^uploadguard: UPLOADGUARD_RETRY_AFTER='later'"):
            module.on_starting(types.SimpleNamespace(pidfile=None))
        monkeypatch.delenv("UPLOADGUARD_RETRY_AFTER")
        with caplog.at_level(logging.ERROR, logger="uploadguard"):
            module.on_starting(types.SimpleNamespace(pidfile=None))
        assert "the on_starting hook failed" in caplog.text


def parse_request(raw: bytes) -> Any:
    """A real gunicorn Request, parsed from bytes."""
    return next(RequestParser(Config(), iter([raw]), ("127.0.0.1", 40000)))


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair: (the server's end, the client's end)."""
    server, client = socket.socketpair()
    with server, client:
        yield server, client


def request_on(server: socket.socket, client: socket.socket, raw: bytes) -> Any:
    """A real gunicorn Request read from a real socket, as a worker parses it."""
    client.sendall(raw)
    return next(RequestParser(Config(), server, ("127.0.0.1", 40000)))


class TestPreRequest:
    @pytest.mark.usefixtures("isolated")
    def test_100_continue_waits_for_the_first_read(self, module: types.ModuleType,
                                                   sockets: tuple[socket.socket, socket.socket]) -> None:
        """gunicorn's eager 100 Continue is withheld; the first read of the body sends it, once."""
        server, client = sockets
        req = request_on(server, client, b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                         b"Expect: 100-continue\r\n\r\n")
        module.pre_request(types.SimpleNamespace(log=logging.getLogger("tests.gunicorn")), req)
        assert req._expected_100_continue is False and req.must_close is True
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(100)  # nothing sent yet
        client.setblocking(True)
        client.sendall(b"body")
        assert req.body.read(2) == b"bo" and req.body.read() == b"dy"
        assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert req.must_close is False  # the body was read: the connection may be kept

    @pytest.mark.usefixtures("isolated")
    def test_unread_body_closes_the_connection(self, module: types.ModuleType,
                                               sockets: tuple[socket.socket, socket.socket]) -> None:
        """A request answered without reading its body never sends 100 Continue, and the connection closes."""
        server, client = sockets
        req = request_on(server, client, b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                         b"Expect: 100-continue\r\n\r\n")
        module.pre_request(types.SimpleNamespace(log=logging.getLogger("tests.gunicorn")), req)
        assert req.should_close() and req.body.pending

    @pytest.mark.parametrize("headers", [
        pytest.param(b"Content-Length: 5000\r\n", id="no-expect"),
        pytest.param(b"", id="no-body"),
    ])
    @pytest.mark.usefixtures("isolated")
    def test_other_requests_are_untouched(self, module: types.ModuleType, headers: bytes,
                                          sockets: tuple[socket.socket, socket.socket]) -> None:
        """Without Expect: 100-continue the request is left exactly as gunicorn made it."""
        server, client = sockets
        req = request_on(server, client, b"POST /u HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        body = req.body
        module.pre_request(types.SimpleNamespace(log=logging.getLogger("tests.gunicorn")), req)
        assert req.body is body and req.must_close is False

    @pytest.mark.usefixtures("isolated")
    def test_asgi_worker_request_untouched(self, module: types.ModuleType, caplog: pytest.LogCaptureFixture) -> None:
        """A request of gunicorn's ASGI worker (-k asgi, which sends 100 Continue on the first receive itself) is left alone, no error logged."""
        from gunicorn.asgi.parser import CallbackRequest

        req = CallbackRequest()
        req.method, req.path, req.content_length, req._expect_100_continue = "POST", "/u", 4, True
        with caplog.at_level(logging.DEBUG):
            module.pre_request(types.SimpleNamespace(log=logging.getLogger("tests.gunicorn")), req)
        assert [r.getMessage() for r in caplog.records] == ["POST /u"]
        assert req._expect_100_continue is True and req.must_close is False

    @pytest.mark.usefixtures("isolated")
    def test_keeps_gunicorns_debug_line(self, module: types.ModuleType, caplog: pytest.LogCaptureFixture) -> None:
        """Like gunicorn's default pre_request, it logs the method and path at debug."""
        req = parse_request(b"GET /page?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        with caplog.at_level(logging.DEBUG, logger="tests.gunicorn"):
            module.pre_request(types.SimpleNamespace(log=logging.getLogger("tests.gunicorn")), req)
        assert [r.getMessage() for r in caplog.records] == ["GET /page"]


# -- real gunicorn ------------------------------------------------------------------

MODULE_CONF = "python:uploadguard.gunicorn"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """Start real gunicorn masters on 127.0.0.1 (stopped afterwards); env is added to a test baseline."""
    started: list[Gunicorn] = []

    def start(app: str, *, config: Path | str | None = GUNICORN_CONF, args: tuple[str, ...] = (), workers: int = 1,
              wait: bool = True, **env: str) -> Gunicorn:
        server = Gunicorn(app, tmp_path=tmp_path, config=config, workers=workers, wait=wait,
                          args=list(args),
                          env={"XDG_CACHE_HOME": str(tmp_path / "cache"), "UPLOADGUARD_TEMP_DIR": str(tmp_path / "uploads"),
                               "UPLOADGUARD_MIN_FREE_SPACE": "0", "UPLOADGUARD_RETRY_AFTER": "1", **env})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def wait_for(condition: Callable[[], Any], *, timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise TimeoutError(f"{what} not met after {timeout}s")


def logged(server: Gunicorn, pattern: str) -> list[tuple[int, re.Match[str]]]:
    """(pid, match) for every log line of gunicorn's default format whose message matches."""
    found = []
    for line in server.log().splitlines():
        head = re.match(r"\[[^]]+\] \[(\d+)\] \[\w+\] (.*)", line)
        if head and (match := re.search(pattern, head.group(2))):
            found.append((int(head.group(1)), match))
    return found


def ready_lines(server: Gunicorn, upload_dir: Path) -> dict[int, str]:
    """{worker pid: "created" or "ready"} from post_worker_init's log lines."""
    lines = logged(server, rf"uploadguard: upload temp dir {re.escape(str(upload_dir))} (created|ready);")
    return {pid: match.group(1) for pid, match in lines}


def whoami(server: Gunicorn, *, hold: float = 0.0) -> dict[str, Any]:
    response = requests.get(f"{server.url}/?hold={hold}", timeout=15)
    response.raise_for_status()
    return dict(response.json())


def whoami_all(server: Gunicorn, workers: int) -> dict[int, dict[str, Any]]:
    """Ask every worker: concurrent held requests each occupy a different sync worker."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(lambda _: whoami(server, hold=1.0), range(workers)))
    return {answer["pid"]: answer for answer in answers}


def print_config(*args: str, config: Path | str = GUNICORN_CONF, **env: str) -> dict[str, str]:
    """The effective settings of a real gunicorn (--print-config), as strings."""
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    full_env.update(PYTHONPATH=str(TESTS), **env)
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(config), "--print-config", *args,
                             "gunicorn_apps:whoami"],
                            capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=30, check=True)
    return dict(re.findall(r"^(\w+)\s+= (.*)$", result.stdout, re.MULTILINE))


@pytest.mark.slow
class TestServerPool:
    @staticmethod
    def pool_of(worker_class: type) -> Any:
        from uploadguard.gunicorn import _pool_of

        worker = object.__new__(worker_class)  # the hook reads only the class and cfg
        worker.cfg = types.SimpleNamespace(workers=5, threads=4)
        return _pool_of(worker)

    def test_blocking_workers_and_their_subclasses(self) -> None:
        """sync and gthread workers, and an application's own subclasses of them, hold a thread per request."""
        from gunicorn.workers.gthread import ThreadWorker
        from gunicorn.workers.sync import SyncWorker

        class MySync(SyncWorker):  # type: ignore[misc]
            pass

        assert (self.pool_of(MySync).worker_class, self.pool_of(MySync).blocking) == ("sync", True)
        assert (self.pool_of(ThreadWorker).worker_class, self.pool_of(ThreadWorker).blocking) == ("gthread", True)
        assert self.pool_of(ThreadWorker).threads == 4 and self.pool_of(ThreadWorker).workers == 5

    def test_the_asgi_worker_is_an_event_loop(self) -> None:
        """gunicorn's ASGI worker holds no thread per body: the resumable endpoint caps nothing there."""
        from gunicorn.workers.gasgi import ASGIWorker

        from uploadguard.config import stream_caps

        pool = self.pool_of(ASGIWorker)
        assert not pool.blocking and stream_caps(None, pool) == (0, 0)


class TestKeepBacklog:
    """The in-process side of ``post_worker_init``'s backlog fix; tests/test_asgi.py shows it on a real socket."""

    def worker(self, loop: object, backlog: int = 512) -> types.SimpleNamespace:
        return types.SimpleNamespace(loop=loop, cfg=types.SimpleNamespace(backlog=backlog),
                                     log=logging.getLogger("tests.gunicorn"))

    def test_the_loops_create_server_gets_the_backlog(self, module: types.ModuleType) -> None:
        """Asked without one, create_server listens with gunicorn's backlog; one given explicitly stands."""
        asked: list[int] = []

        class Loop:
            async def create_server(self, *args: object, backlog: int = 100, **kwargs: object) -> None:
                asked.append(backlog)

        loop = Loop()
        module._keep_backlog(self.worker(loop))
        asyncio.run(loop.create_server(object))
        asyncio.run(loop.create_server(object, backlog=7))
        assert asked == [512, 7]

    def test_a_loop_that_takes_no_attribute_is_named_in_a_warning(self, module: types.ModuleType,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
        class Loop:
            __slots__ = ()

            async def create_server(self, *args: object, **kwargs: object) -> None: ...

        with caplog.at_level(logging.WARNING, "tests.gunicorn"):
            module._keep_backlog(self.worker(Loop()))
        assert [r.getMessage() for r in caplog.records] == [
            "uploadguard: cannot pass backlog 512 to Loop; the listen queue will be the loop's default"]


class TestPrecedence:
    @pytest.mark.parametrize(("env", "args", "expected"), [
        pytest.param({}, (), "600", id="file"),
        pytest.param({"GUNICORN_TIMEOUT": "30"}, (), "30", id="file-from-environment"),
        pytest.param({"GUNICORN_TIMEOUT": "30", "GUNICORN_CMD_ARGS": "--timeout 7"}, (), "7", id="GUNICORN_CMD_ARGS-over-file"),
        pytest.param({"GUNICORN_CMD_ARGS": "--timeout 7"}, ("--timeout", "9"), "9", id="command-line-over-all"),
    ])
    def test_gunicorns_precedence_holds(self, env: dict[str, str], args: tuple[str, ...], expected: str) -> None:
        """The file < GUNICORN_CMD_ARGS < the command line, as in gunicorn without a config file."""
        assert print_config(*args, **env)["timeout"] == expected

    def test_python_module_config(self) -> None:
        """-c python:uploadguard.gunicorn gives gunicorn the same settings and hooks as the file."""
        from_module = print_config(config=MODULE_CONF, GUNICORN_CMD_ARGS="--max-requests 7")
        from_file = print_config(GUNICORN_CMD_ARGS="--max-requests 7")
        assert from_module["max_requests"] == "7"
        assert {name: from_module[name] for name in HOOKS} == {name: f"<{name}()>" for name in HOOKS}
        assert {name for name in from_file if from_module[name] != from_file[name]} == {"config"}


@pytest.mark.slow
class TestStartup:
    def test_bad_upload_setting_stops_gunicorn_before_any_worker(self, serve: Callable[..., Gunicorn]) -> None:
        """A bad UPLOADGUARD_* value: gunicorn exits 1 with one line naming it, before a worker forks."""
        server = serve("wsgi_apps:guarded", wait=False, UPLOADGUARD_MAX_BODY_SIZE="20X")
        assert server.wait_exit() == 1
        log = server.log()
        assert "Error: uploadguard: UPLOADGUARD_MAX_BODY_SIZE='20X' is not a size" in log
        assert "Booting worker" not in log
        assert "Traceback" not in log

    @pytest.mark.parametrize("config", [GUNICORN_CONF, MODULE_CONF], ids=["file", "module"])
    def test_bad_gunicorn_setting_stops_gunicorn(self, serve: Callable[..., Gunicorn], config: Path | str) -> None:
        """A bad GUNICORN_* value stops gunicorn while it reads the configuration, naming the variable."""
        server = serve("gunicorn_apps:whoami", config=config, wait=False, GUNICORN_TIMEOUT="soon")
        assert server.wait_exit() == 1
        assert "GUNICORN_TIMEOUT='soon' is not a duration" in server.log()
        assert "Starting gunicorn" not in server.log()

    def test_settings_logged_once(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """The master logs the effective upload settings once, however many workers there are."""
        server = serve("gunicorn_apps:whoami", workers=2, UPLOADGUARD_MAX_BODY_SIZE="20M")
        wait_for(lambda: len(ready_lines(server, tmp_path / "uploads")) == 2, what="two workers ready")
        [(pid, _)] = logged(server, rf"^uploadguard: temp_dir={re.escape(str(tmp_path / 'uploads'))} max_body_size=20M ")
        assert pid == server.pid

    def test_python_module_config_serves(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """An installed user's -c python:uploadguard.gunicorn runs the hooks: the worker spools to the upload dir."""
        server = serve("gunicorn_apps:whoami", config=MODULE_CONF)
        assert whoami(server)["tempdir"] == str(tmp_path / "uploads")
        assert logged(server, r"^uploadguard: temp_dir=")


@pytest.mark.slow
class TestUploadTempDir:
    def test_every_worker_creates_and_uses_it(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """A missing upload dir is made (mode 0700) and becomes tempfile's and TMPDIR's dir in every worker."""
        (tmp_path / "var").mkdir()
        upload_dir = tmp_path / "var" / "uploads"
        server = serve("gunicorn_apps:whoami", workers=2, UPLOADGUARD_TEMP_DIR=str(upload_dir))
        ready = wait_for(lambda: (lines := ready_lines(server, upload_dir)) and len(lines) == 2 and lines,
                         what="both workers' temp-dir line")
        assert "created" in ready.values()
        assert stat.S_IMODE(upload_dir.stat().st_mode) == 0o700
        answers = whoami_all(server, 2)
        assert answers.keys() == ready.keys()
        for answer in answers.values():
            assert answer["tempdir"] == answer["TMPDIR"] == str(upload_dir)

    def test_a_missing_parent_is_named_and_not_created(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """A configured upload dir whose parent is missing (a typo) is not created: the worker boots and logs
        an error naming the missing parent."""
        upload_dir = tmp_path / "typo" / "uploads"
        server = serve("gunicorn_apps:whoami", workers=1, UPLOADGUARD_TEMP_DIR=str(upload_dir))
        assert logged(server, rf"upload temp dir {re.escape(str(upload_dir))} is unusable \(missing\): cannot create "
                              rf"{re.escape(str(upload_dir))}: its parent directory {re.escape(str(tmp_path / 'typo'))} "
                              "does not exist"), server.log()
        assert not (tmp_path / "typo").exists()

    def test_hup_recreates_a_deleted_dir(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """After the dir is deleted, the workers a HUP makes recreate it and spool there."""
        upload_dir = tmp_path / "uploads"
        server = serve("gunicorn_apps:whoami", workers=2)
        old = set(wait_for(lambda: (lines := ready_lines(server, upload_dir)) and len(lines) == 2 and lines,
                           what="two workers ready"))
        shutil.rmtree(upload_dir)
        server.signal(signal.SIGHUP)
        new = wait_for(lambda: (lines := {pid: how for pid, how in ready_lines(server, upload_dir).items() if pid not in old})
                       and len(lines) == 2 and lines, what="two new workers ready")
        assert "created" in new.values()
        wait_for(lambda: set(server.worker_pids()) == set(new), what="old workers gone")
        answers = whoami_all(server, 2)
        assert answers.keys() == new.keys()
        assert {answer["tempdir"] for answer in answers.values()} == {str(upload_dir)}

    def test_guard_logs_reach_gunicorns_error_log(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """The middleware's INFO heal line and WARNING 413 line appear in gunicorn's error log."""
        upload_dir = tmp_path / "uploads"
        server = serve("wsgi_apps:guarded", UPLOADGUARD_MAX_BODY_SIZE="1K")
        wait_for(lambda: upload_dir.is_dir(), what="upload dir made")
        shutil.rmtree(upload_dir)
        assert requests.post(server.url + "/upload", data=b"x" * 100, timeout=10).status_code == 200
        assert requests.post(server.url + "/upload", data=b"x" * 2000, timeout=10).status_code == 413
        wait_for(lambda: logged(server, r"recreated missing upload temp dir") and logged(server, r"413 POST /upload"),
                 what="guard lines in the gunicorn log")

    def test_unusable_dir_boots_and_answers_503(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """A regular file where the dir should be: the worker boots, pages work, uploads get 503 + Retry-After."""
        blocker = tmp_path / "uploads"
        blocker.write_text("not a directory")
        server = serve("wsgi_apps:guarded", TMPDIR=str(blocker))
        assert requests.get(server.url, timeout=15).text == "hello\n"
        response = requests.post(f"{server.url}/upload", data=b"x" * 1000, timeout=15)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        [(pid, _)] = logged(server, rf"uploadguard: upload temp dir {re.escape(str(blocker))} is unusable \(not_a_directory\)")
        assert pid != server.pid

    def test_unusable_dir_leaves_tempfile_working(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """With TMPDIR naming the broken path too, tempfile falls back to a working dir instead of the master's choice."""
        blocker = tmp_path / "uploads"
        blocker.write_text("not a directory")
        server = serve("gunicorn_apps:whoami", TMPDIR=str(blocker))
        tempdir = whoami(server)["tempdir"]
        assert tempdir != str(blocker) and os.path.isdir(tempdir)


def get_ignoring_errors(server: Gunicorn, count: int) -> None:
    for _ in range(count):
        try:
            requests.get(server.url, timeout=5)
        except requests.RequestException:
            pass


RECYCLE_EVERY_2 = ("--max-requests", "2", "--max-requests-jitter", "0")


@pytest.mark.slow
class TestRecycling:
    def test_pinned_master_dies_when_tmpdir_is_deleted(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """Pinned gunicorn 27: without the config, the first recycle after TMPDIR's dir is deleted kills the master."""
        upload_dir = tmp_path / "uploads"
        upload_dir.mkdir()
        server = serve("wsgi_apps:guarded", config=None, args=RECYCLE_EVERY_2, TMPDIR=str(upload_dir))
        get_ignoring_errors(server, 1)
        shutil.rmtree(upload_dir)
        get_ignoring_errors(server, 2)
        assert server.wait_exit() != 0
        log = server.log()
        assert "Unhandled exception in main loop" in log
        assert re.search(r"FileNotFoundError: .*/uploads/wgunicorn-", log), "WorkerTmp, in the master"

    def test_master_survives_recycles_when_tmpdir_is_deleted(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """With the config, workers recycle after the dir is deleted, the master lives and uploads succeed."""
        upload_dir = tmp_path / "uploads"
        upload_dir.mkdir()
        server = serve("wsgi_apps:guarded", args=RECYCLE_EVERY_2, TMPDIR=str(upload_dir))
        get_ignoring_errors(server, 1)
        shutil.rmtree(upload_dir)
        for _ in range(6):
            assert requests.get(server.url, timeout=15).text == "hello\n"
        response = requests.post(f"{server.url}/upload", data=b"u" * 300_000, timeout=15)
        assert response.status_code == 200 and response.json()["size"] == 300_000
        assert server.alive()
        assert len(logged(server, r"^Booting worker")) >= 4

    def test_pinned_missing_worker_tmp_dir_stops_gunicorn(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """Pinned gunicorn 27: a worker_tmp_dir that does not exist stops the server at the first spawn."""
        server = serve("gunicorn_apps:whoami", config=None, wait=False,
                       args=("--worker-tmp-dir", str(tmp_path / "heartbeats")))
        assert server.wait_exit() != 0
        assert "Can't create workertmp" in server.log()

    def test_deleted_worker_tmp_dir_is_recreated_before_the_next_worker(
            self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """A missing worker_tmp_dir is made at startup and again before each recycle's new worker."""
        heartbeats = tmp_path / "heartbeats"
        server = serve("gunicorn_apps:whoami", args=("--worker-tmp-dir", str(heartbeats), *RECYCLE_EVERY_2))
        whoami(server)
        assert heartbeats.is_dir()
        shutil.rmtree(heartbeats)
        pids = {whoami(server)["pid"] for _ in range(4)}
        assert len(pids) >= 2, "workers were recycled"
        assert server.alive() and heartbeats.is_dir()
        assert logged(server, rf"recreated the missing worker_tmp_dir {re.escape(str(heartbeats))}")

    def test_unusable_worker_tmp_dir_falls_back(self, serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
        """A worker_tmp_dir that cannot be made is replaced by the fallback dir, and the server runs."""
        (tmp_path / "file").write_text("")
        server = serve("gunicorn_apps:whoami", args=("--worker-tmp-dir", str(tmp_path / "file" / "heartbeats")))
        assert whoami(server)["pid"] in server.worker_pids()
        fallback = tmp_path / "cache" / "uploadguard" / "gunicorn"
        assert fallback.is_dir()
        assert logged(server, rf"heartbeat files go to {re.escape(str(fallback))} now")


def expect_continue(port: int, length: int) -> tuple[bytes, bytes]:
    """Send headers with Expect: 100-continue, read the interim response, then send the body; (interim, final)."""
    head = (f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
            "Expect: 100-continue\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(1)
            if not chunk:
                break
            interim += chunk
        sock.sendall(b"e" * length)
        final = b""
        while chunk := sock.recv(65536):
            final += chunk
    return interim, final


OVERSIZED = b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4096\r\nExpect: 100-continue\r\n\r\n"


@pytest.mark.slow
class TestExpectContinue:
    def test_pinned_gunicorn_sends_100_for_any_body(self, serve: Callable[..., Gunicorn]) -> None:
        """Pinned gunicorn 27: without the config, 100 Continue precedes even the middleware's 413."""
        server = serve("wsgi_apps:guarded", config=None, UPLOADGUARD_MAX_BODY_SIZE="1K")
        response, _ = raw_http(server.port, OVERSIZED, read_early=True)
        assert response.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 ")

    def test_oversized_body_gets_413_without_100(self, serve: Callable[..., Gunicorn]) -> None:
        """Over the limit, the client reads the 413 straight away and never sends the body."""
        server = serve("wsgi_apps:guarded", UPLOADGUARD_MAX_BODY_SIZE="1K")
        response, error = raw_http(server.port, OVERSIZED, read_early=True)
        assert response.startswith(b"HTTP/1.1 413 ") and error is None
        assert b"100 Continue" not in response

    def test_body_within_limit_gets_100_then_200(self, serve: Callable[..., Gunicorn]) -> None:
        """Within the limit the client gets 100 Continue, sends the body and gets the app's 200."""
        server = serve("wsgi_apps:guarded", UPLOADGUARD_MAX_BODY_SIZE="1K")
        interim, final = expect_continue(server.port, 1024)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert final.startswith(b"HTTP/1.1 200 ")
        assert json.loads(final.split(b"\r\n\r\n", 1)[1])["size"] == 1024
