"""The upload page with its gallery, the upload endpoint, and the stored files.

Each upload is stored under ``DEMO_STORAGE_DIR`` with a unique name
(``<date>-<time>-<random>-<original name>``).  Images go through
:func:`~uploadguard.images.compress_image` (upright, metadata stripped, JPEG
at quality 85, or 95 for "high quality"; transparent PNGs stay PNG, WebP
stays WebP, and an image is never stored larger than it came); other files
are stored byte for byte.  The answer names the stored file and
its sha256, so a client (or a test) can check what arrived.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import SuspiciousFileOperation
from django.core.files.uploadedfile import UploadedFile
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.text import get_valid_filename
from django.views.decorators.http import require_GET, require_POST

from uploadguard.images import DEFAULT_QUALITY, HIGH_QUALITY, ImageError, compress_image

log = logging.getLogger(__name__)

GALLERY_SIZE = 60  # newest files shown
IMAGE_SUFFIXES = frozenset({".jpg", ".png", ".webp", ".gif"})  # what compress_image() writes
# A stored name is "<stamp>-<stem><suffix>" (+ ".bin"), written first as ".<name>.part": 22 + 1 + 160 + 16 + 4 + 6
# bytes stay under the 255-byte limit of a file name (NAME_MAX) however many bytes each character takes.
MAX_STEM = 160  # bytes (UTF-8) of the original name kept, and at most 80 characters
MAX_SUFFIX = 16  # bytes (UTF-8) of the original extension kept
NOT_STORED = frozenset({errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG})  # open() errors that mean 404


def _title(name: str) -> str:
    """The original file name inside a stored name."""
    return name.split("-", 3)[-1]


def _clip(text: str, size: int) -> str:
    """``text`` cut to at most ``size`` bytes of UTF-8, never inside a character."""
    return text.encode()[:size].decode("utf-8", "ignore")


def _describe(name: str, size: int) -> dict[str, Any]:
    suffix = os.path.splitext(name)[1].lower()
    return {
        "name": name,
        "title": _title(name),
        "url": reverse("stored-file", args=[name]),
        "size": size,
        "is_image": suffix in IMAGE_SUFFIXES,
        "label": suffix.lstrip(".").upper() or "FILE",  # shown instead of a thumbnail
    }


def stored_files() -> list[dict[str, Any]]:
    """The newest stored files, newest first (names start with the time)."""
    try:
        entries = [e for e in os.scandir(settings.DEMO_STORAGE_DIR) if not e.name.startswith(".") and e.is_file()]
    except FileNotFoundError:
        return []
    entries.sort(key=lambda entry: entry.name, reverse=True)
    return [_describe(entry.name, entry.stat().st_size) for entry in entries[:GALLERY_SIZE]]


def _write(name: str, chunks: Iterable[bytes]) -> tuple[int, str]:
    """Write ``chunks`` to the storage dir atomically; return size and sha256."""
    directory = settings.DEMO_STORAGE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{name}.part"
    digest = hashlib.sha256()
    size = 0
    try:
        with open(partial, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        os.replace(partial, directory / name)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


def store(upload: UploadedFile, *, quality: int) -> dict[str, Any]:
    """Store one upload (re-compressed if it is an image) and describe it."""
    try:
        stem, suffix = os.path.splitext(get_valid_filename(upload.name or "upload"))
    except SuspiciousFileOperation:
        stem, suffix = "upload", ""
    stem = _clip(stem[:80], MAX_STEM)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    try:
        image = compress_image(upload, quality=quality, max_dimension=4096, max_pixels=50_000_000)  # memory: <= 17 MiB/MP
    except ImageError as exc:
        suffix = _clip(suffix, MAX_SUFFIX) + (".bin" if suffix.lower() in IMAGE_SUFFIXES else "")  # not shown as an image
        name = f"{stamp}-{stem}{suffix}"
        size, sha256 = _write(name, upload.chunks())
        facts: dict[str, Any] = {"kind": "file", "note": str(exc)}
    else:
        name = f"{stamp}-{stem}{image.extension}"
        size, sha256 = _write(name, [image.data])
        facts = {"kind": "image", "format": image.format, "width": image.width, "height": image.height,
                 "quality": quality, "changed": image.changed}
    return {**_describe(name, size), "sha256": sha256, "original_size": upload.size, **facts}


def _wants_json(request: HttpRequest) -> bool:
    return "json" in request.headers.get("Accept", "")


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "demo/index.html", {"files": stored_files(), "quality": DEFAULT_QUALITY,
                                               "high_quality": HIGH_QUALITY})


@require_POST
def upload(request: HttpRequest) -> HttpResponse:
    """Store every file sent in the ``file`` field (the JS helper sends one per request)."""
    files = request.FILES.getlist("file")
    if not files:
        detail = "No file was sent: choose one or more files."
        if _wants_json(request):
            return JsonResponse({"error": "no_file", "detail": detail}, status=400)
        return HttpResponse(detail, status=400, content_type="text/plain; charset=utf-8")
    quality = HIGH_QUALITY if request.POST.get("quality") == "high" else DEFAULT_QUALITY
    stored = [store(upload, quality=quality) for upload in files]
    if _wants_json(request):
        return JsonResponse({"stored": stored})
    return HttpResponseRedirect(reverse("index"), status=303)


@require_POST
def resumable(request: HttpRequest) -> HttpResponse:
    """Store a finished resumable upload named by its URL (the ``upload`` field), like :func:`upload` does a file."""
    from uploadguard.django import delete_resumable, resumable_file
    from uploadguard.resumable import UploadIncomplete, UploadLocked, UploadNotFound

    url = request.POST.get("upload", "")
    try:
        upload = resumable_file(request, url)
    except (UploadNotFound, UploadIncomplete) as exc:
        return JsonResponse({"error": exc.reason, "detail": exc.detail}, status=exc.status_code)
    quality = HIGH_QUALITY if request.POST.get("quality") == "high" else DEFAULT_QUALITY
    with upload:
        stored = store(upload, quality=quality)
    try:
        delete_resumable(request, url)  # stored: the resumable copy is not needed any more
    except (UploadNotFound, UploadLocked) as exc:  # a double submit deleted it already, or a request holds it
        log.warning("stored %s but could not delete resumable upload %s: %s", stored["name"], url, exc.detail)
    return JsonResponse({"stored": [stored]})


@require_GET
def favicon(request: HttpRequest) -> HttpResponse:
    """No icon, and no "Not Found: /favicon.ico" log line on every page a browser loads."""
    response = HttpResponse(status=204)
    response["Cache-Control"] = "max-age=86400"
    return response


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """``CSRF_FAILURE_VIEW``: a message the upload status line can show."""
    detail = "The page's security token (CSRF) is missing or out of date: reload the page and try again."
    if _wants_json(request):
        return JsonResponse({"error": "csrf", "detail": detail}, status=403)
    return HttpResponse(detail, status=403, content_type="text/plain; charset=utf-8")


@require_GET
def stored_file(request: HttpRequest, name: str) -> FileResponse:
    """A stored file: images inline, anything else as a download."""
    if name.startswith(".") or "\0" in name:  # open() refuses a NUL with ValueError
        raise Http404("no such file")
    try:
        fh = open(settings.DEMO_STORAGE_DIR / name, "rb")  # noqa: SIM115 (FileResponse closes it)
    except OSError as exc:
        if exc.errno not in NOT_STORED:
            raise
        raise Http404("no such file") from None
    as_image = os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
    return FileResponse(fh, as_attachment=not as_image, filename=_title(name))
