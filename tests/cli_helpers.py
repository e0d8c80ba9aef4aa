"""Running a CLI's ``main`` in-process, as the tests of several modules do."""

from __future__ import annotations


def run_cli(main, argv) -> int:
    """``main(argv)``'s exit status (0 for None), also when it raises SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    return 0 if rc is None else int(rc)
