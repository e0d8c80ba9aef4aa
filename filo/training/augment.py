"""Training data: per-epoch sample plans (shuffle + 2x2 mosaics) and the training dataset.

All randomness is drawn in the main process from a ``torch.Generator`` when an epoch's *plan* is
made (:func:`epoch_plan`): the order of the samples and, for each entry, whether it becomes a 2x2
mosaic and which four same-class images fill it. Dataset workers only read files, so a run is
reproducible for any ``num_workers`` and an epoch can be replayed from ``(seed, epoch)`` alone.

Mosaic (the research code's MVTec augmentation, docs/design.md section 7): four images of the class
of the drawn sample -- each picked by choosing a defect type (``specie_name``, "good" included)
uniformly, then an image of that type uniformly -- are pasted at their own size into a
``2W x 2H`` canvas (row-major: top-left, top-right, bottom-left, bottom-right; ``W x H`` = size
of the first tile, other tiles are resized to it), masks likewise; the canvas then goes through
the ordinary CLIP-input and mask transforms (resize to ``S x S``). The label is 1 when any tile
is anomalous (the research code kept the label of the drawn sample: fixed here).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from filo.data.records import Sample
from filo.data.transforms import clip_tensor, decode_image, load_mask, mask_tensor
from filo.errors import FiloError

PlanEntry = tuple[int, ...]  # one sample index, or four (a mosaic)


def species_index(samples: Sequence[Sample]) -> dict[str, dict[str, list[int]]]:
    """``{cls_name: {specie_name: [sample indices]}}``; species sorted by name (stable draws)."""
    out: dict[str, dict[str, list[int]]] = {}
    for i, s in enumerate(samples):
        specie = s.specie_name or ("anomaly" if s.anomaly else "good")
        out.setdefault(s.cls_name, {}).setdefault(specie, []).append(i)
    return {c: {k: v[k] for k in sorted(v)} for c, v in out.items()}


def _randint(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=generator).item())


def epoch_plan(samples: Sequence[Sample], generator: torch.Generator,
               mosaic_prob: float = 0.0) -> list[PlanEntry]:
    """The entries of one epoch: a random permutation of the samples; each entry becomes a mosaic
    of four same-class images with probability ``mosaic_prob``."""
    if not 0.0 <= mosaic_prob <= 1.0:
        raise FiloError(f"--mosaic_prob must be in [0, 1], got {mosaic_prob}")
    index = species_index(samples) if mosaic_prob > 0 else {}
    plan: list[PlanEntry] = []
    for i in torch.randperm(len(samples), generator=generator).tolist():
        u = float(torch.rand((), generator=generator))
        if u < mosaic_prob:
            species = index[samples[i].cls_name]
            names = list(species)
            tiles = []
            for _ in range(4):
                members = species[names[_randint(len(names), generator)]]
                tiles.append(members[_randint(len(members), generator)])
            plan.append(tuple(tiles))
        else:
            plan.append((i,))
    return plan


def mosaic_2x2(images: Sequence[Image.Image], masks: Sequence[np.ndarray],
               ) -> tuple[Image.Image, np.ndarray]:
    """Paste four images (and their bool masks [H, W]) into a 2x2 grid, row-major.

    The canvas is ``2W x 2H`` with ``W x H`` the first image's size (others are resized to it:
    bicubic for images, nearest for masks); it is ``L`` when every tile is ``L``, else ``RGB``.
    """
    if len(images) != 4 or len(masks) != 4:
        raise ValueError("a 2x2 mosaic needs exactly four images and four masks")
    w, h = images[0].size
    mode = "L" if all(im.mode == "L" for im in images) else "RGB"
    canvas = Image.new(mode, (2 * w, 2 * h))
    full = np.zeros((2 * h, 2 * w), dtype=bool)
    for k, (img, m) in enumerate(zip(images, masks, strict=True)):
        m = np.asarray(m, dtype=bool)
        if m.shape != (img.size[1], img.size[0]):
            raise ValueError(f"mask {m.shape} does not match image {img.size[1]}x{img.size[0]}")
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BICUBIC)
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
                (w, h), Image.Resampling.NEAREST)) > 0
        if img.mode != mode:
            img = img.convert(mode)
        row, col = divmod(k, 2)
        canvas.paste(img, (col * w, row * h))
        full[row * h:(row + 1) * h, col * w:(col + 1) * w] = m
    return canvas, full


class TrainDataset(Dataset):
    """Items of an epoch plan over ``samples`` (paths relative to ``root``).

    Each item: ``image`` float [3, S, S] (CLIP input), ``mask`` bool [S, S], ``label`` int,
    ``cls_name`` str, ``img_path`` str (the first tile's path for a mosaic), ``mosaic`` bool.
    """

    def __init__(self, samples: Sequence[Sample], root: str | os.PathLike, image_size: int,
                 plan: Sequence[PlanEntry]) -> None:
        self.samples = list(samples)
        self.root = Path(root)
        self.image_size = int(image_size)
        self.plan = [tuple(p) for p in plan]

    def __len__(self) -> int:
        return len(self.plan)

    def _tile(self, index: int) -> tuple[Image.Image, np.ndarray, int]:
        s = self.samples[index]
        img_file = self.root / s.img_path
        img = decode_image(img_file)
        if s.anomaly:
            if not s.mask_path:
                raise FiloError(f"anomalous image {img_file} has no mask; training needs masks for "
                                f"every anomalous image (add it and rebuild meta.json)")
            mask = load_mask(self.root / s.mask_path, img.size, img_file)
        else:
            mask = np.zeros((img.size[1], img.size[0]), dtype=bool)
        return img, mask, int(s.anomaly)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.plan[index]
        tiles = [self._tile(i) for i in entry]
        if len(tiles) == 1:
            img, mask, label = tiles[0]
        elif len(tiles) == 4:
            img, mask = mosaic_2x2([t[0] for t in tiles], [t[1] for t in tiles])
            label = int(any(t[2] for t in tiles))
        else:
            raise ValueError(f"plan entries have 1 or 4 samples, got {len(entry)}")
        first = self.samples[entry[0]]
        return {
            "image": clip_tensor(img, self.image_size),
            "mask": mask_tensor(mask, self.image_size),
            "label": label,
            "cls_name": first.cls_name,
            "img_path": first.img_path,
            "mosaic": len(entry) == 4,
        }


def train_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`TrainDataset` items (tensors stacked, strings as lists)."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "cls_name": [it["cls_name"] for it in items],
        "img_path": [it["img_path"] for it in items],
        "mosaic": [it["mosaic"] for it in items],
    }
