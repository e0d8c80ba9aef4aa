"""MuSc speed and equality: filo.musc against the original code, same CPU, same weights, one run.

    python benchmarks/bench_musc.py --original /tmp/musc --n 20 --size 224
    python benchmarks/bench_musc.py --sizes 224,336,518 --n 20          # filo alone

``--original``: an unpacked copy of github.com/xrli-U/MuSc (kept outside the repository; see
docs/design.md section 16.8). Both run a seeded random CLIP (12 blocks, ``--width``, 64-wide
heads, patch ``--patch``, exact GELU as the original builds any local weight file) on one
generated MVTec-layout class of ``--n`` images, on the CPU in float32. Printed: seconds and
ms/image of each (the fastest of ``--repeats`` alternating runs), the ratio, the largest map
and image-score differences, and filo's peak of the mutual-scoring buffers. ``--sizes`` times filo alone at several input sizes.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the original's fp32 CPU reference

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_weights(out: Path, width: int, patch: int, size: int, seed: int = 0) -> tuple[Path, dict]:
    from filo.backbone import ClipConfig, build_clip

    cfg = ClipConfig(embed_dim=64, image_size=size, patch_size=patch, vision_width=width,
                     vision_layers=12, vision_heads=max(width // 64, 1), text_width=64,
                     text_heads=1, text_layers=1, text_vocab_size=49408, act="gelu")
    torch.manual_seed(seed)
    clip = build_clip(cfg)
    path = out / f"clip_w{width}_p{patch}_s{size}.pt"
    torch.save(clip.state_dict(), path)
    return path, cfg.open_clip_dict()


def make_class(root: Path, n: int, seed: int = 0) -> str:
    from filo.data.synthetic import make_mvtec_like

    n_def = max(1, n // 2) // 3 or 1
    make_mvtec_like(root, classes=["obj_a"], n_train_good=0, n_test_good=n - 3 * n_def,
                    n_test_defect=n_def, size=160, seed=seed, style="object")
    return "obj_a"


def run_filo(weights: Path, root: Path, cls: str, size: int, batch: int = 4):
    from filo.data.layouts import load_split
    from filo.data.transforms import clip_tensor, decode_image
    from filo.musc.config import MuscSettings
    from filo.musc.scorer import MuscScorer
    from filo.musc.tower import load_tower

    samples = load_split(root, "mvtec", "test", [cls])[cls]
    paths = [str(root / s.img_path) for s in samples]
    t0 = time.perf_counter()
    scorer = MuscScorer(load_tower(weights, size, act="gelu"), MuscSettings(image_size=size))
    normed, feats = [], []
    t_forward = 0.0
    for a in range(0, len(paths), batch):
        x = torch.stack([clip_tensor(decode_image(p), size) for p in paths[a:a + batch]])
        t = time.perf_counter()
        n, f = scorer.extract(x)
        t_forward += time.perf_counter() - t
        normed.append(n)
        feats.append(f)
    layers = [torch.cat([n[i] for n in normed]) for i in range(len(normed[0]))]
    res = scorer.score_set(layers, torch.cat(feats), paths)
    return paths, res, time.perf_counter() - t0, t_forward


def run_original(repo: Path, weights: Path, json_cfg: dict, root: Path, cls: str, size: int):
    cwd = os.getcwd()
    os.chdir(repo)
    sys.path[:0] = [str(repo), str(repo / "models" / "backbone")]
    sys.modules.setdefault("openpyxl", types.SimpleNamespace(Workbook=None))
    try:
        import models.backbone.open_clip as oc
        import models.musc as mm

        cfg_dir = Path(tempfile.mkdtemp())
        (cfg_dir / "bench-tiny.json").write_text(json.dumps(
            {k: v for k, v in json_cfg.items() if k != "quick_gelu"}))
        oc.add_model_config(cfg_dir)
        captured = {}

        def record(gt_sp, pr_sp, gt_px, pr_px):
            captured.update(scores=np.asarray(pr_sp), maps=np.asarray(pr_px))
            return [0] * 3, [0] * 4

        mm.compute_metrics = record
        cfg = {"datasets": {"dataset_name": "mvtec_ad", "data_path": str(root), "class_name": cls,
                            "img_resize": size, "divide_num": 1},
               "models": {"backbone_name": "bench-tiny", "pretrained": str(weights),
                          "batch_size": 4, "feature_layers": [2, 5, 8, 11], "r_list": [1, 3, 5]},
               "device": "0",
               "testing": {"output_dir": str(cfg_dir / "out"), "vis": False,
                           "vis_type": "single_norm", "save_excel": False}}
        t0 = time.perf_counter()
        m = mm.MuSc(cfg, seed=42)
        orig_load = m.load_datasets

        def load_datasets(*a, **k):
            ds = orig_load(*a, **k)
            captured["paths"] = [d[2] for d in ds.data_to_iterate]
            return ds

        m.load_datasets = load_datasets
        encode = m.clip_model.encode_image
        captured["extract"] = 0.0

        def timed_encode(*a, **k):
            t = time.perf_counter()
            out = encode(*a, **k)
            captured["extract"] += time.perf_counter() - t
            return out

        m.clip_model.encode_image = timed_encode
        m.make_category_data(cls)
        return captured, time.perf_counter() - t0
    finally:
        os.chdir(cwd)


def msm_peak_bytes(n: int, patches: int, width: int, block_rows: int = 2048) -> int:
    """filo's mutual-scoring buffers: one degree/layer's unit vectors, one product block and
    the nearest-distance table (float32)."""
    return 4 * (n * patches * width + block_rows * block_rows + n * n * patches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", type=Path, help="unpacked MuSc repository (for the comparison)")
    p.add_argument("--n", type=int, default=20, help="images in the set")
    p.add_argument("--size", type=int, default=224, help="input size of the comparison")
    p.add_argument("--sizes", default="", help="filo alone at these sizes, e.g. 224,336,518")
    p.add_argument("--width", type=int, default=256, help="vision width of the random CLIP")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="alternating runs; fastest reported")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_musc_"))
    root = work / "data"
    cls = make_class(root, args.n)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU float32; random CLIP 12 "
          f"blocks x {args.width}, patch {args.patch}; one class of {args.n} images")
    if args.original is not None:
        weights, json_cfg = make_weights(work, args.width, args.patch, args.size)
        t_orig = t_filo = s_orig = s_filo = float("inf")
        for _ in range(args.repeats):  # alternating; the fastest of each (a shared CPU)
            cap, t = run_original(args.original.resolve(), weights, json_cfg, root, cls,
                                  args.size)
            t_orig, s_orig = min(t_orig, t), min(s_orig, t - cap["extract"])
            paths, res, t, t_extract = run_filo(weights, root, cls, args.size)
            t_filo, s_filo = min(t_filo, t), min(s_filo, t - t_extract)
        order = [paths.index(str(Path(q))) for q in cap["paths"]]
        dmap = float(np.abs(cap["maps"][:, 0] - res.maps[order]).max())
        dscore = float(np.abs(cap["scores"] - res.scores[order]).max())
        print(f"size {args.size}: original {t_orig:.2f} s ({1000 * t_orig / args.n:.0f} ms/img), "
              f"filo {t_filo:.2f} s ({1000 * t_filo / args.n:.0f} ms/img, CLIP forward "
              f"{t_extract:.2f} s); ratio {t_orig / t_filo:.2f}x")
        print(f"all but the CLIP forward passes: original {s_orig:.2f} s, "
              f"filo {s_filo:.2f} s; ratio {s_orig / s_filo:.2f}x")
        print(f"max |map diff| {dmap:.2e}, max |image score diff| {dscore:.2e}")
    for s in [int(v) for v in args.sizes.split(",") if v.strip()]:
        weights, _ = make_weights(work, args.width, args.patch, s)
        _, res, t, te = run_filo(weights, root, cls, s)
        g = s // args.patch
        peak = msm_peak_bytes(args.n, g * g, args.width) / 2**20
        print(f"filo size {s}: {1000 * t / args.n:.0f} ms/img ({1000 * te / args.n:.0f} CLIP "
              f"forward), mutual-scoring buffers {peak:.0f} MiB")


if __name__ == "__main__":
    main()
