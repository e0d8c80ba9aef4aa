"""``python -m filo.service`` is ``python -m filo serve``."""

from filo.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
