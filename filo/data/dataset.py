"""Torch dataset over :class:`~filo.data.records.Sample` lists (evaluation and training inputs)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from filo.data.records import Sample
from filo.data.transforms import (
    DEFAULT_IMAGE_SIZE,
    DETECTOR_MAX_SIZE,
    DETECTOR_SHORT_SIDE,
    clip_tensor,
    decode_image,
    detector_tensor,
    load_mask,
    mask_tensor,
)
from filo.errors import FiloError


class EvalDataset(Dataset):
    """Items of a list of samples, each image decoded once.

    ``samples[i]`` paths are resolved against ``root`` (absolute paths are used as they are).
    Each item is a dict:

    - ``image``: float Tensor[3, S, S] (CLIP input, docs/design.md section 1)
    - ``mask``: bool Tensor[S, S] (all False for normal images)
    - ``label``: int (0 normal, 1 anomalous)
    - ``cls_name``: str, ``specie_name``: str, ``img_path``: str (as in the sample, relative)
    - ``orig_size``: (w, h) of the image file
    - ``det_image``: float Tensor[3, h', w'] (GroundingDINO input), only when
      ``with_detector_input`` is true
    - ``mem_image``: the memory-bank input, only with a ``memory_transform``

    Only paths are stored, so the dataset is safe with DataLoader workers.
    """

    def __init__(self, samples: Sequence[Sample], root: str | os.PathLike,
                 image_size: int = DEFAULT_IMAGE_SIZE, with_detector_input: bool = False,
                 detector_short_side: int = DETECTOR_SHORT_SIDE,
                 detector_max_size: int | None = DETECTOR_MAX_SIZE,
                 memory_transform=None, allow_missing_masks: bool = False,
                 mask_transform=None) -> None:
        self.samples = list(samples)
        self.root = Path(root)
        self.image_size = int(image_size)
        self.with_detector_input = bool(with_detector_input)
        self.detector_short_side = int(detector_short_side)
        self.detector_max_size = detector_max_size
        self.memory_transform = memory_transform  # (PIL image, class) -> memory-bank input
        # True: an anomalous image without a mask gets an empty mask (image-level metrics only)
        self.allow_missing_masks = bool(allow_missing_masks)
        # (bool mask [H, W] or None for no defect, class) -> ground truth in another geometry
        # (the memory bank's centre crop of --protocol crop); default: mask_tensor at the size
        self.mask_transform = mask_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        img_file = self.root / s.img_path
        img = decode_image(img_file)
        size = self.image_size
        if s.anomaly and (s.mask_path or not self.allow_missing_masks):
            if not s.mask_path:
                raise FiloError(f"anomalous image {img_file} has no mask_path; add its mask and "
                                f"rebuild meta.json (`python -m filo.data build-meta`)")
            raw = load_mask(self.root / s.mask_path, img.size, img_file)
            mask = (mask_tensor(raw, size) if self.mask_transform is None
                    else self.mask_transform(raw, s.cls_name))
        elif self.mask_transform is not None:
            mask = self.mask_transform(None, s.cls_name)
        else:
            mask = torch.zeros((size, size), dtype=torch.bool)
        item = image_inputs(img, s.cls_name, size, with_detector_input=self.with_detector_input,
                            detector_short_side=self.detector_short_side,
                            detector_max_size=self.detector_max_size,
                            memory_transform=self.memory_transform, name=str(img_file))
        item.update(mask=mask, label=int(s.anomaly), specie_name=s.specie_name,
                    img_path=s.img_path)
        return item


def image_inputs(img, cls_name: str, image_size: int = DEFAULT_IMAGE_SIZE, *,
                 with_detector_input: bool = False,
                 detector_short_side: int = DETECTOR_SHORT_SIDE,
                 detector_max_size: int | None = DETECTOR_MAX_SIZE,
                 memory_transform=None, name: str = "") -> dict[str, Any]:
    """The model inputs of one decoded image (what :class:`EvalDataset` and the service feed the
    pipeline): ``image``, ``cls_name``, ``orig_size`` and, as asked, ``det_image`` /
    ``mem_image``. A degenerate shape the asked steps cannot take is one FiloError line naming
    ``name`` (:func:`check_image_shape`)."""
    check_image_shape(img.size, name or cls_name, detector=with_detector_input,
                      detector_short_side=detector_short_side,
                      detector_max_size=detector_max_size, memory=memory_transform is not None)
    item: dict[str, Any] = {"image": clip_tensor(img, image_size), "cls_name": cls_name,
                            "orig_size": (img.size[0], img.size[1])}
    if with_detector_input:
        item["det_image"], _ = detector_tensor(img, detector_short_side, detector_max_size)
    if memory_transform is not None:
        item["mem_image"] = memory_transform(img, cls_name)
    return item


DETECTOR_MIN_SIDE = 32  # the detector's backbone downsamples by 32
MEMORY_MAX_ASPECT = 64  # PatchCore resizes the shorter side: longer ones grow without bound


def check_image_shape(size: tuple[int, int], name: str, *, detector: bool = False,
                      detector_short_side: int = DETECTOR_SHORT_SIDE,
                      detector_max_size: int | None = DETECTOR_MAX_SIZE,
                      memory: bool = False) -> None:
    """One FiloError line for an image shape a step cannot take: the box step needs the
    detector input's shorter side (after its resize rule caps the longer side) to be at least
    :data:`DETECTOR_MIN_SIDE` pixels; a memory bank takes images up to :data:`MEMORY_MAX_ASPECT`
    : 1. FiLo alone takes any shape (its input is a square resize)."""
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise FiloError(f"{name}: the image is {w}x{h} pixels (empty); replace it")
    lo, hi = min(w, h), max(w, h)
    if detector:
        short = detector_short_side
        if detector_max_size is not None and hi / lo * short > detector_max_size:
            short = int(round(detector_max_size * lo / hi))
        if short < DETECTOR_MIN_SIDE:
            raise FiloError(f"{name}: a {w}x{h} image is too elongated for the box step (its "
                            f"shorter side would be {short} px at the detector's "
                            f"{detector_max_size}-px limit, it needs {DETECTOR_MIN_SIDE}); crop "
                            f"it into parts, or run without the box step (--no_grounding)")
    if memory and hi / lo > MEMORY_MAX_ASPECT:
        raise FiloError(f"{name}: a {w}x{h} image is too elongated for the memory bank (aspect "
                        f"{hi / lo:.0f}:1, at most {MEMORY_MAX_ASPECT}:1); crop it into parts")


@dataclass
class ImageBatch:
    """A batch of :class:`EvalDataset` items, typed (what the pipeline and the runner read)."""

    images: torch.Tensor  # [B, 3, S, S] CLIP input
    # [B, S, S] bool ground truth (all False for normal images); a list when a mask_transform
    # gives classes other sizes
    masks: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor  # [B] long, 0 normal / 1 anomalous
    cls_names: list[str]
    specie_names: list[str]
    img_paths: list[str]  # as listed (relative to the dataset root)
    orig_sizes: list[tuple[int, int]]  # (w, h) of each image file
    det_images: list[torch.Tensor] | None = None  # GroundingDINO inputs [3, h', w'] (varying)
    # memory-bank (PatchCore) inputs: [B, 3, s, s], or a list when classes use other sizes
    mem_images: torch.Tensor | list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.img_paths)


def _stack_if_same(tensors: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    return torch.stack(tensors) if len({t.shape for t in tensors}) == 1 else tensors


def collate(items: Sequence[dict[str, Any]]) -> ImageBatch:
    """Batch EvalDataset items (or :func:`image_inputs` items: no mask, normal label) into an
    :class:`ImageBatch`."""
    if not items:
        raise ValueError("collate needs at least one item")
    size = items[0]["image"].shape[-2:]
    return ImageBatch(
        images=torch.stack([it["image"] for it in items]),
        masks=_stack_if_same([it["mask"] if "mask" in it else torch.zeros(size, dtype=torch.bool)
                              for it in items]),
        labels=torch.tensor([int(it.get("label", 0)) for it in items], dtype=torch.long),
        cls_names=[it["cls_name"] for it in items],
        specie_names=[it.get("specie_name", "") for it in items],
        img_paths=[it.get("img_path", "") for it in items],
        orig_sizes=[tuple(it["orig_size"]) for it in items],
        det_images=[it["det_image"] for it in items] if "det_image" in items[0] else None,
        mem_images=_stack_if_same([it["mem_image"] for it in items]) if "mem_image" in items[0]
        else None,
    )
