"""``python -m filo.demo`` (the CLI lives in :mod:`filo.cli.demo`)."""

import sys

from filo.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
