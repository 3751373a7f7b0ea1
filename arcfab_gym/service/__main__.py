"""``python -m arcfab_gym.service serve ...`` (same as the ``arcfab`` command)."""

from arcfab_gym.service.cli import main

raise SystemExit(main())
