"""What detector batching and the fast CPU kernels change, measured on seeded tiny models.

Runs the pipeline with the box step on the golden fixtures of the test suite (tests/golden_runs.py:
tiny FiLo with name-seeded weights, the seeded tiny GroundingDINO, a generated MVTec-layout
dataset of 8 images) in four configurations and prints the largest differences to the exact run
(``--exact``: detector at batch 1, reference kernels) of the final maps, the image scores and the
kept boxes' scores, and how many position words / kept-box lists changed:

    python benchmarks/measure_exact.py [--batch_size 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run(assets: dict, batch_size: int, **flags) -> dict:
    """Maps, image scores and full-precision kept-box scores of every image."""
    from torch.utils.data import DataLoader

    from filo.data import EvalDataset, collate, flatten, load_split
    from filo.pipeline import PipelineConfig, box_step, build_pipeline

    config = PipelineConfig(ckpt_path=assets["ckpt"], grounded_checkpoint=assets["gdino"],
                            prompts=assets["prompts"], bert_dir=assets["bert"], image_size=32,
                            device="cpu", **flags)
    pipeline = build_pipeline(config)
    samples = flatten(load_split(assets["data"], "mvtec", "test"))
    loader = DataLoader(EvalDataset(samples, assets["data"], 32, with_detector_input=True),
                        batch_size=batch_size, collate_fn=collate)
    out: dict = {"maps": {}, "scores": {}, "boxes": {}}
    for batch in loader:
        steps = box_step(pipeline.detector, pipeline.prompts, batch.det_images,
                         batch.orig_sizes, batch.cls_names, 32,
                         legacy_grid=config.legacy_grid)
        for path, pred, step in zip(batch.img_paths, pipeline.predict(batch), steps, strict=True):
            out["maps"][path] = pred.anomaly_map
            out["scores"][path] = pred.image_score
            out["boxes"][path] = {"position": step.detection.position,
                                  "phrases": step.detection.phrases,
                                  "scores": step.detection.scores.tolist()}
    return out


def compare(ref: dict, got: dict) -> dict:
    d_map = max(float(np.abs(ref["maps"][k] - got["maps"][k]).max()) for k in ref["maps"])
    d_score = max(abs(ref["scores"][k] - got["scores"][k]) for k in ref["scores"])
    d_box, positions, lists = 0.0, 0, 0
    for k, a in ref["boxes"].items():
        b = got["boxes"][k]
        positions += a["position"] != b["position"]
        if a["phrases"] != b["phrases"] or len(a["scores"]) != len(b["scores"]):
            lists += 1
            continue
        d_box = max(d_box, max(abs(x - y) for x, y in zip(a["scores"], b["scores"], strict=True)))
    return {"max |d map|": d_map, "max |d image score|": d_score,
            "max |d box score|": d_box, "position words changed": positions,
            "kept-box lists changed": lists, "images": len(ref["scores"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=4)
    args = p.parse_args()
    from golden_runs import build_assets

    b = args.batch_size
    configs = {
        f"--exact at --batch_size {b} (batch 1, reference kernels)": (b, {"exact": True}),
        "batch 1, fast kernels": (1, {}),
        f"batch {b}, reference kernels": (b, {"kernels": "reference"}),
        f"batch {b}, fast kernels (default)": (b, {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(Path(tmp) / "assets")
        results = {name: run(assets, bs, **flags) for name, (bs, flags) in configs.items()}
    ref = results[next(iter(configs))]
    rows = [(name, compare(ref, res)) for name, res in results.items()]
    cols = list(rows[0][1])
    print("| configuration | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{r[c]:.2e}" if isinstance(r[c], float) else str(r[c])
                                           for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
