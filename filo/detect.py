"""``python -m filo.detect``: GroundingDINO-only runs (the CLI lives in :mod:`filo.cli.detect`)."""

from filo.cli.detect import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
