"""``python -m arcfab_gym.service [serve] [options]`` -- the ``arcfab`` command, with
``serve`` as the default subcommand."""

import sys

from arcfab_gym.service.cli import main

argv = sys.argv[1:]
if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
    argv = ["serve", *argv]
raise SystemExit(main(argv))
