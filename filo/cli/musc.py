"""``python -m filo.musc pool``: a MuSc reference pool from unlabeled images of one class.

    python -m filo.musc pool --class bottle --images $MVTEC_ROOT/bottle/test \\
        --musc_clip ckpt/ViT-L-14-336px.pt --out outputs/musc_pools
    python -m filo.predict --method musc --musc_clip ckpt/ViT-L-14-336px.pt \\
        --musc_pool outputs/musc_pools --class bottle --images new_photos/ --out outputs/predict

The images are scored against each other once (MuSc's mutual scoring) and stored as features
under ``--out/<class>/`` (``.npy`` arrays read without unpickling, ``meta.json``). Each image
given to ``filo.predict`` or the service with ``--musc_pool`` is then scored against that
pool; a pool member given again scores as in the set. With ``--ckpt_path`` the pool also
records FiLo's statistics on these images, which ``--musc_fusion mean/max`` needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from filo.cli.common import add_verbose, setup_logging
from filo.errors import FiloError, cli_entry
from filo.settings import add_args

POOL_FLAGS = ("musc_clip", "ckpt_path", "prompts", "image_size", "clip_act", "musc_layers",
              "musc_r", "musc_k", "musc_block", "device")


def build_parser() -> argparse.ArgumentParser:
    from filo.pipeline import PipelineConfig

    p = argparse.ArgumentParser(prog="python -m filo.musc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("pool", help="store unlabeled images of one class as a reference pool")
    b.add_argument("--class", dest="cls_name", required=True, help="class name of the images")
    b.add_argument("--images", type=Path, nargs="+", required=True,
                   help="image files or folders (searched recursively)")
    b.add_argument("--out", type=Path, required=True, help="pool folder (one subfolder per class)")
    b.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    add_args(b.add_argument_group("MuSc"), PipelineConfig, POOL_FLAGS)
    add_verbose(b)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from dataclasses import replace

    from filo.cli.predict import collect_images
    from filo.fileio import check_writable_dir
    from filo.musc.pool import build_pool
    from filo.pipeline import PipelineConfig, build_pipeline
    from filo.settings import from_args

    if args.batch_size < 1:
        raise FiloError(f"--batch_size {args.batch_size}: must be at least 1")
    config = from_args(PipelineConfig, args, method="musc", no_grounding=True)
    if config.ckpt_path is not None:  # also FiLo's statistics on the pool (fusion)
        config = replace(config, musc_fusion="mean")
    images = collect_images(list(args.images))
    out = check_writable_dir(args.out, "--out")
    pipeline = build_pipeline(config)
    filo = None
    if pipeline.model is not None:
        pipeline.check_classes([args.cls_name], "--class")

        def filo(batch):
            res = pipeline.model.predict(batch, [args.cls_name] * len(batch),
                                         [None] * len(batch))
            return (res.anomaly_map.float().cpu().numpy(),
                    res.image_score.float().cpu().numpy())

    build_pool(pipeline.musc, images, args.cls_name, out, batch_size=args.batch_size,
               filo=filo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
