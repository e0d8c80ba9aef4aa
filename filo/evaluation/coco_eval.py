"""COCO box evaluation of the detector's boxes against boxes built from the masks (``--coco_eval``).

Ground truth: one box per connected defect region of each mask (8-connectivity on ``mask > 0``
at the original image size), the tight bounding box in COCO ``[x, y, w, h]`` pixels where a
region covering pixel columns ``x0..x1`` (inclusive) has ``w = x1 - x0 + 1`` -- the box spans
the pixels' full extent, as the detector's continuous ``x1, y1, x2, y2`` boxes do. One category,
``defect`` (id 1); images without anomalies are listed with no boxes (every box on them is a
false positive).

Detections: every kept box of every image, as category ``defect`` whatever its phrase.

Metrics: :class:`pycocotools.cocoeval.COCOeval` with ``iouType="bbox"`` -- AP (IoU 0.5:0.95),
AP50, AP75 and AR@100, area range ``all``, at most 100 boxes per image (the highest scores).
pycocotools marks a metric with no ground truth to score against as -1; here it is ``None``
(``null`` in JSON), never 0.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from filo.data.records import Sample

logger = logging.getLogger(__name__)

CATEGORY = {"id": 1, "name": "defect", "supercategory": "defect"}
METRICS = ("AP", "AP50", "AP75", "AR100")
# index of each metric in COCOeval.stats (summarize()'s twelve numbers)
_STATS_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "AR100": 8}
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def mask_regions_to_boxes(mask: np.ndarray) -> list[list[int]]:
    """One COCO box ``[x, y, w, h]`` per 8-connected region of ``mask > 0``, in label order
    (first region met in row-major order first); ``[]`` for an empty mask.

    The box is tight and inclusive of its pixels: a region covering columns ``x0..x1`` and rows
    ``y0..y1`` gives ``[x0, y0, x1 - x0 + 1, y1 - y0 + 1]``.
    """
    from scipy import ndimage

    binary = np.asarray(mask) > 0
    if binary.ndim != 2:
        raise ValueError(f"a mask is a 2-D array, got shape {binary.shape}")
    labels, n = ndimage.label(binary, structure=_EIGHT_CONNECTED)
    boxes = []
    for rows, cols in ndimage.find_objects(labels)[:n]:
        boxes.append([int(cols.start), int(rows.start), int(cols.stop - cols.start),
                      int(rows.stop - rows.start)])
    return boxes


def region_areas(mask: np.ndarray) -> list[int]:
    """Pixel count of each 8-connected region of ``mask > 0`` (same order as
    :func:`mask_regions_to_boxes`)."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(mask) > 0, structure=_EIGHT_CONNECTED)
    return [int(c) for c in np.bincount(labels.ravel(), minlength=n + 1)[1:]]


def image_ids(split: Mapping[str, Sequence[Sample]]) -> dict[str, int]:
    """COCO image id of every listed image: its 1-based position in the split (dataset order).
    The ground truth and the detection files (``--save_coco`` too) share these ids."""
    ids: dict[str, int] = {}
    for group in split.values():
        for s in group:
            ids.setdefault(s.img_path, len(ids) + 1)
    return ids


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    from filo.errors import FiloError

    try:
        with Image.open(path) as img:
            return int(img.size[0]), int(img.size[1])
    except (OSError, ValueError, SyntaxError) as err:
        raise FiloError(f"cannot read image {path}: {err}") from None


def build_ground_truth(split: Mapping[str, Sequence[Sample]], root: str | os.PathLike,
                       classes: Iterable[str] | None = None) -> dict[str, Any]:
    """The COCO ground truth (a dataset dict, as ``coco_gt.json`` holds it) of ``classes``
    (default: every class of ``split``).

    Each image of those classes is an entry of ``images`` (id from :func:`image_ids`,
    ``file_name`` = its dataset-relative path, width and height of the original image, and its
    ``class``); each connected region of its mask (read at the original size, any nonzero pixel)
    is an annotation of category ``defect`` with its box, its region's pixel count as ``area``
    and ``iscrowd`` 0. Normal images and anomalous images without a mask file have no boxes.
    """
    from filo.data.transforms import load_mask

    root = Path(root)
    wanted = set(split) if classes is None else set(classes)
    ids = image_ids(split)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for cls_name, group in split.items():
        if cls_name not in wanted:
            continue
        for s in group:
            img_file = root / s.img_path
            w, h = _image_size(img_file)
            image_id = ids[s.img_path]
            images.append({"id": image_id, "file_name": s.img_path, "width": w, "height": h,
                           "class": cls_name})
            if not (s.anomaly and s.mask_path):
                continue
            mask = load_mask(root / s.mask_path, (w, h), img_file)
            for box, area in zip(mask_regions_to_boxes(mask), region_areas(mask), strict=True):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": CATEGORY["id"], "bbox": box, "area": area,
                                    "iscrowd": 0})
    return {"info": {"description": "filo ground-truth defect boxes: one per 8-connected mask "
                                    "region, tight [x, y, w, h] in original pixels"},
            "images": images, "annotations": annotations, "categories": [dict(CATEGORY)]}


