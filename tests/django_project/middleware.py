"""``Sabotage``: breaks the upload temp dir after uploadguard's check and before Django parses the body.

That is the race the middleware cannot prevent (the directory vanishes, fills
up or turns read-only between the check and the spooling), made
deterministic.  The request header ``X-Sabotage`` says how:

``remove``    delete the directory
``fill``      fill its file system (a test tmpfs) until it has no space left
``readonly``  remount its file system (a test tmpfs) read-only

Every response gets ``X-Inner-Middleware: seen``, and ``X-Process-Exception``
names the exception if Django called ``process_exception``, so tests can see
what happened inside.

``TakingUploads``: the resumable endpoint with an ``on_complete`` that moves
the data away (to ``STORE_DIR/taken``), as applications do.

``RecordingUploads``: the resumable endpoint with an ``on_complete`` that asks
the database (as an application recording the upload would) and notes the
upload as ``STORE_DIR/completed/<id>``; ``AsyncRecordingUploads`` the same,
its ``on_complete`` a coroutine function using Django's async ORM.

``CorsUploads``: the resumable endpoint answering cross-origin requests from
``https://app.example``.

``SlowUploads``: the resumable endpoint with an ``on_complete`` that takes its
time for 3-byte uploads (a virus scan, a thumbnail), made deterministic: it
waits until ``SlowUploads.release`` is set, 10 s at most.
"""

import os
import shutil
import subprocess
import threading
import tempfile
from pathlib import Path

from django.conf import settings

from tests.support import fill
from uploadguard.django import ResumableUploadsMiddleware


def spool_dir() -> str:
    return settings.FILE_UPLOAD_TEMP_DIR or tempfile.gettempdir()


class Sabotage:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        how = request.headers.get("X-Sabotage")
        if how == "remove":
            shutil.rmtree(spool_dir())
        elif how == "fill":
            fill(Path(spool_dir()))
        elif how == "readonly":
            subprocess.run(["mount", "-o", "remount,ro", spool_dir()], check=True)
        response = self.get_response(request)
        response["X-Inner-Middleware"] = "seen"
        if hasattr(request, "process_exception"):
            response["X-Process-Exception"] = request.process_exception
        return response

    def process_exception(self, request, exception):
        request.process_exception = type(exception).__name__


class TakingUploads(ResumableUploadsMiddleware):
    def on_complete(self, upload):
        os.makedirs(os.path.join(settings.STORE_DIR, "taken"), exist_ok=True)
        os.replace(upload.path, os.path.join(settings.STORE_DIR, "taken", upload.id))


class Hold:
    """Holds each request whose ``X-Hold`` header is set until ``Hold.release`` is set, 30 s at most.

    A session or user lookup that takes its time (a slow database), made
    deterministic.  ``Hold.entered`` says a request waits; ``Hold.released``
    whether it was let go (``False``: it gave up waiting).
    """

    entered = threading.Event()
    release = threading.Event()
    released = None

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.headers.get("X-Hold"):
            Hold.entered.set()
            Hold.released = Hold.release.wait(30)
        return self.get_response(request)


class Meet:
    """Holds each request whose ``X-Meet`` header is set until another such request is held too, 10 s at most.

    Two slow session lookups at once, made deterministic: they meet only if
    they run side by side.  ``Meet.met`` says, per request, whether it met the
    other (``False``: it gave up waiting).
    """

    barrier = threading.Barrier(2)
    met: list[bool] = []

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.headers.get("X-Meet"):
            try:
                Meet.barrier.wait(10)
                Meet.met.append(True)
            except threading.BrokenBarrierError:
                Meet.met.append(False)
        return self.get_response(request)


class RecordingUploads(ResumableUploadsMiddleware):
    def on_complete(self, upload):
        from django.contrib.auth.models import User

        users = User.objects.count()
        os.makedirs(os.path.join(settings.STORE_DIR, "completed"), exist_ok=True)
        with open(os.path.join(settings.STORE_DIR, "completed", upload.id), "w") as note:
            note.write(str(users))


class AsyncRecordingUploads(ResumableUploadsMiddleware):
    async def on_complete(self, upload):
        from django.contrib.auth.models import User

        users = await User.objects.acount()
        os.makedirs(os.path.join(settings.STORE_DIR, "completed"), exist_ok=True)
        with open(os.path.join(settings.STORE_DIR, "completed", upload.id), "w") as note:
            note.write(str(users))


class CorsUploads(ResumableUploadsMiddleware):
    cors_origins = ["https://app.example"]


class SlowUploads(ResumableUploadsMiddleware):
    entered = threading.Event()
    release = threading.Event()
    released = None

    def on_complete(self, upload):
        if upload.length == 3:
            SlowUploads.entered.set()
            SlowUploads.released = SlowUploads.release.wait(10)
