"""``python -m dist_restore``: the ``dist-restore`` command line."""

from dist_restore.cli import main

raise SystemExit(main())
