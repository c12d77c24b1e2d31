"""WSGI apps for the resumable end-to-end tests (``tests/test_resumable_gunicorn.py``).

Configured from the environment so one module serves every test:
``RESUMABLE_TEST_STORAGE`` (the storage directory), ``RESUMABLE_TEST_HOOK_LOG``
(a file ``on_complete`` appends ``<id> <sha256>`` lines to),
``RESUMABLE_TEST_HOOK_FAIL`` (a file whose existence makes ``on_complete`` raise).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

from uploadguard.resumable import ResumableUploads, Upload


def fallback(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"app"]


def on_complete(upload: Upload) -> None:
    fail = os.environ.get("RESUMABLE_TEST_HOOK_FAIL")
    if fail and os.path.exists(fail):
        raise RuntimeError("on_complete told to fail")
    digest = hashlib.sha256()
    with upload.open() as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    log = os.environ.get("RESUMABLE_TEST_HOOK_LOG")
    if log:
        with open(log, "a") as out:
            out.write(f"{upload.id} {digest.hexdigest()} {os.getpid()}\n")


application = ResumableUploads(
    fallback,
    storage=os.environ.get("RESUMABLE_TEST_STORAGE") or None,
    on_complete=on_complete,
    cors_origins=os.environ.get("RESUMABLE_TEST_CORS", "*"),
    lock_timeout=float(os.environ.get("RESUMABLE_TEST_LOCK_TIMEOUT", "5")),
)
