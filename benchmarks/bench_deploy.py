"""The torch CPU pipeline against its deploy bundle on onnxruntime and OpenVINO, same CPU, one run.

    .venv/bin/python benchmarks/bench_deploy.py --out bench_deploy.md            # ViT-L @ 518
    .venv/bin/python benchmarks/bench_deploy.py --quick                          # tiny, seconds

Models: FiLo with the real ViT-L/14@336 architecture at 518 px (seeded random weights: timing and
parity only) and the memory-bank feature extractor WideResNet-50-2 (layers 2 + 3, 224 px crop,
PatchCore aggregation to 1024 dims, kNN against a 1,568-row bank). Rows:

* ``torch``: ``FiLo.predict`` (the pipeline's FiLo step, its fast CPU kernels) + the numpy
  conversion; for WideResNet ``PatchEmbedder.embed`` + ``NearestNeighbourScorer`` (torch kNN);
* ``onnxruntime`` / ``openvino``: :class:`filo.deploy.inferencer.BundleInferencer` on the
  exported bundle (graphs + the numpy steps), the same image, the same thread count;
* ``onnxruntime int8`` (``--int8``): the FiLo graphs with int8 matrix-product weights.

Every row runs in its own subprocess (torch is never imported by the deploy rows), so "peak RSS"
is that process's ``ru_maxrss``. Times are the median of ``--iters`` runs after one warm-up;
``max |d map|`` is the largest difference of the row's map to the torch map of the same image
(for the WideResNet rows, raw squared distances, relative to the torch map's maximum).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASS = "bottle"


def _rss_mb() -> float:
    """Peak RSS of this process (VmHWM: reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _image(size: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((size + 37, size), Image.Resampling.BICUBIC)


def _filo_model(quick: bool):
    import torch

    from filo.model import FiLo, FiLoConfig

    torch.manual_seed(0)
    cfg = FiLoConfig.tiny() if quick else FiLoConfig.vit_l_14_336(518)
    model = FiLo(cfg).eval()
    with torch.no_grad():  # seeded weights off their init (zero biases and contexts take part)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _wrn_embedder(quick: bool):
    import torch

    from filo.memory.build import PatchEmbedder
    from filo.memory.config import MemoryConfig

    torch.manual_seed(0)
    cfg = MemoryConfig(backbone="wrn50", layers="layer2,layer3", weights=None)
    from filo.memory.features import WideResNetFeatures, build_wide_resnet

    # random init: no weight file needed
    return PatchEmbedder.from_network(
        cfg, WideResNetFeatures(build_wide_resnet("wrn50", None), cfg.layer_list()))


def _timed(fn, iters: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# ------------------------------------------------------------------------------------------
# workers


def worker_torch(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from filo.data.transforms import clip_tensor

    if args.part == "filo":
        model = _filo_model(args.quick)
        x = clip_tensor(_image(model.config.image_size), model.config.image_size)[None]
        fn = lambda: model.predict(x, [CLASS], [None]).anomaly_map[0].float().numpy()  # noqa: E731
    else:
        from filo.memory.build import score_features
        from filo.memory.patchcore import NearestNeighbourScorer

        emb = _wrn_embedder(args.quick)
        bank = np.load(args.bank)
        scorer = NearestNeighbourScorer(bank, k=1, backend="torch", device="cpu")
        x = emb.preprocess(_image(256))[None]

        def fn():
            rows, grid = emb.embed(x)
            return score_features(rows.reshape(1, -1, rows.shape[-1]), scorer, grid,
                                  emb.cfg).maps[0]
    sec, amap = _timed(fn, args.iters)
    np.save(args.map_out, np.asarray(amap, dtype=np.float32))
    return {"seconds": sec, "rss_mb": _rss_mb()}


def worker_deploy(args) -> dict:
    import numpy as np

    from filo.deploy.inferencer import BundleInferencer

    inf = BundleInferencer(args.bundle, threads=args.threads)
    size = inf.filo["image_size"] if inf.filo else 256
    img = _image(size)
    if inf.filo:
        fn = lambda: inf.run_filo(img, CLASS)[0]  # noqa: E731
    else:
        from filo.deploy import numerics

        mc = inf.bundle.manifest["classes"][CLASS]["memory"]

        def fn():  # the bank's map at its input size, as the torch row
            from filo.deploy.inferencer import _to_input, patchcore_geometry

            x = _to_input(patchcore_geometry(img, mc["resize"], mc["imagesize"], mc["crop"]),
                          mc["mean"], mc["std"])
            out = inf._graph(mc["graph"])({"image": x})
            rows, grid = numerics.aggregate([out[f"feature_{j}"][0] for j in range(len(out))],
                                            mc["patchsize"], mc["pretrain_dim"], mc["target_dim"])
            return numerics.memory_map(numerics.knn_scores(rows, inf._bank(CLASS), 1), grid,
                                       mc["imagesize"])
    sec, amap = _timed(fn, args.iters)
    np.save(args.map_out, np.asarray(amap, dtype=np.float32))
    assert "torch" not in sys.modules
    return {"seconds": sec, "rss_mb": _rss_mb()}


# ------------------------------------------------------------------------------------------
# driver


def _export(quick: bool, work: Path, threads: int, skip: tuple[str, ...] = ()
            ) -> dict[str, Path]:
    import torch

    torch.set_num_threads(threads)
    from filo.export.writer import _export_filo, finish_bundle

    out: dict[str, Path] = {}
    b = work / "filo_onnx"
    if (b / "manifest.json").is_file():  # --work: kept from an earlier run
        return _export_rest(quick, work, threads, {"filo onnxruntime": b}, skip)
    model = _filo_model(quick)
    t = time.perf_counter()
    b.mkdir()
    section, per_class = _export_filo(model, b, [CLASS], 17)
    manifest = {"kind": "filo-deploy-bundle", "format_version": 1, "fusion": "filo",
                "fusion_weight": 0.5, "position": None, "map_size": model.config.image_size,
                "filo": section, "memory": None, "classes": {CLASS: {"text": per_class[CLASS]}},
                "versions": {}}
    finish_bundle(b, manifest)
    print(f"[bench] FiLo exported in {time.perf_counter() - t:.0f} s", flush=True)
    out["filo onnxruntime"] = b
    del model
    return _export_rest(quick, work, threads, out, skip)


def _export_rest(quick: bool, work: Path, threads: int, out: dict[str, Path],
                 skip: tuple[str, ...] = ()) -> dict[str, Path]:
    import numpy as np
    import torch

    from filo.export.graphs import FeatureGraph
    from filo.export.writer import _trace, convert_bundle, finish_bundle

    if "filo openvino" not in skip:
        if not (work / "filo_ov" / "manifest.json").is_file():
            import shutil

            shutil.rmtree(work / "filo_ov", ignore_errors=True)
            convert_bundle(out["filo onnxruntime"], work / "filo_ov", "openvino")
        out["filo openvino"] = work / "filo_ov"
    emb = _wrn_embedder(quick)
    m = work / "wrn_onnx"
    if not (m / "manifest.json").is_file():
        (m / "memory").mkdir(parents=True)
        x = torch.zeros(1, 3, 224, 224)
        _trace(FeatureGraph(emb.net), (x,), m / "memory_features_0.onnx", ["image"],
               ["feature_0", "feature_1"], {"image": {0: "batch"}}, 17)
        rng = np.random.default_rng(0)
        np.save(m / "memory/0_bank.npy", rng.standard_normal((1568, 1024)).astype(np.float32) * 0.05)
        mem = {"graph": "memory_features_0.onnx", "bank": "memory/0_bank.npy", "num_nn": 1,
               "patchsize": 3, "pretrain_dim": 1024, "target_dim": 1024, "resize": 256,
               "imagesize": 224, "crop": True, "mean": list(emb.mean), "std": list(emb.std),
               "score_rule": "max", "topk": 10, "calibration": {}}
        finish_bundle(m, {"kind": "filo-deploy-bundle", "format_version": 1, "fusion": "memory",
                          "fusion_weight": 0.5, "position": None, "map_size": 224, "filo": None,
                          "memory": {"graphs": ["memory_features_0.onnx"]},
                          "classes": {CLASS: {"memory": mem}}, "versions": {}})
    out["wrn50 onnxruntime"] = m
    if not (work / "wrn_ov" / "manifest.json").is_file():
        convert_bundle(m, work / "wrn_ov", "openvino")
    out["wrn50 openvino"] = work / "wrn_ov"
    return out


def _run(kind: str, part: str, args, work: Path, bundle: Path | None) -> dict:
    map_out = work / f"map_{part}_{kind.replace(' ', '_')}.npy"
    cmd = [sys.executable, __file__, "--worker", "torch" if bundle is None else "deploy",
           "--part", part, "--threads", str(args.threads), "--iters", str(args.iters),
           "--map_out", str(map_out), "--bank", str(work / "wrn_onnx/memory/0_bank.npy")]
    if bundle is not None:
        cmd += ["--bundle", str(bundle)]
    if args.quick:
        cmd.append("--quick")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{kind} {part} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["map"] = map_out
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny FiLo (32 px) instead of ViT-L @ 518")
    p.add_argument("--iters", type=int, default=3, help="timed runs per row (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of torch and of each runtime (default: all cores)")
    p.add_argument("--int8", action="store_true", help="also time the int8 ONNX FiLo bundle")
    p.add_argument("--out", type=Path, default=None, help="write the table here (markdown)")
    p.add_argument("--skip", default="", help="comma-separated rows to leave out, e.g. 'filo "
                   "openvino' (converting the ViT-L graph to IR needs ~8 GB of free memory)")
    p.add_argument("--work", type=Path, default=None,
                   help="keep the bundles in this folder and reuse the ones already there "
                        "(default: a temporary folder)")
    p.add_argument("--worker", choices=("torch", "deploy"), help=argparse.SUPPRESS)
    p.add_argument("--part", choices=("filo", "wrn50"), default="filo", help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--bank", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--map_out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        res = worker_torch(args) if args.worker == "torch" else worker_deploy(args)
        print(json.dumps(res))
        return 0

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="filo-bench-deploy-") as tmp:
        work = Path(tmp) if args.work is None else args.work
        work.mkdir(parents=True, exist_ok=True)
        skip = tuple(x.strip() for x in args.skip.split(",") if x.strip())
        bundles = _export(args.quick, work, args.threads, skip)
        if args.int8:
            from filo.export.writer import convert_bundle

            bundles["filo onnxruntime int8"] = convert_bundle(
                bundles["filo onnxruntime"], work / "filo_int8", "onnx", "int8")
        rows = []
        for part in ("filo", "wrn50"):
            ref = _run("torch", part, args, work, None)
            rows.append((part, "torch", ref, 0.0))
            print(f"[bench] {part} torch {ref['seconds']:.3f} s", flush=True)
            for name, bundle in bundles.items():
                if not name.startswith(part):
                    continue
                r = _run(name, part, args, work, bundle)
                want = np.load(ref["map"])
                d = float(np.abs(np.load(r["map"]) - want).max())
                if part == "wrn50":  # raw squared distances: relative to the map's maximum
                    d /= float(np.abs(want).max())
                rows.append((part, name[len(part) + 1:], r, d))
                print(f"[bench] {name} {r['seconds']:.3f} s, max |d map| {d:.2e}", flush=True)
    arch = "tiny FiLo @ 32" if args.quick else "FiLo ViT-L/14@336 @ 518"
    lines = [f"threads: {args.threads}; median of {args.iters} runs after a warm-up; one image",
             "", "| model | runtime | s / image | speed-up vs torch | peak RSS (MB) | "
             "max map diff to torch (WideResNet: relative to the map maximum) |",
             "|---|---|---|---|---|---|"]
    base = {part: r["seconds"] for part, kind, r, _ in rows if kind == "torch"}
    for part, kind, r, d in rows:
        model = arch if part == "filo" else "WideResNet-50-2 @ 224 + kNN"
        lines.append(f"| {model} | {kind} | {r['seconds']:.3f} | "
                     f"{base[part] / r['seconds']:.2f}x | {r['rss_mb']:.0f} | {d:.1e} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
