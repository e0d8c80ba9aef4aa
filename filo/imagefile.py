"""Image files without torch: decoding any PIL mode and the CLIP resize (docs/design.md section 1).

Decoding: :func:`decode_image` opens any PIL mode and returns an 8-bit ``L`` image for
single-channel inputs (1, L, LA, I;16*, I, F) and an ``RGB`` image for everything else
(RGB, RGBA, P, PA, CMYK, YCbCr, ...). Alpha is dropped (as ``Image.convert("RGB")`` does in the
research code); 16-bit values are scaled to 8 bits with ``round(v / 257)``.

Torch-free (numpy and Pillow only), so the deploy inferencer (:mod:`filo.deploy`) decodes and
resizes exactly like the torch pipeline; :mod:`filo.data.transforms` re-exports every name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from filo.errors import FiloError

DEFAULT_IMAGE_SIZE = 518

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_GRAY_8 = ("1", "L", "LA", "La")


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------

def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """Scale 0..65535 to 0..255 (``round(v / 257)``, so 65535 -> 255 and 257*k -> k)."""
    return np.clip(np.rint(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def _to_base_mode(img: Image.Image, path: str | os.PathLike) -> Image.Image:
    mode = img.mode
    if mode in _GRAY_8:
        return img.convert("L")
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.int64)
        return Image.fromarray(_sixteen_to_eight(arr))
    if mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        finite = arr[np.isfinite(arr)]
        hi = float(finite.max()) if finite.size else 0.0
        lo = float(finite.min()) if finite.size else 0.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=hi, neginf=lo)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = np.rint(arr * 255.0)  # float image in [0, 1]
        elif lo >= 0.0 and hi <= 255.0:
            out = np.rint(arr)  # 8-bit values stored wide
        elif lo >= 0.0 and hi <= 65535.0:
            return Image.fromarray(_sixteen_to_eight(arr))  # 16-bit values (e.g. 16-bit PNG as "I")
        else:
            out = np.rint((arr - lo) / max(hi - lo, 1e-12) * 255.0)
        return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if mode == "RGB":
        return img.copy()
    try:
        return img.convert("RGB")
    except (ValueError, OSError):
        try:
            return img.convert("RGBA").convert("RGB")
        except (ValueError, OSError):
            raise FiloError(f"cannot convert image {path} (mode {mode}) to RGB; "
                            f"save it as an 8-bit RGB or grayscale PNG") from None


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                  Image.DecompressionBombError)


def _open_decoded(source, name: str, fix: str, check=None) -> Image.Image:
    """Open ``source`` (a path or a file object), run ``check(img)`` on the header, decode.

    Any decoding failure is one :class:`FiloError` line naming ``name`` and ending with ``fix``."""
    try:
        with Image.open(source) as img:
            if check is not None:
                check(img)
            img.load()
            return _to_base_mode(img, name)
    except FiloError:
        raise
    except _DECODE_ERRORS as err:
        reason = ("not a readable image" if isinstance(err, UnidentifiedImageError)
                  else str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise FiloError(f"cannot read image {name}: {reason}; {fix}") from None


def decode_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully into memory; ``L`` for single-channel images, ``RGB`` otherwise.

    Raises a one-line :class:`FiloError` naming the file when it is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise FiloError(f"image {path} not found; check the dataset root and the image list")
    return _open_decoded(path, str(path), "the file is corrupt or not an image, replace or "
                         "remove it")


def decode_image_bytes(data: bytes, name: str, *, allowed_formats: frozenset[str] | None = None,
                       max_pixels: int | None = None) -> Image.Image:
    """Decode an image held in memory (an upload) like :func:`decode_image`.

    ``allowed_formats``: PIL format names accepted (e.g. ``{"PNG", "JPEG"}``); ``max_pixels``:
    largest width x height, checked from the header before any pixel is decoded. Errors are one
    :class:`FiloError` line naming ``name``.
    """
    import io

    def check(img: Image.Image) -> None:
        if allowed_formats is not None and img.format not in allowed_formats:
            raise FiloError(f"{name}: format {img.format or 'unknown'} is not accepted; send "
                            f"one of {', '.join(sorted(allowed_formats))}")
        w, h = img.size
        if w < 1 or h < 1 or (max_pixels is not None and w * h > max_pixels):
            raise FiloError(f"{name}: {w}x{h} pixels is outside the accepted size (at most "
                            f"{max_pixels} pixels); send a smaller image")

    return _open_decoded(io.BytesIO(data), name, "the file is corrupt or not an image", check)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` as an 8-bit RGB PIL image (any input mode; see :func:`decode_image`)."""
    return to_rgb(decode_image(path))


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB copy of an already decoded (``L`` or ``RGB``) image."""
    return img.convert("RGB") if img.mode != "RGB" else img


def clip_resize(img: Image.Image, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """PIL bicubic (antialiased) resize to ``size x size`` in the image's own mode, then RGB."""
    if img.mode not in ("L", "RGB"):
        img = _to_base_mode(img, "<in-memory image>")
    resized = img.resize((size, size), Image.Resampling.BICUBIC)
    return to_rgb(resized)
