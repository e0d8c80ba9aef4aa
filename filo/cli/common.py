"""Pieces every CLI shares: flag groups generated from the settings dataclasses, logging."""

from __future__ import annotations

import argparse
import logging

from filo.evaluation.runner import RunConfig
from filo.pipeline import PipelineConfig
from filo.settings import add_args

FOLDER_FLAGS = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir")
# pipeline flags, grouped for --help (every CLI takes the groups or subsets it needs)
FILO_FLAGS = ("ckpt_path", "prompts", "image_size", "device", "position", "score_mode",
              "clip_act", "autocast", "kernels", "exact", "legacy_macaroni", "memory_bank",
              "fusion", "fusion_weight", "calib_dir", "baseline")
MUSC_FLAGS = ("method", "musc_clip", "musc_layers", "musc_r", "musc_k", "musc_divide",
              "musc_block", "musc_pool", "musc_fusion")
DETECTOR_FLAGS = ("grounded_checkpoint", "no_grounding", "box_threshold", "text_threshold",
                  "area_threshold", "outside_box_factor", "bert_dir", "legacy_phrase_case",
                  "legacy_text_threshold", "legacy_grid", "legacy_box_slices")
DATA_FLAGS = ("dataset", "data_path", "classes", "batch_size", "num_workers",
              "allow_outside_root", "realiad_split", "mask_rule", *FOLDER_FLAGS)
OUTPUT_FLAGS = ("save_path", "save_maps", "save_boxes", "coco_eval", "viz_dir", "viz_limit",
                "viz_only_errors", "viz_lift_boxes", "from_cache", "protocol")


def add_pipeline_args(parser: argparse.ArgumentParser, filo: tuple[str, ...] = FILO_FLAGS,
                      detector: tuple[str, ...] = DETECTOR_FLAGS,
                      musc: tuple[str, ...] = MUSC_FLAGS) -> None:
    """The :class:`~filo.pipeline.PipelineConfig` flags, in a "model", a "MuSc" and a
    "GroundingDINO" group (pass subsets for a CLI that offers fewer)."""
    if filo:
        add_args(parser.add_argument_group("model"), PipelineConfig, filo)
    if musc:
        add_args(parser.add_argument_group("MuSc (--method musc)"), PipelineConfig, musc)
    if detector:
        add_args(parser.add_argument_group("GroundingDINO"), PipelineConfig, detector)


def add_run_args(parser: argparse.ArgumentParser, data: tuple[str, ...] = DATA_FLAGS,
                 outputs: tuple[str, ...] = OUTPUT_FLAGS) -> None:
    """The :class:`~filo.evaluation.runner.RunConfig` flags (data, outputs)."""
    add_args(parser.add_argument_group("data"), RunConfig, data)
    add_args(parser.add_argument_group("outputs"), RunConfig, outputs)


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def run_evaluation_cli(run, pipeline) -> None:
    """Run an evaluation under torchrun when launched by it (one process otherwise)."""
    from dataclasses import replace

    from filo import distributed
    from filo.evaluation.runner import run_evaluation

    dist = distributed.init_from_env(pipeline.device)
    clean = False
    try:
        run_evaluation(run, replace(pipeline, device=dist.device(pipeline.device)), dist=dist)
        clean = True
    finally:
        distributed.shutdown(dist, clean=clean)
