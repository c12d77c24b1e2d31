"""A minimal Flask upload app behind uploadguard.

Run it with the project's gunicorn settings (from the repository root)::

    gunicorn -c gunicorn_conf.py --chdir examples --bind "${HOST:-127.0.0.1}:${PORT:-8000}" flask_app:app

It listens on loopback unless ``HOST`` names another address: ``PORT`` alone
changes only the port (``gunicorn_conf.py`` alone would bind ``0.0.0.0:$PORT``,
gunicorn's convention for platforms that route to the container).

The page uploads each chosen file in its own request through the package's
``upload.js`` (progress per file, retries on 503); without JavaScript the
form still posts normally.  Files are stored as-is in ``FLASK_STORAGE_DIR``
(default ``examples/var/flask``).  A real application would add CSRF
protection (e.g. Flask-WTF's ``CSRFProtect``).
"""

from __future__ import annotations

import hashlib
import os
from importlib.resources import files
from pathlib import Path

from flask import Flask, Response, jsonify, redirect, render_template_string, request, send_from_directory, url_for
from flask.typing import ResponseReturnValue
from werkzeug.utils import secure_filename

from uploadguard.flask import UploadGuard

app = Flask(__name__)
app.config["STORAGE_DIR"] = Path(os.environ.get("FLASK_STORAGE_DIR") or Path(__file__).parent / "var" / "flask")
UploadGuard(app)

PAGE = """<!doctype html>
<html lang="en"><meta charset="utf-8"><title>uploadguard + Flask</title>
<h1>uploadguard + Flask</h1>
<form action="{{ url_for('upload') }}" method="post" enctype="multipart/form-data" data-uploadguard>
  <input type="file" name="file" multiple required> <button>Upload</button>
  <ol data-uploadguard-list></ol>
</form>
<h2>Stored</h2>
<ul>{% for name in names %}<li><a href="{{ url_for('stored', name=name) }}">{{ name }}</a></li>{% endfor %}</ul>
<script src="{{ url_for('upload_js') }}"></script>
"""


@app.get("/")
def index() -> str:
    directory: Path = app.config["STORAGE_DIR"]
    names = sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
    return render_template_string(PAGE, names=names)


@app.post("/upload")
def upload() -> ResponseReturnValue:
    """Store every file of the ``file`` field; answer their names, sizes and sha256."""
    uploads = request.files.getlist("file")
    if not uploads:
        return jsonify(error="no_file", detail="No file was sent: choose one or more files."), 400
    directory: Path = app.config["STORAGE_DIR"]
    directory.mkdir(parents=True, exist_ok=True)
    stored = []
    for upload in uploads:
        name = secure_filename(upload.filename or "") or "upload"
        upload.save(directory / name)
        with open(directory / name, "rb") as fh:
            sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
        stored.append({"name": name, "size": (directory / name).stat().st_size, "sha256": sha256})
    if "json" in request.headers.get("Accept", ""):
        return jsonify(stored=stored)
    return redirect(url_for("index"), code=303)


@app.get("/stored/<name>")
def stored(name: str) -> Response:
    return send_from_directory(app.config["STORAGE_DIR"], name, as_attachment=True)


@app.get("/upload.js")
def upload_js() -> Response:
    """The JavaScript helper shipped inside the uploadguard package."""
    return send_from_directory(str(files("uploadguard") / "static" / "uploadguard"), "upload.js")
