"""filo's PatchCore against the original patchcore-inspection, on the same seeded weights.

Generates a small MVTec-layout class (4 normal train images, 2 normal and 2 defective test
images with masks, 300 x 260 px), writes seeded random WideResNet-50-2 weights
(``torch.manual_seed(0)``, torchvision's init), then for each configuration builds a bank with
filo's defaults (plus the flags listed) and runs the original's PatchCore the way its
``bin/run_patchcore.py`` does (seeds fixed per class, backbone built, fit on the train loader,
predict on the test loader). It prints, per configuration, the largest map and score
differences relative to the original's maxima, the bank sizes, and the coreset overlap: the
fraction of filo's bank rows that are rows of the original's bank.

The original is not part of filo: pass its ``src`` folder (a checkout of
github.com/amazon-science/patchcore-inspection; it needs faiss, e.g. faiss-cpu)::

    python benchmarks/patchcore_equality.py --original /path/to/patchcore-inspection/src

``--protocol`` also runs ``test.py --memory_bank ... --protocol crop`` and compares its image
and pixel AUROC with the original's metrics on the same generated class.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASS = "part"
CONFIGS = [  # (name, resize, imagesize, coreset, filo flags)
    ("p1_224", 256, 224, 1.0, {}),
    ("default_224", 256, 224, 0.1, {}),
    ("default_320", 366, 320, 0.1, {}),
    ("p1_320", 366, 320, 1.0, {}),
    ("filo_rng_224", 256, 224, 0.1, {"coreset_rng": "filo"}),
]


def make_data(root: Path, seed: int = 0) -> None:
    """A generated class: smooth textured parts; test defects are bright scratches."""
    rng = np.random.default_rng(seed)
    w, h = 300, 260
    yy, xx = np.mgrid[0:h, 0:w]

    def base():
        img = np.zeros((h, w, 3))
        for _ in range(6):
            fx, fy, ph = rng.uniform(0.01, 0.06, 2).tolist() + [rng.uniform(0, 6.3)]
            img += rng.uniform(10, 30, 3) * np.sin(fx * xx + fy * yy + ph)[..., None]
        return img + 120 + rng.normal(0, 4, (h, w, 3))

    def save(arr, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)

    for i in range(4):
        save(base(), root / CLASS / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        save(base(), root / CLASS / "test" / "good" / f"{i:03d}.png")
    for i in range(2):
        img, mask = base(), np.zeros((h, w), dtype=np.uint8)
        cx, cy = rng.integers(90, 210), rng.integers(80, 180)
        sel = ((xx - cx) ** 2 / 900 + (yy - cy) ** 2 / 64) <= 1
        img[sel] = [250, 240, 60]
        mask[sel] = 255
        save(img, root / CLASS / "test" / "scratch" / f"{i:03d}.png")
        gt = root / CLASS / "ground_truth" / "scratch"
        gt.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(gt / f"{i:03d}_mask.png")


def seeded_weights(path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.wide_resnet50_2(weights=None).state_dict(), path)


# ---- the original ------------------------------------------------------------------------------

def run_original(src: Path, data: Path, weights: Path, resize: int, imagesize: int,
                 coreset: float) -> dict:
    """The original's run_patchcore.py steps for one class; raw scores, maps, bank, masks."""
    sys.path.insert(0, str(src))
    for name in ("timm", "matplotlib", "matplotlib.pyplot"):  # its other backbones, its plots
        sys.modules.setdefault(name, types.ModuleType(name))
    import patchcore.common
    import patchcore.patchcore
    import patchcore.sampler
    import patchcore.utils
    import torchvision
    from patchcore.datasets.mvtec import DatasetSplit, MVTecDataset

    device = torch.device("cpu")
    train = MVTecDataset(str(data), classname=CLASS, resize=resize, imagesize=imagesize,
                         split=DatasetSplit.TRAIN, train_val_split=1.0, seed=0)
    test = MVTecDataset(str(data), classname=CLASS, resize=resize, imagesize=imagesize,
                        split=DatasetSplit.TEST, seed=0)
    train_dl = torch.utils.data.DataLoader(train, batch_size=2, shuffle=False, num_workers=0)
    test_dl = torch.utils.data.DataLoader(test, batch_size=2, shuffle=False, num_workers=0)
    patchcore.utils.fix_seeds(0, device)
    sampler = (patchcore.sampler.IdentitySampler() if coreset >= 1 else
               patchcore.sampler.ApproximateGreedyCoresetSampler(coreset, device))
    # = patchcore.backbones.load("wideresnet50"): construct (random init), then load weights
    backbone = torchvision.models.wide_resnet50_2(weights=None)
    backbone.load_state_dict(torch.load(weights, weights_only=True))
    backbone.name, backbone.seed = "wideresnet50", None
    pc = patchcore.patchcore.PatchCore(device)
    pc.load(backbone=backbone, layers_to_extract_from=["layer2", "layer3"], device=device,
            input_shape=(3, imagesize, imagesize), pretrain_embed_dimension=1024,
            target_embed_dimension=1024, patchsize=3, featuresampler=sampler,
            anomaly_scorer_num_nn=1, nn_method=patchcore.common.FaissNN(False, 2))
    pc.fit(train_dl)
    scores, segs, labels, masks = pc.predict(test_dl)
    return {"scores": np.asarray(scores, dtype=np.float64), "maps": np.asarray(segs),
            "labels": np.asarray(labels), "masks": np.asarray(masks),
            "bank": np.asarray(pc.anomaly_scorer.detection_features, dtype=np.float32)}


