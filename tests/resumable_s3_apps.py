"""The resumable endpoint on S3 storage, for the several-hosts tests (``tests/test_resumable_hosts.py``).

Each gunicorn "host" runs this module with its own local directories and the
same ``UPLOADGUARD_RESUMABLE_STORAGE=s3://bucket/prefix``; endpoint and
credentials come from boto3's standard environment (``AWS_ENDPOINT_URL``...).
``RESUMABLE_TEST_HOOK_LOG``: a file ``on_complete`` appends
``<id> <sha256> <pid> <host>`` lines to (hosts may share it: appends of one
short line are atomic); ``RESUMABLE_TEST_HOST``: this host's name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

from uploadguard.resumable import ResumableUploads, Upload


def fallback(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    body = os.environ.get("RESUMABLE_TEST_HOST", "app").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def on_complete(upload: Upload) -> None:
    digest = hashlib.sha256()
    with upload.open() as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    log = os.environ.get("RESUMABLE_TEST_HOOK_LOG")
    if log:
        with open(log, "a") as out:
            out.write(f"{upload.id} {digest.hexdigest()} {os.getpid()} {os.environ.get('RESUMABLE_TEST_HOST')}\n")


application = ResumableUploads(
    fallback,
    on_complete=on_complete,
    lock_timeout=float(os.environ.get("RESUMABLE_TEST_LOCK_TIMEOUT", "5")),
)  # storage: UPLOADGUARD_RESUMABLE_STORAGE=s3://bucket/prefix, as a deployment sets it
