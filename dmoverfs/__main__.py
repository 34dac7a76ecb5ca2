"""``python -m dmoverfs`` is the ``dmoverfs`` command."""

from dmoverfs.cli import main

raise SystemExit(main())