def original_metrics(run: dict, src: Path) -> dict:
    """The original's metrics as its run_patchcore.py computes them (per-class min-max)."""
    import patchcore.metrics as m

    s = run["scores"]
    s = (s - s.min()) / (s.max() - s.min())
    segs = run["maps"]
    segs = (segs - segs.min()) / (segs.max() - segs.min())
    img = m.compute_imagewise_retrieval_metrics(s, run["labels"])["auroc"]
    pix = m.compute_pixelwise_retrieval_metrics(segs, run["masks"])["auroc"]
    return {"image_auroc": 100 * img, "pixel_auroc": 100 * pix}


# ---- filo --------------------------------------------------------------------------------------

def run_filo(data: Path, weights: Path, out: Path, resize: int, imagesize: int, coreset: float,
             flags: dict) -> dict:
    from filo.data.layouts import load_split
    from filo.data.transforms import decode_image
    from filo.memory.bank import load_bank
    from filo.memory.build import PatchEmbedder, build_banks, score_features
    from filo.memory.config import MemoryConfig
    from filo.memory.patchcore import NearestNeighbourScorer

    cfg = MemoryConfig(weights=weights, resize=resize, imagesize=imagesize,
                       coreset=None if coreset == 0.1 else coreset, **flags)
    build_banks(data, load_split(data, "mvtec", "train"), cfg, out, device="cpu",
                log=lambda *_: None)
    bank, meta = load_bank(out, CLASS)
    emb = PatchEmbedder(cfg, device="cpu")
    test = load_split(data, "mvtec", "test")[CLASS]
    x = torch.stack([emb.preprocess(decode_image(data / s.img_path)) for s in test])
    rows, grid = emb.embed(x)
    res = score_features(rows.reshape(len(test), -1, rows.shape[-1]),
                         NearestNeighbourScorer(bank, backend="faiss"), grid, cfg)
    return {"scores": res.scores.astype(np.float64), "maps": res.maps, "bank": bank,
            "calibration": meta.calibration}


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of the rows of ``a`` that equal (to 1e-4 relative) some row of ``b``."""
    from filo.memory.patchcore import NearestNeighbourScorer

    d = NearestNeighbourScorer(b, backend="torch").scores(a)
    scale = float((b * b).sum(1).mean())
    return float((d <= 1e-8 * scale).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", type=Path, required=True,
                    help="the src/ folder of a patchcore-inspection checkout")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    ap.add_argument("--protocol", action="store_true", help="also compare the crop-protocol "
                    "metrics of test.py with the original's")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="pc_equal_"))
    data, weights = tmp / "data", tmp / "wrn50_seeded.pth"
    make_data(data)
    seeded_weights(weights)
    wanted = args.configs.split(",")
    results = {}
    for name, resize, imagesize, coreset, flags in CONFIGS:
        if name not in wanted:
            continue
        ref = run_original(args.original, data, weights, resize, imagesize, coreset)
        got = run_filo(data, weights, tmp / f"banks_{name}", resize, imagesize, coreset, flags)
        r = {"maps_max_diff_rel": float(np.abs(got["maps"] - ref["maps"]).max()
                                        / np.abs(ref["maps"]).max()),
             "scores_max_diff_rel": float(np.abs(got["scores"] - ref["scores"]).max()
                                          / np.abs(ref["scores"]).max()),
             "bank_rows": [int(len(got["bank"])), int(len(ref["bank"]))],
             "coreset_overlap": overlap(got["bank"], ref["bank"]),
             "calibration_image_std": got["calibration"].get("image_std")}
        if args.protocol and name == "default_224":
            r["original_metrics"] = original_metrics(ref, args.original)
            r["filo_crop_metrics"] = filo_crop_metrics(data, tmp / f"banks_{name}", tmp)
        results[name] = r
        print(name, json.dumps(r), flush=True)
    return 0


def filo_crop_metrics(data: Path, banks: Path, tmp: Path) -> dict:
    """test.py --memory_bank --protocol crop on the generated class: image and pixel AUROC."""
    from filo.cli.test import main as test_main

    out = tmp / "test_crop"
    rc = test_main(["--dataset", "mvtec", "--data_path", str(data), "--memory_bank",
                    str(banks), "--protocol", "crop", "--save_path", str(out),
                    "--device", "cpu", "--num_workers", "0"])
    assert rc == 0
    row = json.loads((out / "results.json").read_text())["classes"][CLASS]
    return {"image_auroc": row["auroc_sp"], "pixel_auroc": row["auroc_px"]}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
