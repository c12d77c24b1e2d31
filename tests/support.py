"""Test support: real gunicorn processes, real tmpfs mounts, raw HTTP on loopback.

Shared by every end-to-end test so each one reads as a specification, not
as process plumbing.  Everything here touches 127.0.0.1 only and is bounded
in time.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
GUNICORN_CONF = ROOT / "gunicorn_conf.py"
T = TypeVar("T")

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mount, chown); CI runs as root")


def free_port() -> int:
    """A port free on 127.0.0.1 right now (gunicorn cannot report a port-0 bind back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def children(pid: int) -> list[int]:
    """PIDs of ``pid``'s current children (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


class Gunicorn:
    """A real gunicorn master on 127.0.0.1, started in the background.

    ``app`` is a ``module:callable`` importable from ``tests/`` (or ``pythonpath``);
    ``config`` a config file (default: none; pass ``GUNICORN_CONF`` for the
    project's); ``env`` is added to a copy of this process's environment.
    The log (stdout + stderr) goes to ``log_path`` for assertions.
    """

    def __init__(
        self,
        app: str,
        *,
        tmp_path: Path,
        config: Path | str | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        pythonpath: Sequence[Path | str] = (),
        workers: int = 1,
        wait: bool = True,
        prefix: Sequence[str] = (),  # a command gunicorn runs under, e.g. other_users_can_run_python()
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        command = [*prefix, sys.executable, "-m", "gunicorn"]
        if config is not None:
            command += ["-c", str(config)]
        paths = [str(TESTS), *map(str, pythonpath)]
        # --no-control-socket: gunicorn 27 binds $HOME/.gunicorn/gunicorn.ctl by default,
        # which masters running side by side would fight over.
        command += ["--bind", f"127.0.0.1:{self.port}", "--workers", str(workers), "--no-control-socket",
                    "--pythonpath", ",".join(paths), *args, app]
        full_env = dict(os.environ)
        full_env.pop("WEB_CONCURRENCY", None)
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=str(ROOT), start_new_session=True)
        if wait:
            try:
                wait_for_port(self.port, proc=self.proc)
                if config is not None and str(config) in (str(GUNICORN_CONF), "python:uploadguard.gunicorn"):
                    self._wait_for_workers(workers, args)
            except Exception:
                self.stop()
                raise RuntimeError(f"gunicorn did not start:\n{self.log()}") from None

    def _wait_for_workers(self, workers: int, args: Sequence[str], timeout: float = 20.0) -> None:
        """Wait until every worker has run uploadguard's post_worker_init.

        The port answers as soon as the master listens; a worker still booting
        would recreate an upload dir that a test has just removed.
        """
        if "--log-level" in args and args[list(args).index("--log-level") + 1] not in ("debug", "info"):
            return  # the hook's line is at INFO: nothing to wait for
        deadline = time.monotonic() + timeout
        while self.log().count("uploadguard: upload temp dir") < workers:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"{workers} workers not ready after {timeout}s")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def worker_pids(self) -> list[int]:
        """PIDs of the master's current children (Linux /proc)."""
        return children(self.proc.pid)

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()


@contextlib.contextmanager
def tmpfs(path: Path, *, size: str = "2m", options: str = "") -> Iterator[Path]:
    """A real tmpfs mounted at ``path`` (root only), unmounted afterwards."""
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root; CI runs as root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, *, leave: int = 0) -> Path:
    """Fill a file system until at most ``leave`` bytes stay free; returns the filler file."""
    filler = directory / "filler"
    vfs = os.statvfs(directory)
    to_write = max(0, vfs.f_bavail * vfs.f_frsize - leave)
    with open(filler, "wb") as fh:
        block = b"\0" * 65536
        while to_write > 0:
            try:
                fh.write(block[: min(len(block), to_write)])
                fh.flush()
            except OSError:
                break
            to_write -= min(len(block), to_write)
    return filler


def raw_http(port: int, request: bytes, *, body: bytes | Iterator[bytes] = b"", timeout: float = 10.0,
             read_early: bool = False) -> tuple[bytes, str | None]:
    """Send a request (headers, then body) over a raw socket; return (response bytes, error name).

    With ``read_early`` the response is read before the body is sent (for
    ``Expect: 100-continue``).  The error name is that of an ``OSError`` seen
    while sending or reading (e.g. ``ConnectionResetError``), else ``None``.
    """
    error = None
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        try:
            if read_early:
                return _read_all(sock), None
            parts = [body] if isinstance(body, bytes) else body
            for part in parts:
                sock.sendall(part)
        except OSError as exc:
            error = type(exc).__name__
        try:
            data = _read_all(sock)
        except OSError as exc:
            error = error or type(exc).__name__
    return data, error


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


@contextlib.contextmanager
def unlinked_dir(base: Path) -> Iterator[Path]:
    """A directory that looks fine but was deleted under a bind mount (root only).

    This is what a worker sees when the source of its ``PrivateTmp`` mount was
    removed: ``isdir()`` is true, ``st_nlink`` is 0, every create fails with ENOENT.
    """
    if not IS_ROOT:
        pytest.skip("bind mounts need root; CI runs as root")
    source, mountpoint = base / "source", base / "unlinked"
    source.mkdir(parents=True)
    mountpoint.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(mountpoint)], check=True)
    try:
        source.rmdir()
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def as_user(uid: int, call: Callable[[], T]) -> T:
    """``call()`` in a forked child running as ``uid`` (root only); its result or exception comes back.

    For checks that depend on who asks, without a second test process tree.
    """
    if not IS_ROOT:
        pytest.skip("switching users needs root; CI runs as root")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            try:
                payload = pickle.dumps((True, call()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the parent
                payload = pickle.dumps((False, exc))
            with os.fdopen(write_end, "wb") as out:
                out.write(payload)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as result:
        data = result.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


@contextlib.contextmanager
def traversable_dir() -> Iterator[Path]:
    """A fresh directory every user can reach (pytest's tmp_path sits below a 0700 one), removed after."""
    path = Path(tempfile.mkdtemp(prefix="uploadguard-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def other_users_can_run_python(stash: Path, *, setup: Sequence[str] = (), run_as: int | None = None) -> list[str]:
    """A command prefix: run in a private mount namespace where users other than root can run this Python.

    Where the interpreter lives below a directory others cannot enter
    (``/root/.pyenv``), that directory is covered by a world-readable tmpfs
    holding just the way to the interpreter (``stash`` is an empty directory
    to park the original on); nothing outside the namespace changes.
    ``setup`` adds shell lines run as root first; ``run_as`` a uid to switch to
    (``setpriv``, gid the same, no supplementary groups) -- gunicorn's own
    ``--user`` needs no switch here.  Root only.
    """
    if not IS_ROOT or not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs root, unshare and setpriv (util-linux)")
    script = ["set -e"]
    parts = Path(os.path.realpath(sys.base_prefix)).parts
    for depth in range(1, len(parts) - 1):
        directory = Path(*parts[:depth])
        if not os.stat(directory).st_mode & 0o001:
            stash.mkdir(parents=True, exist_ok=True)
            child = parts[depth]
            script += [f"mount --bind '{directory}' '{stash}'", f"mount -t tmpfs -o mode=755 tmpfs '{directory}'",
                       f"mkdir '{directory}/{child}'", f"mount --bind '{stash}/{child}' '{directory}/{child}'"]
            break
    script += list(setup)
    switch = f"setpriv --reuid={run_as} --regid={run_as} --clear-groups " if run_as is not None else ""
    script.append(f'exec {switch}"$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script), "sh"]
