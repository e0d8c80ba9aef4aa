"""Evaluate FiLo (+ GroundingDINO) on a dataset. See `python test.py --help`."""

from filo.cli.test import main

if __name__ == "__main__":
    raise SystemExit(main())
