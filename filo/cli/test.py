"""``python test.py`` / ``python -m filo.cli.test``: evaluate FiLo (+ GroundingDINO) on a dataset.

Flags keep the research code's names (``--dataset --data_path --ckpt_path --grounded_checkpoint
--box_threshold --text_threshold --area_threshold --image_size --device --viz_dir``) and add
batching, class selection, prompt files, caching and exports.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from filo.errors import FiloError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="test.py", description="Zero-shot anomaly segmentation test run (FiLo + GroundingDINO).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="mvtec", choices=["mvtec", "visa", "folder", "meta", "auto"],
                   help="dataset layout of --data_path")
    d.add_argument("--data_path", type=Path, default=None,
                   help="dataset root (default: $MVTEC_ROOT or $VISA_ROOT by --dataset)")
    d.add_argument("--classes", default=None,
                   help="comma-separated class names to evaluate (default: all, in dataset order)")
    d.add_argument("--image_size", type=int, default=518, help="CLIP input and evaluation size")
    d.add_argument("--num_workers", type=int, default=2, help="data-loading worker processes")
    m = p.add_argument_group("model")
    m.add_argument("--ckpt_path", type=Path, default=None, help="FiLo checkpoint ({'filo': ...})")
    m.add_argument("--prompts", type=Path, default=None,
                   help="prompt YAML file (default: the released-checkpoint prompts)")
    m.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    m.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    m.add_argument("--position", default=None,
                   help="with --no_grounding: fix the position word (default: average all nine)")
    m.add_argument("--score_mode", default="research", choices=["research", "softmax"],
                   help="image score: research-code formula (default) or the paper's softmax")
    m.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"],
                   help="reduced-precision towers (CUDA; bf16 also on recent CPUs): faster, maps "
                        "differ by up to ~1e-2 from float32")
    m.add_argument("--kernels", default="fast", choices=["fast", "reference"],
                   help="CPU float32 kernels: 'fast' (default: linear layers via oneDNN, "
                        "deformable attention as one gather) or 'reference' (plain PyTorch ops); "
                        "same maps to ~1e-6, no effect on CUDA")
    m.add_argument("--clip_act", default=None, choices=["gelu", "quick_gelu"],
                   help="CLIP MLP activation (default: the checkpoint's recorded one; for a "
                        "research-layout checkpoint exact GELU unless it is for 336 px, as the "
                        "research code runs it)")
    m.add_argument("--legacy_macaroni", action="store_true",
                   help="research-code bug: macaroni1 uses macaroni2's prompts")
    g = p.add_argument_group("GroundingDINO")
    g.add_argument("--grounded_checkpoint", type=Path, default=None,
                   help="GroundingDINO checkpoint (original or converted layout); enables the box step")
    g.add_argument("--no_grounding", action="store_true", help="FiLo maps alone, no box step")
    g.add_argument("--box_threshold", type=float, default=0.25)
    g.add_argument("--text_threshold", type=float, default=0.25)
    g.add_argument("--area_threshold", type=float, default=0.7,
                   help="boxes covering this fraction of the image or more are dropped")
    g.add_argument("--outside_box_factor", type=float, default=0.7,
                   help="map values outside every counted box are multiplied by this (1 disables)")
    g.add_argument("--bert_dir", type=Path, default=None,
                   help="local bert-base-uncased tokenizer directory (default: $FILO_BERT_LOCAL)")
    g.add_argument("--legacy_phrase_case", action="store_true",
                   help="research-code behaviour: case-sensitive phrase matching")
    g.add_argument("--legacy_text_threshold", action="store_true",
                   help="research-code behaviour: phrases use --box_threshold")
    g.add_argument("--legacy_grid", action="store_true",
                   help="research-code position rule: closed cells [0,172],[173,344],[345,517], best box by its printed 2-decimal score, last of ties")
    g.add_argument("--legacy_box_slices", action="store_true",
                   help="research-code box rule: boxes not clamped to the image, corners "
                        "truncated with int() and used as Python slices (a corner <= -1 empties "
                        "the box), for the position word and the outside-box factor")
    o = p.add_argument_group("outputs")
    o.add_argument("--save_path", type=Path, default=None,
                   help="results folder: table, results.json/.csv, log, prediction cache "
                        "(default: $RESULTS_DIR/test_<dataset>)")
    o.add_argument("--save_maps", type=Path, default=None,
                   help="write one float32 .npy map per image and scores.csv here")
    o.add_argument("--save_boxes", type=Path, default=None,
                   help="write the detector's boxes as one JSON per image here")
    o.add_argument("--viz_dir", type=Path, default=None, help="write visualisations here")
    o.add_argument("--viz_limit", type=int, default=None, help="at most N visualisations per class")
    o.add_argument("--viz_only_errors", action="store_true",
                   help="visualise only misclassified images")
    o.add_argument("--viz_lift_boxes", action="store_true",
                   help="visual only: raise the shown heat inside detector boxes")
    o.add_argument("--from_cache", action="store_true",
                   help="recompute the tables from cached predictions without running any model")
    o.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def settings_from_args(args: argparse.Namespace):
    from filo.evaluation.runner import EvalSettings

    data_path = args.data_path
    if data_path is None:
        env = {"mvtec": "MVTEC_ROOT", "visa": "VISA_ROOT"}.get(args.dataset)
        if env and os.environ.get(env):
            data_path = Path(os.environ[env])
        else:
            raise FiloError("--data_path is required (or set MVTEC_ROOT / VISA_ROOT via env.sh)")
    if args.ckpt_path is None and not args.from_cache:
        raise FiloError("--ckpt_path is required: a FiLo checkpoint such as "
                        "ckpt/filo_train_on_visa.pth (see `python -m filo doctor`)")
    save_path = args.save_path or Path(os.environ.get("RESULTS_DIR", "outputs/results")) / f"test_{args.dataset}"
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    return EvalSettings(
        dataset=args.dataset, data_path=data_path, ckpt_path=args.ckpt_path,
        grounded_checkpoint=args.grounded_checkpoint, box_threshold=args.box_threshold,
        text_threshold=args.text_threshold, area_threshold=args.area_threshold,
        outside_box_factor=args.outside_box_factor, image_size=args.image_size,
        device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
        classes=classes, prompts=args.prompts, no_grounding=args.no_grounding,
        position=args.position, save_path=save_path, save_maps=args.save_maps,
        save_boxes=args.save_boxes, viz_dir=args.viz_dir, viz_limit=args.viz_limit,
        viz_only_errors=args.viz_only_errors, viz_lift_boxes=args.viz_lift_boxes,
        from_cache=args.from_cache,
        score_mode=args.score_mode, autocast=args.autocast, kernels=args.kernels,
        legacy_macaroni=args.legacy_macaroni,
        legacy_phrase_case=args.legacy_phrase_case,
        legacy_text_threshold=args.legacy_text_threshold, legacy_grid=args.legacy_grid,
        legacy_box_slices=args.legacy_box_slices, clip_act=args.clip_act,
        bert_dir=args.bert_dir,
    )


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    if settings.grounded_checkpoint is None and not settings.no_grounding:
        print("[filo] no --grounded_checkpoint: FiLo maps alone (same as --no_grounding)")
        settings.no_grounding = True
    from filo.evaluation.runner import run_test

    run_test(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
