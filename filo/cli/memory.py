"""``python -m filo.memory build``: PatchCore memory banks from normal images, one per class.

    python -m filo.memory build --dataset mvtec --data_path $MVTEC_ROOT --out outputs/banks/mvtec
    python -m filo.memory build --dataset visa --data_path $VISA_ROOT --shots 4 \\
        --ckpt_path ckpt/filo_train_on_mvtec.pth --out outputs/banks/visa_4shot

Defaults are the PatchCore paper's run (WideResNet-50-2 from --weights, layers 2+3, resize 256,
crop 224, coreset 10 % with the original's random numbers, every train image in the bank;
calibration leave-one-out or --calib_dir). Banks are resumable per class; each bank records its
settings and calibrated normal/anomalous thresholds. Use them with ``test.py --memory_bank DIR`` and
``python -m filo.predict --memory_bank DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from filo.cli.common import add_verbose, setup_logging
from filo.errors import FiloError, cli_entry
from filo.settings import add_args


def build_parser() -> argparse.ArgumentParser:
    from filo.evaluation.runner import RunConfig
    from filo.memory.config import MemoryConfig
    from filo.pipeline import PipelineConfig

    p = argparse.ArgumentParser(prog="python -m filo.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build memory banks from normal train images")
    data = b.add_argument_group("data")
    add_args(data, RunConfig, ("dataset", "data_path", "classes", "batch_size",
                               "realiad_split", "normal_dir", "abnormal_dir", "mask_dir",
                               "normal_test_dir"))
    data.add_argument("--out", type=Path, required=True, help="bank folder (one subfolder per class)")
    add_args(b.add_argument_group("memory bank"), MemoryConfig)
    add_args(b.add_argument_group("FiLo (clip backbone source; normal statistics for fusion)"),
             PipelineConfig, ("ckpt_path", "prompts", "device"))
    add_verbose(b)
    return p


def _refuse_idle_flags(cfg, pipe) -> None:
    """One line for a flag that has no effect in this combination (before any work)."""
    if cfg.backbone == "clip" and cfg.weights is not None:
        raise FiloError(f"--weights {cfg.weights} is for the WideResNet backbones; --backbone "
                        f"clip takes its features from --ckpt_path: drop --weights")
    if pipe.prompts is not None and pipe.ckpt_path is None:
        raise FiloError(f"--prompts {pipe.prompts} is used for FiLo's normal statistics, which "
                        f"need --ckpt_path; add --ckpt_path or drop --prompts")
    if cfg.topk != 10 and cfg.score_rule != "topk_mean" and cfg.preset is None:
        raise FiloError(f"--topk {cfg.topk} applies to --score_rule topk_mean only (this run: "
                        f"{cfg.score_rule}); drop it or pass --score_rule topk_mean")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from filo.data.layouts import load_split
    from filo.evaluation.runner import RunConfig
    from filo.fileio import check_writable_dir
    from filo.memory.build import build_banks
    from filo.memory.config import MemoryConfig
    from filo.pipeline import PipelineConfig
    from filo.settings import from_args

    run = from_args(RunConfig, args).resolved("memory")
    cfg = from_args(MemoryConfig, args)
    pipe = from_args(PipelineConfig, args)
    _refuse_idle_flags(cfg, pipe)
    out = check_writable_dir(args.out, "--out")
    if cfg.backbone != "clip":
        weights = cfg.weights_path()
        if weights is not None and not weights.is_file():
            raise FiloError(f"WideResNet weights {weights} not found: place torchvision's "
                            f"{weights.name} there (`python -m filo download "
                            f"{'wide-resnet50-2' if cfg.backbone == 'wrn50' else 'wide-resnet101-2'}`"
                            f" on a machine with internet) or pass --weights")
    split = load_split(run.data_path, run.dataset, "train", run.class_list(),
                       source="--data_path", allow_outside_root=run.allow_outside_root,
                       realiad_split=run.realiad_split, folders=run.folder_spec())
    from filo import distributed

    dist = distributed.init_from_env(pipe.device)
    filo = None
    if pipe.ckpt_path is not None:
        from filo.checkpoint import build_filo_from_checkpoint
        from filo.pipeline import generic_prompts_note, load_pipeline_prompts

        prompts, added = load_pipeline_prompts(pipe).covering(list(split))
        if added:
            print(f"[filo] warning: {generic_prompts_note(added, prompts.source, str(run.data_path))}")
        filo = build_filo_from_checkpoint(pipe.ckpt_path, prompts=prompts,
                                          device=dist.device(pipe.device))
    clean = False
    try:
        built = build_banks(Path(run.data_path), split, cfg, out, ckpt_path=pipe.ckpt_path,
                            device=dist.device(pipe.device), batch_size=run.batch_size,
                            filo=filo, dist=dist)
        n_built = sum(dist.gather(len(built)))
        clean = True
    finally:
        distributed.shutdown(dist, clean=clean)
    if dist.is_main:
        print(f"[filo] {len(split)} bank(s) in {out} ({n_built} built now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
