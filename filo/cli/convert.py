"""``python -m filo.detector convert IN OUT``: original GroundingDINO checkpoint -> transformers."""

from __future__ import annotations

import argparse
import sys

from filo.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m filo.detector",
                                     description="GroundingDINO checkpoint tools (offline).")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert an original-layout checkpoint "
                          "(groundingdino_swint_ogc.pth, grounding_train_on_*.pth)")
    conv.add_argument("src", help="original GroundingDINO checkpoint (.pth)")
    conv.add_argument("dst", help="output file in the transformers layout (.pth)")
    conv.add_argument("--bert_dir", default=None,
                      help="local bert-base-uncased dir (its config.json sets the BERT head "
                           "count; default hidden/64)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from filo.detector.convert import convert_file
        from filo.detector.model import read_bert_config

        report = convert_file(args.src, args.dst, bert_config=read_bert_config(args.bert_dir))
        print(f"{args.src} -> {args.dst}: {report.summary()}")
        for key, why in sorted(report.ignored.items()):
            print(f"  ignored {key}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
