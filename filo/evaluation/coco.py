"""Detector boxes as a COCO detection file (``--save_coco``), built from cached predictions.

Image ids are the images' 1-based positions in the split (:func:`filo.evaluation.coco_eval.
image_ids`), the ids of ``--coco_eval``'s ``coco_gt.json`` too.
"""

from __future__ import annotations

from typing import Any

from filo.detector.caption import matched_word
from filo.evaluation.coco_eval import image_ids
from filo.prompts import PromptTable


class CocoWriter:
    """Collects detections as a COCO file: images, categories, annotations with scores."""

    def __init__(self) -> None:
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.categories: dict[str, int] = {"anomaly": 1}

    def add(self, img_path: str, cls_name: str, det: dict[str, Any], words: list[str],
            case_sensitive: bool, image_id: int | None = None) -> None:
        """``det``: a detection record (boxes x1, y1, x2, y2 in original pixels, scores,
        phrases, matched, image_size (w, h)); ``image_id``: default the next number."""
        if image_id is None:
            image_id = len(self.images) + 1
        w, h = det["image_size"]
        self.images.append({"id": image_id, "file_name": img_path, "width": int(w),
                            "height": int(h), "class": cls_name})
        for box, score, phrase, matched in zip(det["boxes"], det["scores"], det["phrases"],
                                               det["matched"], strict=True):
            name = (matched_word(phrase, words, case_sensitive) if matched else None) or "anomaly"
            cat = self.categories.setdefault(name, len(self.categories) + 1)
            x1, y1, x2, y2 = (float(v) for v in box)
            bw, bh = max(0.0, x2 - x1), max(0.0, y2 - y1)
            self.annotations.append({
                "id": len(self.annotations) + 1, "image_id": image_id, "category_id": cat,
                "bbox": [round(x1, 2), round(y1, 2), round(bw, 2), round(bh, 2)],
                "area": round(bw * bh, 2), "iscrowd": 0, "score": round(float(score), 5),
                "phrase": phrase, "matched": bool(matched)})

    def to_json(self) -> dict:
        return {"info": {"description": "filo GroundingDINO detections"},
                "images": self.images, "annotations": self.annotations,
                "categories": [{"id": i, "name": n, "supercategory": "defect"}
                               for n, i in self.categories.items()]}


def coco_from_cache(split, cache, prompts: PromptTable, *, case_sensitive: bool) -> dict:
    """COCO detections of every listed image with cached boxes (ids: positions in ``split``)."""
    writer = CocoWriter()
    ids = image_ids(split)
    for cls_name, group in split.items():
        words = [*prompts.detail_phrases(cls_name), *prompts.grounding_words]
        for s in group:
            pred = cache.get(s.img_path)
            det = pred.extras.get("detections") if pred is not None else None
            if det is not None:
                writer.add(s.img_path, cls_name, det, words, case_sensitive, ids[s.img_path])
    return writer.to_json()
