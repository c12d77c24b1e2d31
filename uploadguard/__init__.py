"""uploadguard: file uploads to gunicorn-served WSGI apps that do not fail at random.

The public API::

    from uploadguard import UploadGuard, Settings
    application = UploadGuard(application)

See :mod:`uploadguard.wsgi` for the middleware, :mod:`uploadguard.config` for
the ``UPLOADGUARD_*`` settings, :mod:`uploadguard.django` and
:mod:`uploadguard.flask` for the framework integrations.
"""

from __future__ import annotations

from .config import ConfigError, Settings
from .errors import BadRequest, BodyTooLarge, InternalError, LengthRequired, TempDirUnavailable, UploadGuardError
from .wsgi import GuardStats, UploadGuard

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "ConfigError",
    "GuardStats",
    "InternalError",
    "LengthRequired",
    "Settings",
    "TempDirUnavailable",
    "UploadGuard",
    "UploadGuardError",
    "__version__",
]
