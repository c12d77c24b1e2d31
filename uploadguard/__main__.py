"""``python -m uploadguard``: the same as the ``uploadguard`` command (see :mod:`uploadguard.cli`)."""

from uploadguard.cli import main

raise SystemExit(main())
