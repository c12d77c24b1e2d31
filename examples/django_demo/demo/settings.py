"""Settings of the demo.  Not for production: the secret key is public."""

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
VAR = HERE.parent / "var"

# Public on purpose: this site is a local demo.  Never reuse it.
SECRET_KEY = "uploadguard-demo-only-not-secret"
# Off: the demo shows what users of a production site see (no debug pages).
DEBUG = os.environ.get("DEMO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]

INSTALLED_APPS = [
    "uploadguard.django.UploadGuardConfig",  # system checks; static/ holds uploadguard/upload.js
    "django.contrib.staticfiles",
    "demo",
]
MIDDLEWARE = [
    "uploadguard.django.UploadGuardMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Resumable uploads (tus) under /files/, after CSRF: upload.js resumes a cut upload where it stopped.
    "uploadguard.django.ResumableUploadsMiddleware",
]
CSRF_FAILURE_VIEW = "demo.views.csrf_failure"
ROOT_URLCONF = "demo.urls"
WSGI_APPLICATION = "demo.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
DATABASES: dict[str, dict[str, str]] = {}  # none: the gallery lists DEMO_STORAGE_DIR
STATIC_URL = "/static/"
USE_TZ = True
TIME_ZONE = "UTC"  # Django sets the process time zone: keep gunicorn's log times in one zone

# Where uploads are spooled while they arrive (the directory uploadguard
# guards: it follows FILE_UPLOAD_TEMP_DIR) and where the demo keeps them afterwards.
FILE_UPLOAD_TEMP_DIR = os.environ.get("UPLOADGUARD_TEMP_DIR") or str(VAR / "tmp")
DEMO_STORAGE_DIR = Path(os.environ.get("DEMO_STORAGE_DIR") or VAR / "uploads")
# Where resumable uploads are assembled (persistent, like the storage dir: a resumed upload survives a restart).
UPLOADGUARD_RESUMABLE_STORAGE = os.environ.get("UPLOADGUARD_RESUMABLE_STORAGE") or str(VAR / "resumable")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "django": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "uploadguard": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "demo": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}
