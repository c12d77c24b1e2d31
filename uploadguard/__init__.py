"""uploadguard: file uploads to gunicorn-served WSGI apps that do not fail at random.

The public API::

    from uploadguard import UploadGuard, Settings
    application = UploadGuard(application)

See :mod:`uploadguard.wsgi` for the middleware, :mod:`uploadguard.config` for
the ``UPLOADGUARD_*`` settings, :mod:`uploadguard.django` and
:mod:`uploadguard.flask` for the framework integrations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, Settings
from .errors import BadRequest, BodyTooLarge, InternalError, LengthRequired, TempDirUnavailable, UploadGuardError

if TYPE_CHECKING:
    from .stats import GuardStats as GuardStats
    from .wsgi import UploadGuard as UploadGuard

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


def __getattr__(name: str) -> Any:
    # The WSGI guard (and the stats) on first use (PEP 562): every ``uploadguard.*`` import runs this file, and
    # the ASGI guard, the pure resumable core or ``uploadguard.config`` must not load the WSGI driver.
    value: Any
    if name == "UploadGuard":
        from .wsgi import UploadGuard as value
    elif name == "GuardStats":
        from .stats import GuardStats as value
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
