"""Throughput and peak memory of FiLo inference: maps, detector, full pipeline, metrics.

Run (random weights, timing only; the machine's other load makes absolute numbers noisy):

    .venv/bin/python benchmarks/bench_pipeline.py --quick            # tiny configs, seconds
    .venv/bin/python benchmarks/bench_pipeline.py --real --out bench.md   # ViT-L-14-336 @ 518 +
                                                                          # Swin-T GroundingDINO

Every configuration runs in its own subprocess, so its peak memory is the ``ru_maxrss`` high-water
mark of that process: "peak RSS" is the whole process (weights included), "work" is the rise
during the timed forwards over the RSS after building the model and inputs. On CUDA the
columns are ``torch.cuda.max_memory_allocated``.

Rows:

* ``filo``: ``FiLo.predict`` (maps + scores) at each batch size; ``filo research-like``: the
  same code at batch 1 under ``torch.no_grad`` with every speed switch off
  (``filo.model.RESEARCH_LIKE_SWITCHES``: all nine positions' prompts encoded, full 77-token
  context, six separate MMCI convolutions, linear layers through the BLAS), as the research
  code runs.
* ``detector``: ``Detector.detect_tensors`` (batched in same-size groups); ``detector
  research-like``: batch 1 with transformers' own CPU ops (``DetectionParams(fast_kernels=False)``).
* ``pipeline``: the test-run pipeline (``filo.pipeline.Pipeline``: detector,
  position from the boxes, FiLo, box fusion); ``pipeline research-like``: the same steps image
  by image with the research-like FiLo and the detector with transformers' own CPU ops
  (``DetectionParams(fast_kernels=False)``) under ``torch.no_grad``.
* ``metrics``: ``filo.metrics.pixel_metrics`` + image AUROC/AP/F1-max for one class of N images
  at the eval size, and exact AUPRO alone.

The maps of the first batch of each FiLo / pipeline configuration are saved, and the table's
``max |d map|`` column gives their largest difference to the research-like maps (the speed-ups
must keep it <= 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE_EVAL = 518
CLASS = "bottle"
POSITIONS = ["center", "top left", "bottom", "right"]


# ------------------------------------------------------------------------------------------
# worker side (one configuration per process)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _bert_dir(explicit: str | None) -> str:
    """--bert_dir, else $FILO_BERT_LOCAL when it holds vocab.txt, else the dev extra's copy."""
    from filo.demo import demo_bert_dir

    return explicit or str(demo_bert_dir())


def _filo_model(spec: dict, research: bool):
    import torch

    from filo.model import RESEARCH_LIKE_SWITCHES, FiLo, FiLoConfig, InferenceOptions

    switches = dict(RESEARCH_LIKE_SWITCHES) if research else {}
    if spec.get("autocast"):
        switches["autocast"] = spec["autocast"]
    config = FiLoConfig.tiny() if spec["quick"] else FiLoConfig.vit_l_14_336()
    torch.manual_seed(0)
    model = FiLo(config, options=InferenceOptions(**switches)).eval()
    if spec["quick"]:  # the tiny model's default init gives near-constant maps: spread them
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.to(spec["device"])


def _detector(spec: dict, research: bool = False):
    import torch

    from filo.detector.config import DetectorArch
    from filo.detector.inference import DetectionParams, Detector
    from filo.detector.model import build_model, load_tokenizer

    arch = DetectorArch.tiny() if spec["quick"] else DetectorArch.swin_t_ogc()
    torch.manual_seed(1)
    model = build_model(arch)
    params = DetectionParams(batch_size=spec["batch"], fast_kernels=not research)
    return Detector(model, load_tokenizer(spec["bert_dir"]), params, spec["device"])


def _inputs(spec: dict, n: int, det: bool):
    import torch

    size = 32 if spec["quick"] else SIZE_EVAL
    det_side = 96 if spec["quick"] else 518  # reference rule: short side 518 (MVTec 1024x1024 -> 518x518)

    def rand(seed: int, *shape: int) -> torch.Tensor:  # image i is the same in every row
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    from filo.data.dataset import ImageBatch

    images = torch.stack([rand(1000 + i, 3, size, size) for i in range(n)])
    det_images = [rand(5000 + i, 3, det_side, det_side) for i in range(n)] if det else []
    orig = (1024, 1024)
    batches = []
    for start in range(0, n, spec["batch"]):
        sl = slice(start, start + spec["batch"])
        k = images[sl].shape[0]
        batch = ImageBatch(images=images[sl], masks=torch.zeros(k, size, size, dtype=torch.bool),
                           labels=torch.zeros(k, dtype=torch.long), cls_names=[CLASS] * k,
                           specie_names=[""] * k, img_paths=[f"{start + j}" for j in range(k)],
                           orig_sizes=[orig] * k, det_images=det_images[sl] if det else None)
        batches.append({"batch": batch,
                        "positions": [POSITIONS[(start + j) % len(POSITIONS)] for j in range(k)]})
    return batches


