"""The test project as a Django ASGI site with resumable uploads: a database, sessions, auth, login().

The settings a demanding user would have: database-backed sessions and
users (SQLite at ``$TEST_DJANGO_DB``, migrated by the test), the middleware
order the docs give, the resumable storage at ``$TEST_RESUMABLE_STORAGE``.
Served by ``tests/django_project/asgi.py``.
"""

import os

from .settings import *  # noqa: F403  (the test project's, then what the ASGI site adds)
from .settings import _PACKAGE

INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.sessions",
                  "uploadguard.django.UploadGuardConfig"]
MIDDLEWARE = [
    "uploadguard.django.UploadGuardMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # ResumableUploadsMiddleware, its on_complete asking the database (AsyncRecordingUploads: a coroutine's)
    f"{_PACKAGE}.middleware.{os.environ.get('TEST_RESUMABLE_MIDDLEWARE') or 'RecordingUploads'}",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ.get("TEST_DJANGO_DB") or ":memory:"}}
SESSION_ENGINE = "django.contrib.sessions.backends.db"
UPLOADGUARD_RESUMABLE_STORAGE = os.environ.get("TEST_RESUMABLE_STORAGE") or None
ROOT_URLCONF = f"{_PACKAGE}.urls"
