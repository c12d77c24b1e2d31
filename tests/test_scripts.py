"""``scripts/test`` installs with pip only when the install is not current; ``scripts/demo`` starts the demo.

The script runs for real in a copy of the repository's layout holding a tiny
package (so pip installs in seconds): a real ``python3 -m venv``, a real
``pip install -e '.[test]'`` (its build backend comes from PyPI, as on a fresh
machine), then pytest.  Whether pip ran is read from pip's own log file
(``PIP_LOG``), which pip writes only when it runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import ROOT, free_port, wait_for_port

pytestmark = pytest.mark.slow

SETUP_CFG = """\
[metadata]
name = tiny
version = 1

[options]
packages = tiny

[options.extras_require]
test =
"""
PYPROJECT = """\
[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A checkout-shaped directory with scripts/test, a tiny package and one passing test."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "test", root / "scripts" / "test")
    (root / "setup.cfg").write_text(SETUP_CFG)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "tiny").mkdir()
    (root / "tiny" / "__init__.py").write_text("")
    (root / "test_tiny.py").write_text("def test_imports():\n    import tiny\n")
    return root


def run(project: Path, pip_log: Path) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run scripts/test -q; returns the result and whether pip ran."""
    pip_log.unlink(missing_ok=True)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PIP_", "VIRTUAL_ENV"))}
    env["PIP_LOG"] = str(pip_log)
    proc = subprocess.run([str(project / "scripts" / "test"), "-q", "-p", "no:cacheprovider", "test_tiny.py"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    return proc, pip_log.exists()


def lend_pytest(project: Path) -> None:
    """Make this interpreter's pytest importable in the project's venv (the tiny test extra installs nothing)."""
    [site] = (project / ".venv" / "lib").glob("python3*/site-packages")
    (site / "lend_pytest.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


class TestInstallOnlyWhenNeeded:
    def test_installs_on_a_fresh_machine_then_only_after_setup_cfg_changes(self, project: Path,
                                                                            tmp_path: Path) -> None:
        """pip runs without a .venv, not while setup.cfg and pyproject.toml stay unchanged, again after a change."""
        pip_log = tmp_path / "pip.log"
        first, installed = run(project, pip_log)
        assert installed, first.stderr
        assert (project / ".venv" / "bin" / "python").exists()
        assert "No module named pytest" in first.stderr  # the tiny extra brings no pytest; lent below
        lend_pytest(project)

        second, installed = run(project, pip_log)
        assert second.returncode == 0, second.stdout + second.stderr
        assert not installed, "pip ran although the install was current"
        assert "1 passed" in second.stdout

        with open(project / "setup.cfg", "a") as fh:
            fh.write("\n[options.package_data]\ntiny = *.txt\n")
        third, installed = run(project, pip_log)
        assert third.returncode == 0 and installed, third.stderr

        fourth, installed = run(project, pip_log)
        assert fourth.returncode == 0 and not installed

        (project / "pyproject.toml").write_text(PYPROJECT + "\n[tool.pytest.ini_options]\naddopts = \"-ra\"\n")
        fifth, installed = run(project, pip_log)
        assert fifth.returncode == 0 and installed, fifth.stderr

    def test_failed_install_is_retried(self, project: Path, tmp_path: Path) -> None:
        """A pip install that fails leaves no stamp: the next run tries again instead of skipping."""
        pip_log = tmp_path / "pip.log"
        (project / "setup.cfg").write_text(SETUP_CFG.replace("version = 1", "version = attr: tiny.no_such_name"))
        first, installed = run(project, pip_log)
        assert first.returncode != 0 and installed
        assert not (project / ".venv" / ".uploadguard-test-installed").exists()
        second, installed = run(project, pip_log)
        assert second.returncode != 0 and installed


PACKAGE_JSON = """{{"name": "tiny-js", "version": "{version}", "private": true,
 "dependencies": {{"tinydep": "file:tinydep"}}}}
"""
PACKAGE_LOCK = """{{"name": "tiny-js", "version": "{version}", "lockfileVersion": 3, "requires": true,
 "packages": {{
  "": {{"name": "tiny-js", "version": "{version}", "dependencies": {{"tinydep": "file:tinydep"}}}},
  "node_modules/tinydep": {{"resolved": "tinydep", "link": true}},
  "tinydep": {{"version": "1.0.0"}}
 }}}}
