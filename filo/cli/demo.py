"""``python -m filo.demo``: the whole pipeline on generated data (see :mod:`filo.demo`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from filo.demo import BANNER, DemoConfig, run_demo
from filo.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    import filo.demo

    p = argparse.ArgumentParser(prog="python -m filo.demo", description=filo.demo.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path,
                   default=Path(os.environ.get("RESULTS_DIR", "outputs/results")) / "demo",
                   help="working folder: generated data, checkpoints, results")
    p.add_argument("--viz_dir", type=Path, default=None, help="write visualisations here")
    p.add_argument("--seed", type=int, default=0, help="seed of data, training and detector")
    p.add_argument("--epochs", type=int, default=DemoConfig.epochs, help="training epochs")
    p.add_argument("--no_banner", action="store_true", help="no 'this is the demo' banner")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.no_banner:
        root = Path(os.environ.get("FILO_ROOT", "."))
        print(BANNER.format(data=os.environ.get("MVTEC_ROOT", root / "data/mvtec_anomaly_detection"),
                            ckpt=Path(os.environ.get("CKPT_DIR", root / "ckpt")) / "filo_train_on_visa.pth"))
    run_demo(DemoConfig(out=args.out, viz_dir=args.viz_dir, seed=args.seed, epochs=args.epochs))
    if not args.no_banner:
        print("[demo] this was the demo. Real run: place the assets (python -m filo doctor "
              "--job test-mvtec), then: source env.sh && bash scripts/test_mvtec.sh")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
