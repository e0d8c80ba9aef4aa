"""Memory-bank (PatchCore) speed and memory: feature extraction (backbone and aggregation
timed separately), kNN search, coreset picks, and peak RSS of a bank build at camera resolution.

Every comparison runs in this one process (the RSS rows: one fresh subprocess per variant),
after a warm-up, with the variants alternated and repeated (``--repeats``, default 3); the
table gives medians and ratios. WideResNet-50-2 with seeded random weights (timing only).

* features: filo's aggregation (grouped convolutions) at batch 1 and 8, the former unfold
  implementation (kept here as the reference, also for the max relative difference), and the
  original PatchCore (amazon-science/patchcore-inspection) when ``--original SRC`` points at its
  ``src`` folder (or a checkout with ``src/patchcore``); without it those rows are skipped with
  a note;
* kNN: ``NearestNeighbourScorer`` torch and faiss against one ``torch.cdist``;
* coreset: time per pick of the greedy loop on 1 and 2 threads;
* rss (``--rss SIZE``): peak RSS of building a bank from ``--rss_images`` generated images
  square-resized to SIZE, filo (float32 and float16 features) and the original.

    python benchmarks/bench_memory.py --original /tmp/patchcore/src      # all rows
    python benchmarks/bench_memory.py --quick                            # small sizes (smoke)
    python benchmarks/bench_memory.py --only rss --rss 1024 --rss_images 20 --original ...
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reference_aggregate(features, patchsize=3, pretrain_dim=1024, target_dim=1024):
    """filo's former aggregation: unfold into C*p*p planes, upsample them, pool twice."""
    from filo.memory.patchcore import patch_grid

    pooled, ref = [], None
    batch = features[0].shape[0]
    for feat in features:
        cols = F.unfold(feat, patchsize, padding=(patchsize - 1) // 2)
        grid = patch_grid(feat.shape[-2], feat.shape[-1], patchsize)
        width = cols.shape[1]
        if ref is None:
            ref = grid
        elif grid != ref:
            planes = F.interpolate(cols.reshape(batch, width, *grid), size=ref,
                                   mode="bilinear", align_corners=False)
            cols = planes.reshape(batch, width, ref[0] * ref[1])
        rows = cols.transpose(1, 2).reshape(-1, 1, width)
        pooled.append(F.adaptive_avg_pool1d(rows, pretrain_dim).squeeze(1))
        del cols, rows
    stacked = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim).squeeze(1), ref


def load_original(src: str | None):
    """The original ``patchcore`` package from a copy of its ``src`` folder in a temp dir
    (its ``backbones`` module, which needs timm, is replaced by an empty one), or None."""
    if not src:
        return None
    src_dir = Path(src)
    if (src_dir / "src" / "patchcore").is_dir():
        src_dir = src_dir / "src"
    if not (src_dir / "patchcore" / "patchcore.py").is_file():
        return None
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="orig_patchcore_"))
    shutil.copytree(src_dir / "patchcore", tmp / "patchcore")
    (tmp / "patchcore" / "backbones.py").write_text("")  # timm-only; the model is passed in
    sys.path.insert(0, str(tmp))
    import patchcore.common
    import patchcore.patchcore
    import patchcore.sampler

    return patchcore


def original_model(pc, backbone, size: int, fraction: float):
    model = pc.patchcore.PatchCore(torch.device("cpu"))
    model.load(backbone=copy.deepcopy(backbone), layers_to_extract_from=["layer2", "layer3"],
               device=torch.device("cpu"), input_shape=(3, size, size),
               pretrain_embed_dimension=1024, target_embed_dimension=1024, patchsize=3,
               featuresampler=pc.sampler.ApproximateGreedyCoresetSampler(
                   fraction, torch.device("cpu")),
               anomaly_score_num_nn=1, nn_method=pc.common.FaissNN(False, 4))
    return model


