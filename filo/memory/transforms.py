"""Image and mask geometry of the PatchCore memory-bank mode.

PatchCore's reference input (``crop=True``): the image is made RGB first, torchvision
``Resize(resize)`` (shorter side -> ``resize``, longer side ``int(resize * long / short)``, PIL
bilinear, which antialiases when shrinking), ``CenterCrop(imagesize)`` (offset
``int(round((n - imagesize) / 2))``), ToTensor and the ImageNet mean/std.

``crop=False`` square-resizes the whole image to ``imagesize x imagesize`` (PIL bilinear)
instead, so the map covers the whole image like FiLo's maps (used when fusing the two).

Masks go through the same geometry on the 0/255 ``L`` image. The original casts the resized
``[0, 1]`` mask to ``int`` for its pixel metrics, which truncates: only pixels that stay exactly
1.0 count as defective. PIL resizes an 8-bit ``L`` image to 8-bit values (rounded), so that is
``value == 255`` after the resize, which :func:`patchcore_mask` computes.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from filo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from filo.errors import FiloError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "patchcore_geometry", "patchcore_mask",
           "patchcore_tensor"]


def _check_sizes(resize: int, imagesize: int, crop: bool) -> None:
    if imagesize < 1 or (crop and resize < 1):
        raise FiloError(f"memory-bank input: resize {resize} and imagesize {imagesize} must be "
                        "positive")
    if crop and imagesize > resize:
        raise FiloError(f"memory-bank input: the centre crop {imagesize} is larger than the "
                        f"resized shorter side {resize}; use --imagesize <= --resize")


def patchcore_geometry(img: Image.Image, resize: int = 256, imagesize: int = 224,
                       crop: bool = True) -> Image.Image:
    """Resize (+ centre crop) a PIL image in its own mode; PIL bilinear throughout."""
    _check_sizes(resize, imagesize, crop)
    bilinear = TF.InterpolationMode.BILINEAR
    if not crop:
        return TF.resize(img, [imagesize, imagesize], interpolation=bilinear, antialias=True)
    img = TF.resize(img, resize, interpolation=bilinear, antialias=True)
    return TF.center_crop(img, [imagesize, imagesize])


def patchcore_tensor(img: Image.Image, resize: int = 256, imagesize: int = 224,
                     crop: bool = True, *, mean: tuple[float, ...] = IMAGENET_MEAN,
                     std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """The network input ``[3, imagesize, imagesize]`` float32 (module docstring).

    The image is converted to RGB before resizing, as the original does when it opens files.
    ``mean``/``std``: ImageNet by default; ``ClipTowerFeatures.mean/std`` for the CLIP tower.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = patchcore_geometry(img, resize, imagesize, crop)
    return TF.normalize(TF.to_tensor(img), list(mean), list(std))


def patchcore_mask(mask: Image.Image, resize: int = 256, imagesize: int = 224,
                   crop: bool = True) -> torch.Tensor:
    """Boolean ``[imagesize, imagesize]`` ground truth with the original's truncation.

    ``mask`` is an 8-bit 0/255 image (other modes are converted to ``L``); it is resized in
    ``L`` mode like the original (PIL bilinear, 8-bit rounded result) and a pixel is defective
    only if it is exactly 255 afterwards (``ToTensor`` gives 1.0, ``astype(int)`` keeps 1).
    Border pixels of a defect, interpolated below 255, therefore count as normal.
    """
    if mask.mode != "L":
        mask = mask.convert("L")
    out = np.asarray(patchcore_geometry(mask, resize, imagesize, crop))
    return torch.from_numpy(out == 255)
