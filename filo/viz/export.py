"""Writing panels and thumbnails to disk (atomic) and naming them after the dataset images."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from filo.errors import FiloError
from filo.fileio import atomic_write_bytes as _atomic_write_bytes


def _encode(image: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(image[..., ::-1]), params or [])
    if not ok:
        raise FiloError(f"could not encode an image as {ext}; check the OpenCV installation")
    return buf.tobytes()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Atomic write of encoded image bytes; an unwritable folder is a one-line user error."""
    try:
        _atomic_write_bytes(path, data)
    except OSError as err:
        raise FiloError(f"cannot write {path}: {err.strerror}; choose a writable --viz_dir") from None


def write_panel(path: str | Path, panel: np.ndarray) -> Path:
    """Write an RGB uint8 panel as PNG atomically (temp file + ``os.replace``); makes parent dirs."""
    path = Path(path)
    atomic_write_bytes(path, _encode(panel, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]))
    return path


def write_thumbnail(path: str | Path, panel: np.ndarray, max_width: int = 320) -> Path:
    """A JPEG copy of ``panel`` at most ``max_width`` px wide (aspect ratio kept), atomically."""
    path = Path(path)
    h, w = panel.shape[:2]
    if w > max_width:
        new_h = max(1, int(round(h * max_width / w)))
        panel = cv2.resize(panel, (max_width, new_h), interpolation=cv2.INTER_AREA)
    atomic_write_bytes(path, _encode(panel, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 85]))
    return path


def viz_file_name(img_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Relative output name of an image's panel: its path under the dataset root, suffix ``.png``.

    ``"bottle/test/broken_large/000.png"`` -> ``bottle/test/broken_large/000.png``;
    ``"candle/Data/Images/Anomaly/000.JPG"`` -> ``candle/Data/Images/Anomaly/000.png``.
    An absolute path is made relative to ``root`` when given (else its anchor is dropped).
    Backslashes count as separators; ``..`` components are refused (the name must stay inside
    the visualisation folder).
    """
    text = os.fspath(img_path).replace("\\", "/")
    if root is not None:
        root_text = os.fspath(root).replace("\\", "/").rstrip("/")
        if root_text and (text == root_text or text.startswith(root_text + "/")):
            text = text[len(root_text):]
    parts = [p for p in PurePosixPath(text).parts if p not in ("/", "", ".")]
    if parts and len(parts[0]) == 2 and parts[0][1] == ":":  # a Windows drive letter
        parts = parts[1:]
    if not parts:
        raise FiloError(f"cannot name a visualisation for image path {img_path!r}: it has no file name")
    if ".." in parts:
        raise FiloError(f"image path {img_path!r} contains '..'; give paths relative to the dataset root")
    return Path(*parts).with_suffix(".png")
