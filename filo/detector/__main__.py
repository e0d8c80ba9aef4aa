"""``python -m filo.detector convert IN OUT`` (the CLI lives in :mod:`filo.cli.convert`)."""

import sys

from filo.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
