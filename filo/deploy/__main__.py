"""``python -m filo.deploy`` (the CLI lives in :mod:`filo.cli.deploy`)."""

from filo.cli.deploy import main

if __name__ == "__main__":
    raise SystemExit(main())
