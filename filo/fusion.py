"""Fusing GroundingDINO boxes with FiLo anomaly maps (docs/design.md section 6).

Boxes here are x1, y1, x2, y2 in MAP pixel coordinates (the size x size CLIP input). Detector
boxes come in original-image pixels; map them with :func:`boxes_to_map` (the CLIP input is a
non-aspect-preserving resize, so x and y scale separately).

Two box geometries (docs/design.md section 6.1):

* default: corners clamped to the map, pixel columns ``floor(x1) .. floor(x2) - 1`` inside;
* research (``legacy_slices=True``): the detector's normalized boxes scaled straight to the map
  (:func:`research_box_corners`, not clamped), corners truncated toward zero with ``int()`` and
  used as Python slice bounds, so a corner at or below -1 is a slice start counted from the far
  end and usually empties the box; a pixel outside every box whose score is exactly 1.0 is also
  kept (the research code marked "inside" by writing 1.0 into a copy of the map).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_SIZE = 518
# Research-code cells per axis (closed intervals); centres between them match no cell.
LEGACY_CELLS = ((0, 172), (173, 344), (345, 517))


def boxes_to_map(boxes: torch.Tensor | np.ndarray | Sequence, image_size: tuple[int, int],
                 size: int = DEFAULT_SIZE) -> torch.Tensor:
    """Original-image pixel boxes [N, 4] of an image of (w, h) -> size x size map pixels."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64) if not isinstance(boxes, torch.Tensor)
                        else boxes, dtype=torch.float64).reshape(-1, 4)
    w, h = image_size
    return b * torch.tensor([size / w, size / h, size / w, size / h], dtype=torch.float64)


def _cell_half_open(v: float, size: int) -> int:
    """Third of [0, size) holding v: [0, s/3) -> 0, [s/3, 2s/3) -> 1, [2s/3, size] -> 2.

    For 518 the edges are 172.67 and 345.33: 172 -> 0, 173 -> 1, 345 -> 1 (legacy: 2).
    """
    return min(max(int(math.floor(v * 3.0 / size)), 0), 2)


def _cell_legacy(v: float) -> int | None:
    for i, (lo, hi) in enumerate(LEGACY_CELLS):
        if lo <= v <= hi:
            return i
    return None


