"""``python -m filo.detect``: GroundingDINO-only runs over a dataset (no FiLo maps).

Image score = the best kept box's score (max token probability). Prints image-level
auroc_sp / f1_sp / ap_sp per class and their mean (x100, one decimal), written like test.py's
tables to ``--save_path`` (results.json/.csv/.md, log, resumable prediction cache);
``--save_boxes DIR`` writes one JSON per image (boxes in original pixels, scores, phrases,
matched, position), ``--save_coco FILE`` all kept boxes as COCO detections.

``--coco_eval``: COCO box AP of the kept boxes (pycocotools: AP at IoU 0.5:0.95, AP50, AP75,
AR@100, per class and over all images) against ground-truth boxes built from the masks, one per
8-connected defect region (:mod:`filo.evaluation.coco_eval`); a second table after the main one,
the ``coco`` key of results.json, ``coco_eval.csv``, and ``coco_gt.json`` /
``coco_detections.json`` beside them to re-run any COCO tool. Works with ``--from_cache``.

Box map: the detector-only stand-in for an anomaly map, ``--image_size`` square like FiLo's map
(a non-aspect-preserving resize of the image): each pixel holds the highest score of the COUNTED
boxes covering it, 0 elsewhere (:func:`filo.fusion.box_score_map`). ``--pixel_metrics`` scores it
against the ground-truth masks; ``--viz_dir`` overlays it on each image with the boxes, phrases
and scores. The run is the same pipeline and runner as test.py without a FiLo checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from filo.cli.common import (
    add_pipeline_args,
    add_run_args,
    add_verbose,
    run_evaluation_cli,
    setup_logging,
)
from filo.errors import FiloError, cli_entry

DETECT_PIPELINE_FLAGS = ("grounded_checkpoint", "box_threshold", "text_threshold",
                         "area_threshold", "legacy_text_threshold", "legacy_phrase_case",
                         "legacy_grid", "legacy_box_slices", "bert_dir")
DETECT_MODEL_FLAGS = ("prompts", "image_size", "device", "kernels", "exact")
DETECT_OUTPUT_FLAGS = ("save_path", "save_boxes", "save_coco", "coco_eval", "pixel_metrics",
                       "viz_dir", "viz_limit", "viz_only_errors", "from_cache")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m filo.detect",
                                description=__doc__.splitlines()[0])
    add_run_args(p, outputs=DETECT_OUTPUT_FLAGS)
    add_pipeline_args(p, filo=DETECT_MODEL_FLAGS, detector=DETECT_PIPELINE_FLAGS, musc=())
    add_verbose(p)
    return p


def configs_from_args(args: argparse.Namespace):
    from filo.evaluation.runner import RunConfig
    from filo.pipeline import PipelineConfig
    from filo.settings import from_args

    run = from_args(RunConfig, args).resolved("detect")
    pipeline = from_args(PipelineConfig, args)
    if pipeline.grounded_checkpoint is None:
        raise FiloError("--grounded_checkpoint is required: grounding_train_on_{mvtec,visa}.pth, "
                        "groundingdino_swint_ogc.pth, or a file from `python -m filo.detector "
                        "convert`")
    return run, pipeline


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    run, pipeline = configs_from_args(args)
    run_evaluation_cli(run, pipeline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
