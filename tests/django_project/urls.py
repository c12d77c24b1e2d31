from django.urls import path

from . import views

urlpatterns = [
    path("form/", views.form),
    path("upload/", views.upload),
    path("upload/protected/", views.upload_protected),
    path("raw/", views.raw),
    path("broken/", views.broken),
    path("resumable-done/", views.resumable_done),
    path("login/", views.login),
]
