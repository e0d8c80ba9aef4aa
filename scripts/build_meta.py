"""Write the research-code meta.json of a dataset: thin wrapper of `python -m filo.data build-meta`.

Usage: python scripts/build_meta.py --dataset mvtec|visa|folder --root DIR [--out FILE]
"""

from __future__ import annotations

import sys

from filo.cli.data import main

if __name__ == "__main__":
    sys.exit(main(["build-meta", *sys.argv[1:]]))
