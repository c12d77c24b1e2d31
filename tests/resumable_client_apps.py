"""WSGI apps for the client-side resumable tests (interop, browser, soak) under real gunicorn.

``application`` is ``UploadGuard(ResumableUploads(...))``, the stack the README
recommends: the tus endpoint under ``/files/``, the guard's temp-dir checks
and retryable 503 in front.  Its storage is ``$TEST_RESUMABLE_STORAGE``.
Each completed upload is recorded by ``on_complete`` as
``$TEST_RECORDS/<id>.json`` -- the sha256 and length of ``upload.open()`` and
the metadata -- so a test can check what the server holds without knowing
the store's layout; with ``$TEST_COMPLETIONS`` set, each call also appends a
line ``<id> <pid>`` to that file (to count the calls and know who made them).
``/page/<name>`` serves ``$TEST_PAGES/<name>`` (the browser test's page and
``upload.js``, same origin as the endpoint).
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from uploadguard import UploadGuard
from uploadguard.resumable import ResumableUploads

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from uploadguard.resumable import Upload


def record(upload: Upload) -> None:
    """Write what the server holds for a completed upload, atomically."""
    digest = hashlib.sha256()
    with upload.open() as data:
        while block := data.read(1024 * 1024):
            digest.update(block)
    records = Path(os.environ["TEST_RECORDS"])
    records.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"id": upload.id, "length": upload.length, "sha256": digest.hexdigest(),
                       "metadata": upload.metadata, "pid": os.getpid()})
    temp = records / f".{upload.id}.{os.getpid()}.tmp"
    temp.write_text(body)
    temp.replace(records / f"{upload.id}.json")
    if completions := os.environ.get("TEST_COMPLETIONS"):
        with open(completions, "a") as calls:  # one short append: lines from other workers never interleave
            calls.write(f"{upload.id} {os.getpid()}\n")


def pages(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Everything outside ``/files/``: static test pages, else 404."""
    path = environ.get("PATH_INFO", "")
    name = path.removeprefix("/page/")
    root = os.environ.get("TEST_PAGES")
    if root and path.startswith("/page/") and "/" not in name and (Path(root) / name).is_file():
        body = (Path(root) / name).read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [body]
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]


application = UploadGuard(ResumableUploads(pages, storage=os.environ.get("TEST_RESUMABLE_STORAGE"),
                                           on_complete=record))