def _run_metrics(spec: dict) -> dict:
    import numpy as np

    from filo import metrics

    n, size = spec["n_metric_images"], SIZE_EVAL
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    maps = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        if i % 3:  # two anomalous images of three, one or two elliptic blobs each
            for _ in range(1 + i % 2):
                cy, cx = rng.uniform(0.15, 0.85, 2) * size
                ry, rx = rng.uniform(0.03, 0.12, 2) * size
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        maps[i] = np.clip(0.3 * masks[i] + rng.normal(0.4, 0.15, (size, size)), 0, 1)
    labels = masks.reshape(n, -1).any(1).astype(int)
    scores = maps.reshape(n, -1).max(1)
    before = _rss_mb()
    start = time.perf_counter()
    if spec["variant"] == "aupro":
        metrics.aupro(masks, maps)
    else:
        metrics.pixel_metrics(masks, maps)
        metrics.image_auroc(labels, scores)
        metrics.image_ap(labels, scores)
        metrics.image_f1_max(labels, scores)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": n, "rss_before": before, "rss_peak": _rss_mb()}


def _run_model(spec: dict) -> dict:
    import numpy as np
    import torch

    from filo.fusion import fuse_with_boxes

    part, research = spec["part"], spec["variant"] == "research-like"
    device = torch.device(spec["device"])
    n_timed = spec["batch"] * spec["iters"]
    batches = _inputs(spec, n_timed, det=part != "filo")
    model = _filo_model(spec, research) if part != "detector" else None
    detector = _detector(spec, research) if part != "filo" else None
    prompts = model.prompts if model is not None else None
    if prompts is None:
        from filo.prompts import load_prompt_table

        prompts = load_prompt_table()
    from filo.pipeline import Pipeline, PipelineConfig, box_step

    size = batches[0]["batch"].images.shape[-1]
    pipeline = None
    if part == "pipeline":
        pipeline = Pipeline(PipelineConfig(image_size=size, kernels="reference" if research
                                           else "fast"), prompts, model, detector)

    def run(item) -> np.ndarray | None:
        batch = item["batch"]
        if part == "filo":
            if research:
                with torch.no_grad():
                    out = model(batch.images.to(device), batch.cls_names, item["positions"])
            else:
                out = model.predict(batch.images, batch.cls_names, item["positions"])
            return out.anomaly_map.float().cpu().numpy()
        if part == "detector":
            box_step(detector, prompts, batch.det_images, batch.orig_sizes, batch.cls_names, size)
            return None
        if not research:
            return np.stack([p.anomaly_map for p in pipeline.predict(batch)])
        # research-like pipeline: image by image, torch.no_grad instead of inference mode, as the
        # research test.py loop; the same box step and fusion as the pipeline
        with torch.no_grad():
            (boxes,) = box_step(detector, prompts, batch.det_images, batch.orig_sizes,
                                batch.cls_names, size)
            out = model(batch.images.to(device), batch.cls_names, [boxes.detection.position])
            maps = fuse_with_boxes(out.anomaly_map.float().cpu(), [boxes.counted_in_map], 0.7)
        return maps.numpy()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mb()
    for _ in range(spec["warmup"]):  # untimed runs of the first batch (same images everywhere)
        run(batches[0])
    start = time.perf_counter()
    maps_out = [run(batch) for batch in batches]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "images": n_timed, "rss_before": before, "rss_peak": _rss_mb()}
    if device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated() / 2**20
    if spec.get("maps_file") and maps_out and maps_out[0] is not None:
        np.save(spec["maps_file"], np.concatenate(maps_out))
    return result


def worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["part"] == "metrics":
        return _run_metrics(spec)
    return _run_model(spec)


# ------------------------------------------------------------------------------------------
# driver side