def position_from_boxes(boxes_518, scores, matched, positions: Sequence[str],
                        size: int = DEFAULT_SIZE, legacy_grid: bool = False) -> str | None:
    """Position word of the highest-scoring counted box's centre (3x3 grid, row-major).

    ``boxes_518`` [N, 4] x1, y1, x2, y2 in map pixels; ``scores`` [N]; ``matched`` [N] bools;
    ``positions`` the 9 words in row-major order (top left, top, top right, left, ...). No
    counted box -> the centre (size / 2 rounded down, i.e. 259 for 518). Ties go to the first box.
    ``legacy_grid``: the research code's position rule: closed cells [0,172], [173,344],
    [345,517] (for size 518; a centre between two cells gets no position, ``None``, meaning
    all), and the box chosen by its score as printed in its phrase label (``str(score)[:4]``,
    e.g. 0.4567 -> 0.45) with the LAST of equal scores winning (the research code's ``>=``).
    """
    if len(positions) != 9:
        raise ValueError(f"need 9 position words, got {len(positions)}")
    b = np.asarray(boxes_518, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    m = np.asarray(matched, dtype=bool).reshape(-1)
    if not (len(b) == len(s) == len(m)):
        raise ValueError("boxes, scores and matched differ in length")
    if m.any():
        idx = np.flatnonzero(m)
        if legacy_grid:
            shown = np.array([float(str(float(v))[:4]) for v in s[idx]])
            best = idx[len(shown) - 1 - int(np.argmax(shown[::-1]))]
        else:
            best = idx[int(np.argmax(s[idx]))]
        cx, cy = (b[best, 0] + b[best, 2]) / 2.0, (b[best, 1] + b[best, 3]) / 2.0
    else:
        cx = cy = float(size // 2)
    if legacy_grid:
        col, row = _cell_legacy(cx), _cell_legacy(cy)
        if col is None or row is None:
            return None
    else:
        col, row = _cell_half_open(cx, size), _cell_half_open(cy, size)
    return positions[row * 3 + col]


def research_box_corners(boxes_cxcywh, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """The research code's box geometry: normalized cx, cy, w, h [N, 4] -> x1, y1, x2, y2 in
    size x size map pixels, float32, NOT clamped.

    Same float32 operations in the same order: ``b = box * size``, ``x1y1 = b[:2] - b[2:] / 2``,
    ``x2y2 = b[2:] + x1y1``.
    """
    b = torch.as_tensor(boxes_cxcywh, dtype=torch.float32).reshape(-1, 4)
    b = b * torch.tensor([size] * 4, dtype=torch.float32)
    x1y1 = b[:, :2] - b[:, 2:] / 2
    return torch.cat([x1y1, b[:, 2:] + x1y1], dim=1)


def box_mask(boxes, height: int, width: int, legacy_slices: bool = False) -> np.ndarray:
    """Boolean [H, W] mask of the union of boxes (x1, y1, x2, y2 map pixels).

    Default: corners clamped to the map, then pixel columns floor(x1) .. floor(x2) - 1 (rows
    alike) are inside. ``legacy_slices``: the research rule, ``int()`` corners as Python slice
    bounds without clamping (a negative corner counts from the far end; see the module doc).
    """
    inside = np.zeros((height, width), dtype=bool)
    for rows, cols in _box_slices(boxes, height, width, legacy_slices):
        inside[rows, cols] = True
    return inside


def _box_slices(boxes, height: int, width: int,
                legacy_slices: bool = False) -> list[tuple[slice, slice]]:
    """(rows, cols) slices of each box, with :func:`box_mask`'s pixel rule."""
    out = []
    if legacy_slices:
        for x1, y1, x2, y2 in np.asarray(boxes).reshape(-1, 4).tolist():
            out.append((slice(int(y1), int(y2)), slice(int(x1), int(x2))))
        return out
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0 = int(np.clip(math.floor(x1), 0, width))
        c1 = int(np.clip(math.floor(x2), 0, width))
        r0 = int(np.clip(math.floor(y1), 0, height))
        r1 = int(np.clip(math.floor(y2), 0, height))
        out.append((slice(r0, r1), slice(c0, c1)))
    return out


def box_score_map(boxes, scores, height: int, width: int) -> np.ndarray:
    """Float32 [H, W] map of boxes: each pixel holds the highest score of the boxes covering it
    (pixel rule of :func:`box_mask`), 0 outside every box.

    The detector-only "anomaly map" (``python -m filo.detect``): pass the COUNTED boxes in map
    pixels and their scores.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    slices = _box_slices(boxes, height, width)
    if len(slices) != len(s):
        raise ValueError(f"{len(slices)} boxes but {len(s)} scores")
    out = np.zeros((height, width), dtype=np.float32)
    for (rows, cols), score in zip(slices, s, strict=True):
        np.maximum(out[rows, cols], np.float32(score), out=out[rows, cols])
    return out


def fuse_with_boxes(anomaly_map, boxes, outside_factor: float = 0.7,
                    legacy_slices: bool = False):
    """Keep the map inside any counted box, multiply it by ``outside_factor`` elsewhere.

    ``anomaly_map``: [H, W] or [B, H, W], torch tensor or numpy array (same type returned).
    ``boxes``: the COUNTED boxes in map pixels, [N, 4] (or, for a batch, a list of B such
    arrays). With no counted box the whole map is scaled. 1.0 disables the step.
    ``legacy_slices``: the research code's box rule (see the module doc; pass the boxes of
    :func:`research_box_corners`), including "a score of exactly 1.0 is kept".
    """
    is_torch = isinstance(anomaly_map, torch.Tensor)
    arr = anomaly_map
    if arr.ndim not in (2, 3):
        raise ValueError(f"anomaly_map must be [H, W] or [B, H, W], got shape {tuple(arr.shape)}")
    batched = arr.ndim == 3
    maps = arr if batched else arr[None]
    per_image = list(boxes) if batched else [boxes]
    if len(per_image) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {len(per_image)} box lists")
    h, w = int(maps.shape[-2]), int(maps.shape[-1])
    masks = np.stack([box_mask(b if b is not None else np.zeros((0, 4)), h, w, legacy_slices)
                      for b in per_image])
    if legacy_slices:  # the research code kept every pixel equal to its "inside" marker 1.0
        ones = (maps == 1.0).cpu().numpy() if is_torch else (maps == 1.0)
        masks = masks | ones
    if is_torch:
        keep = torch.from_numpy(masks).to(arr.device)
        out = torch.where(keep, maps, maps * outside_factor)
    else:
        out = np.where(masks, maps, maps * outside_factor).astype(maps.dtype, copy=False)
    return out if batched else out[0]
