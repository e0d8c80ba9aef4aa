"""``python -m filo.detect``: GroundingDINO-only runs over a dataset (no FiLo maps).

Image score = the best kept box's score (max token probability). Prints image-level
auroc_sp / f1_sp / ap_sp per class and their mean (x100, one decimal); ``--save_boxes DIR``
writes one JSON per image (boxes in original pixels, scores, phrases, matched, position).
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
    p.add_argument("--save_boxes", default=None, metavar="DIR", help="write per-image JSON here")
    return p


def _metric_rows(labels: dict[str, list[int]], scores: dict[str, list[float]]) -> list[list]:
    from filo.metrics import image_ap, image_auroc, image_f1_max

    rows, means = [], []
    for cls in labels:
        y, s = np.asarray(labels[cls]), np.asarray(scores[cls], dtype=np.float64)
        if y.min() == y.max():
            log.warning("class %s has only one label; its image metrics are undefined", cls)
            vals = [float("nan")] * 3
        else:
            vals = [image_auroc(y, s), image_f1_max(y, s), image_ap(y, s)]
        means.append(vals)
        rows.append([cls, *[round(v * 100, 1) for v in vals]])
    mean = np.nanmean(np.asarray(means, dtype=np.float64), axis=0)
    rows.append(["mean", *[round(float(v) * 100, 1) for v in mean]])
    return rows


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tabulate import tabulate

    from filo.data import load_split
    from filo.data.transforms import load_detector_input
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
                             batch_size=max(1, args.batch_size))
    detector = load_detector(args.grounded_checkpoint, device=args.device,
                             bert_dir=args.bert_dir, params=params)
    out_dir = Path(args.save_boxes) if args.save_boxes else None
    root = Path(args.data_path)
    labels: dict[str, list[int]] = {}
    scores: dict[str, list[float]] = {}
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
                    labels.setdefault(cls, []).append(int(sample.anomaly))
                    scores.setdefault(cls, []).append(det.best_score)
                    if out_dir is not None:
                        target = out_dir / (Path(sample.img_path).with_suffix(".json"))
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_text(json.dumps({"img_path": sample.img_path,
                                                      **det.to_json()}))
                bar.update(len(chunk))
    rows = _metric_rows(labels, scores)
    print(tabulate(rows, headers=["objects", "auroc_sp", "f1_sp", "ap_sp"], tablefmt="pipe"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