def alternate(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each variant: one warm-up call each, then ``repeats`` rounds in which
    every variant runs once (alternated)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def wrn50():
    from filo.memory.features import build_wide_resnet

    torch.manual_seed(0)
    return build_wide_resnet("wrn50", None)


# --------------------------------------------------------------------------------------------


def filo_embedder(model, size: int):
    from filo.memory import build
    from filo.memory.config import MemoryConfig
    from filo.memory.features import WideResNetFeatures

    cfg = MemoryConfig(backbone="wrn50", resize=size, imagesize=size)
    return build.PatchEmbedder.from_network(cfg, WideResNetFeatures(model, ("layer2", "layer3")))


def features_rows(args, rows, pc) -> None:
    from filo.heap import keep_freed_pages
    from filo.memory.patchcore import aggregate

    n_img = args.images
    model = wrn50()
    emb = filo_embedder(copy.deepcopy(model), args.size)
    images = torch.randn(n_img, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))

    def backbone(bs):  # as filo's embedder runs it: channels-last, freed pages kept
        with torch.no_grad(), keep_freed_pages():
            return [emb.net(images[i:i + bs].contiguous(memory_format=emb.memory_format))
                    for i in range(0, n_img, bs)]

    maps1, maps8 = backbone(1), backbone(8)

    def agg(maps, fn):
        return lambda: [fn(list(m)) for m in maps]

    variants = {"backbone b1": lambda: backbone(1), "backbone b8": lambda: backbone(8),
                "aggregate b1": agg(maps1, aggregate), "aggregate b8": agg(maps8, aggregate),
                "former aggregate b1": agg(maps1, reference_aggregate),
                "former aggregate b8": agg(maps8, reference_aggregate)}
    orig = None
    if pc is not None:
        orig = original_model(pc, model, args.size, 0.1)
        variants["original embed b1"] = lambda: [orig._embed(images[i:i + 1])
                                                 for i in range(n_img)]
        variants["original embed b8"] = lambda: [orig._embed(images[i:i + 8])
                                                 for i in range(0, n_img, 8)]
    t = alternate(variants, args.repeats)
    got = torch.cat([aggregate(list(m))[0] for m in maps8])
    want = torch.cat([reference_aggregate([x.contiguous() for x in m])[0] for m in maps8])
    rel = float((got - want).abs().max() / want.abs().max())
    s = f"{args.size} px, {n_img} images"
    for b in (1, 8):
        total = t[f"backbone b{b}"] + t[f"aggregate b{b}"]
        former = t[f"backbone b{b}"] + t[f"former aggregate b{b}"]
        rows.append((f"features filo, batch {b} ({s})", f"{n_img / total:.2f} img/s",
                     f"backbone {1e3 * t[f'backbone b{b}'] / n_img:.0f} ms/img + aggregation "
                     f"{1e3 * t[f'aggregate b{b}'] / n_img:.1f} ms/img",
                     f"{former / total:.2f}x vs former", f"{rel:.1e}"))
        rows.append((f"features former aggregation, batch {b}", f"{n_img / former:.2f} img/s",
                     f"aggregation {1e3 * t[f'former aggregate b{b}'] / n_img:.0f} ms/img", "",
                     "-"))
    b8 = t["backbone b8"] + t["aggregate b8"]
    b1 = t["backbone b1"] + t["aggregate b1"]
    rows.append(("features filo batch 8 / batch 1 (time)", f"{b8 / b1:.2f}", "", "", "-"))
    if orig is not None:
        o_feat = np.asarray(orig._embed(images[:2]))
        f_feat = torch.cat([emb.embed(images[i:i + 1])[0] for i in range(2)])
        orel = float(np.abs(f_feat.numpy() - o_feat).max() / np.abs(o_feat).max())
        for b in (1, 8):
            to = t[f"original embed b{b}"]
            rows.append((f"features original PatchCore, batch {b}", f"{n_img / to:.2f} img/s",
                         "", f"filo {to / (t[f'backbone b{b}'] + t[f'aggregate b{b}']):.2f}x "
                         "faster", f"{orel:.1e}"))
    else:
        rows.append(("features original PatchCore", "skipped", "pass --original SRC (a copy "
                     "of patchcore-inspection's src folder)", "", "-"))


def heap_rows(args, rows) -> None:
    """Batch 1 against batch 8 at ``--heap_size`` with glibc's default malloc (every big
    activation mapped afresh and zero-filled by the kernel) and inside filo's
    ``keep_freed_pages`` (freed pages reused), with the system time each spent."""
    from filo.heap import keep_freed_pages

    emb = filo_embedder(wrn50(), args.heap_size)
    n_img = 8
    images = torch.randn(n_img, 3, args.heap_size, args.heap_size,
                         generator=torch.Generator().manual_seed(4))
    sys_time: dict[str, float] = {}

    def run(bs, kept):
        def go():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            with torch.no_grad():
                if kept:
                    with keep_freed_pages():
                        for i in range(0, n_img, bs):
                            emb.embed(images[i:i + bs])
                else:
                    for i in range(0, n_img, bs):
                        emb.embed(images[i:i + bs])
            sys_time[f"{bs} {kept}"] = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
        return go

    variants = {f"{bs} {kept}": run(bs, kept) for kept in (False, True) for bs in (1, 8)}
    t = alternate(variants, args.repeats)
    for kept in (False, True):
        label = "freed pages kept (filo)" if kept else "glibc default malloc"
        b1, b8 = t[f"1 {kept}"], t[f"8 {kept}"]
        rows.append((f"features {args.heap_size} px, {label}", f"batch 1 {1e3 * b1 / n_img:.0f} "
                     f"ms/img, batch 8 {1e3 * b8 / n_img:.0f} ms/img",
                     f"system time {sys_time[f'1 {kept}']:.1f} s / {sys_time[f'8 {kept}']:.1f} s",
                     f"batch 8 / batch 1 {b8 / b1:.2f}", "-"))


