"""Tiled memory banks: native-resolution tiles of a large image and their maps stitched back
(docs/design.md §13.5).

A ``tile x tile`` window moves over the image with stride ``tile - overlap``; the last window
of a row or column is moved back to end at the image border, so the tiles cover every pixel and
all have the same size (an image side shorter than the tile is padded by edge replication and
the padding cropped off the map). Overlapping tile maps are averaged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["stitch", "tile_boxes", "tile_starts", "tile_tensor", "split_tiles"]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``: stride ``tile - overlap``, the last one
    ending at ``length`` (a single 0 when ``length <= tile``)."""
    if tile <= overlap:
        raise ValueError(f"tile {tile} must be larger than the overlap {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``(y0, x0)`` of every tile, row-major."""
    return [(y, x) for y in tile_starts(height, tile, overlap)
            for x in tile_starts(width, tile, overlap)]


def tile_tensor(img, mean, std) -> torch.Tensor:
    """A PIL image at its native resolution as a normalised ``[3, H, W]`` float32 tensor."""
    import torchvision.transforms.functional as TF

    if img.mode != "RGB":
        img = img.convert("RGB")
    return TF.normalize(TF.to_tensor(img), list(mean), list(std))


def split_tiles(x: torch.Tensor, tile: int, overlap: int
                ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``[3, H, W] -> ([T, 3, tile, tile], boxes)``; sides shorter than ``tile`` are padded by
    edge replication first."""
    h, w = x.shape[-2:]
    ph, pw = max(0, tile - h), max(0, tile - w)
    if ph or pw:
        x = F.pad(x[None], (0, pw, 0, ph), mode="replicate")[0]
    boxes = tile_boxes(max(h, tile), max(w, tile), tile, overlap)
    return torch.stack([x[:, y:y + tile, x0:x0 + tile] for y, x0 in boxes]), boxes


def stitch(tile_maps: np.ndarray, boxes: list[tuple[int, int]], size: tuple[int, int]
           ) -> np.ndarray:
    """``[T, t, t]`` tile maps -> ``[H, W]`` float32: the mean of every tile covering a pixel
    (``size`` = (H, W) of the image; padding beyond it is dropped)."""
    h, w = size
    t = tile_maps.shape[-1]
    hh, ww = max(h, t), max(w, t)
    acc = np.zeros((hh, ww), dtype=np.float64)
    count = np.zeros((hh, ww), dtype=np.float64)
    for m, (y, x) in zip(tile_maps, boxes, strict=True):
        acc[y:y + t, x:x + t] += m
        count[y:y + t, x:x + t] += 1.0
    return (acc / count)[:h, :w].astype(np.float32)
