"""The documented ``asgi.py``: resumable uploads in front of Django, the guard around both.

Served by uvicorn and ``gunicorn -c gunicorn_conf.py -k asgi`` in
tests/test_django_asgi.py (settings: ``tests.django_project.settings_asgi``).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", __name__.rpartition(".")[0] + ".settings_asgi")
django_app = get_asgi_application()

from uploadguard.asgi import UploadGuard  # noqa: E402  (after Django is set up)
from uploadguard.django import ResumableUploadsASGI, settings_from_django  # noqa: E402

application = UploadGuard(ResumableUploadsASGI(django_app), settings=settings_from_django())
