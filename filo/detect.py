"""``python -m filo.detect``: GroundingDINO-only runs over a dataset (no FiLo maps).

Image score = the best kept box's score (max token probability). Prints image-level
auroc_sp / f1_sp / ap_sp per class and their mean (x100, one decimal); ``--save_boxes DIR``
writes one JSON per image (boxes in original pixels, scores, phrases, matched, position).

Box map: the detector-only stand-in for an anomaly map, ``--image_size`` square like FiLo's map
(a non-aspect-preserving resize of the image): each pixel holds the highest score of the COUNTED
boxes covering it, 0 elsewhere (:func:`filo.fusion.box_score_map`). ``--pixel_metrics`` scores it
against the ground-truth masks (resized like FiLo's evaluation, :func:`filo.data.transforms.
mask_tensor`) with :func:`filo.metrics.pixel_metrics`; ``--viz_dir`` overlays it on each image
with the boxes, phrases and scores (:class:`filo.viz.VizWriter`, plus ``index.html``);
``--save_coco FILE`` writes all kept boxes as COCO detections.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from filo.errors import FiloError, cli_entry
from filo.fileio import atomic_write_text

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m filo.detect", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="auto", help="mvtec, visa, folder, meta or auto")
    p.add_argument("--data_path", required=True, help="dataset root")
    p.add_argument("--grounded_checkpoint", required=True,
                   help="grounding_train_on_{mvtec,visa}.pth, groundingdino_swint_ogc.pth, or a "
                        "file from `python -m filo.detector convert`")
    p.add_argument("--box_threshold", type=float, default=0.25)
    p.add_argument("--text_threshold", type=float, default=0.25)
    p.add_argument("--area_threshold", type=float, default=0.7)
    p.add_argument("--legacy_text_threshold", action="store_true",
                   help="decode phrases with box_threshold (research code)")
    p.add_argument("--legacy_phrase_case", action="store_true",
                   help="case-sensitive phrase matching (research code)")
    p.add_argument("--legacy_grid", action="store_true", help="research code's closed grid cells")
    p.add_argument("--device", default="auto")
    p.add_argument("--bert_dir", default=None, help="local bert-base-uncased dir (vocab.txt)")
    p.add_argument("--prompts", default=None, help="prompt YAML (default: bundled tables)")
    p.add_argument("--classes", default=None, help="comma-separated subset of classes")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--kernels", default="fast", choices=["fast", "reference"],
                   help="CPU float32 kernels: 'fast' (oneDNN linears, gather deformable "
                        "attention) or 'reference' (transformers' own ops); same boxes to rounding")
    p.add_argument("--save_boxes", default=None, metavar="DIR", help="write per-image JSON here")
    p.add_argument("--save_coco", default=None, metavar="FILE",
                   help="write all kept boxes as COCO detections (bbox x,y,w,h in original "
                        "pixels, score, category = the matched prompt word or 'anomaly')")
    p.add_argument("--image_size", type=int, default=518,
                   help="side of the box map used by --pixel_metrics and --viz_dir")
    p.add_argument("--pixel_metrics", action="store_true",
                   help="also score the box map against the masks (auroc_px, f1_px, ap_px, aupro)")
    p.add_argument("--viz_dir", default=None, metavar="DIR",
                   help="write panels (image | box-map overlay with boxes | colour bar) and "
                        "index.html here")
    p.add_argument("--viz_limit", type=int, default=None, metavar="N",
                   help="at most N panels per class")
    p.add_argument("--viz_only_errors", action="store_true",
                   help="panels only for misclassified images (per-class F1-optimal threshold)")
    return p


PIXEL_COLUMNS = ("auroc_px", "f1_px", "ap_px", "aupro")
IMAGE_COLUMNS = ("auroc_sp", "f1_sp", "ap_sp")


def _metric_rows(labels: dict[str, list[int]], scores: dict[str, list[float]],
                 masks: dict[str, list[np.ndarray]] | None = None,
                 maps: dict[str, list[np.ndarray]] | None = None) -> list[list]:
    """Per-class rows [class, (pixel columns), image columns] x100 and a mean row."""
    from filo.metrics import image_ap, image_auroc, image_f1_max, pixel_metrics

    rows, means = [], []
    for cls in labels:
        vals: list[float] = []
        if masks is not None and maps is not None:
            px = pixel_metrics(np.stack(masks[cls]), np.stack(maps[cls]), fpr_limit=0.3,
                               legacy=True)
            vals += [px["auroc_px"], px["f1_px"], px["ap_px"], px["aupro_legacy"]]
        y, s = np.asarray(labels[cls]), np.asarray(scores[cls], dtype=np.float64)
        if y.min() == y.max():
            log.warning("class %s has only one label; its image metrics are undefined", cls)
            vals += [float("nan")] * 3
        else:
            vals += [image_auroc(y, s), image_f1_max(y, s), image_ap(y, s)]
        means.append(vals)
        rows.append([cls, *[round(v * 100, 1) for v in vals]])
    mean = np.nanmean(np.asarray(means, dtype=np.float64), axis=0)
    rows.append(["mean", *[round(float(v) * 100, 1) for v in mean]])
    return rows


def box_map_for(det, size: int) -> np.ndarray:
    """The box map of one detection: counted boxes in size x size map pixels, their scores."""
    from filo.fusion import box_score_map

    keep = np.asarray(det.matched, dtype=bool)
    boxes = det.boxes_in_map(size).numpy()[keep]
    return box_score_map(boxes, det.scores.numpy()[keep], size, size)


class CocoWriter:
    """Collects detections as a COCO file: images, categories, annotations with scores."""

    def __init__(self) -> None:
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.categories: dict[str, int] = {"anomaly": 1}

    def add(self, img_path: str, cls_name: str, det, words: list[str],
            case_sensitive: bool) -> None:
        from filo.detector.caption import matched_word

        image_id = len(self.images) + 1
        w, h = det.image_size
        self.images.append({"id": image_id, "file_name": img_path, "width": int(w),
                            "height": int(h), "class": cls_name})
        for box, score, phrase, matched in zip(det.boxes.tolist(), det.scores.tolist(),
                                               det.phrases, det.matched, strict=True):
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
        return {"info": {"description": "filo.detect GroundingDINO detections"},
                "images": self.images, "annotations": self.annotations,
                "categories": [{"id": i, "name": n, "supercategory": "defect"}
                               for n, i in self.categories.items()]}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tabulate import tabulate

    from filo.data import load_split
    from filo.data.transforms import load_detector_input, mask_tensor
    from filo.detector.caption import build_caption
    from filo.detector.inference import DetectionParams, load_detector
    from filo.fusion import position_from_boxes
    from filo.prompts import load_prompt_table

    split = load_split(args.data_path, args.dataset, "test", args.classes, source="--data_path")
    dataset = args.dataset if args.dataset in ("mvtec", "visa") else None
    prompts = load_prompt_table(args.prompts, dataset if args.prompts is None else None)
    unknown = [c for c in split if not prompts.has_class(c)]
    if unknown:
        raise FiloError(f"class {unknown[0]!r} has no prompts in {prompts.source}; pass "
                        "--prompts with a file that lists it")
    params = DetectionParams(box_threshold=args.box_threshold,
                             text_threshold=args.text_threshold,
                             area_threshold=args.area_threshold,
                             legacy_text_threshold=args.legacy_text_threshold,
                             case_sensitive=args.legacy_phrase_case,
                             batch_size=max(1, args.batch_size),
                             fast_kernels=args.kernels == "fast")
    if args.image_size < 8:
        raise FiloError(f"--image_size {args.image_size}: use at least 8 (FiLo maps use 518)")
    if args.viz_limit is not None and args.viz_limit < 0:
        raise FiloError(f"--viz_limit {args.viz_limit}: use 0 or more panels per class")
    detector = load_detector(args.grounded_checkpoint, device=args.device,
                             bert_dir=args.bert_dir, params=params)
    out_dir = Path(args.save_boxes) if args.save_boxes else None
    root = Path(args.data_path)
    viz = _viz_writer(args, root) if args.viz_dir else None
    coco = CocoWriter() if args.save_coco else None
    want_maps = args.pixel_metrics or viz is not None
    labels: dict[str, list[int]] = {}
    scores: dict[str, list[float]] = {}
    masks: dict[str, list[np.ndarray]] | None = {} if args.pixel_metrics else None
    maps: dict[str, list[np.ndarray]] | None = {} if args.pixel_metrics else None
    total = sum(len(v) for v in split.values())
    with tqdm(total=total, desc="detect", unit="img") as bar:
        for cls, samples in split.items():
            words = prompts.grounding_words
            details = prompts.detail_phrases(cls)
            caption = build_caption(words, details)
            for start in range(0, len(samples), params.batch_size):
                chunk = samples[start:start + params.batch_size]
                inputs = [load_detector_input(root / s.img_path) for s in chunk]
                dets = detector.detect_tensors([t for t, _ in inputs], [wh for _, wh in inputs],
                                               [caption] * len(chunk),
                                               [[*details, *words]] * len(chunk))
                for sample, det in zip(chunk, dets, strict=True):
                    det.position = position_from_boxes(
                        det.boxes_in_map().numpy(), det.scores.numpy(), det.matched,
                        prompts.positions, legacy_grid=args.legacy_grid)
                    label = int(sample.anomaly)
                    labels.setdefault(cls, []).append(label)
                    scores.setdefault(cls, []).append(det.best_score)
                    box_map = box_map_for(det, args.image_size) if want_maps else None
                    if masks is not None and maps is not None:
                        gt = _gt_mask(root, sample, det.image_size)
                        masks.setdefault(cls, []).append(
                            mask_tensor(gt, args.image_size).numpy() if gt is not None
                            else np.zeros((args.image_size, args.image_size), dtype=bool))
                        maps.setdefault(cls, []).append(box_map)
                    if viz is not None and viz.wants(cls, label, det.best_score):
                        viz.add(sample.img_path, cls, label, det.best_score, None, box_map,
                                gt_mask=_gt_mask(root, sample, det.image_size),
                                boxes=det.boxes.tolist(), labels=det.phrases,
                                scores=det.scores.tolist(), matched=det.matched)
                    if coco is not None:
                        coco.add(sample.img_path, cls, det, [*details, *words],
                                 args.legacy_phrase_case)
                    if out_dir is not None:
                        target = out_dir / (Path(sample.img_path).with_suffix(".json"))
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_text(json.dumps({"img_path": sample.img_path,
                                                      **det.to_json()}))
                bar.update(len(chunk))
    rows = _metric_rows(labels, scores, masks, maps)
    columns = [*(PIXEL_COLUMNS if args.pixel_metrics else ()), *IMAGE_COLUMNS]
    table = tabulate(rows, headers=["objects", *columns], tablefmt="pipe")
    print(table)
    if coco is not None:
        atomic_write_text(args.save_coco, json.dumps(coco.to_json()))
    if viz is not None:
        index = viz.finish(table, title=f"filo detect: {args.dataset} {args.data_path} "
                                        f"(GroundingDINO box map)")
        print(f"visualisations: {index}")
    return 0


def _gt_mask(root: Path, sample, image_size: tuple[int, int]) -> np.ndarray | None:
    """Ground-truth mask of an anomalous sample at its image size (None: normal / no mask)."""
    from filo.data.transforms import load_mask

    if not sample.anomaly or not sample.mask_path:
        return None
    return load_mask(root / sample.mask_path, image_size=image_size,
                     image_path=root / sample.img_path)


def _viz_writer(args, root: Path):
    from filo.data.transforms import load_rgb
    from filo.viz import VizWriter

    def load_image(img_path: str) -> np.ndarray:
        return np.asarray(load_rgb(root / img_path))

    # box scores are probabilities: the fixed 0..1 colour scale of FiLo maps fits them too
    return VizWriter(args.viz_dir, 0.0, 1.0, args.viz_limit, args.viz_only_errors, None,
                     load_image=load_image, root=root)


if __name__ == "__main__":
    sys.exit(main())
