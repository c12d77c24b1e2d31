"""The package as users get it: typed, importable without its optional dependencies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import uploadguard
from tests.support import ROOT


class TestPackage:
    def test_public_api(self) -> None:
        """Everything in __all__ is importable from the top level, and __all__ is sorted."""
        assert list(uploadguard.__all__) == sorted(uploadguard.__all__)
        for name in uploadguard.__all__:
            assert getattr(uploadguard, name) is not None

    def test_typed(self) -> None:
        """The package ships py.typed, so type checkers use its hints."""
        assert (Path(uploadguard.__file__).parent / "py.typed").is_file()

    @pytest.mark.slow
    def test_mypy_strict(self, tmp_path: Path) -> None:
        """The whole package type-checks under mypy --strict."""
        pytest.importorskip("mypy")
        proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path), "uploadguard"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_core_imports_without_optional_dependencies(self) -> None:
        """The core (middleware, settings, CLI) needs the standard library only."""
        blocked = "import sys\nfor name in ('django', 'flask', 'PIL', 'gunicorn', 'prometheus_client', 'werkzeug'):\n" \
                  "    sys.modules[name] = None\n" \
                  "import uploadguard, uploadguard.cli, uploadguard.tempdir, uploadguard.metrics\n" \
                  "uploadguard.UploadGuard(lambda e, s: [], temp_dir='/nonexistent-uploadguard')\n"
        proc = subprocess.run([sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr

    def test_asgi_extra_brings_the_c_http_parsers_the_servers_pick(self) -> None:
        """The asgi extra installs httptools, which uvicorn then uses by default; gunicorn_h1c (it may need a C
        compiler) is installed by the deploy README beside it, and gunicorn -k asgi then uses it by default."""
        import configparser
        import re

        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg")
        names = {re.split(r"[<>=!~\[;\s]", line.strip())[0].lower().replace("_", "-")
                 for line in config["options.extras_require"]["asgi"].splitlines()
                 if line.strip() and not line.strip().startswith("#")}
        assert {"uvicorn", "httptools"} <= names and "gunicorn-h1c" not in names, names
        deploy = (ROOT / "examples" / "deploy" / "README.md").read_text()
        assert re.search(r"pip install 'uploadguard\[gunicorn,asgi,metrics\]' gunicorn_h1c", deploy)
        from gunicorn.asgi.protocol import ASGIProtocol
        from uvicorn.config import Config

        assert ASGIProtocol._check_h1c_protocol_available() and ASGIProtocol._h1c_has_limits  # http_parser "auto"
        server = Config(app=lambda scope, receive, send: None, http="auto")
        server.load()
        assert server.http_protocol_class.__name__ == "HttpToolsProtocol"

    @pytest.mark.slow
    def test_license_ships_in_the_sdist_and_the_wheel(self, tmp_path: Path) -> None:
        """The MIT LICENSE file setup.cfg declares is in both distributions, and the metadata names ASGI."""
        import tarfile
        import zipfile

        # setuptools' own build backend, as pip runs it, offline: the test extra brings a setuptools with bdist_wheel.
        for kind in ("sdist", "wheel"):
            build = f"import sys\nfrom setuptools import build_meta\nbuild_meta.build_{kind}(sys.argv[1])\n"
            proc = subprocess.run([sys.executable, "-c", build, str(tmp_path / kind)], cwd=ROOT, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        [sdist_name] = [path.relative_to(tmp_path) for path in (tmp_path / "sdist").glob("uploadguard-*.tar.gz")]
        [wheel_name] = [path.relative_to(tmp_path) for path in (tmp_path / "wheel").glob("uploadguard-*.whl")]
        with tarfile.open(tmp_path / sdist_name) as sdist:
            assert any(name.endswith("/LICENSE") for name in sdist.getnames()), sdist.getnames()
        with zipfile.ZipFile(tmp_path / wheel_name) as wheel:
            licenses = [name for name in wheel.namelist() if name.endswith("LICENSE")]
            assert licenses and b"MIT License" in wheel.read(licenses[0]), wheel.namelist()
            [metadata] = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
            text = wheel.read(metadata).decode()
        assert "ASGI" in text.split("\n\n", 1)[0] and "Framework :: FastAPI" in text
