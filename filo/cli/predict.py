"""``python -m filo.predict``: anomaly maps for unlabelled images ("run it on my images").

    python -m filo.predict --images photos/ part_07.jpg --class bottle \\
        --ckpt_path ckpt/filo_train_on_visa.pth --grounded_checkpoint ckpt/grounding_train_on_visa.pth \\
        --out outputs/predict

For each image (files, or folders searched recursively; each file once; any image mode), named
after the input with its suffix kept and its path below the folder it was found in
(``photos/sub/x.jpg`` -> ``OUT/sub/x.jpg.npy``): ``{name}.npy`` (the float32 map at the model's
input size), ``{name}.full.npy`` (the same map resized to the image's own size),
``{name}.png`` (input | overlay with the detector boxes | colour bar), ``{name}.json`` (image
score, boxes, optional mask statistics) and, with ``--threshold``, ``{name}_mask.png`` (the
binary map at the image's size). A ``summary.json`` lists every image with its score. Any class the prompt file knows can be used.
Every pipeline flag of test.py applies (the same :class:`~filo.pipeline.PipelineConfig`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from filo.cli.common import add_pipeline_args, add_verbose, setup_logging
from filo.cli.images import (  # noqa: F401 (re-exported)
    IMAGE_SUFFIXES,
    collect_images,
    output_stem,
    output_stems,
    with_ext,
)
from filo.errors import FiloError, cli_entry
from filo.heap import batch_work
from filo.settings import add_args, in_range


class _SkipUnreadable:
    """EvalDataset items, or ``{"error": ..., "img_path": ...}`` for an image that cannot be
    read (so one bad file does not stop the others)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except FiloError as err:
            return {"error": str(err), "img_path": self.dataset.samples[index].img_path}


def _collate_skipping(items):
    """(ImageBatch of the readable items or None, [(img_path, error), ...])."""
    from filo.data.dataset import collate

    bad = [(it["img_path"], it["error"]) for it in items if "error" in it]
    good = [it for it in items if "error" not in it]
    return (collate(good) if good else None), bad


