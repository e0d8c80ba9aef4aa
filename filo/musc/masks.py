"""The MuSc code's ground-truth binarisation (``--mask_rule musc``, docs/design.md 16.7).

The mask is resized bilinearly to the map size as an 8-bit image; MVTec AD, BTAD and every
other layout then count only pixels that are still exactly 255 (the original truncates the
``/255`` value to an integer), VisA every nonzero pixel. filo's own rule is ``> 0.5``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from filo.data.transforms import load_mask


def original_mask(path: str | Path, size: int, dataset: str) -> np.ndarray:
    """bool ``[size, size]`` ground truth of the mask file ``path`` under the original's rule."""
    binary = load_mask(path)
    img = Image.fromarray(binary.astype(np.uint8) * 255)
    arr = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    return arr > 0 if dataset == "visa" else arr == 255
