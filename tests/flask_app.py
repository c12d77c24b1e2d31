"""The Flask app of the tests of :mod:`uploadguard.flask`, in-process and under gunicorn.

``create_app(**config)`` builds it guarded by ``UploadGuard(app)`` (``guarded=False``: without);
``app`` is one built from the environment (``TEST_STORE_DIR``: where uploads
are kept) for gunicorn.  The request header ``X-Sabotage`` breaks the temp
dir after uploadguard's check and before the view reads the form -- the race
the check cannot prevent: ``remove`` deletes it, ``fill`` fills its file
system (a test tmpfs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.wrappers import Response

from tests.support import fill
from uploadguard.flask import ResumableUploads, UploadGuard, delete_resumable, resumable_file


def create_app(*, guarded: bool = True, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update({"STORE_DIR": os.environ.get("TEST_STORE_DIR"), **config})

    @app.before_request
    def sabotage() -> None:
        how = request.headers.get("X-Sabotage")
        if how == "remove":
            shutil.rmtree(tempfile.gettempdir())
        elif how == "fill":
            fill(Path(tempfile.gettempdir()))

    @app.after_request
    def stamp(response: Response) -> Response:
        response.headers["X-Inner-Hook"] = "seen"
        return response

    @app.post("/upload")
    def upload() -> Response:
        """Store the files of the ``file`` field; answer their names, sizes and sha256."""
        stored = []
        for part in request.files.getlist("file"):
            data = part.read()
            name = os.path.basename(part.filename or "upload")
            os.makedirs(app.config["STORE_DIR"], exist_ok=True)
            with open(os.path.join(app.config["STORE_DIR"], name), "wb") as out:
                out.write(data)
            stored.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        return jsonify(stored=stored, fields=request.form.to_dict())

    @app.post("/raw")
    def raw() -> Response:
        """Read the body as a stream (a chunked upload, say); answer its size."""
        return jsonify(size=len(request.get_data()))

    @app.post("/broken")
    def broken() -> Response:
        """Fail with an OSError that has nothing to do with uploads."""
        shutil.copy("/nonexistent-uploadguard-test/settings.ini", "/nonexistent-uploadguard-test/copy.ini")
        return jsonify()

    @app.get("/")
    def index() -> str:
        return "hello\n"

    @app.post("/resumable-done")
    def resumable_done() -> Response:
        """A form naming a finished resumable upload: store the file, answer its name and sha256."""
        upload = resumable_file(request.form["upload"])
        data = upload.read()
        os.makedirs(app.config["STORE_DIR"], exist_ok=True)
        upload.stream.close()
        with open(os.path.join(app.config["STORE_DIR"], os.path.basename(upload.filename or "upload")), "wb") as out:
            out.write(data)
        if request.form.get("delete"):
            delete_resumable(request.form["upload"])
        return jsonify(name=upload.filename, size=len(data), content_type=upload.content_type,
                       sha256=hashlib.sha256(data).hexdigest())

    if guarded:
        UploadGuard(app)
    if app.config.get("RESUMABLE_STORAGE") or os.environ.get("TEST_RESUMABLE_STORAGE"):
        app.config["SECRET_KEY"] = app.config.get("SECRET_KEY") or "uploadguard-tests-only"
        app.config["UPLOADGUARD_RESUMABLE_STORAGE"] = (app.config.get("RESUMABLE_STORAGE")
                                                       or os.environ["TEST_RESUMABLE_STORAGE"])
        ResumableUploads(app)
    return app


app = create_app()
