"""``python -m filo.baselines``: train anomalib models on a filo dataset (docs/design.md §17).

``fit --model NAME --data_path DIR --out DIR`` trains one model per class; ``--list`` prints the
models anomalib provides with their arguments. Evaluate with ``python test.py --baseline DIR``.
"""

from __future__ import annotations

import argparse

from filo.baselines.config import PRESETS, FitConfig
from filo.cli.common import add_verbose, setup_logging
from filo.errors import FiloError, cli_entry
from filo.settings import add_args

DATA_FLAGS = ("dataset", "data_path", "classes", "batch_size", "num_workers",
              "allow_outside_root", "realiad_split")


def build_parser() -> argparse.ArgumentParser:
    from filo.evaluation.runner import RunConfig

    p = argparse.ArgumentParser(
        prog="python -m filo.baselines",
        description="Trained baselines through anomalib: fit one model per class, then "
                    "evaluate with `python test.py --baseline DIR`.")
    p.add_argument("--list", action="store_true", help="list the models and presets, then exit")
    sub = p.add_subparsers(dest="command")
    fit = sub.add_parser("fit", help="train one model per class")
    add_args(fit.add_argument_group("data"), RunConfig, DATA_FLAGS)
    add_args(fit.add_argument_group("model"), FitConfig)
    fit.add_argument("--model_args", action="append", metavar="KEY=VALUE", default=[],
                     help="a model constructor argument (repeatable), e.g. n_features=100")
    add_verbose(fit)
    add_verbose(p)
    return p


def list_models() -> str:
    from filo.baselines import backend

    lines = [f"anomalib {backend.version()} image models (python -m filo.baselines fit --model "
             f"NAME --model_args key=value):"]
    for name in backend.model_names():
        params = backend.init_parameters(name)
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        need = backend.NEEDS_LOCAL.get(name)
        lines.append(f"  {name}: {shown}" + (f"  [needs {need[0]}=DIR]" if need else ""))
    lines.append("presets (--preset):")
    for name, p in PRESETS.items():
        lines.append(f"  {name}: {p}")
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.list:
        print(list_models())
        return 0
    if args.command != "fit":
        raise FiloError("give a command: `python -m filo.baselines fit --model NAME --data_path "
                        "DIR --out DIR` (or --list)")
    from filo.baselines.config import parse_model_args
    from filo.baselines.fit import fit_baselines
    from filo.evaluation.runner import RunConfig
    from filo.settings import from_args

    run = from_args(RunConfig, args)
    if run.data_path is None:
        run = run.resolved("fit")
    cfg = from_args(FitConfig, args, model_args=parse_model_args(args.model_args))
    records = fit_baselines(cfg, run.data_path, run.dataset, run.class_list(),
                            batch_size=run.batch_size, num_workers=run.num_workers,
                            allow_outside_root=run.allow_outside_root,
                            realiad_split=run.realiad_split)
    print(f"[filo] {len(records)} model(s) in {cfg.out}; evaluate with `python test.py "
          f"--baseline {cfg.out} --dataset {run.dataset} --data_path {run.data_path}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