def knn_rows(args, rows) -> None:
    from filo.memory.patchcore import NearestNeighbourScorer, faiss_available

    gen = torch.Generator().manual_seed(2)
    bank = torch.randn(args.bank, 1024, generator=gen)
    queries = torch.randn(args.queries, 1024, generator=gen)
    backends = ["torch"] + (["faiss"] if faiss_available() else [])
    scorers = {b: NearestNeighbourScorer(bank, k=1, backend=b, device="cpu") for b in backends}
    results = {}
    variants = {f"{b}": (lambda b=b: results.__setitem__(b, scorers[b].scores(queries)))
                for b in backends}
    variants["cdist"] = lambda: results.__setitem__(
        "cdist", torch.cdist(queries, bank).pow(2).min(1).values.numpy())
    t = alternate(variants, args.repeats)
    ref = results["cdist"]
    for b in backends:
        diff = float(np.max(np.abs(results[b] - ref) / np.maximum(ref, 1e-12)))
        rows.append((f"kNN {b}: {len(queries):,} queries, bank {len(bank):,} x 1,024",
                     f"{len(queries) / t[b]:,.0f} q/s",
                     f"torch.cdist {len(queries) / t['cdist']:,.0f} q/s",
                     f"{t['cdist'] / t[b]:.2f}x vs cdist", f"{diff:.1e}"))


def coreset_rows(args, rows) -> None:
    from filo.memory.patchcore import approximate_greedy_coreset

    feats = torch.randn(args.n, 1024, generator=torch.Generator().manual_seed(3))
    frac = args.fraction
    picks = int(args.n * frac)
    import filo.memory.patchcore as pcm

    real = pcm._pick_threads

    def run(threads):
        def go():
            if threads == 2:  # the loop on the caller's (2) threads instead of one
                import contextlib

                pcm._pick_threads = lambda device: contextlib.nullcontext()
            before = torch.get_num_threads()
            torch.set_num_threads(2)
            try:
                approximate_greedy_coreset(feats, frac, seed=0)
            finally:
                pcm._pick_threads = real
                torch.set_num_threads(before)
        return go

    t = alternate({"1 thread": run(1), "2 threads": run(2)}, args.repeats)
    rows.append((f"coreset {args.n:,} x 1,024 -> {picks:,} picks, loop on 1 thread",
                 f"{t['1 thread']:.2f} s", f"2 threads {t['2 threads']:.2f} s",
                 f"{t['2 threads'] / t['1 thread']:.2f}x", "-"))