def _cases(args) -> list[dict]:
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    cases = []
    for device in devices:
        for part in ("filo", "detector", "pipeline"):
            if part not in args.parts:
                continue
            cases.append({"part": part, "variant": "research-like", "batch": 1,
                          "device": device})
            for b in args.batch_sizes:
                cases.append({"part": part, "variant": "optimized", "batch": b, "device": device})
        if "filo" in args.parts and args.autocast:
            dev_ac = "bf16" if device == "cpu" else args.autocast
            cases.append({"part": "filo", "variant": f"autocast {dev_ac} (not exact)",
                          "batch": max(args.batch_sizes), "device": device, "autocast": dev_ac})
    if "metrics" in args.parts:
        for variant in ("pixel_metrics + image metrics", "aupro"):
            cases.append({"part": "metrics", "variant": variant, "batch": args.metric_images,
                          "device": "cpu"})
    return cases


def _run_case(case: dict, args, tmp: Path, idx: int) -> dict:
    spec = dict(case, quick=args.quick, iters=args.iters, warmup=args.warmup,
                bert_dir=_bert_dir(args.bert_dir), n_metric_images=args.metric_images,
                threads=args.threads)
    if case["part"] in ("filo", "pipeline"):
        spec["maps_file"] = str(tmp / f"maps_{idx}.npy")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark case {case} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(case)
    result["maps_file"] = spec.get("maps_file")
    return result


def _fmt_mb(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def table(results: list[dict], title: str) -> str:
    import numpy as np

    refs = {}
    for r in results:
        if r["variant"] == "research-like" and r.get("maps_file") and Path(r["maps_file"]).is_file():
            refs[(r["part"], r["device"])] = np.load(r["maps_file"])
    lines = [f"### {title}", "",
             "| part | variant | device | batch | images/s | s/image | peak RSS MB | work MB "
             "| max abs d map |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ips = r["images"] / r["seconds"] if r["seconds"] > 0 else float("inf")
        diff = "-"
        ref = refs.get((r["part"], r["device"]))
        mf = r.get("maps_file")
        if ref is not None and mf and Path(mf).is_file() and r["variant"] != "research-like":
            got = np.load(mf)
            k = min(len(got), len(ref))
            diff = f"{float(np.abs(got[:k] - ref[:k]).max()):.1e}"
        if r.get("cuda_peak") is not None:
            peak, work = f"cuda {r['cuda_peak']:,.0f}", "-"
        else:
            peak, work = _fmt_mb(r["rss_peak"]), _fmt_mb(r["rss_peak"] - r["rss_before"])
        batch = f"N={r['batch']}" if r["part"] == "metrics" else str(r["batch"])
        lines.append(f"| {r['part']} | {r['variant']} | {r['device']} | {batch} | {ips:.3g} | "
                     f"{1 / ips:.3g} | {peak} | {work} | {diff} |")
    lines.append("")
    for part in ("filo", "detector", "pipeline"):
        for dev in sorted({r["device"] for r in results}):
            base = [r for r in results if (r["part"], r["device"], r["variant"]) ==
                    (part, dev, "research-like")]
            opt = [r for r in results if (r["part"], r["device"], r["variant"]) ==
                   (part, dev, "optimized")]
            if base and opt:
                best = max(opt, key=lambda r: r["images"] / r["seconds"])
                ratio = (best["images"] / best["seconds"]) / (base[0]["images"] / base[0]["seconds"])
                lines.append(f"- {part} speed-up vs research-like ({dev}): **{ratio:.2f}x** "
                             f"(optimized batch {best['batch']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny configs (default)")
    mode.add_argument("--real", action="store_true",
                      help="ViT-L-14-336 @ 518 + Swin-T GroundingDINO, random weights")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--parts", nargs="+", default=["filo", "detector", "pipeline", "metrics"],
                        choices=["filo", "detector", "pipeline", "metrics"])
    parser.add_argument("--iters", type=int, default=None, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches per row")
    parser.add_argument("--metric-images", type=int, default=None)
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None,
                        help="add an (inexact) autocast FiLo row (CPU rows always use bf16)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--bert_dir", default=None, help="directory with BERT vocab.txt")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    args.quick = not args.real
    defaults = ({"batch_sizes": [1, 4], "iters": 3, "warmup": 1, "metric_images": 10}
                if args.quick else
                {"batch_sizes": [1, 2], "iters": 1, "warmup": 1, "metric_images": 100})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for idx, case in enumerate(_cases(args)):
            print(f"running {case}", file=sys.stderr, flush=True)
            results.append(_run_case(case, args, Path(tmp), idx))
        title = ("quick (FiLoConfig.tiny, DetectorArch.tiny)" if args.quick
                 else "real (ViT-L-14-336 @ 518, Swin-T GroundingDINO @ 518x518, random weights)")
        text = table(results, f"{title}, {os.cpu_count()} CPU cores")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
