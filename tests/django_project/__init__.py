"""A tiny Django project for the tests of :mod:`uploadguard.django`.

Importable as ``tests.django_project`` (in-process tests) and as
``django_project`` (gunicorn with ``--pythonpath tests``); the settings name
their sibling modules relative to whichever it is.
"""
