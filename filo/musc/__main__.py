"""``python -m filo.musc`` (the CLI lives in :mod:`filo.cli.musc`)."""

import sys

from filo.cli.musc import main

if __name__ == "__main__":
    sys.exit(main())
