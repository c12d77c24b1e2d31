"""The documentation builds, and every Python block in it runs.

``mkdocs build --strict`` (the docs extra; also in the test extra) fails on a broken link, a missing
anchor, a missing included file or an API reference that names nothing; the settings and CLI references
are rendered from the code by docs/hooks.py.  Each page's Python blocks run in order in a fresh process
(tests/run_snippets.py, with Sybil), so a block that stops working fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from uploadguard.config import SETTING_NAMES

pytest.importorskip("mkdocs")
pytest.importorskip("sybil")

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def run_snippets(page: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.run_snippets", str(page)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


class TestSite:
    def test_builds_strictly_with_the_references_rendered(self, tmp_path: Path) -> None:
        """`mkdocs build --strict` succeeds offline; the site lists every setting, CLI command and API, and has the plots."""
        done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                               "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
        assert done.returncode == 0, done.stdout + done.stderr
        site = tmp_path / "site"
        settings = (site / "settings" / "index.html").read_text()
        assert all(name in settings for name in SETTING_NAMES)
        cli = (site / "cli" / "index.html").read_text()
        assert all(f"usage: uploadguard {command}" in cli for command in ("clean", "check-disk", "doctor"))
        api = (site / "api" / "index.html").read_text()
        for name in ("UploadGuard", "ResumableUploads", "LocalStore", "S3Store", "compress_image",
                     "UploadGuardMiddleware", "resumable_file"):
            assert f'id="uploadguard.' in api and name in api, name
        assert (site / "images" / "demo-resumable.png").stat().st_size > 10_000
        for plot in ("images-cpu", "images-memory", "s3-throughput", "slow-patches"):  # drawn from bench/README.md
            assert (site / "images" / f"bench-{plot}.svg").read_text().count("<rect") >= 3, plot
        assert "## [Unreleased]" not in (site / "changelog" / "index.html").read_text()  # rendered, not raw


class TestSnippets:
    @pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
    def test_every_python_block_runs(self, page: Path) -> None:
        """Every Python block of the page runs as written, in order, in a fresh process and a fresh directory."""
        done = run_snippets(page)
        assert done.returncode == 0, done.stdout + done.stderr

    def test_a_broken_block_fails(self, tmp_path: Path) -> None:
        """A page whose block raises makes the runner fail, naming the page and the line."""
        page = tmp_path / "broken.md"
        page.write_text("# Broken\n\n```python\nfrom uploadguard import UploadGuard\nUploadGuard(None, max_body_size='20X')\n```\n")
        done = run_snippets(page)
        assert done.returncode == 1 and "broken.md, line 3: the block fails" in done.stderr, done.stderr

    @pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
    def test_every_skipped_block_says_why(self, page: Path) -> None:
        """A block marked not runnable carries its reason."""
        for mark in re.findall(r"<!-- skip: next(.*?)-->", page.read_text()):
            assert mark.strip().startswith('"'), f"{page.name}: skip without a reason"

    def test_the_readme_is_short(self) -> None:
        """README.md stays the short version (at most 12,000 bytes): the rest is in docs/."""
        assert len((ROOT / "README.md").read_bytes()) <= 12_000
