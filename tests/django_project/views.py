"""Views of the test project; each answers JSON."""

import hashlib
import os
import shutil

from django.conf import settings
from django.http import JsonResponse
from django.middleware.csrf import get_token
from django.views.decorators.csrf import csrf_exempt


def form(request):
    """The CSRF token (and its cookie), as a page with a form would hand it out."""
    return JsonResponse({"csrf": get_token(request)})


def _store(request):
    stored = []
    for upload in request.FILES.getlist("file"):
        digest = hashlib.sha256()
        target = os.path.join(settings.STORE_DIR, os.path.basename(upload.name))
        os.makedirs(settings.STORE_DIR, exist_ok=True)
        spooled = os.path.dirname(upload.temporary_file_path()) if hasattr(upload, "temporary_file_path") else None
        with open(target, "wb") as out:
            for chunk in upload.chunks():
                digest.update(chunk)
                out.write(chunk)
        stored.append({"name": upload.name, "size": upload.size, "sha256": digest.hexdigest(), "spooled_in": spooled})
    return JsonResponse({"stored": stored, "fields": request.POST.dict()})


@csrf_exempt
def upload(request):
    """Store the files of the ``file`` field (the view is the first to read the body)."""
    return _store(request)


def upload_protected(request):
    """The same behind CSRF protection: ``CsrfViewMiddleware.process_view`` reads the body first."""
    return _store(request)


@csrf_exempt
def raw(request):
    """Read ``wsgi.input`` directly, as a view taking chunked uploads must; also say what Django saw."""
    django_body = request.body
    stream = request.META["wsgi.input"]
    size = 0
    while chunk := stream.read(65536):
        size += len(chunk)
    return JsonResponse({"size": size, "django_body": len(django_body), "files": len(request.FILES)})


@csrf_exempt
def broken(request):
    """Fail with an OSError that has nothing to do with uploads."""
    shutil.copy("/nonexistent-uploadguard-test/settings.ini", "/nonexistent-uploadguard-test/copy.ini")
    return JsonResponse({})


def resumable_done(request):
    """A form naming a finished resumable upload (CSRF-protected): store the file, answer its name and sha256."""
    from uploadguard.django import resumable_file

    upload = resumable_file(request, request.POST["upload"])
    answer = _stored(upload)
    if request.POST.get("delete"):
        from uploadguard.django import delete_resumable

        delete_resumable(request, request.POST["upload"])
    return JsonResponse(answer)


async def resumable_done_async(request):
    """``resumable_done`` as an async view: ``aresumable_file``, the file stored in a thread."""
    import asyncio

    from uploadguard.django import aresumable_file

    upload = await aresumable_file(request, request.POST["upload"])
    return JsonResponse(await asyncio.to_thread(_stored, upload, "async-"))


async def resumable_done_async_sync_call(request):
    """An async view calling the sync ``resumable_file`` (a mistake: it must fail clearly, off nothing)."""
    from uploadguard.django import resumable_file

    resumable_file(request, request.POST["upload"])
    return JsonResponse({})


def _stored(upload, prefix=""):
    digest = hashlib.sha256()
    os.makedirs(settings.STORE_DIR, exist_ok=True)
    with open(os.path.join(settings.STORE_DIR, prefix + upload.name), "wb") as out:
        for chunk in upload.chunks():
            digest.update(chunk)
            out.write(chunk)
    upload.close()
    return {"name": upload.name, "size": upload.size, "content_type": upload.content_type,
            "sha256": digest.hexdigest()}


def db_login(request):
    """Log in as the database user ``user`` names, created on first use (``login()``: session and CSRF rotate)."""
    from django.contrib.auth import login
    from django.contrib.auth.models import User

    user, _ = User.objects.get_or_create(username="user" + request.POST["user"])
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return JsonResponse({"id": user.pk})


def login(request):
    """Log in as the user ``user`` names (``django.contrib.auth.login``: the session key and CSRF secret rotate)."""
    from django.contrib.auth import login
    from django.contrib.auth.models import User

    user = User(id=int(request.POST["user"]), username="user" + request.POST["user"])  # never saved: no database
    login(request, user, backend="tests.test_django_resumable.Backend")
    return JsonResponse({})
