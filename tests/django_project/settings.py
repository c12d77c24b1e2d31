"""Settings of the test project: uploadguard first, CSRF on, every upload spooled to disk.

From the environment (for gunicorn): ``TEST_FILE_UPLOAD_TEMP_DIR`` becomes
``FILE_UPLOAD_TEMP_DIR`` (unset: Django spools to ``tempfile.gettempdir()``),
``TEST_STORE_DIR`` is where the upload view keeps the files it receives,
``TEST_DJANGO_MAX_BODY_SIZE`` becomes ``UPLOADGUARD_MAX_BODY_SIZE``.
"""

import os

_PACKAGE = __name__.rpartition(".")[0]

SECRET_KEY = "uploadguard-tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = ["uploadguard.django.UploadGuardConfig"]
MIDDLEWARE = [
    "uploadguard.django.UploadGuardMiddleware",
    f"{_PACKAGE}.middleware.Sabotage",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = f"{_PACKAGE}.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

# Any file over 1 KB goes through TemporaryFileUploadHandler, i.e. the temp dir.
FILE_UPLOAD_MAX_MEMORY_SIZE = 1024
FILE_UPLOAD_TEMP_DIR = os.environ.get("TEST_FILE_UPLOAD_TEMP_DIR") or None
STORE_DIR = os.environ.get("TEST_STORE_DIR") or None
# A limit from Django settings (not the environment), for the 100-continue and nesting tests.
UPLOADGUARD_MAX_BODY_SIZE = os.environ.get("TEST_DJANGO_MAX_BODY_SIZE") or None
