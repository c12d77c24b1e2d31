"""WSGI apps for tests/test_gunicorn.py: a gunicorn worker seen from inside.

``whoami`` answers the worker's pid, ``tempfile.gettempdir()`` and ``TMPDIR``
as JSON; ``?hold=0.5`` keeps the worker busy that many seconds first, so
concurrent requests reach different sync workers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def whoami(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    hold = parse_qs(environ.get("QUERY_STRING", "")).get("hold")
    if hold:
        time.sleep(float(hold[0]))
    body = json.dumps({
        "pid": os.getpid(),
        "tempdir": tempfile.gettempdir(),
        "TMPDIR": os.environ.get("TMPDIR"),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
