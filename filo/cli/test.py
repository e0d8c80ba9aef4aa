"""``python test.py`` / ``python -m filo.cli.test``: evaluate FiLo (+ GroundingDINO) on a dataset.

Flags keep the research code's names (``--dataset --data_path --ckpt_path --grounded_checkpoint
--box_threshold --text_threshold --area_threshold --image_size --device --viz_dir``) and add
batching, class selection, prompt files, caching and exports. Every flag is defined once, on
:class:`~filo.pipeline.PipelineConfig` or :class:`~filo.evaluation.runner.RunConfig`.
"""

from __future__ import annotations

import argparse

from filo.cli.common import (
    add_pipeline_args,
    add_run_args,
    add_verbose,
    run_evaluation_cli,
    setup_logging,
)
from filo.errors import FiloError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="test.py", description="Zero-shot anomaly segmentation test run (FiLo + GroundingDINO).")
    add_run_args(p)
    add_pipeline_args(p)
    add_verbose(p)
    return p


def configs_from_args(args: argparse.Namespace):
    """(RunConfig with defaults resolved, PipelineConfig), validated."""
    from filo.evaluation.runner import RunConfig
    from filo.pipeline import PipelineConfig
    from filo.settings import from_args

    run = from_args(RunConfig, args).resolved("test")
    pipeline = from_args(PipelineConfig, args)
    if pipeline.ckpt_path is None and pipeline.memory_bank is None and not run.from_cache \
            and not pipeline.uses_musc and pipeline.baseline is None:
        raise FiloError("--ckpt_path is required: a FiLo checkpoint such as "
                        "ckpt/filo_train_on_visa.pth (see `python -m filo doctor`)")
    return run, pipeline


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    run, pipeline = configs_from_args(args)
    if pipeline.grounded_checkpoint is None and not pipeline.no_grounding:
        pipeline.no_grounding = True
        print(f"[filo] no --grounded_checkpoint: no box step; maps: {pipeline.map_name}")
    run_evaluation_cli(run, pipeline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
