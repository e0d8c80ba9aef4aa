"""``python -m filo`` — project-level commands: ``doctor``, ``download``, ``export``, ``serve``
and ``data`` (the same as ``python -m filo.data``)."""

from __future__ import annotations

import argparse
import os
import sys

from filo import __version__
from filo.errors import FiloError, cli_entry

DOWNLOAD_EPILOG = """\
Hugging Face Hub assets (filo-train-on-*, grounding-train-on-*: FantasticGNU/FiLo;
bert-base-uncased: google-bert/bert-base-uncased) are fetched with huggingface_hub:
  HF_ENDPOINT            a Hub mirror (default https://huggingface.co)
  HF_HUB_CACHE, HF_HOME  where the Hub cache lives; the file is hard-linked (or copied) from
                         there to the path the doctor checks
  HF_TOKEN               token for private or gated repositories
  FILO_HF_REVISION_FILO  revision of FantasticGNU/FiLo (default: main; pin a commit hash)
  FILO_HF_REVISION_BERT  revision of google-bert/bert-base-uncased (default: a pinned commit)
  An interrupted Hub download is retried and resumed by huggingface_hub.
Other assets (clip-vit-l-14-336, groundingdino-swint-ogc, wide-resnet*) come over plain HTTPS:
  FILO_ASSET_MIRROR      fetch {mirror}/{asset name}/{file name} instead of the public source;
                         it does NOT apply to Hub assets (use HF_ENDPOINT for those)
  A cut connection keeps <file>.part; running the same command again resumes it.
Every file is checked (sha256 where known) before it is moved into place."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m filo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"filo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from filo.doctor import add_arguments

    doctor = sub.add_parser("doctor", help="check that every asset a job needs is present and intact")
    add_arguments(doctor)

    download = sub.add_parser(
        "download", help="fetch model files (needs internet) and verify their checksums",
        description="Fetch the missing files of the named assets (default: all), verify them and\n"
                    "put them where `python -m filo doctor` looks. The only filo command that uses\n"
                    "the network: it lifts HF_HUB_OFFLINE (set by env.sh) for itself.",
        epilog=DOWNLOAD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    download.add_argument("names", nargs="*",
                          help="asset names (default: every asset); see `python -m filo doctor`")
    download.add_argument("--timeout", type=float, default=10.0,
                          help="seconds to wait for a connection or for data (default 10); also "
                               "the Hub's metadata and read timeouts unless HF_HUB_ETAG_TIMEOUT / "
                               "HF_HUB_DOWNLOAD_TIMEOUT are set")
    sub.add_parser("export", add_help=False,
                   help="write a deploy bundle (ONNX / OpenVINO) that runs without torch; "
                        "`python -m filo export --help` lists its flags")
    sub.add_parser("serve", add_help=False,
                   help="run the inspection service (REST API and a page); `python -m filo serve "
                        "--help` lists its flags")
    sub.add_parser("data", add_help=False,
                   help="dataset tools (summary, build-meta, synth); the same as `python -m "
                        "filo.data`")
    return parser


def _download(names: list[str], timeout: float) -> int:
    # the only command allowed to fetch: lift env.sh's HF_HUB_OFFLINE=1 for this process before
    # anything imports huggingface_hub (it reads the variable at import time)
    os.environ["HF_HUB_OFFLINE"] = "0"
    from filo.assets import AssetPaths, ChecksumCache, build_registry
    from filo.download import download_asset

    registry = build_registry(AssetPaths.from_env())
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise FiloError(f"unknown asset {unknown[0]!r}; known: {', '.join(registry)}")
    cache = ChecksumCache()
    for name in dict.fromkeys(names or list(registry)):
        download_asset(registry[name], timeout=timeout, cache=cache)
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # its flags are the service's and the pipeline's (filo.cli.serve)
        from filo.cli.serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["data"]:  # python -m filo data summary ... = python -m filo.data summary ...
        from filo.cli.data import main as data_main

        return data_main(argv[1:])
    if argv[:1] == ["export"]:  # its flags are the bundle's and the pipeline's (filo.cli.export)
        from filo.cli.export import main as export_main

        return export_main(argv[1:])
    args = _build_parser().parse_args(argv)
    if args.command == "doctor":
        from filo.doctor import main_doctor

        return main_doctor(args)
    if args.command == "download":
        return _download(args.names, args.timeout)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
