"""Data pipeline: dataset records and layouts, image/mask transforms, torch dataset, synthetic data.

Public API::

    from filo.data import Sample, load_split, EvalDataset, collate
    split = load_split(root, "mvtec", "test", classes=None)   # {cls: [Sample, ...]}
    ds = EvalDataset(flatten(split), root, image_size=518, with_detector_input=True)
"""

from __future__ import annotations

from filo.data.dataset import EvalDataset, ImageBatch, collate
from filo.data.layouts import (
    DATASETS,
    IMAGE_EXTENSIONS,
    MVTEC_CLASSES,
    VISA_CLASSES,
    build_meta,
    detect_dataset,
    flatten,
    iter_samples,
    load_split,
    read_meta,
    scan_folder,
    scan_mvtec,
    scan_visa,
    write_meta,
)
from filo.data.records import Sample
from filo.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    clip_tensor,
    decode_image,
    detector_resize_size,
    detector_tensor,
    load_clip_input,
    load_detector_input,
    load_mask,
    load_rgb,
    mask_tensor,
)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS",
    "MVTEC_CLASSES", "VISA_CLASSES", "EvalDataset", "Sample", "build_meta", "clip_tensor",
    "ImageBatch", "collate", "decode_image", "detect_dataset", "detector_resize_size", "detector_tensor",
    "flatten", "iter_samples", "load_clip_input", "load_detector_input", "load_mask", "load_rgb",
    "load_split", "mask_tensor", "read_meta", "scan_folder", "scan_mvtec", "scan_visa",
    "write_meta",
]
