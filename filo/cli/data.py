"""``python -m filo.data``: build meta.json, generate synthetic datasets, summarize a dataset."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from filo.cli.common import FOLDER_FLAGS
from filo.errors import FiloError, cli_entry
from filo.evaluation.runner import RunConfig
from filo.settings import add_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m filo.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build-meta", help="scan a dataset and write the research-code meta.json")
    b.add_argument("--dataset", required=True,
                   choices=["mvtec", "visa", "folder", "mpdd", "btad", "mvtec_ad2", "realiad"])
    b.add_argument("--root", required=True, help="dataset root folder")
    b.add_argument("--out", default=None, help="output file (default: ROOT/meta.json)")

    s = sub.add_parser("summary", help="count the images of a dataset split per class")
    s.add_argument("--dataset", default="auto",
                   choices=["auto", "mvtec", "visa", "folder", "meta", "mpdd", "btad", "mvtec_ad2", "realiad"])
    s.add_argument("--root", required=True)
    s.add_argument("--split", default=None, choices=["train", "test"],
                   help="one split only (default: train and test)")
    for cmd in (b, s):
        add_args(cmd.add_argument_group("folder layout: named folders"), RunConfig, FOLDER_FLAGS)

    g = sub.add_parser("synth", help="write a synthetic dataset with planted defects")
    g.add_argument("--layout", default="mvtec",
                   choices=["mvtec", "visa", "folder", "part", "mpdd", "btad", "mvtec_ad2",
                            "realiad"],
                   help="part: ROOT is one class as a user photographs it (train/good, "
                        "test/good, test/ng1, test/ng2; masks for ng1 only; 1600x1200 unless "
                        "--size)")
    g.add_argument("--root", required=True, help="output folder")
    g.add_argument("--classes", default=None, help="comma-separated class names")
    g.add_argument("--style", default=None, choices=["texture", "object"],
                   help="default: texture for mvtec, object for visa/folder")
    g.add_argument("--n-train-good", type=int, default=4)
    g.add_argument("--n-test-good", type=int, default=3)
    g.add_argument("--n-test-defect", type=int, default=3)
    g.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: 128; part: 1600x1200)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--image-mode", default="RGB", choices=["RGB", "L"])
    g.add_argument("--meta", action="store_true", help="also write ROOT/meta.json")
    return p


def _folders(args):
    return RunConfig(**{f: getattr(args, f) for f in FOLDER_FLAGS}).folder_spec()


def summary_lines(root, dataset: str = "auto", split: str | None = None, folders=None,
                  ) -> list[str]:
    """Per class, the image count of every split folder (``train/good: 10 normal``, ``test/ng1:
    3 anomalous, 3 with masks``)."""
    from filo.data.layouts import detect_dataset, load_split

    if folders is not None and folders.given():
        dataset = "folder" if dataset == "auto" else dataset
    elif dataset == "auto":
        dataset = detect_dataset(root)
    splits = [split] if split else ["train", "test"]
    found = {sp: load_split(root, dataset, sp, source="--root", folders=folders,
                            allow_empty=sp == "train" and split is None) for sp in splits}
    classes = list(dict.fromkeys(c for sp in splits for c in found[sp]))
    lines = [f"{root}: {dataset} layout, {len(classes)} class(es)"]
    for cls_name in classes:
        main_split = splits[-1]  # test (as before), or the one split asked for
        group = found[main_split].get(cls_name, [])
        n_anom = sum(x.anomaly for x in group)
        line = (f"{cls_name}: {len(group)} images ({len(group) - n_anom} normal, {n_anom} "
                f"anomalous)")
        if len(splits) == 2:
            line += f" in test; {len(found['train'].get(cls_name, []))} images in train"
        lines.append(line)
        for sp in splits:
            groups: dict[str, list] = {}
            for smp in found[sp].get(cls_name, []):
                groups.setdefault(smp.specie_name or ("anomalous" if smp.anomaly else "normal"),
                                  []).append(smp)
            for specie, group in groups.items():
                n_anom = sum(x.anomaly for x in group)
                n_mask = sum(bool(x.mask_path) for x in group)
                kind = (f"{len(group) - n_anom} normal" if not n_anom else
                        f"{n_anom} anomalous, {n_mask} with masks"
                        if n_anom == len(group) else
                        f"{len(group) - n_anom} normal, {n_anom} anomalous, {n_mask} with masks")
                lines.append(f"  {sp}/{specie}: {kind}")
    return lines


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build-meta":
        from filo.data.layouts import write_meta

        out = write_meta(args.root, args.dataset, args.out, source="--root",
                         folders=_folders(args))
        print(out)
        return 0
    if args.command == "summary":
        for line in summary_lines(args.root, args.dataset, args.split, _folders(args)):
            print(line)
        return 0
    if args.command == "synth" and args.layout == "part":
        from filo.data.synthetic import make_part_folder

        size = args.size or (1600, 1200)
        t0 = time.perf_counter()
        info = make_part_folder(args.root, n_train_good=args.n_train_good,
                                n_test_good=args.n_test_good, n_test_defect=args.n_test_defect,
                                size=size, seed=args.seed)
        print(f"wrote {info.n_images} images ({info.n_anomalous} anomalous) of class "
              f"{info.classes[0]} to {info.root} in {time.perf_counter() - t0:.1f}s")
        return 0
    if args.command == "synth":
        import functools

        from filo.data import synthetic

        maker = {"mvtec": synthetic.make_mvtec_like, "visa": synthetic.make_visa_like,
                 "folder": synthetic.make_folder_like}.get(args.layout)
        tree = maker is None  # mpdd, btad, mvtec_ad2, realiad
        if args.layout == "realiad":
            def maker(root, n_train_good, n_test_good, n_test_defect, **kw):
                return synthetic.make_realiad_like(root, n_train_samples=n_train_good,
                                                   n_test_good_samples=n_test_good,
                                                   n_test_ng_samples=n_test_defect, **kw)
        elif tree:
            maker = functools.partial(synthetic.make_tree_like, dataset=args.layout)
        style = args.style or ("texture" if args.layout == "mvtec" else "object")
        kwargs = dict(n_train_good=args.n_train_good, n_test_good=args.n_test_good,
                      n_test_defect=args.n_test_defect, size=args.size or 128, seed=args.seed,
                      style=style)
        if not tree:
            kwargs["image_mode"] = args.image_mode
        if args.classes:
            kwargs["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
        if args.layout in ("mvtec", "visa"):
            kwargs["with_meta"] = args.meta
        t0 = time.perf_counter()
        try:
            info = maker(args.root, **kwargs)
        except ValueError as err:
            raise FiloError(str(err)) from None
        if args.layout not in ("mvtec", "visa", "realiad") and args.meta:
            from filo.data.layouts import write_meta

            write_meta(args.root, args.layout)
        print(f"wrote {info.n_images} images ({info.n_anomalous} anomalous) of "
              f"{len(info.classes)} classes to {info.root} in {time.perf_counter() - t0:.1f}s")
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
