"""``python train.py`` / ``python -m filo.cli.train``: train FiLo's heads, prompts and adapter.

Stage 1 trains the linear + MMCI heads and both prompt learners, stage 2 the adapter, on the full
test split of an auxiliary dataset (docs/design.md section 7). The checkpoint
``{save_dir}/filo_train_on_{dataset}.pth`` is rewritten after every epoch together with the
resume state ``filo_train_on_{dataset}.state.pt``; ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from filo.errors import FiloError, cli_entry

DATA_ENV = {"mvtec": "MVTEC_ROOT", "visa": "VISA_ROOT"}
CLIP_FILE = "ViT-L-14-336px.pt"


def _default_save_dir() -> Path:
    return Path(os.environ.get("CKPT_DIR") or "ckpt")


def _default_clip_weights() -> Path:
    env = os.environ.get("FILO_CLIP_WEIGHTS")
    if env:
        return Path(env)
    return Path(os.environ.get("CKPT_DIR") or "ckpt") / CLIP_FILE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train FiLo (heads + prompt learners, then the adapter).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="mvtec", choices=["mvtec", "visa", "folder", "meta", "mpdd", "btad", "mvtec_ad2", "realiad"],
                   help="layout of --data_path (its full test split is the training data); also "
                        "names the checkpoint filo_train_on_<dataset>.pth")
    d.add_argument("--data_path", type=Path, default=None,
                   help="dataset root (default: $MVTEC_ROOT / $VISA_ROOT by --dataset)")
    d.add_argument("--classes", default=None,
                   help="comma-separated classes to train on (default: all)")
    d.add_argument("--image_size", type=int, default=None,
                   help="CLIP input size (default: 518; 32 with --model_config tiny)")
    d.add_argument("--mosaic_prob", type=float, default=None,
                   help="probability of a 2x2 same-class mosaic per sample (default: 0.2 for "
                        "mvtec, 0 otherwise)")
    from filo.evaluation.runner import RunConfig
    from filo.settings import add_args

    add_args(d, RunConfig, ("num_workers",))  # the one definition every CLI shares
    m = p.add_argument_group("model")
    m.add_argument("--model_config", default="vit-l-14-336", choices=["vit-l-14-336", "tiny"],
                   help="vit-l-14-336 (needs --clip_weights) or tiny (random weights, tests/demo)")
    m.add_argument("--clip_weights", type=Path, default=None,
                   help=f"OpenAI CLIP weights (default: $FILO_CLIP_WEIGHTS or $CKPT_DIR/{CLIP_FILE})")
    m.add_argument("--prompts", type=Path, default=None,
                   help="prompt YAML file (default: the bundled table of --dataset)")
    m.add_argument("--clip_act", default=None, choices=["gelu", "quick_gelu"],
                   help="CLIP MLP activation (default: the research rule, exact GELU unless "
                        "--image_size 336, as the released checkpoints; quick_gelu is what "
                        "OpenAI trained CLIP with); recorded in the checkpoint")
    m.add_argument("--taps", default="reference", choices=["reference", "true"],
                   help="feature taps: reference (as the released checkpoints) or true per-layer")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=15, help="stage-1 epochs (heads + prompts)")
    o.add_argument("--adapter_epochs", type=int, default=5, help="stage-2 epochs (adapter)")
    o.add_argument("--batch_size", type=int, default=1, help="images per step")
    o.add_argument("--lr", type=float, default=1e-4, help="learning rate of linear heads + MMCI")
    o.add_argument("--prompt_lr", type=float, default=1e-3, help="learning rate of the prompt learners")
    o.add_argument("--adapter_lr", type=float, default=1e-5, help="learning rate of the adapter")
    o.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order")
    o.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    o.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    r = p.add_argument_group("outputs")
    r.add_argument("--save_dir", type=Path, default=None,
                   help="where filo_train_on_<dataset>.pth, its .state.pt and .train_log.json go "
                        "(default: $CKPT_DIR or ckpt)")
    r.add_argument("--resume", action="store_true",
                   help="continue the interrupted run saved in --save_dir")
    r.add_argument("--no_progress", action="store_true", help="no progress bars")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def settings_from_args(args: argparse.Namespace):
    from filo.training import TrainSettings

    data_path = args.data_path
    if data_path is None:
        env = DATA_ENV.get(args.dataset)
        if env and os.environ.get(env):
            data_path = Path(os.environ[env])
        else:
            hint = f" (or set {env} via env.sh)" if env else ""
            raise FiloError(f"--data_path is required: the root of the {args.dataset} dataset{hint}")
    if not Path(data_path).is_dir():
        raise FiloError(f"dataset root {data_path} does not exist; pass --data_path with the "
                        f"{args.dataset} dataset root (see data/README.md)")
    clip_weights = None
    if args.model_config == "vit-l-14-336":
        clip_weights = args.clip_weights or _default_clip_weights()
        if not Path(clip_weights).is_file():
            raise FiloError(f"CLIP weights {clip_weights} not found; fetch them with `python -m "
                            f"filo download` or pass --clip_weights (or set FILO_CLIP_WEIGHTS)")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    from filo.fileio import check_writable_dir

    save_dir = check_writable_dir(args.save_dir or _default_save_dir(), "--save_dir")
    return TrainSettings(
        dataset=args.dataset, data_path=Path(data_path),
        save_dir=save_dir, clip_weights=clip_weights,
        model_config=args.model_config, epochs=args.epochs, adapter_epochs=args.adapter_epochs,
        batch_size=args.batch_size, lr=args.lr, prompt_lr=args.prompt_lr,
        adapter_lr=args.adapter_lr, image_size=args.image_size, device=args.device,
        seed=args.seed, resume=args.resume, num_workers=args.num_workers, prompts=args.prompts,
        classes=classes, mosaic_prob=args.mosaic_prob, taps=args.taps, clip_act=args.clip_act, amp=args.amp,
        progress=not args.no_progress,
    )


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    from filo.training import train

    try:
        result = train(settings)
    except KeyboardInterrupt:
        print(f"interrupted: every finished epoch is saved in {settings.save_dir}; run the same "
              f"command with --resume to continue", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"[train] checkpoint: {result.checkpoint}")
    print(f"[train] resume state: {result.state_path}; log: {result.log_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
