"""Image arguments of the prediction CLIs (``filo.predict``, ``filo.deploy predict``): torch-free."""

from __future__ import annotations

from pathlib import Path

from filo.errors import FiloError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the given folders."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise FiloError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {item}")
            found += files
        elif item.is_file():
            found.append(item)
        else:
            raise FiloError(f"--images: {item} does not exist")
    if not found:
        raise FiloError("--images: give at least one image file or folder")
    return found


def output_stem(path: Path, inputs: list[Path]) -> Path:
    """Output name: the path below the folder it was found in (or the file name)."""
    resolved = path.resolve()
    for item in inputs:
        base = item.resolve()
        if item.is_dir() and base in resolved.parents:
            return resolved.relative_to(base).with_suffix("")
    return Path(path.stem)
