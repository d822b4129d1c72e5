"""``python -m server.demo``: see :mod:`server.demo`."""

from server.demo.cli import main

raise SystemExit(main())
