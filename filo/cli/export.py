"""``python -m filo export``: write a deploy bundle (graphs, prompt tables, memory banks and
their calibration, manifest) that ``python -m filo.deploy predict`` runs without torch.

    python -m filo export --ckpt_path ckpt/filo_train_on_visa.pth --classes bottle \\
        --format openvino --out outputs/bundle

The model flags are those of ``python -m filo.predict``; GroundingDINO is not exported
(docs/design.md §18.3), so a bundle's maps are FiLo's (and the memory banks') without the
box step: all nine positions averaged, or ``--position``.
"""

from __future__ import annotations

import argparse

from filo.cli.common import add_pipeline_args, add_verbose, setup_logging
from filo.errors import cli_entry
from filo.export.config import ExportConfig
from filo.settings import add_args

EXPORT_PIPELINE_FLAGS = ("ckpt_path", "prompts", "image_size", "position", "score_mode",
                         "clip_act", "legacy_macaroni", "memory_bank", "fusion", "fusion_weight")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m filo export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p.add_argument_group("bundle"), ExportConfig)
    # --grounded_checkpoint is accepted only to be refused with the reason (not exported)
    add_pipeline_args(p, EXPORT_PIPELINE_FLAGS, ("grounded_checkpoint",))
    add_verbose(p)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from filo.export.writer import export_bundle
    from filo.pipeline import PipelineConfig
    from filo.settings import from_args

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    out = export_bundle(from_args(ExportConfig, args), from_args(PipelineConfig, args))
    print(f"[filo] bundle -> {out} (run it: python -m filo.deploy predict --bundle {out} IMAGES)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
