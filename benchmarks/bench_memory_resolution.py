"""Memory banks of 1600 x 1200 parts: build time and peak RSS, tiled and resized.

For each image count (``--counts``, default 10 50 200) and mode, one fresh process builds one
class's bank with ``filo.memory.build.build_class_bank`` (features, coreset, leave-one-out
calibration, as ``python -m filo.memory build`` runs them) from generated 1600 x 1200 images,
WideResNet-50-2 with seeded random weights (timing only):

* ``resized``: the default geometry (resize 256, centre crop 224);
* ``tiled``: ``--tile 512 --tile_overlap 32`` at native resolution (12 tiles per image), features
  in float16 (``--feature_dtype float16``);
* ``square1024`` / ``square1024_f16`` (``--modes``): the whole image square-resized to 1024 px
  (``--resize 1024 --imagesize 1024 --no_crop``, 16,384 patches per image), float32 / float16
  features.

The tiled and 1024 px banks' coreset fraction is ``--coreset`` (default 0.001: the greedy pick
loop's cost grows with rows x picks, so 10 % of 50 tiled images' 2.4 million patches is days on
2 cores); resized banks use the default 10 %. Peak RSS is
the process's VmHWM; the last columns give the growth per image between the counts measured.

    python benchmarks/bench_memory_resolution.py --counts 10 50
    python benchmarks/bench_memory_resolution.py --counts 200 --modes square1024 --coreset 0.0002
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"resized": {}, "tiled": {"tile": 512, "tile_overlap": 32, "feature_dtype": "float16"},
         "square1024": {"resize": 1024, "imagesize": 1024, "no_crop": True},
         "square1024_f16": {"resize": 1024, "imagesize": 1024, "no_crop": True,
                            "feature_dtype": "float16"}}
SMALL_CORESET = ("tiled", "square1024", "square1024_f16")  # --coreset applies


def child(data: str, n: int, mode: str, coreset: float) -> dict:
    import torch

    from filo.data.layouts import load_split
    from filo.memory import build
    from filo.memory.config import MemoryConfig
    from filo.memory.features import WideResNetFeatures, build_wide_resnet

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_memory import peak_rss_mb

    from filo.heap import keep_freed_pages

    cfg = MemoryConfig(backbone="wrn50", coreset=coreset if mode in SMALL_CORESET else 0.1,
                       **MODES[mode])
    torch.manual_seed(0)
    emb = build.PatchEmbedder.from_network(
        cfg, WideResNetFeatures(build_wide_resnet("wrn50", None), ("layer2", "layer3")))
    samples = load_split(data, "mvtec", "train", ["part"])["part"][:n]
    start_rss = peak_rss_mb()
    start = time.perf_counter()
    with keep_freed_pages():  # as build_banks runs it
        bank, meta = build.build_class_bank(Path(data), "part", samples, cfg, emb, batch_size=8)
    return {"n": n, "mode": mode, "seconds": time.perf_counter() - start,
            "rss_peak_mb": peak_rss_mb(), "rss_start_mb": start_rss,
            "bank_rows": int(bank.shape[0]), "grid": meta["grid"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[10, 50, 200])
    p.add_argument("--modes", nargs="+", default=["resized", "tiled"], choices=list(MODES))
    p.add_argument("--coreset", type=float, default=0.001)
    p.add_argument("--data", default=None, help="reuse a generated dataset folder")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.coreset)))
        return 0
    from filo.data.synthetic import make_mvtec_like

    data = args.data or tempfile.mkdtemp(prefix="bench_res_")
    if not (Path(data) / "part").is_dir():
        make_mvtec_like(data, classes=("part",), n_train_good=max(args.counts), n_test_good=1,
                        n_test_defect=1, size=(1600, 1200), seed=0)
    print(f"# generated 1600x1200 images in {data}; tiled coreset {args.coreset}, resized 0.1",
          flush=True)
    results = []
    for n in sorted(args.counts):
        for mode in args.modes:
            out = subprocess.run([sys.executable, __file__, "--child", data, str(n), mode,
                                  "--coreset", str(args.coreset)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
                print(f"# {mode} {n}: failed: {last}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"# {json.dumps(r)}", flush=True)
    print("| mode | images | build s | s / image | peak RSS MB | RSS growth MB / image | bank rows |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in args.modes:
        prev = None
        for r in (x for x in results if x["mode"] == mode):
            growth = "-"
            if prev is not None:
                growth = f"{(r['rss_peak_mb'] - prev['rss_peak_mb']) / (r['n'] - prev['n']):.1f}"
            print(f"| {mode} | {r['n']} | {r['seconds']:.0f} | {r['seconds'] / r['n']:.1f} | "
                  f"{r['rss_peak_mb']:,.0f} | {growth} | {r['bank_rows']:,} |")
            prev = r
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