def build_parser() -> argparse.ArgumentParser:
    from filo.evaluation.runner import RunConfig

    p = argparse.ArgumentParser(prog="python -m filo.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("images and outputs")
    io.add_argument("--images", type=Path, nargs="+", required=True, help="image files or folders")
    io.add_argument("--class", dest="cls_name", required=True,
                    help="class name as in the prompt file (e.g. bottle, metal_nut, pcb1)")
    io.add_argument("--out", type=Path, default=Path("outputs/predict"),
                    help="output folder (default: outputs/predict)")
    io.add_argument("--threshold", type=float, default=None,
                    help="also write a binary mask of map >= THRESHOLD per image (0..1; default "
                         "with a calibrated memory bank: its pixel threshold)")
    add_args(io, RunConfig, ("batch_size", "num_workers", "viz_lift_boxes"))
    add_pipeline_args(p)
    add_verbose(p)
    return p


@batch_work
def run_predict(args: argparse.Namespace, pipeline_factory=None, dist=None) -> dict:
    from PIL import Image
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from filo.data.dataset import EvalDataset
    from filo.data.records import Sample
    from filo.data.transforms import load_rgb
    from filo.evaluation.runner import RunConfig
    from filo.fileio import atomic_save_npy, atomic_write, atomic_write_text
    from filo.pipeline import PipelineConfig, build_pipeline
    from filo.settings import from_args
    from filo.viz import render_panel, write_panel

    if args.threshold is not None and args.memory_bank is None and (
            problem := in_range(0.0, 1.0)(args.threshold)):
        raise FiloError(f"--threshold {args.threshold}: {problem}")
    from dataclasses import replace

    from filo.distributed import DistContext
    from filo.fileio import check_writable_dir, ensure_inside

    dist = dist or DistContext()
    batching = from_args(RunConfig, args)
    config = from_args(PipelineConfig, args)
    config = replace(config, device=dist.device(config.device))
    images = collect_images(list(args.images))
    out_dir = check_writable_dir(args.out, "--out")
    pipeline = (pipeline_factory or build_pipeline)(config)
    pipeline.check_classes([args.cls_name], "--class")
    if getattr(pipeline, "scores_sets", False):
        raise FiloError("--method musc scores an image against other images of its class: give "
                        "--musc_pool (built by `python -m filo.musc pool --class "
                        f"{args.cls_name} --images DIR --out POOL`)")

    all_samples = [Sample(str(p.resolve()), "", args.cls_name, "", 0) for p in images]
    stems = {s.img_path: stem for s, stem in
             zip(all_samples, output_stems(images, list(args.images)), strict=True)}
    samples = dist.shard(all_samples)  # under torchrun: this process's share
    loader = DataLoader(_SkipUnreadable(EvalDataset(
                            samples, "/", pipeline.image_size,
                            with_detector_input=pipeline.needs_detector_input,
                            memory_transform=getattr(pipeline, "memory_transform", None))),
                        batch_size=batching.batch_size, num_workers=batching.num_workers,
                        collate_fn=_collate_skipping)
    summary, failed = [], []
    with tqdm(total=len(samples), desc="predict", unit="img", dynamic_ncols=True) as bar:
        for batch, bad in loader:
            for img_path, error in bad:
                tqdm.write(f"[filo] skipped {img_path}: {error}")
                failed.append({"image": img_path, "error": error})
            bar.update(len(bad))
            if batch is None:
                continue
            for i, pred in enumerate(pipeline.predict(batch)):
                img_path = batch.img_paths[i]
                stem = ensure_inside(out_dir, out_dir / stems[img_path])
                stem.parent.mkdir(parents=True, exist_ok=True)
                amap = pred.anomaly_map
                atomic_save_npy(with_ext(stem, ".npy"), amap.astype(np.float32))
                det = pred.detection or {}
                rgb = np.asarray(load_rgb(img_path))
                h, w = rgb.shape[:2]
                full = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(
                    (w, h), Image.BILINEAR))
                atomic_save_npy(with_ext(stem, ".full.npy"), full.astype(np.float32))
                vmin, vmax = pipeline.map_range(args.cls_name)
                panel = render_panel(
                    rgb, amap, vmin=vmin, vmax=vmax, boxes=det.get("boxes"),
                    box_labels=det.get("phrases"), box_scores=det.get("scores"),
                    box_matched=det.get("matched"), lift_boxes=batching.viz_lift_boxes,
                    title=f"{Path(img_path).name}  score {pred.image_score:.3f}")
                write_panel(with_ext(stem, ".png"), panel)
                record = {"image": img_path, "class": args.cls_name,
                          "image_score": float(pred.image_score), "position": pred.position,
                          "map": str(with_ext(stem, ".npy")),
                          "map_size": list(amap.shape[-2:]),
                          "map_full": str(with_ext(stem, ".full.npy")),
                          "image_size": [h, w],
                          "overlay": str(with_ext(stem, ".png")),
                          "detections": det or None}
                cal = pipeline.calibration(args.cls_name)
                if cal is not None:
                    record.update(verdict="anomalous" if pred.image_score >= cal["image_threshold"]
                                  else "normal", image_threshold=cal["image_threshold"])
                threshold = args.threshold
                if threshold is None and cal is not None:
                    threshold = cal["pixel_threshold"]  # None for fused scores
                if threshold is not None:
                    binary = full >= threshold
                    mask_path = with_ext(stem, "_mask.png")
                    mask_png = Image.fromarray((binary * 255).astype(np.uint8))
                    atomic_write(mask_path, lambda fh, im=mask_png: im.save(fh, format="PNG"))
                    record.update(mask=str(mask_path), threshold=threshold,
                                  anomalous_fraction=float(binary.mean()))
                atomic_write_text(with_ext(stem, ".json"), json.dumps(record, indent=1) + "\n")
                summary.append(record)
            bar.update(len(batch))
    from filo.settings import as_dict

    if dist.active:  # every process's records, in image order, for rank 0's summary
        gathered = dist.gather((summary, failed))
        order = {s.img_path: i for i, s in enumerate(all_samples)}
        summary = sorted((r for part, _ in gathered for r in part),
                         key=lambda r: order[r["image"]])
        failed = [f for _, part in gathered for f in part]
    result = {"class": args.cls_name, "ckpt_path": str(config.ckpt_path) if config.ckpt_path else None,
              "grounded_checkpoint": str(config.grounded_checkpoint) if config.grounded_checkpoint else None,
              "settings": as_dict(config), "n_images": len(summary), "images": summary,
              "failed": failed}
    if dist.is_main:
        atomic_write_text(out_dir / "summary.json", json.dumps(result, indent=1) + "\n")
    return result


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from filo import distributed

    dist = distributed.init_from_env(args.device)
    clean = False
    try:
        result = run_predict(args, dist=dist)
        clean = True
    finally:
        distributed.shutdown(dist, clean=clean)
    if not dist.is_main:
        return 0
    if result["images"]:
        best = max(result["images"], key=lambda r: r["image_score"])
        print(f"[filo] {result['n_images']} image(s) -> {Path(args.out) / 'summary.json'}; "
              f"highest score {best['image_score']:.3f}: {best['image']}")
    if result["failed"]:
        first = result["failed"][0]
        raise FiloError(f"{len(result['failed'])} image(s) could not be read and were skipped "
                        f"(first: {first['error']}); the others are in {args.out} (summary.json "
                        f"lists the failures)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
