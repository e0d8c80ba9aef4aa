"""Time filo.metrics on random blob masks / maps of 518 x 518 (N = 10 and 100 images).

Run: .venv/bin/python benchmarks/bench_metrics.py [--sizes 10 100] [--sklearn]
Prints seconds per metric (one class) and the peak extra memory of exact AUPRO in bytes per
pixel (tracemalloc; numpy reports its buffers to it). No assertions: informational only.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from scipy import ndimage

from filo import metrics

SIZE = 518


def make_class(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    maps = np.empty((n, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        small = ndimage.gaussian_filter(rng.normal(size=(SIZE // 8, SIZE // 8)), 2.0)
        field = ndimage.zoom(small, SIZE / small.shape[0], order=1)[:SIZE, :SIZE]
        if i % 3:  # two anomalous images out of three
            masks[i] = field > np.quantile(field, 0.97)
        noise = ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), 3.0) * 8.0
        maps[i] = 1.0 / (1.0 + np.exp(-(2.0 * masks[i] + noise - 1.0)))
    return masks, maps


def timed(fn, *args) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--sklearn", action="store_true", help="also time sklearn AUROC / AP")
    args = parser.parse_args()

    funcs = {
        "pixel_auroc": metrics.pixel_auroc,
        "pixel_ap": metrics.pixel_ap,
        "pixel_f1_max": metrics.pixel_f1_max,
        "aupro": metrics.aupro,
        "aupro_legacy": metrics.aupro_legacy,
        "pixel_metrics (all)": metrics.pixel_metrics,
    }
    if args.sklearn:
        from sklearn.metrics import average_precision_score, roc_auc_score

        funcs["sklearn roc_auc_score"] = lambda m, a: roc_auc_score(m.ravel(), a.ravel())
        funcs["sklearn average_precision"] = lambda m, a: average_precision_score(
            m.ravel(), a.ravel()
        )

    rows = []
    for n in args.sizes:
        masks, maps = make_class(n)
        n_regions = sum(ndimage.label(m, np.ones((3, 3)))[1] for m in masks)
        print(f"N={n}: {masks.size / 1e6:.1f} M pixels, {n_regions} regions", flush=True)
        for name, fn in funcs.items():
            seconds, value = timed(fn, masks, maps)
            shown = value if isinstance(value, float) else value["aupro"]
            rows.append((name, n, seconds, shown))
            print(f"  {name:<26s} {seconds:7.2f} s   value {shown:.4f}", flush=True)
        tracemalloc.start()
        metrics.aupro(masks, maps)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(
            f"  aupro peak extra memory: {peak / 2**20:.0f} MiB = {peak / masks.size:.1f} B/pixel"
        )

    print()
    print(f"{'metric':<26s}" + "".join(f"{f'N={n} (s)':>12s}" for n in args.sizes))
    for name in funcs:
        cells = [f"{s:12.2f}" for (r, _, s, _) in rows if r == name]
        print(f"{name:<26s}" + "".join(cells))


if __name__ == "__main__":
    main()
