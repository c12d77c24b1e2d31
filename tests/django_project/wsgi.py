"""WSGI entry points: ``application`` (the middleware alone), ``guarded`` (inside ``uploadguard.UploadGuard``)."""

import os

from django.core.wsgi import get_wsgi_application

from uploadguard import UploadGuard

os.environ.setdefault("DJANGO_SETTINGS_MODULE", __name__.rpartition(".")[0] + ".settings")

application = get_wsgi_application()
guarded = UploadGuard(application)
