"""Image arguments of the prediction CLIs (``filo.predict``, ``filo.deploy predict``): torch-free."""

from __future__ import annotations

from pathlib import Path

from filo.errors import FiloError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the given folders, each once
    (by resolved path; the first mention keeps its place)."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                           and p.is_file())
            if not files:
                raise FiloError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {item}")
            found += files
        elif item.is_file():
            found.append(item)
        else:
            raise FiloError(f"--images: {item} does not exist")
    if not found:
        raise FiloError("--images: give at least one image file or folder")
    seen: set[Path] = set()
    unique = []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def output_stem(path: Path, inputs: list[Path]) -> Path:
    """Output base name of one image: its path below the folder it was found in (or its file
    name), suffix kept (``sub/x.jpg``: outputs ``sub/x.jpg.npy``, ``sub/x.jpg.png``, ...)."""
    resolved = path.resolve()
    for item in inputs:
        base = item.resolve()
        if item.is_dir() and base in resolved.parents:
            return resolved.relative_to(base)
    return Path(path.name)


def output_stems(images: list[Path], inputs: list[Path]) -> list[Path]:
    """:func:`output_stem` of every image, made unique: a name another image already has (two
    files ``x.jpg`` named from different folders) gets ``~2``, ``~3`` ... before its suffix."""
    used: set[str] = set()
    out = []
    for path in images:
        stem = output_stem(path, inputs)
        cand, k = stem, 1
        while cand.as_posix().lower() in used:  # case-insensitive file systems too
            k += 1
            cand = stem.with_name(f"{Path(stem.name).stem}~{k}{Path(stem.name).suffix}")
        used.add(cand.as_posix().lower())
        out.append(cand)
    return out


def with_ext(stem: Path, ext: str) -> Path:
    """``x.jpg`` + ``.npy`` -> ``x.jpg.npy`` (the input's suffix stays in the name)."""
    return stem.with_name(stem.name + ext)
