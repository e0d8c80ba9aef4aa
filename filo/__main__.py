"""``python -m filo`` — project-level commands (the CLI lives in :mod:`filo.cli.main`)."""

import sys

from filo.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
