"""Image and mask transforms of docs/design.md section 1 (CLIP input, ground-truth mask, detector input).

Decoding: :func:`decode_image` opens any PIL mode and returns an 8-bit ``L`` image for
single-channel inputs (1, L, LA, I;16*, I, F) and an ``RGB`` image for everything else
(RGB, RGBA, P, PA, CMYK, YCbCr, ...). Alpha is dropped (as ``Image.convert("RGB")`` does in the
research code); 16-bit values are scaled to 8 bits with ``round(v / 257)``.

CLIP input (:func:`clip_tensor`): PIL bicubic resize to SxS (aspect not kept) in the decoded mode
-- a grayscale image is resized first and made RGB afterwards, as open_clip's preprocess did in
the research code -- then ToTensor and the OpenAI CLIP mean/std.

Mask (:func:`mask_tensor`): ``> 0``, as a 0/255 ``L`` image, PIL bilinear resize to SxS, /255, > 0.5.

Detector input (:func:`detector_tensor`): RGB, PIL bilinear resize to
:func:`detector_resize_size` (GroundingDINO's ``RandomResize([518], max_size=1333)`` rule),
ToTensor, ImageNet mean/std.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from filo.errors import FiloError
from filo.imagefile import (  # noqa: F401 - re-exported, torch-free decoding
    _DECODE_ERRORS,
    _GRAY_8,
    _SIXTEEN_BIT,
    DEFAULT_IMAGE_SIZE,
    _open_decoded,
    _sixteen_to_eight,
    _to_base_mode,
    clip_resize,
    decode_image,
    decode_image_bytes,
    load_rgb,
    to_rgb,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DETECTOR_SHORT_SIDE = 518
DETECTOR_MAX_SIZE = 1333


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------

def pil_to_tensor01(img: Image.Image) -> torch.Tensor:
    """torchvision ``ToTensor`` for an 8-bit RGB image: [3, H, W] float32 in [0, 1]."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def normalize(t: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(t - mean) / std`` per channel, like torchvision ``Normalize``."""
    m = torch.tensor(mean, dtype=t.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=t.dtype).view(-1, 1, 1)
    return (t - m) / s


def clip_tensor(img: Image.Image, size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """CLIP input [3, size, size]: bicubic resize, ToTensor, OpenAI CLIP mean/std."""
    return normalize(pil_to_tensor01(clip_resize(img, size)), CLIP_MEAN, CLIP_STD)


def load_mask(path: str | os.PathLike, image_size: tuple[int, int] | None = None,
              image_path: str | os.PathLike | None = None) -> np.ndarray:
    """Read a mask as a bool array [H, W] (any nonzero pixel is defective).

    ``image_size`` (w, h) of the matching image: a different mask size raises a FiloError naming
    both files.
    """
    path = Path(path)
    if not path.is_file():
        who = f" of image {image_path}" if image_path is not None else ""
        raise FiloError(f"mask {path}{who} not found; add it or rebuild the image list")
    try:
        with Image.open(path) as m:
            m.load()
            if m.mode in ("1", "L", "I", "F") or m.mode in _SIXTEEN_BIT:
                arr = np.asarray(m) > 0
            elif m.mode in ("LA", "La"):
                arr = np.asarray(m.convert("L")) > 0
            else:
                arr = (np.asarray(m.convert("RGB")) > 0).any(axis=2)
            size = m.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FiloError(f"cannot read mask {path}: {reason}; the file is corrupt or not an "
                        f"image, replace it") from None
    if image_size is not None and tuple(size) != tuple(image_size):
        raise FiloError(f"mask {path} is {size[0]}x{size[1]} but image {image_path} is "
                        f"{image_size[0]}x{image_size[1]}; masks must have the image's size")
    return arr


def mask_tensor(mask: np.ndarray, size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """Ground-truth mask [size, size] bool: 0/255 L image, PIL bilinear resize, /255, > 0.5."""
    img = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    resized = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    return torch.from_numpy(arr > 0.5)


def detector_resize_size(w: int, h: int, short: int = DETECTOR_SHORT_SIDE,
                         max_size: int | None = DETECTOR_MAX_SIZE) -> tuple[int, int]:
    """GroundingDINO's resize rule (``RandomResize([short], max_size)``): new ``(w, h)``.

    The shorter side becomes ``short`` and the longer ``int(short * long / shorter)``; if that
    longer side would exceed ``max_size``, ``short`` becomes ``int(round(max_size * shorter /
    longer))`` first. An image whose shorter side already equals the target keeps its size.
    """
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    size = short
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


def detector_tensor(img: Image.Image, short: int = DETECTOR_SHORT_SIDE,
                    max_size: int | None = DETECTOR_MAX_SIZE,
                    ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Detector input [3, h', w'] (RGB, PIL bilinear, ImageNet mean/std) and the original (w, h)."""
    rgb = to_rgb(img)
    w, h = rgb.size
    new_w, new_h = detector_resize_size(w, h, short, max_size)
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return normalize(pil_to_tensor01(rgb), IMAGENET_MEAN, IMAGENET_STD), (w, h)


def load_clip_input(path: str | os.PathLike, size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """Decode ``path`` and return its CLIP input tensor [3, size, size]."""
    return clip_tensor(decode_image(path), size)


def load_detector_input(path: str | os.PathLike, short: int = DETECTOR_SHORT_SIDE,
                        max_size: int | None = DETECTOR_MAX_SIZE,
                        ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode ``path`` and return its detector tensor and original (w, h)."""
    return detector_tensor(decode_image(path), short, max_size)
