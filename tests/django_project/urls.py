from django.urls import path

from . import views

urlpatterns = [
    path("form/", views.form),
    path("upload/", views.upload),
    path("upload/protected/", views.upload_protected),
    path("raw/", views.raw),
    path("broken/", views.broken),
    path("resumable-done/", views.resumable_done),
    path("resumable-done-async/", views.resumable_done_async),
    path("resumable-done-async-sync-call/", views.resumable_done_async_sync_call),
    path("db-login/", views.db_login),
    path("login/", views.login),
]
