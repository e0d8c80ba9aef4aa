"""Memory-bank (PatchCore) speed: feature extraction, coreset selection, nearest neighbours.

Every row is timed in this one run next to a straightforward implementation of the same step,
so the README can state ratios:

* features: ``PatchEmbedder.embed`` on batches of 8 vs the same code image by image
  (WideResNet-50-2 with random weights at 224 px: timing only);
* coreset: ``approximate_greedy_coreset`` (128-d projection, chunked) vs a full greedy coreset
  in the original 1,024 dimensions, on N x 1,024 random features;
* nearest neighbours: ``NearestNeighbourScorer`` with faiss and with torch vs ``torch.cdist``
  against the whole bank at once, for a bank of M x 1,024 and 8 images of 28 x 28 patches;
* bank memory: bytes of the bank matrix.

    python benchmarks/bench_memory.py              # N = 200,000, M = 20,000 (a few minutes)
    python benchmarks/bench_memory.py --quick      # small sizes (the suite's smoke test)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def timed(fn, repeats: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def full_greedy(features: torch.Tensor, n_pick: int, start: int = 0) -> list[int]:
    """The straightforward greedy k-center: exact distances in the full dimension."""
    picks = [start]
    dist = torch.cdist(features, features[start:start + 1]).squeeze(1)
    for _ in range(n_pick - 1):
        i = int(torch.argmax(dist))
        picks.append(i)
        dist = torch.minimum(dist, torch.cdist(features, features[i:i + 1]).squeeze(1))
    return picks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=None, help="coreset input rows (default 200,000)")
    p.add_argument("--fraction", type=float, default=0.01, help="coreset fraction timed")
    p.add_argument("--bank", type=int, default=None, help="bank rows for the kNN rows")
    args = p.parse_args()
    torch.manual_seed(0)
    n = args.n or (4_000 if args.quick else 200_000)
    m = args.bank or (2_000 if args.quick else 20_000)
    n_img = 4 if args.quick else 16
    rows = []

    from filo.memory.build import PatchEmbedder
    from filo.memory.config import MemoryConfig
    from filo.memory.patchcore import NearestNeighbourScorer, approximate_greedy_coreset

    # features
    cfg = MemoryConfig(backbone="wrn50")
    embedder = PatchEmbedder.__new__(PatchEmbedder)
    from filo.memory.features import WideResNetFeatures, build_wide_resnet

    embedder.cfg, embedder.device = cfg, torch.device("cpu")
    embedder.net = WideResNetFeatures(build_wide_resnet("wrn50", None), ("layer2", "layer3"))
    images = torch.randn(n_img, 3, 224, 224)
    t_batch, _ = timed(lambda: [embedder.embed(images[i:i + 8]) for i in range(0, n_img, 8)])
    t_loop, _ = timed(lambda: [embedder.embed(images[i:i + 1]) for i in range(n_img)])
    rows.append(("features (WRN50, 224 px)", f"{n_img / t_batch:.2f} img/s",
                 f"{n_img / t_loop:.2f} img/s (per image)", t_loop / t_batch))

    # coreset
    feats = torch.randn(n, 1024)
    k = int(n * args.fraction)
    t_fast, idx = timed(lambda: approximate_greedy_coreset(feats, args.fraction, seed=0))
    probe = min(k, 50)  # the straightforward greedy is timed on its first picks, then scaled
    t_probe, _ = timed(lambda: full_greedy(feats, probe))
    t_slow = t_probe * k / probe
    rows.append((f"coreset {n:,} x 1,024 -> {k:,}", f"{t_fast:.1f} s",
                 f"{t_slow:.1f} s (full-dimension greedy; {probe} picks timed, scaled)",
                 t_slow / t_fast))

    # nearest neighbours
    bank = torch.randn(m, 1024)
    queries = torch.randn(n_img * 784, 1024)
    results = {}
    for backend in ("faiss", "torch"):
        scorer = NearestNeighbourScorer(bank, k=1, backend=backend)
        t, results[backend] = timed(lambda s=scorer: s.scores(queries), repeats=2)
        results[backend + "_t"] = t
    t_cdist, ref = timed(lambda: torch.cdist(queries, bank).pow(2).min(1).values.numpy(),
                         repeats=2)
    for backend in ("faiss", "torch"):
        diff = float(np.max(np.abs(results[backend] - ref) / np.maximum(ref, 1e-12)))
        rows.append((f"kNN {backend}: {len(queries):,} queries, bank {m:,} x 1,024",
                     f"{len(queries) / results[backend + '_t']:,.0f} q/s",
                     f"{len(queries) / t_cdist:,.0f} q/s (torch.cdist, whole bank)",
                     t_cdist / results[backend + "_t"], diff))
    rows.append((f"bank memory, {m:,} x 1,024 float32", f"{bank.numel() * 4 / 2**20:.0f} MB",
                 "", 1.0))

    print("| step | filo | straightforward | ratio | max rel diff |")
    print("| --- | --- | --- | ---: | ---: |")
    for r in rows:
        diff = f"{r[4]:.1e}" if len(r) > 4 else "-"
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f}x | {diff} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
