"""The README's server commands, run as written against the README's own app blocks under real gunicorn.

tests/test_docs.py runs every Python block in-process; this file serves the blocks that define an app with
the shell commands the README gives for them (``gunicorn -c gunicorn_conf.py app:application``, the
installed ``-c python:uploadguard.gunicorn``; uvicorn and ``-k asgi`` for the FastAPI block), so a command or an
app block that stops working under a real server fails here.  Only the bind address is the test's own.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.support import ROOT, Gunicorn

pytestmark = pytest.mark.slow
requests = pytest.importorskip("requests")

README = (ROOT / "README.md").read_text()


def section(heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def block(heading: str, language: str) -> str:
    match = re.search(rf"^```{language}\n(.*?)^```", section(heading), re.S | re.M)
    assert match, f"README.md's '## {heading}' has no {language} block"
    return match.group(1)


def gunicorn_commands(text: str) -> list[list[str]]:
    """Every ``gunicorn ...`` command in ``text`` (a shell block or a comment), as argument lists."""
    return [shlex.split(line.split("#", 1)[0]) for line in re.findall(r"(gunicorn -c [^#)\n]+)", text)]


def serve(command: list[str], app_source: str, tmp_path: Path) -> Gunicorn:
    """``command`` (``gunicorn -c CONFIG [-k CLASS] MODULE:APP``) with ``app_source`` saved as MODULE.py."""
    assert command[0] == "gunicorn" and command[1] == "-c", command
    config, *args, app = command[2:]
    work = tmp_path / "work"
    work.mkdir()
    (work / f"{app.split(':')[0]}.py").write_text(app_source)
    return Gunicorn(app, tmp_path=tmp_path, config=ROOT / config if not config.startswith("python:") else config,
                    args=args, pythonpath=[work],
                    env={"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"), "UPLOADGUARD_MAX_BODY_SIZE": "1K"})


class TestReadmeServers:
    @pytest.mark.parametrize("index", [0, 1], ids=["from-a-checkout", "installed"])
    def test_the_wsgi_block_under_each_gunicorn_command(self, tmp_path: Path, index: int) -> None:
        """The README's WSGI block served by its gunicorn command answers a GET and reads a readable 413 for a large body."""
        commands = gunicorn_commands(block("gunicorn", "sh"))
        assert len(commands) == 2, commands
        server = serve(commands[index], block("WSGI", "python"), tmp_path)
        try:
            assert requests.get(server.url + "/", timeout=10).text == "hello\n"
            refused = requests.post(server.url + "/", data=b"x" * 4096, timeout=10)
            assert refused.status_code == 413 and "(1024 bytes)" in refused.text, refused.text
        finally:
            server.stop()

    def test_the_fastapi_block_under_uvicorn(self, tmp_path: Path) -> None:
        """The README's FastAPI block, served as its comment says first (uvicorn app:app), stores a file and refuses a large one with 413."""
        pytest.importorskip("fastapi")
        from tests.test_asgi import Uvicorn

        source = block("ASGI (FastAPI, Starlette, Django ASGI)", "python")
        [app] = re.findall(r"run with: uvicorn (\S+)", source)
        work = tmp_path / "work"
        work.mkdir()
        (work / f"{app.split(':')[0]}.py").write_text(source)
        server = Uvicorn(app, tmp_path=tmp_path, env={"PYTHONPATH": str(work), "UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"),
                                                     "UPLOADGUARD_MAX_BODY_SIZE": "1K"})
        url = f"http://127.0.0.1:{server.port}/upload"
        try:
            small = requests.post(url, files={"file": ("a.txt", b"abc")}, timeout=10)
            assert small.status_code == 200 and small.json() == {"size": 3}, small.text
            assert requests.post(url, files={"file": ("b.bin", b"x" * 4096)}, timeout=10).status_code == 413
        finally:
            server.stop()

    def test_the_fastapi_block_under_gunicorn_asgi(self, tmp_path: Path) -> None:
        """The README's FastAPI block, served as its comment says second (gunicorn -k asgi), stores a file and refuses a large one with 413."""
        pytest.importorskip("fastapi")
        source = block("ASGI (FastAPI, Starlette, Django ASGI)", "python")
        [command] = gunicorn_commands(source)
        server = serve(command, source, tmp_path)
        try:
            small = requests.post(server.url + "/upload", files={"file": ("a.txt", b"abc")}, timeout=10)
            assert small.status_code == 200 and small.json() == {"size": 3}, small.text
            large = requests.post(server.url + "/upload", files={"file": ("b.bin", b"x" * 4096)}, timeout=10)
            assert large.status_code == 413, large.text
        finally:
            server.stop()
