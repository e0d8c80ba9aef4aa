"""``python -m filo.export``: the same CLI as ``python -m filo export`` (:mod:`filo.cli.export`)."""

from filo.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
