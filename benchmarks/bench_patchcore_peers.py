"""PatchCore side by side: filo, the original patchcore-inspection and anomalib's PatchCore.

One process, the same CPU, the same preprocessed images (generated parts, resize 256, centre
crop 224) and the same seeded WideResNet-50-2 weights (timing only). Every variant runs once as
a warm-up, then ``--repeats`` rounds alternate the three implementations; the tables give
medians and ratios.

* **bank build** (features of ``--train`` images + coreset) at each ``--fractions`` (default
  10 % and 1 %), each implementation with its own defaults: filo batches by
  ``--batch_memory_mb`` (8 at 224 px), the original its run's batch size 2, anomalib its
  train batch size 32;
* **scoring per image** (``--test`` images one at a time against the 10 % bank; filo's
  scoring runs the network in channels-last layout, its bank builds by default not): features,
  nearest-neighbour search, map upsampling and smoothing, image score;
* **equality**: filo with ``--coreset_rng original`` against the original: features, bank rows
  (overlap), maps and image scores. anomalib's PatchCore is a different variant (1,536-d
  features: layer2 and upsampled layer3 concatenated, without the adaptive average pooling to
  1,024; no BatchNorm probe; 9-neighbour reweighted image score), so its maps are not compared;
* **ceiling**: this CPU's measured float32 matrix-product rate (``torch.mm`` 4096 x 4096) and
  copy bandwidth, against the work each step does: the backbone's counted FLOPs per image,
  the kNN's ``2 x P x M x D``, the coreset pick loop's bytes per pick.

The original is not part of filo: pass its ``src`` folder (a checkout of
github.com/amazon-science/patchcore-inspection; it needs faiss, e.g. faiss-cpu); anomalib is
filo's ``anomalib`` extra. Either missing: its rows are skipped with a note.

    python benchmarks/bench_patchcore_peers.py --original /path/to/patchcore-inspection/src
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SEED = 0


def median_times(variants: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds per variant (one warm-up call each, then alternated rounds) and each
    variant's last return value."""
    out = {k: fn() for k, fn in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, out


# ---- inputs -------------------------------------------------------------------------------


def make_inputs(n_train: int, n_test: int, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    from filo.data.layouts import load_split
    from filo.data.synthetic import make_mvtec_like
    from filo.memory.transforms import patchcore_tensor

    make_mvtec_like(work / "data", classes=("part",), n_train_good=n_train, n_test_good=n_test // 2,
                    n_test_defect=n_test - n_test // 2, size=(256, 256), seed=0)

    def tensors(split):
        samples = load_split(work / "data", "mvtec", split, ["part"])["part"]
        return torch.stack([patchcore_tensor(Image.open(work / "data" / s.img_path), 256, 224)
                            for s in samples])

    return tensors("train")[:n_train], tensors("test")[:n_test]


def seeded_weights(work: Path) -> Path:
    from filo.memory.features import build_wide_resnet

    torch.manual_seed(SEED)
    path = work / "wide_resnet50_2_seeded.pth"
    torch.save(build_wide_resnet("wrn50", None).state_dict(), path)
    return path


# ---- filo -----------------------------------------------------------------------------------


class Filo:
    name = "filo"

    def __init__(self, weights: Path) -> None:
        from filo.memory.build import PatchEmbedder
        from filo.memory.config import MemoryConfig

        self.cfg = MemoryConfig(backbone="wrn50", weights=str(weights), coreset_rng="original")
        self.embedder = PatchEmbedder(self.cfg, device="cpu")  # as bank builds run it
        self.scoring = PatchEmbedder(self.cfg, device="cpu", channels_last=True)  # as scoring
        self.bank = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        from filo.heap import keep_freed_pages

        with keep_freed_pages():  # as filo's bank builds run
            return self._features(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        from filo.memory.build import FeatureBuffer, feature_dtype, images_per_batch

        per_batch = images_per_batch(self.cfg, 8, "cpu")
        buf = FeatureBuffer(len(images), feature_dtype(self.cfg))
        for i in range(0, len(images), per_batch):
            buf.embed(self.embedder, images[i:i + per_batch])
        return buf.result().reshape(-1, buf.data.shape[-1])

    def build(self, images: torch.Tensor, fraction: float) -> np.ndarray:
        from filo.heap import keep_freed_pages
        from filo.memory.patchcore import approximate_greedy_coreset

        with keep_freed_pages():  # as filo's bank builds run
            rows = self._features(images)
            idx = approximate_greedy_coreset(rows, fraction, seed=SEED, rng="original",
                                             arch="wrn50")
            return rows[idx].numpy().copy()

    def use_bank(self, bank: np.ndarray) -> None:
        from filo.memory.patchcore import NearestNeighbourScorer

        self.bank = NearestNeighbourScorer(torch.from_numpy(bank), k=1, backend="auto")

    def score(self, image: torch.Tensor) -> tuple[np.ndarray, float]:
        from filo.heap import keep_freed_pages
        from filo.memory.build import score_features

        with keep_freed_pages():
            rows, grid = self.scoring.embed(image[None])
            res = score_features(rows[None], self.bank, grid, self.cfg)
        return res.maps[0], float(res.scores[0])


# ---- the original ---------------------------------------------------------------------------


class Original:
    name = "original"

    def __init__(self, src: Path, weights: Path) -> None:
        from bench_memory import load_original

        self.pc = load_original(str(src))
        if self.pc is None:
            raise FileNotFoundError(f"{src} holds no patchcore/patchcore.py")
        self.weights = weights
        self.model = self._model(0.1)

    def _model(self, fraction: float):
        import torchvision

        pc = self.pc
        backbone = torchvision.models.wide_resnet50_2(weights=None)
        backbone.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True))
        model = pc.patchcore.PatchCore(torch.device("cpu"))
        model.load(backbone=backbone, layers_to_extract_from=["layer2", "layer3"],
                   device=torch.device("cpu"), input_shape=(3, 224, 224),
                   pretrain_embed_dimension=1024, target_embed_dimension=1024, patchsize=3,
                   featuresampler=pc.sampler.ApproximateGreedyCoresetSampler(
                       fraction, torch.device("cpu")),
                   anomaly_score_num_nn=1,
                   nn_method=pc.common.FaissNN(False, torch.get_num_threads()))
        return model

    def features(self, images: torch.Tensor) -> np.ndarray:
        return np.concatenate([self.model._embed(images[i:i + 2])
                               for i in range(0, len(images), 2)])

    def build(self, images: torch.Tensor, fraction: float) -> np.ndarray:
        from filo.memory.original_rng import _projection_state

        self.model.featuresampler.percentage = fraction
        # the original run's generator state at this point (seed 0): filo replays the same
        torch.set_rng_state(_projection_state(SEED, "wrn50"))
        np.random.seed(SEED)
        batches = [images[i:i + 2] for i in range(0, len(images), 2)]  # its batch size 2
        self.model.fit(batches)
        return np.asarray(self.model.anomaly_scorer.detection_features).copy()

    def use_bank(self, bank: np.ndarray) -> None:
        self.model.anomaly_scorer.fit(detection_features=[bank])

    def score(self, image: torch.Tensor) -> tuple[np.ndarray, float]:
        scores, masks = self.model._predict(image[None])
        return np.asarray(masks[0]), float(scores[0])


# ---- anomalib -------------------------------------------------------------------------------


class Anomalib:
    name = "anomalib"

    def __init__(self, weights: Path) -> None:
        import warnings

        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        from filo.baselines.backend import load_backbone_weights, no_downloads

        warnings.filterwarnings("ignore", module="anomalib")
        with no_downloads():
            self.model = PatchcoreModel(layers=["layer2", "layer3"], backbone="wide_resnet50_2",
                                        pre_trained=False, num_neighbors=9)
        load_backbone_weights(self.model, weights)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        self.model.train()
        self.model.embedding_store.clear()
        with torch.no_grad():
            for i in range(0, len(images), 32):  # its train batch size
                self.model(images[i:i + 32])
        return torch.vstack(self.model.embedding_store)

    def build(self, images: torch.Tensor, fraction: float) -> np.ndarray:
        self.model.train()
        self.model.embedding_store.clear()
        with torch.no_grad():
            for i in range(0, len(images), 32):
                self.model(images[i:i + 32])
            torch.manual_seed(SEED)
            self.model.subsample_embedding(fraction)
        return self.model.memory_bank.numpy().copy()

    def use_bank(self, bank: np.ndarray) -> None:
        self.model.memory_bank = torch.from_numpy(bank)

    def score(self, image: torch.Tensor) -> tuple[np.ndarray, float]:
        self.model.eval()
        with torch.no_grad():
            out = self.model(image[None])
        return out.anomaly_map[0, 0].numpy(), float(out.pred_score[0])


# ---- the CPU's ceiling --------------------------------------------------------------------------


def gemm_gflops(n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


def conv_gflops(repeats: int = 5) -> float:
    """oneDNN's rate on the backbone's typical convolution (3x3, 512 -> 512 channels, 28 x 28,
    batch 8, channels-last): on CPUs where MKL's sgemm is not the fastest kernel this is the
    higher ceiling."""
    import torch.nn.functional as F

    x = torch.randn(8, 512, 28, 28).contiguous(memory_format=torch.channels_last)
    w = torch.randn(512, 512, 3, 3).contiguous(memory_format=torch.channels_last)
    F.conv2d(x, w, padding=1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        F.conv2d(x, w, padding=1)
        times.append(time.perf_counter() - start)
    return 2 * 8 * 512 * 28 * 28 * 512 * 9 / min(times) / 1e9


def copy_gbps(mb: int = 512, repeats: int = 5) -> float:
    a = torch.empty(mb << 18)
    b = torch.empty_like(a)
    a.fill_(1)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - start)
    return 2 * a.numel() * 4 / min(times) / 1e9  # bytes read + written


def backbone_gflop(embedder) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, 224, 224).contiguous(memory_format=embedder.memory_format)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        embedder.net(x)
    return counter.get_total_flops() / 1e9


# ---- main -------------------------------------------------------------------------------------


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def matched(bank: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(fraction of ``bank``'s rows that are rows of ``ref`` -- nearest row within 1e-4 of the
    largest row norm --, max distance of a row to its nearest ``ref`` row / that norm)."""
    b, r = torch.from_numpy(bank).double(), torch.from_numpy(ref).double()
    d = torch.cdist(b, r).min(1).values / r.norm(dim=1).max()
    return float((d <= 1e-4).double().mean()), float(d.max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--original", default=None, help="patchcore-inspection's src folder")
    p.add_argument("--train", type=int, default=40, help="bank images (default 40)")
    p.add_argument("--test", type=int, default=10, help="images scored (default 10)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_anomalib", action="store_true", help="skip anomalib's rows")
    args = p.parse_args()

    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    train, test = make_inputs(args.train, args.test, work)
    weights = seeded_weights(work)
    impls = [Filo(weights)]
    notes = []
    if args.original:
        impls.append(Original(Path(args.original), weights))
    else:
        notes.append("original PatchCore skipped: pass --original SRC")
    if not args.no_anomalib:
        try:
            impls.append(Anomalib(weights))
        except ImportError as err:
            notes.append(f"anomalib skipped ({err}): pip install 'filo[anomalib]'")
    names = [i.name for i in impls]
    torch.set_num_threads(threads)  # importing the original's modules (faiss) changes it
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; {args.train} bank "
          f"images, {args.test} scored, 224 px; median of {args.repeats} alternated rounds "
          f"after a warm-up", flush=True)

    builds: dict[float, dict[str, float]] = {}
    banks: dict[float, dict[str, np.ndarray]] = {}
    for frac in args.fractions:
        t, out = median_times({i.name: (lambda i=i, frac=frac: i.build(train, frac)) for i in impls},
                              args.repeats)
        builds[frac], banks[frac] = t, out
        print(f"# bank build {frac:g}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()),
              flush=True)
    score_bank = 0.1 if 0.1 in banks else args.fractions[0]
    for i in impls:
        i.use_bank(banks[score_bank][i.name])

    def score_all(i):
        return [i.score(x) for x in test]

    t_score, scored = median_times({i.name: (lambda i=i: score_all(i)) for i in impls},
                                   args.repeats)
    t_feat, feats = median_times({i.name: (lambda i=i: i.features(train)) for i in impls},
                                 args.repeats)

    def fastest_peer(times):
        peers = {k: v for k, v in times.items() if k != "filo"}
        return min(peers.items(), key=lambda kv: kv[1]) if peers else None

    print("\n| step | " + " | ".join(names) + " | filo vs faster peer |")
    print("| --- |" + " ---: |" * len(names) + " --- |")

    def row(label, times, fmt):
        peer = fastest_peer(times)
        ratio = f"{peer[1] / times['filo']:.2f}x ({peer[0]})" if peer else "-"
        print(f"| {label} | " + " | ".join(fmt(times[n]) for n in names) + f" | {ratio} |")

    row(f"features, {args.train} images", t_feat, lambda s: f"{args.train / s:.2f} img/s")
    for frac in args.fractions:
        row(f"bank build at {frac:.0%} (features + coreset)", builds[frac],
            lambda s: f"{s:.2f} s")
    row(f"scoring per image (against the {score_bank:.0%} bank)", t_score,
        lambda s: f"{1e3 * s / args.test:.0f} ms")

    if "original" in names:
        f_maps = np.stack([m for m, _ in scored["filo"]])
        o_maps = np.stack([m for m, _ in scored["original"]])
        print("\n| filo against the original | max rel diff |")
        print("| --- | ---: |")
        print(f"| features ({args.train} images) | {rel(feats['filo'], feats['original']):.1e} |")
        for frac in args.fractions:
            ov, dist = matched(banks[frac]["filo"], banks[frac]["original"])
            print(f"| bank at {frac:.0%}: {len(banks[frac]['filo']):,} vs "
                  f"{len(banks[frac]['original']):,} rows, overlap {ov:.1%} (row to nearest "
                  f"row) | {dist:.1e} |")
        print(f"| maps (x max) | {rel(f_maps, o_maps):.1e} |")
        print(f"| image scores | {rel([s for _, s in scored['filo']], [s for _, s in scored['original']]):.1e} |")

    # the CPU's ceiling against the work done
    mm, conv, bw = gemm_gflops(), conv_gflops(), copy_gbps()
    gemm = max(mm, conv)
    flop = backbone_gflop(impls[0].embedder)
    per_img = t_feat["filo"] / args.train
    n_rows = feats["filo"].shape[0]
    p_img = n_rows // args.train
    m_rows = len(banks[score_bank]["filo"])
    knn_gflop = 2 * p_img * m_rows * 1024 / 1e9
    print(f"\n| ceiling {gemm:.0f} GFLOP/s (torch.mm 4096^2 {mm:.0f}, oneDNN 3x3 convolution "
          f"{conv:.0f}); copy {bw:.1f} GB/s | work | filo | share of ceiling |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| backbone + aggregation per image | {flop:.2f} GFLOP | {1e3 * per_img:.0f} ms = "
          f"{flop / per_img:.0f} GFLOP/s | {flop / per_img / gemm:.0%} |")
    print(f"| the same at the ceiling | | {1e3 * flop / gemm:.0f} ms | |")
    for name in names[1:]:
        peer = t_feat[name] / args.train
        print(f"| {name} features per image | | {1e3 * peer:.0f} ms: at most "
              f"{peer / (flop / gemm):.2f}x is possible at the ceiling | |")
    from filo.memory.build import score_features

    filo = impls[0]
    test_rows = [filo.scoring.embed(x[None]) for x in test]
    t_knn = median_times({"knn": lambda: [score_features(r[None], filo.bank, g, filo.cfg)
                                          for r, g in test_rows]}, args.repeats)[0]["knn"]
    t_knn /= args.test
    print(f"| kNN + map per image ({p_img:,} x {m_rows:,} x 1,024) | {knn_gflop:.2f} GFLOP | "
          f"{1e3 * t_knn:.0f} ms = {knn_gflop / t_knn:.0f} GFLOP/s | {knn_gflop / t_knn / gemm:.0%} |")
    pick_bytes = n_rows * 128 * 4 * 2
    print(f"| coreset pick ({n_rows:,} x 128 projected rows) | {pick_bytes / 1e6:.0f} MB moved "
          f"| {1e3 * pick_bytes / (bw * 1e9):.2f} ms at the copy rate | |")
    for n in notes:
        print(f"\n{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