# --------------------------------------------------------------------------------------------
# peak RSS of one bank build (run in a fresh process per variant)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(impl: str, size: int, n: int, src: str | None, fraction: float) -> dict:
    from PIL import Image

    from filo.memory.config import MemoryConfig
    from filo.memory.transforms import patchcore_tensor

    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
           for _ in range(min(n, 4))]
    cfg = MemoryConfig(backbone="wrn50", no_crop=True, imagesize=size, coreset=fraction,
                       feature_dtype="float16" if impl == "filo16" else "float32")
    base = peak_rss_mb()
    start = time.perf_counter()
    if impl.startswith("filo"):
        from filo.memory import build
        from filo.memory.features import WideResNetFeatures

        emb = build.PatchEmbedder.from_network(
            cfg, WideResNetFeatures(wrn50(), ("layer2", "layer3")))
        base = peak_rss_mb()
        start = time.perf_counter()
        per_batch = build.images_per_batch(cfg, 8)
        buf = build.FeatureBuffer(n, build.feature_dtype(cfg))
        for i in range(0, n, per_batch):
            buf.embed(emb, torch.stack([emb.preprocess(pil[j % len(pil)])
                                        for j in range(i, min(n, i + per_batch))]))
        t_feat = time.perf_counter() - start
        feat_rss = peak_rss_mb()
        bank = build._coreset(buf.result().reshape(-1, buf.data.shape[-1]), cfg,
                              torch.device("cpu"))
        rows_n = int(bank.shape[0])
    else:
        pc = load_original(src)
        model = original_model(pc, wrn50(), size, fraction)
        base = peak_rss_mb()
        start = time.perf_counter()
        data = [torch.stack([patchcore_tensor(pil[j % len(pil)], size, size, crop=False)])
                for j in range(n)]
        feats = [model._embed(x) for x in data]
        t_feat = time.perf_counter() - start
        feat_rss = peak_rss_mb()
        feats = np.concatenate(feats, axis=0)
        rows_n = len(model.featuresampler.run(feats))
    return {"impl": impl, "n": n, "size": size, "t_features": t_feat,
            "t_total": time.perf_counter() - start, "rss_features_mb": feat_rss,
            "rss_peak_mb": peak_rss_mb(), "rss_start_mb": base, "bank_rows": rows_n}


def rss_rows(args, rows) -> None:
    impls = ["filo", "filo16"] + (["original"] if load_original(args.original) else [])
    results = {}
    for impl in impls:
        cmd = [sys.executable, __file__, "--rss_child", impl, "--rss", str(args.rss),
               "--rss_images", str(args.rss_images), "--fraction", str(args.rss_fraction)]
        if args.original:
            cmd += ["--original", args.original]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
            rows.append((f"rss {impl}", "failed", last, "", "-"))
            continue
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    for impl, r in results.items():
        ratio = ""
        if "original" in results and impl != "original":
            ratio = f"{r['rss_peak_mb'] / results['original']['rss_peak_mb']:.2f}x of original"
        rows.append((f"build peak RSS {impl}: {r['n']} images 1600x1200 -> {r['size']} px",
                     f"{r['rss_peak_mb']:,.0f} MB",
                     f"after features {r['rss_features_mb']:,.0f} MB, start "
                     f"{r['rss_start_mb']:,.0f} MB; features {r['t_features']:.0f} s, total "
                     f"{r['t_total']:.0f} s, {r['bank_rows']:,} rows", ratio, "-"))
    if "original" not in results:
        rows.append(("build peak RSS original", "skipped", "pass --original SRC", "", "-"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (the suite's smoke test)")
    p.add_argument("--only", nargs="*", choices=("features", "heap", "knn", "coreset", "rss"))
    p.add_argument("--heap_size", type=int, default=512, help="input size of the heap rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=None, help="images timed (default 16)")
    p.add_argument("--size", type=int, default=224, help="feature-extraction input size")
    p.add_argument("--n", type=int, default=None, help="coreset input rows (default 100,000)")
    p.add_argument("--fraction", type=float, default=0.002, help="coreset fraction timed")
    p.add_argument("--bank", type=int, default=None, help="bank rows of the kNN rows")
    p.add_argument("--queries", type=int, default=None, help="kNN queries")
    p.add_argument("--original", default=None, help="patchcore-inspection's src folder")
    p.add_argument("--rss", type=int, default=None, help="RSS rows at this input size")
    p.add_argument("--rss_images", type=int, default=20)
    p.add_argument("--rss_fraction", type=float, default=0.001)
    p.add_argument("--rss_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.rss, args.rss_images, args.original,
                                   args.fraction)))
        return 0
    args.images = args.images or (8 if args.quick else 16)
    args.n = args.n or (4_000 if args.quick else 100_000)
    args.bank = args.bank or (2_000 if args.quick else 20_000)
    args.queries = args.queries or (1_000 if args.quick else 12_544)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.heap_size = min(args.heap_size, 128)
    only = set(args.only or ("features", "heap", "knn", "coreset", "rss"))
    if args.rss is None:
        only.discard("rss")
    pc = load_original(args.original) if "features" in only else None
    rows: list[tuple] = []
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} alternated runs after a warm-up", flush=True)
    if "features" in only:
        features_rows(args, rows, pc)
    if "heap" in only:
        heap_rows(args, rows)
    if "knn" in only:
        knn_rows(args, rows)
    if "coreset" in only:
        coreset_rows(args, rows)
    if "rss" in only:
        rss_rows(args, rows)
    print("| step | filo | detail | ratio | max rel diff |")
    print("| --- | --- | --- | --- | ---: |")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
