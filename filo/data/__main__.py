"""``python -m filo.data`` (the CLI lives in :mod:`filo.cli.data`)."""

import sys

from filo.cli.data import main

if __name__ == "__main__":
    sys.exit(main())
