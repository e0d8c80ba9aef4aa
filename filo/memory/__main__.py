"""``python -m filo.memory`` (the CLI lives in :mod:`filo.cli.memory`)."""

import sys

from filo.cli.memory import main

if __name__ == "__main__":
    sys.exit(main())
