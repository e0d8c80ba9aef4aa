"""``python -m filo.predict``: anomaly maps for unlabelled images ("run it on my images").

    python -m filo.predict --images photos/ part_07.jpg --class bottle \\
        --ckpt_path ckpt/filo_train_on_visa.pth --grounded_checkpoint ckpt/grounding_train_on_visa.pth \\
        --out outputs/predict

For each image (files, or folders searched recursively; any image mode): ``{name}.npy`` (the
float32 map at the evaluation size), ``{name}.png`` (input | overlay with the detector boxes |
colour bar), ``{name}.json`` (image score, boxes, optional mask statistics) and, with
``--threshold``, ``{name}_mask.png`` (the binary map at the original image size). A
``summary.json`` lists every image with its score. Any class the prompt file knows can be used.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from filo.data.dataset import EvalDataset, collate
from filo.data.records import Sample
from filo.errors import FiloError, cli_entry
from filo.evaluation.runner import EvalSettings
from filo.fileio import atomic_save_npy, atomic_write_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the given folders."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise FiloError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {item}")
            found += files
        elif item.is_file():
            found.append(item)
        else:
            raise FiloError(f"--images: {item} does not exist")
    if not found:
        raise FiloError("--images: give at least one image file or folder")
    return found


def output_stem(path: Path, inputs: list[Path]) -> Path:
    """Output name: the path below the folder it was found in (or the file name)."""
    resolved = path.resolve()
    for item in inputs:
        base = item.resolve()
        if item.is_dir() and base in resolved.parents:
            return resolved.relative_to(base).with_suffix("")
    return Path(path.stem)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m filo.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, nargs="+", required=True, help="image files or folders")
    p.add_argument("--class", dest="cls_name", required=True,
                   help="class name as in the prompt file (e.g. bottle, metal_nut, pcb1)")
    p.add_argument("--ckpt_path", type=Path, required=True, help="FiLo checkpoint")
    p.add_argument("--grounded_checkpoint", type=Path, default=None,
                   help="GroundingDINO checkpoint (adds the box step)")
    p.add_argument("--prompts", type=Path, default=None, help="prompt YAML file")
    p.add_argument("--out", type=Path, default=Path("outputs/predict"), help="output folder")
    p.add_argument("--threshold", type=float, default=None,
                   help="also write a binary mask of map >= THRESHOLD per image")
    p.add_argument("--position", default=None, help="without boxes: fix the position word")
    p.add_argument("--image_size", type=int, default=518)
    p.add_argument("--device", default=None)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--box_threshold", type=float, default=0.25)
    p.add_argument("--text_threshold", type=float, default=0.25)
    p.add_argument("--area_threshold", type=float, default=0.7)
    p.add_argument("--outside_box_factor", type=float, default=0.7)
    p.add_argument("--bert_dir", type=Path, default=None)
    p.add_argument("--lift_boxes", action="store_true",
                   help="visual only: raise the shown heat inside detector boxes")
    return p


def run_predict(args: argparse.Namespace, predictor_factory=None) -> dict:
    from filo.evaluation.predictor import build_predictor, check_classes, load_prompts_for
    from filo.viz import render_panel, write_panel

    images = collect_images(list(args.images))
    settings = EvalSettings(
        dataset="folder", data_path=Path("/"), ckpt_path=args.ckpt_path,
        grounded_checkpoint=args.grounded_checkpoint, box_threshold=args.box_threshold,
        text_threshold=args.text_threshold, area_threshold=args.area_threshold,
        outside_box_factor=args.outside_box_factor, image_size=args.image_size,
        device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
        prompts=args.prompts, no_grounding=args.grounded_checkpoint is None,
        position=args.position, bert_dir=args.bert_dir)
    check_classes(load_prompts_for(settings), [args.cls_name], "--class")
    predictor = (predictor_factory or build_predictor)(settings)

    samples = [Sample(str(p.resolve()), "", args.cls_name, "", 0) for p in images]
    stems = {s.img_path: output_stem(p, list(args.images)) for s, p in zip(samples, images, strict=True)}
    loader = DataLoader(EvalDataset(samples, "/", args.image_size,
                                    with_detector_input=settings.grounding),
                        batch_size=max(1, args.batch_size), num_workers=max(0, args.num_workers),
                        collate_fn=collate)
    out_dir = Path(args.out)
    summary = []
    with tqdm(total=len(samples), desc="predict", unit="img", dynamic_ncols=True) as bar:
        for batch in loader:
            pred = predictor(batch)
            for i, img_path in enumerate(batch["img_path"]):
                stem = out_dir / stems[img_path]
                stem.parent.mkdir(parents=True, exist_ok=True)
                amap = pred.anomaly_maps[i]
                atomic_save_npy(stem.with_suffix(".npy"), amap.astype(np.float32))
                det = (pred.extras[i] if pred.extras else {}).get("detections") or {}
                from filo.data.transforms import load_rgb

                rgb = np.asarray(load_rgb(img_path))
                panel = render_panel(
                    rgb, amap, vmin=0.0, vmax=1.0, boxes=det.get("boxes"),
                    box_labels=det.get("phrases"), box_scores=det.get("scores"),
                    box_matched=det.get("matched"), lift_boxes=args.lift_boxes,
                    title=f"{Path(img_path).name}  score {pred.image_scores[i]:.3f}")
                write_panel(stem.with_suffix(".png"), panel)
                record = {"image": img_path, "class": args.cls_name,
                          "image_score": float(pred.image_scores[i]),
                          "map": str(stem.with_suffix(".npy")),
                          "overlay": str(stem.with_suffix(".png")),
                          "detections": det or None}
                if args.threshold is not None:
                    h, w = rgb.shape[:2]
                    full = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(
                        (w, h), Image.BILINEAR))
                    binary = full >= args.threshold
                    mask_path = stem.with_name(stem.name + "_mask.png")
                    Image.fromarray((binary * 255).astype(np.uint8)).save(mask_path)
                    record.update(mask=str(mask_path), threshold=args.threshold,
                                  anomalous_fraction=float(binary.mean()))
                atomic_write_text(stem.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
                summary.append(record)
            bar.update(len(batch["img_path"]))
    result = {"class": args.cls_name, "ckpt_path": str(args.ckpt_path),
              "grounded_checkpoint": str(args.grounded_checkpoint) if args.grounded_checkpoint else None,
              "n_images": len(summary), "images": summary}
    atomic_write_text(out_dir / "summary.json", json.dumps(result, indent=1) + "\n")
    return result


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run_predict(args)
    best = max(result["images"], key=lambda r: r["image_score"])
    print(f"[filo] {result['n_images']} image(s) -> {Path(args.out) / 'summary.json'}; "
          f"highest score {best['image_score']:.3f}: {best['image']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