def detections_of(image_id: int, det: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """COCO results (``image_id, category_id, bbox, score``) of one image's detection record
    (boxes ``x1, y1, x2, y2`` in original pixels and their scores): every kept box, as category
    ``defect``."""
    if not det:
        return []
    out = []
    for box, score in zip(det.get("boxes") or [], det.get("scores") or [], strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append({"image_id": int(image_id), "category_id": CATEGORY["id"],
                    "bbox": [x1, y1, max(0.0, x2 - x1), max(0.0, y2 - y1)],
                    "score": float(score)})
    return out


def _coco_api(dataset: Mapping[str, Any]):
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = dict(dataset)
    api.createIndex()
    return api


def _results_api(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]]):
    """What ``COCO.loadRes`` makes of ``detections`` (area = w * h, ids from 1, iscrowd 0),
    also for an empty list (which ``loadRes`` cannot take)."""
    anns = []
    for i, d in enumerate(detections):
        x, y, w, h = (float(v) for v in d["bbox"])
        anns.append({"id": i + 1, "image_id": int(d["image_id"]),
                     "category_id": int(d["category_id"]), "bbox": [x, y, w, h],
                     "score": float(d["score"]), "area": w * h, "iscrowd": 0})
    return _coco_api({"images": list(gt["images"]), "categories": list(gt["categories"]),
                      "annotations": anns})


def evaluate(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]],
             img_ids: Iterable[int] | None = None) -> dict[str, Any]:
    """COCO bbox metrics of ``detections`` (COCO results) against ``gt`` (a COCO dataset dict),
    over ``img_ids`` (default: every image of ``gt``).

    Returns ``AP`` (IoU 0.5:0.95), ``AP50``, ``AP75``, ``AR100`` as fractions in [0, 1], or
    ``None`` where pycocotools has nothing to score (no ground-truth box in these images: its
    -1), plus ``n_images``, ``n_gt`` and ``n_detections`` of these images. pycocotools' printing
    goes to the debug log.
    """
    from pycocotools.cocoeval import COCOeval

    ids = sorted({int(i) for i in (img_ids if img_ids is not None else
                                   (im["id"] for im in gt["images"]))})
    chosen = set(ids)
    known = {int(im["id"]) for im in gt["images"]}
    stray = {int(d["image_id"]) for d in detections} - known
    if stray:
        raise ValueError(f"detections on image ids not in the ground truth: {sorted(stray)[:5]}")
    counts = {"n_images": len(ids),
              "n_gt": sum(1 for a in gt["annotations"] if int(a["image_id"]) in chosen),
              "n_detections": sum(1 for d in detections if int(d["image_id"]) in chosen)}
    if not ids:
        return {**dict.fromkeys(METRICS), **counts}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = _coco_api(gt)
        coco_dt = _results_api(gt, detections)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logger.debug("pycocotools (%d images):\n%s", len(ids), buf.getvalue())
    values = {}
    for name, index in _STATS_INDEX.items():
        v = float(ev.stats[index])
        values[name] = None if v < 0 else v
    return {**values, **counts}


def evaluate_by_class(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]]
                      ) -> dict[str, Any]:
    """:func:`evaluate` for each class's images (the ``class`` of the ground-truth images, in
    their order) and for all images together: ``{"classes": {name: metrics}, "overall":
    metrics}``."""
    by_class: dict[str, list[int]] = {}
    for im in gt["images"]:
        by_class.setdefault(im.get("class", ""), []).append(int(im["id"]))
    return {"classes": {name: evaluate(gt, detections, ids) for name, ids in by_class.items()},
            "overall": evaluate(gt, detections)}
