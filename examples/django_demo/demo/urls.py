from django.contrib.staticfiles.views import serve
from django.urls import path, re_path

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("upload/", views.upload, name="upload"),
    path("resumable/", views.resumable, name="resumable"),
    path("media/<str:name>", views.stored_file, name="stored-file"),
    path("favicon.ico", views.favicon),
    # DEBUG is off, so staticfiles would not serve; a demo may do it anyway.
    re_path(r"^static/(?P<path>.+)$", serve, {"insecure": True}),
]