"""


def write_js_package(project: Path, version: str) -> None:
    """tests/js with one local dependency (npm installs it offline, as a link), pinned by a package-lock.json."""
    js = project / "tests" / "js"
    (js / "tinydep").mkdir(parents=True, exist_ok=True)
    (js / "tinydep" / "package.json").write_text('{"name": "tinydep", "version": "1.0.0"}\n')
    (js / "package.json").write_text(PACKAGE_JSON.format(version=version))
    (js / "package-lock.json").write_text(PACKAGE_LOCK.format(version=version))


class TestNpmOnlyWhenNeeded:
    @pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm (apt-get install npm)")
    def test_npm_ci_on_a_fresh_checkout_then_only_after_the_lock_file_changes(self, project: Path,
                                                                             tmp_path: Path) -> None:
        """Where npm is present, tests/js/node_modules is installed when missing, kept while package-lock.json
        stays, and installed afresh (npm ci empties node_modules first) after it changed."""
        write_js_package(project, "1.0.0")
        modules = project / "tests" / "js" / "node_modules"
        first, _ = run(project, tmp_path / "pip.log")
        lend_pytest(project)
        assert (modules / "tinydep" / "package.json").exists(), first.stderr
        (modules / "marker").write_text("npm ci would remove this")

        second, _ = run(project, tmp_path / "pip.log")
        assert second.returncode == 0 and "1 passed" in second.stdout, second.stdout + second.stderr
        assert (modules / "marker").exists(), "npm ci ran although node_modules was current"
        assert "added" not in second.stdout + second.stderr  # quiet

        write_js_package(project, "1.0.1")
        third, _ = run(project, tmp_path / "pip.log")
        assert third.returncode == 0, third.stdout + third.stderr
        assert not (modules / "marker").exists() and (modules / "tinydep").exists()
        assert "added" not in third.stdout + third.stderr

        shutil.rmtree(modules)
        fourth, _ = run(project, tmp_path / "pip.log")
        assert fourth.returncode == 0 and (modules / "tinydep").exists()

    def test_without_npm_the_tests_still_run(self, project: Path, tmp_path: Path) -> None:
        """Without npm on PATH, scripts/test installs with pip and runs pytest as usual, and nothing for tests/js."""
        write_js_package(project, "1.0.0")
        tools = tmp_path / "bin"  # PATH with what scripts/test needs, and no npm
        tools.mkdir()
        for tool in ("bash", "cksum", "cat", "dirname", "mkdir"):
            found = shutil.which(tool)
            assert found is not None
            (tools / tool).symlink_to(found)
        (tools / "python3").symlink_to(os.path.realpath(sys.executable))  # the interpreter, not a pyenv shim
        env = {name: value for name, value in os.environ.items() if not name.startswith(("PIP_", "VIRTUAL_ENV"))}
        env["PATH"] = str(tools)
        command = [str(project / "scripts" / "test"), "-q", "-p", "no:cacheprovider", "test_tiny.py"]
        subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        lend_pytest(project)
        proc = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
        assert not (project / "tests" / "js" / "node_modules").exists()

class TestDemoScript:
    def test_start_up_line_names_the_storage_and_a_page_load_logs_no_not_found(self, tmp_path: Path) -> None:
        """scripts/demo on a fresh checkout (no var/) starts, its settings line names the resumable storage the
        site uses, and loading the page and its icon logs no "Not Found"."""
        root = tmp_path / "checkout"
        (root / "scripts").mkdir(parents=True)
        shutil.copy2(ROOT / "scripts" / "demo", root / "scripts" / "demo")
        shutil.copy2(ROOT / "gunicorn_conf.py", root / "gunicorn_conf.py")
        shutil.copytree(ROOT / "examples" / "django_demo" / "demo", root / "examples" / "django_demo" / "demo",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (root / ".venv").symlink_to(ROOT / ".venv")  # this checkout's install: scripts/demo finds it complete
        port = free_port()
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("UPLOADGUARD_", "DEMO_", "PIP_", "VIRTUAL_ENV"))}
        env.update(PORT=str(port), WEB_CONCURRENCY="1", HOME=str(tmp_path))
        log = tmp_path / "demo.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(root / "scripts" / "demo")], cwd=root, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(port, timeout=60, proc=proc)
            for path in ("/", "/favicon.ico"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
                    assert response.status in (200, 204)
            deadline = time.monotonic() + 30
            while '"GET /favicon.ico' not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)  # the access log line is written after the answer
        finally:
            with contextlib.suppress(ProcessLookupError):  # it exited already: its log says why, below
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        text = log.read_text()
        storage = root / "examples" / "django_demo" / "var" / "resumable"
        assert f"resumable uploads are assembled in {storage}" in text
        assert f"resumable_storage={storage} " in text, text
        assert "Not Found" not in text, text
        assert (root / "examples" / "django_demo" / "var" / "tmp").is_dir()  # created below the var/ it made
