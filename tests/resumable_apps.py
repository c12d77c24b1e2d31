"""WSGI apps for the resumable end-to-end tests (``tests/test_resumable_gunicorn.py``, and the S3
hosts of ``tests/test_resumable_hosts.py``).

Configured from the environment so one module serves every test:
``RESUMABLE_TEST_STORAGE`` (the storage directory; unset: the settings', e.g.
``UPLOADGUARD_RESUMABLE_STORAGE=s3://bucket/prefix`` as a deployment sets it),
``RESUMABLE_TEST_HOOK_LOG`` (a file ``on_complete`` appends ``<id> <sha256> <pid> [<host>]``
lines to; hosts may share it: appends of one short line are atomic),
``RESUMABLE_TEST_HOOK_FAIL`` (a file whose existence makes ``on_complete`` raise),
``RESUMABLE_TEST_HOOK_DIE`` (a file whose existence makes ``on_complete`` delete it and SIGKILL its
worker: a death after the upload's last fsync and before the hook returned),
``RESUMABLE_TEST_HOST`` (this host's name: the other paths answer it).
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterable
from typing import Any

from uploadguard.resumable import ResumableUploads, Upload


def fallback(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    body = os.environ.get("RESUMABLE_TEST_HOST", "app").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def on_complete(upload: Upload) -> None:
    fail = os.environ.get("RESUMABLE_TEST_HOOK_FAIL")
    if fail and os.path.exists(fail):
        raise RuntimeError("on_complete told to fail")
    die = os.environ.get("RESUMABLE_TEST_HOOK_DIE")
    if die and os.path.exists(die):
        os.unlink(die)
        os.kill(os.getpid(), signal.SIGKILL)
    digest = hashlib.sha256()
    with upload.open() as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    log = os.environ.get("RESUMABLE_TEST_HOOK_LOG")
    if log:
        with open(log, "a") as out:
            out.write(f"{upload.id} {digest.hexdigest()} {os.getpid()} {os.environ.get('RESUMABLE_TEST_HOST', '')}".rstrip()
                      + "\n")


application = ResumableUploads(
    fallback,
    storage=os.environ.get("RESUMABLE_TEST_STORAGE") or None,
    on_complete=on_complete,
    cors_origins=os.environ.get("RESUMABLE_TEST_CORS", "*"),
    lock_timeout=float(os.environ.get("RESUMABLE_TEST_LOCK_TIMEOUT", "5")),
)
