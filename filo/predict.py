"""``python -m filo.predict``: maps for unlabelled images (the CLI lives in :mod:`filo.cli.predict`)."""

from filo.cli.predict import build_parser, collect_images, main, output_stem, run_predict

__all__ = ["build_parser", "collect_images", "main", "output_stem", "run_predict"]

if __name__ == "__main__":
    raise SystemExit(main())
