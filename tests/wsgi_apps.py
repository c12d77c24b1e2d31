"""Plain WSGI apps that gunicorn serves in the end-to-end tests.

``spool`` does what Django and Werkzeug do with an upload: copy the body into
a named temp file in the upload temp dir, then answer its size and sha256.
``guarded`` is the same app behind :class:`uploadguard.UploadGuard`, configured
from the ``UPLOADGUARD_*`` environment like a user's would be.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from uploadguard import UploadGuard


def spool(environ, start_response):
    if environ["REQUEST_METHOD"] == "GET":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello\n"]
    directory = os.environ.get("UPLOADGUARD_TEMP_DIR") or tempfile.gettempdir()
    digest = hashlib.sha256()
    size = 0
    stream = environ["wsgi.input"]
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".upload") as fh:
        while True:
            chunk = stream.read(65536)
            if not chunk:
                break
            fh.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        fh.flush()
    body = json.dumps({"size": size, "sha256": digest.hexdigest()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def broken(environ, start_response):
    """Raises an OSError unrelated to uploads (a missing config file)."""
    open("/nonexistent-uploadguard-config/settings.ini")  # noqa: SIM115
    raise AssertionError("unreachable")


guarded = UploadGuard(spool)
guarded_broken = UploadGuard(broken)


def refuse(environ, start_response):
    """A naive size check: answers 413 without reading the body (what many apps do)."""
    start_response("413 Content Too Large", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"too big\r\n"]


#: The limit given as a keyword, not the environment: the 100-continue hook must still honour it.
guarded_keyword = UploadGuard(spool, max_body_size="1M")
#: A guard inside a guard: the inner, smaller limit wins.
nested = UploadGuard(UploadGuard(spool, max_body_size="1M"))
