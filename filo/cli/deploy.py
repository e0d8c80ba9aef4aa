"""``python -m filo.deploy predict``: a bundle's maps for images, without torch.

    python -m filo.deploy predict --bundle outputs/bundle --class bottle photos/ part_07.jpg \\
        --out outputs/deploy

Writes what ``python -m filo.predict`` writes: per image ``{name}.npy`` (the float32 map),
``{name}.png`` (input | overlay | colour bar), ``{name}.json`` (score, verdict when the bundle
has a calibrated memory bank, mask statistics with a threshold) and ``summary.json``. Imports
numpy, Pillow, OpenCV, scipy and the bundle's runtime (onnxruntime or OpenVINO), never torch
(docs/design.md §18).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from filo.cli.images import collect_images, output_stems, with_ext
from filo.errors import FiloError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m filo.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="maps, scores and verdicts of images with a bundle",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("images", type=Path, nargs="+", help="image files or folders")
    pr.add_argument("--bundle", type=Path, required=True,
                    help="bundle folder written by `python -m filo export`")
    pr.add_argument("--class", dest="cls_name", default=None,
                    help="class of the images (default: the bundle's only class)")
    pr.add_argument("--out", type=Path, default=Path("outputs/deploy"),
                    help="output folder (default: outputs/deploy)")
    pr.add_argument("--threshold", type=float, default=None,
                    help="also write a binary mask of map >= THRESHOLD per image (default with a "
                         "calibrated memory bank: its pixel threshold)")
    pr.add_argument("--threads", type=int, default=0,
                    help="runtime threads (default 0: the runtime's choice, all cores)")
    pr.add_argument("--no_overlays", action="store_true", help="skip the .png panels")
    return p


def run_predict(args: argparse.Namespace) -> dict:
    from PIL import Image

    from filo.deploy.inferencer import BundleInferencer
    from filo.fileio import atomic_save_npy, atomic_write_text, check_writable_dir, ensure_inside
    from filo.imagefile import decode_image, to_rgb

    images = collect_images(list(args.images))
    inf = BundleInferencer(args.bundle, threads=args.threads)
    cls_name = args.cls_name
    if cls_name is None:
        if len(inf.classes) != 1:
            raise FiloError(f"--class: the bundle {args.bundle} serves {', '.join(inf.classes)}; "
                            f"name one")
        cls_name = inf.classes[0]
    inf.check_class(cls_name)
    out_dir = check_writable_dir(args.out, "--out")
    summary, failed = [], []
    stems = output_stems(images, list(args.images))
    for path, out_stem in zip(images, stems, strict=True):
        try:
            img = decode_image(path)
        except FiloError as err:
            failed.append({"image": str(path.resolve()), "error": str(err)})
            continue
        pred = inf.predict(img, cls_name)
        img_path = str(path.resolve())
        stem = ensure_inside(out_dir, out_dir / out_stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        amap = pred.anomaly_map
        atomic_save_npy(with_ext(stem, ".npy"), amap.astype(np.float32))
        rgb = np.asarray(to_rgb(img))
        h, w = rgb.shape[:2]
        full = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(
            (w, h), Image.BILINEAR))  # the map at the image's own size, as filo.predict writes
        atomic_save_npy(with_ext(stem, ".full.npy"), full.astype(np.float32))
        record = {"image": img_path, "class": cls_name, "image_score": float(pred.image_score),
                  "position": pred.position, "map": str(with_ext(stem, ".npy")),
                  "map_full": str(with_ext(stem, ".full.npy")),
                  "overlay": None if args.no_overlays else str(with_ext(stem, ".png")),
                  "detections": None}
        if not args.no_overlays:
            from filo.viz import render_panel, write_panel

            vmin, vmax = inf.map_range(cls_name)
            write_panel(with_ext(stem, ".png"), render_panel(
                rgb, amap, vmin=vmin, vmax=vmax,
                title=f"{path.name}  score {pred.image_score:.3f}"))
        cal = inf.calibration(cls_name)
        if cal is not None:
            record.update(verdict=pred.verdict, image_threshold=cal["image_threshold"])
        threshold = args.threshold
        if threshold is None and cal is not None:
            threshold = cal["pixel_threshold"]
        if threshold is not None:
            binary = full >= threshold
            mask_path = with_ext(stem, "_mask.png")
            Image.fromarray((binary * 255).astype(np.uint8)).save(mask_path)
            record.update(mask=str(mask_path), threshold=threshold,
                          anomalous_fraction=float(binary.mean()))
        atomic_write_text(with_ext(stem, ".json"), json.dumps(record, indent=1) + "\n")
        summary.append(record)
    result = {"class": cls_name, "bundle": str(args.bundle),
              "format": inf.bundle.manifest["format"], "n_images": len(summary),
              "images": summary, "failed": failed}
    atomic_write_text(out_dir / "summary.json", json.dumps(result, indent=1) + "\n")
    return result


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run_predict(args)
    if result["images"]:
        best = max(result["images"], key=lambda r: r["image_score"])
        print(f"[filo] {result['n_images']} image(s) -> {Path(args.out) / 'summary.json'}; "
              f"highest score {best['image_score']:.3f}: {best['image']}")
    if result["failed"]:
        first = result["failed"][0]
        raise FiloError(f"{len(result['failed'])} image(s) could not be read and were skipped "
                        f"(first: {first['error']}); the others are in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
