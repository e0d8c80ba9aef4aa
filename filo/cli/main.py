"""``python -m filo`` — project-level commands: ``doctor`` and ``download``."""

from __future__ import annotations

import argparse
import sys

from filo import __version__
from filo.errors import FiloError, cli_entry


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m filo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"filo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from filo.doctor import add_arguments

    doctor = sub.add_parser("doctor", help="check that every asset a job needs is present and intact")
    add_arguments(doctor)

    download = sub.add_parser(
        "download", help="fetch assets over HTTPS (needs internet) and verify their checksums")
    download.add_argument("names", nargs="*",
                          help="asset names (default: every asset); see `python -m filo doctor`")
    download.add_argument("--timeout", type=float, default=10.0,
                          help="seconds to wait for a connection (default 10)")
    return parser


def _download(names: list[str], timeout: float) -> int:
    from filo.assets import AssetPaths, ChecksumCache, build_registry, download_asset

    registry = build_registry(AssetPaths.from_env())
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise FiloError(f"unknown asset {unknown[0]!r}; known: {', '.join(registry)}")
    cache = ChecksumCache()
    for name in names or list(registry):
        download_asset(registry[name], timeout=timeout, cache=cache)
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "doctor":
        from filo.doctor import main_doctor

        return main_doctor(args)
    if args.command == "download":
        return _download(args.names, args.timeout)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
