"""What ``python -m filo export --precision int8`` costs: map error and AUROC of the int8 bundle
against the fp32 bundle (which equals the torch pipeline to ~1e-6) on the demo's target data.

    .venv/bin/python -m filo.demo --out outputs/demo --no_banner
    .venv/bin/python benchmarks/deploy_int8_cost.py --demo outputs/demo

FiLo alone (no box step, all nine positions averaged), every test image of the demo's VisA-like
target classes. Prints max / mean absolute map difference, image AUROC and pixel AUROC of both.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, required=True, help="output folder of python -m filo.demo")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    from filo.data.layouts import load_split
    from filo.data.transforms import load_mask, mask_tensor
    from filo.demo import DEMO_PROMPTS
    from filo.deploy.inferencer import BundleInferencer
    from filo.export.config import ExportConfig
    from filo.export.writer import convert_bundle, export_bundle
    from filo.imagefile import decode_image
    from filo.pipeline import PipelineConfig

    target = args.demo / "data" / "target_visa_like"
    split = load_split(target, "visa", "test")
    classes = sorted(split)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_bundle(ExportConfig(out=Path(tmp) / "fp32", classes=",".join(classes)),
                             PipelineConfig(ckpt_path=args.demo / "ckpt" / "filo_train_on_mvtec.pth",
                                            prompts=DEMO_PROMPTS))
        int8 = convert_bundle(fp32, Path(tmp) / "int8", "onnx", "int8")
        runs = {k: BundleInferencer(b, threads=args.threads) for k, b in
                (("fp32", fp32), ("int8", int8))}
        res = {k: {"scores": [], "labels": [], "pix": [], "gt": []} for k in runs}
        diffs = []
        for cls in classes:
            for s in split[cls]:
                img = decode_image(target / s.img_path)
                size = runs["fp32"].size
                gt = (mask_tensor(load_mask(target / s.mask_path), size).numpy() if s.mask_path
                      else np.zeros((size, size), bool))
                maps = {}
                for k, inf in runs.items():
                    pred = inf.predict(img, cls)
                    maps[k] = pred.anomaly_map
                    res[k]["scores"].append(pred.image_score)
                    res[k]["labels"].append(s.anomaly)
                    res[k]["pix"].append(pred.anomaly_map.ravel())
                    res[k]["gt"].append(gt.ravel())
                diffs.append(np.abs(maps["int8"] - maps["fp32"]))
    d = np.concatenate([x.ravel() for x in diffs])
    print(f"images: {len(diffs)} ({', '.join(classes)})")
    print(f"int8 vs fp32 map: max abs diff {d.max():.2e}, mean abs diff {d.mean():.2e}")
    for k, r in res.items():
        img_auc = roc_auc_score(r["labels"], r["scores"])
        pix_auc = roc_auc_score(np.concatenate(r["gt"]), np.concatenate(r["pix"]))
        print(f"{k}: image AUROC {img_auc:.4f}, pixel AUROC {pix_auc:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
