"""The documentation's resumable code block, run as written under real gunicorn and driven by tuspy.

tests/test_docs.py runs every Python block of README.md and docs/ in-process; this one also serves the
plain-WSGI resumable block (docs/resumable.md, repeated unchanged in README.md) for a real client.

A block is found by the heading of its section and the line that introduces
it, never by line numbers, so editing the page around it cannot silently
test something else; a block that is gone or renamed fails the test.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import pytest

from tests.support import ROOT, Gunicorn

README = ROOT / "README.md"
RESUMABLE = ROOT / "docs" / "resumable.md"


def readme_block(section: str, lead: str, *, language: str = "python", page: Path = RESUMABLE) -> str:
    """The first ``language`` code block after the line starting with ``lead`` in ``page``'s ``section``."""
    text = page.read_text()
    match = re.search(rf"^{re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"{page.name} has no {section!r} section"
    body = match.group(1)
    start = re.search(rf"^{re.escape(lead)}", body, re.M)
    assert start, f"{page.name}: {section!r} has no line starting with {lead!r}"
    block = re.search(rf"^```{language}\n(.*?)^```", body[start.end():], re.S | re.M)
    assert block, f"{page.name}: {section!r} has no {language} block after {lead!r}"
    return block.group(1)


@pytest.mark.slow
class TestPlainWsgiResumable:
    def test_runs_as_written_on_a_fresh_account(self, tmp_path: Path) -> None:
        """The plain-WSGI resumable block, saved as app.py and served by gunicorn with uploadguard's hooks for a user
        with an empty home, takes a tuspy upload in chunks and its on_complete stores the file byte-identical."""
        from tusclient import client as tus_client

        work = tmp_path / "work"
        home = tmp_path / "home"  # a fresh account: no ~/.cache, no ~/.local
        work.mkdir()
        home.mkdir()
        (work / "app.py").write_text(readme_block("# Resumable uploads", "**Plain WSGI**"))
        server = Gunicorn("app:application", tmp_path=tmp_path, config="python:uploadguard.gunicorn",
                          args=["--chdir", str(work)], pythonpath=[work],
                          env={"HOME": str(home), "XDG_CACHE_HOME": "", "XDG_DATA_HOME": ""})
        try:
            data = os.urandom(3 * 1024 * 1024 + 17)
            uploader = tus_client.TusClient(f"{server.url}/files/").uploader(
                file_stream=io.BytesIO(data), chunk_size=1024 * 1024, metadata={"filename": "photo.jpg"})
            uploader.upload()
            upload_id = uploader.url.rsplit("/", 1)[1]
            stored = work / "media" / upload_id
            assert stored.is_file(), server.log()[-3000:]
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
            assert (home / ".local" / "share" / "uploadguard" / "uploads").is_dir()  # the default storage
            assert " 500 " not in server.log() and "Traceback" not in server.log()
        finally:
            server.stop()


class TestReadmeRepeatsTheDocs:
    def test_the_readme_resumable_block_is_the_docs_block(self) -> None:
        """README.md's plain-WSGI resumable block is docs/resumable.md's, unchanged, so the gunicorn run above covers both."""
        readme = README.read_text()
        assert readme_block("# Resumable uploads", "**Plain WSGI**") in readme
